"""``tokenring plan`` (rank every strategy by predicted time) and ``tokenring calibrate``
(measure this machine into a topology file): docs/scaling.md."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table
from rich.text import Text

import tokenring as tr
from tokenring.planner import PlanReport, calibrate_command, load_topology, preset_names

from .argtypes import DTYPE_HELP, DTYPE_METAVAR, dtype_name, positive_int

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "USP_NAMING",
    "add_calibrate_parser",
    "add_plan_parser",
    "plot_plan_timelines",
    "run_calibrate",
    "run_plan",
]


USP_NAMING = (
    "usp-UxR: Ulysses over U ranks inside each of R groups, TokenRing across the groups; "
    "usp-UxR-ring: the pass-KV ring across them instead of TokenRing"
)


def document_lengths(text: str) -> list[int]:
    """``--documents``: ``LENGTH`` or ``LENGTHxCOUNT`` items, comma-separated."""
    lengths: list[int] = []
    for item in text.split(","):
        length, times_given, count = item.strip().partition("x")
        try:
            n, times = int(length), int(count) if times_given else 1
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{item!r} is not LENGTH or LENGTHxCOUNT (e.g. 512x16,57344)"
            ) from None
        if n < 1 or times < 1:
            raise argparse.ArgumentTypeError(f"{item!r}: lengths and counts must be positive")
        lengths += [n] * times
    return lengths


def window_pair(text: str) -> tuple[int, int]:
    """``--window``: ``LEFT,RIGHT``."""
    try:
        left, right = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not LEFT,RIGHT (e.g. 4095,0)") from None
    return left, right


@contextmanager
def _progress() -> Iterator[Callable | None]:
    """A line on stderr that counts the candidates done while the planner works (a
    terminal only; a plan at 1,024 GPUs with ``--exhaustive`` takes minutes)."""
    if not sys.stderr.isatty():
        yield None
        return
    done = 0
    with Console(stderr=True).status("tokenring plan: simulating candidates") as status:

        def tell(c) -> None:
            nonlocal done
            done += 1
            what = "refused" if c.refused else "bounded" if c.at_least_ms is not None else (
                f"{c.predicted_ms:.3f} ms"
            )  # fmt: skip
            status.update(f"tokenring plan: {done} candidates done (last: {c.name}, {what})")

        yield tell


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity where the platform says)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def add_plan_parser(sub) -> None:
    """The ``plan`` subcommand's options (every one with its help and default)."""
    p = sub.add_parser(
        "plan",
        help="rank every strategy for one call by predicted time",
        description="Rank every strategy for one attention call by predicted time. "
        + USP_NAMING
        + ".",
    )
    p.add_argument(
        "--topology",
        required=True,
        help=f"(required) a preset ({', '.join(preset_names())}) or a topology file",
    )
    p.add_argument(
        "--gpus", type=positive_int, required=True, help="(required) devices the sequence spans"
    )
    p.add_argument(
        "--seq", type=positive_int, required=True, help="(required) global sequence length"
    )
    p.add_argument("--heads-q", type=positive_int, required=True, help="(required) query heads")
    p.add_argument(
        "--heads-kv", type=positive_int, required=True, help="(required) key/value heads"
    )
    p.add_argument(
        "--head-dim", type=positive_int, required=True, help="(required) dimension of a head"
    )
    p.add_argument(
        "--batch", type=positive_int, default=1, help="sequences per call (default: %(default)s)"
    )
    p.add_argument(
        "--causal", action="store_true", help="causal mask (default: off, full attention)"
    )
    p.add_argument(
        "--backward",
        action="store_true",
        help="forward + backward, as in training (default: off, forward only)",
    )
    p.add_argument(
        "--dtype",
        type=dtype_name,
        default="bfloat16",
        metavar=DTYPE_METAVAR,
        help=f"{DTYPE_HELP} (default: %(default)s)",
    )
    p.add_argument(
        "--layout",
        choices=["contiguous", "zigzag"],
        default=None,
        help="default: zigzag when causal, else contiguous",
    )
    p.add_argument(
        "--documents",
        type=document_lengths,
        default=None,
        metavar="LENGTHS",
        help="lengths of documents packed in the sequence, adding up to --seq: "
        "comma-separated, each LENGTH or LENGTHxCOUNT (e.g. 512x16,57344); without "
        "--layout both layouts are priced (default: one document)",
    )
    p.add_argument(
        "--window",
        type=window_pair,
        default=None,
        metavar="LEFT,RIGHT",
        help="a sliding window as window_size: query i sees keys i-LEFT..i+RIGHT, -1 "
        "unbounded (default: none)",
    )
    p.add_argument(
        "--json", action="store_true", help="print one JSON object instead (default: a table)"
    )
    p.add_argument(
        "--timeline",
        default=None,
        metavar="PNG",
        help="also draw the predicted per-step timelines of the four fastest here, each pass "
        "asked for, in the format of the measured ones (tokenring bench) (default: none)",
    )
    p.add_argument(
        "--exhaustive",
        action="store_true",
        help="simulate every candidate (default: a large one whose single rank already takes "
        "longer than the fastest is shown with that bound, '>= ms', instead)",
    )
    p.add_argument(
        "--workers",
        type=positive_int,
        default=usable_cpus(),
        help="processes that simulate the candidates side by side (default: the CPUs this "
        "process may use, here %(default)s)",
    )


def _table(report: PlanReport) -> Table:
    """The ranking as a table; its caption says how the USP candidates are named."""
    table = Table(
        title=f"tokenring plan: {report.world} x {report.topology}, S={report.call.seq_len}",
        caption=USP_NAMING if any(c.name.startswith("usp-") for c in report.candidates) else None,
    )
    for column in (
        "strategy",
        "predicted ms",
        "compute ms",
        "exposed comm ms",
        "host ms",
        "dominant",
        "slowest step (ms: compute / exposed comm)",
    ):
        table.add_column(column, justify="left" if column in ("strategy", "dominant") else "right")
    for c in report.candidates:
        if c.refused:
            table.add_row(Text(c.name), "refused", "", "", "", "", Text(c.refused))
            continue
        if c.at_least_ms is not None:
            why = "not simulated: one of its ranks alone takes longer than the choice"
            table.add_row(Text(c.name), f">= {c.at_least_ms:.3f}", "", "", "", "", Text(why))
            continue
        steps = [s for _, p in c.passes for s in p.steps]
        worst = max(steps, key=lambda s: s.ms)
        table.add_row(
            Text(c.name),
            f"{c.predicted_ms:.3f}",
            f"{c.term_ms('compute'):.3f}",
            f"{c.term_ms('comm'):.3f}",
            f"{c.term_ms('host'):.3f}",
            c.dominant or "",
            f"step {worst.step}: {worst.ms:.3f} ({worst.compute_ms:.3f} / {worst.comm_ms:.3f})",
        )
    return table


def plot_plan_timelines(report: PlanReport, path: str, fastest: int = 4) -> Figure:
    """The predicted per-step timelines of the ``fastest`` candidates as a PNG: one row
    per candidate, one column per pass (forward; with ``--backward`` the backward too),
    each panel titled with its pass."""
    from .plots import plot_timelines

    chosen = report.priced[:fastest]
    panels = {
        f"{c.name}, {pass_.value} pass (predicted): {p.ms:.2f} ms": list(p.spans)
        for c in chosen
        for pass_, p in c.passes
    }
    return plot_timelines(panels, path, columns=len(chosen[0].passes))


def run_plan(args: argparse.Namespace, console: Console) -> int:
    """``tokenring plan``: the ranking as a table (or ``--json``), the choice and why, and
    the predicted timelines; exit status 2 on bad input, 1 when no strategy can run."""
    try:
        with _progress() as progress:
            report = tr.plan(
                topology=args.topology,
                gpus=args.gpus,
                seq=args.seq,
                heads_q=args.heads_q,
                heads_kv=args.heads_kv,
                head_dim=args.head_dim,
                batch=args.batch,
                causal=args.causal,
                backward=args.backward,
                dtype=args.dtype,
                layout=args.layout,
                documents=args.documents,
                window=args.window,
                workers=args.workers,
                exhaustive=args.exhaustive,
                progress=progress,
            )
    except ValueError as error:
        console.print(Text(f"tokenring plan: {error}", style="red"))
        return 2
    if args.timeline and report.priced:
        plot_plan_timelines(report, args.timeline)
    if args.json:
        print(json.dumps(report.to_dict()))
        return 0
    console.print(_table(report))
    if not report.priced:
        console.print("[red]no strategy can run this call[/red]")
        return 1
    console.print(Text.assemble("choice: ", (report.choice, "bold")))
    console.print(Text(report.explain()))
    if args.timeline:
        console.print(Text(f"predicted timelines: {args.timeline}"))
    return 0


def add_calibrate_parser(sub) -> None:
    """The ``calibrate`` subcommand's options (every one with its help and default)."""
    p = sub.add_parser("calibrate", help="measure this machine into a topology file")
    p.add_argument(
        "--output",
        default="tokenring-topology.json",
        help="topology file to write (default: %(default)s)",
    )
    p.add_argument(
        "--base",
        default=None,
        help="preset whose links fill what cannot be measured here "
        "(default: the preset matched to the device)",
    )
    p.add_argument(
        "--dtype",
        type=dtype_name,
        default="bfloat16",
        metavar=DTYPE_METAVAR,
        help=f"{DTYPE_HELP}; a CPU calibrates float32 (default: %(default)s)",
    )
    p.add_argument(
        "--max-length",
        type=positive_int,
        default=None,
        help="longest block side of the kernel table (powers of two from 128 on a GPU, 32 on "
        "a CPU): smaller is quicker and coarser (default: 65536 on a GPU, 1024 on a CPU)",
    )


def _join_torchrun() -> bool:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1), initialise the process group (NCCL on
    GPUs, gloo on CPU), each rank on its own GPU; True when this call did."""
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def _more_ranks_command(args: argparse.Namespace) -> str:
    """The command that measures the links too: this one under ``torchrun``, with a
    process per GPU (two CPU processes without GPUs; ``N`` with one GPU here)."""
    import torch

    ranks = torch.cuda.device_count() if torch.cuda.is_available() else 2
    extra = f" --base {shlex.quote(args.base)}" if args.base else ""
    extra += f" --dtype {args.dtype}" if args.dtype != "bfloat16" else ""
    extra += f" --max-length {args.max_length}" if args.max_length else ""
    return calibrate_command(ranks if ranks > 1 else "N", args.output) + extra


def run_calibrate(args: argparse.Namespace, console: Console) -> int:
    """``tokenring calibrate``: measure this device (and, under torchrun, the links) and
    write the topology file; rank 0 alone writes and prints. Exit status 2 on an
    unknown ``--base`` or a ``--max-length`` below the grid's second length."""
    import torch.distributed as dist

    started = _join_torchrun()
    try:
        rank = dist.get_rank() if dist.is_initialized() else 0
        return _calibrate(args, console if rank == 0 else Console(quiet=True))
    finally:
        if started:
            dist.destroy_process_group()


def _calibrate(args: argparse.Namespace, console: Console) -> int:
    """``run_calibrate`` once the process group (if any) is up; ``console`` prints on
    rank 0 only."""
    import torch
    import torch.distributed as dist

    from tokenring.planner import topology_for

    from .calibrate import CPU_LENGTHS, GPU_LENGTHS, calibrate

    device = (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )
    grid = GPU_LENGTHS if device.type == "cuda" else CPU_LENGTHS
    lengths = tuple(n for n in grid if n <= (args.max_length or grid[-1]))
    if len(lengths) < 2:
        console.print(
            Text(
                f"tokenring calibrate: --max-length {args.max_length}: the kernel table needs "
                f"two lengths at least ({grid[0]}, {grid[1]}, ... on {device.type})",
                style="red",
            )
        )
        return 2
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    try:
        base = load_topology(args.base, world) if args.base else topology_for(device, world)
    except ValueError as error:
        console.print(Text(f"tokenring calibrate: {error}", style="red"))
        return 2
    dtype = getattr(torch, args.dtype)
    if device.type == "cpu" and dtype is not torch.float32:
        console.print("CPU: calibrating float32 (the CPU kernels' dtype)")
        dtype = torch.float32
    console.print(Text(f"tokenring calibrate on {device} ({world} process(es)), base {base.name}"))
    topo = calibrate(base, device, dtype, lambda line: console.print(Text(line)), lengths)
    if not (dist.is_initialized() and dist.get_rank() != 0):
        topo.save(args.output)
    for note in topo.notes:
        console.print(Text(f"  {note}"))
    console.print(Text(f"topology file: {args.output} (measured on {world} rank(s))"))
    if world == 1:
        console.print(
            "strategy='auto' over more ranks plans with this file's device and a preset's "
            "links; to measure the links of several ranks too, run:"
        )
        console.print(Text(_more_ranks_command(args)), soft_wrap=True)  # one line, to copy
    return 0
