"""The ``tokenring`` command: ``demo`` (check and draw every strategy), ``bench`` (the
cases of docs/benchmarking.md, side by side with the single-device ideal and the peers),
``plan`` (rank the strategies by predicted time) and ``calibrate`` (measure this machine
for the planner): docs/scaling.md."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from tokenring.execution.timeline import Span

from .argtypes import DTYPE_HELP, dtype_name, positive_int, positive_seconds
from .cases import CASE_NAMES
from .demo import DemoConfig, demo_worker, tolerance
from .launch import WorkerFailed, default_world, run_local
from .plan_cli import add_calibrate_parser, add_plan_parser, run_calibrate, run_plan
from .plots import plot_timelines

__all__ = ["main"]


def _demo(args: argparse.Namespace, console: Console) -> int:
    """``tokenring demo``: every strategy checked against float64, timed and drawn."""
    world, backend = default_world(cpu_workers=args.world_size or 4)
    if args.world_size and backend == "nccl":
        if args.world_size > world:
            console.print(f"[red]--world-size {args.world_size}: only {world} GPUs here[/red]")
            return 2
        world = args.world_size
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if backend == "nccl" else "float32")
    heads_kv = args.heads_kv or args.heads
    if args.heads % heads_kv:
        console.print(
            f"[red]--heads {args.heads} must be a multiple of --heads-kv {heads_kv}[/red]"
        )
        return 2
    cfg = DemoConfig(args.seq_len, args.heads, heads_kv, args.head_dim, dtype, args.repeats)
    console.print(
        f"tokenring demo: {world} {'GPU' if backend == 'nccl' else 'CPU'} processes ({backend}), "
        f"S={cfg.seq_len}, heads {cfg.heads}/{cfg.heads_kv}, head_dim {cfg.head_dim}, {dtype}"
    )
    with _progress(console) as progress:
        task = progress.add_task("starting workers", total=None)

        def on_message(msg):
            _, done, total, label = msg
            progress.update(task, completed=done, total=total, description=label)

        try:
            results = run_local(
                demo_worker,
                (cfg,),
                world=world,
                backend=backend,
                timeout_s=args.timeout,
                transfer_timeout_s=args.transfer_timeout,
                on_message=on_message,
            )
        except WorkerFailed as err:
            console.print(Text.assemble(("demo failed: ", "red"), str(err)))
            return 1
    report = results[0]
    tol = tolerance(dtype)
    table = Table(title=f"exact attention over {world} ranks vs float64 on one device")
    for col in (
        "strategy",
        "layout",
        "causal",
        "max rel err (out, lse)",
        "max rel err (grads)",
        "ms / forward",
        "check",
    ):
        table.add_column(col, justify="right" if "err" in col or "ms" in col else "left")
    failed = 0
    for row in report["rows"]:
        if "refused" in row:
            table.add_row(
                row["strategy"], row["layout"], str(row["causal"]), "", "", "",
                Text(f"refused: {row['refused']}", style="yellow"),
            )  # fmt: skip
            continue
        ok = row["out_err"] <= tol and row["grad_err"] <= tol
        failed += not ok
        table.add_row(
            row["strategy"],
            row["layout"],
            str(row["causal"]),
            f"{row['out_err']:.2e}",
            f"{row['grad_err']:.2e}",
            f"{row['ms']:.2f}",
            "[green]ok[/green]" if ok else "[red]FAILED[/red]",
        )
    console.print(table)
    console.print("usp UxR: Ulysses over U ranks inside each of R groups, TokenRing across them")
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    panels = {
        f"{name}: zigzag causal forward, S={cfg.seq_len}, {world} ranks (measured)": [
            Span(**s) for s in spans
        ]
        for name, spans in report["timelines"].items()
    }
    plot_timelines(panels, str(out))
    console.print(f"per-step timeline written to {out.resolve()}")
    if failed:
        console.print(f"[red]{failed} case(s) exceeded the tolerance {tol:g}[/red]")
        return 1
    ran = [row for row in report["rows"] if "refused" not in row]
    console.print(f"all {len(ran)} cases run match float64 attention within {tol:g}")
    return 0


def _progress(console: Console) -> Progress:
    """A transient progress bar whose description is printed literally."""
    return Progress(
        TextColumn("{task.description}", markup=False),  # method names hold brackets
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )


def _bench(args: argparse.Namespace, console: Console) -> int:
    """``tokenring bench``: every method over the cases on this machine's devices; rows
    stream to ``bench.partial.jsonl`` (kept if the run dies) until ``bench.json`` holds
    them all, then the partial file goes."""
    from tokenring.options import Strategy as TrStrategy

    from .methods import Auto, PeerMethod, Strategy, usp_splits
    from .peers import default_peers
    from .report import environment, print_results, write_outputs
    from .runner import BenchConfig, bench_worker

    world, backend = default_world(cpu_workers=args.world_size or 2)
    if args.world_size and backend == "nccl":
        world = min(world, args.world_size)
    cfg = BenchConfig(
        case_names=tuple(args.cases) if args.cases else None,
        seqs=tuple(args.seq) if args.seq else None,
        passes=tuple(args.passes),
        repeats=args.repeats,
        timing=args.timing,
        timeline_seq=args.timeline_seq if backend == "nccl" else 256,
    )
    peers = [PeerMethod(p) for p in default_peers()]
    one_d = [s.value for s in TrStrategy if s is not TrStrategy.USP]
    hybrids = usp_splits(world)
    ours = [*one_d, "auto", *(h.name for h in hybrids)]
    wanted = args.methods or [*ours, *(p.name for p in peers)]
    methods = [Strategy(name) for name in wanted if name in one_d]
    methods += [Auto()] if "auto" in wanted else []
    methods += [h for h in hybrids if h.name in wanted]
    peers = [p for p in peers if p.name in wanted]
    console.print(
        Text(
            f"tokenring bench: {world} {'GPU' if backend == 'nccl' else 'CPU'} "
            f"processes ({backend}), methods {', '.join(wanted)}"
        )
    )
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    partial_path = out_dir / "bench.partial.jsonl"
    partial_path.write_text("")
    records: list[dict] = []
    with _progress(console) as progress:
        task = progress.add_task("starting workers", total=None)

        def on_message(msg):
            if msg[0] == "record":
                records.append(msg[1])
                with partial_path.open("a") as f:  # kept if the run dies later
                    f.write(json.dumps(msg[1]) + "\n")
                return
            _, done, total, label = msg
            progress.update(task, completed=done, total=total, description=label)

        try:
            results = run_local(
                bench_worker,
                (cfg, methods, peers),
                world=world,
                backend=backend,
                timeout_s=args.timeout,
                transfer_timeout_s=args.transfer_timeout,
                on_message=on_message,
            )
        except WorkerFailed as err:
            console.print(
                Text.assemble(("bench failed: ", "red"), f"{err}\nrows so far: {partial_path}")
            )
            return 1
    env = {**environment(world, backend), "timing": cfg.timing}
    result = {"records": records, "timelines": results[0]["timelines"]}
    print_results(console, records, f"tokenring bench on {world} x {env['card']}")
    for kind, path in write_outputs(result, env, out_dir).items():
        console.print(Text(f"{kind}: {path.resolve()}"))
    partial_path.unlink()  # every row is in bench.json now
    failed = [r for r in records if r["status"].startswith("FAILED")]
    if failed:
        console.print(f"[red]{len(failed)} row(s) failed[/red]")
        return 1
    return 0


def _demo_dtype(text: str) -> str:
    """``auto`` (float32 on CPU, bfloat16 on GPU) or any spelling ``dtype_name`` takes."""
    return "auto" if text == "auto" else dtype_name(text)


def _add_timeouts(parser: argparse.ArgumentParser, whole_run_s: float) -> None:
    """``--timeout`` (the whole run) and ``--transfer-timeout`` (one stalled transfer)."""
    parser.add_argument(
        "--timeout",
        type=positive_seconds,
        default=whole_run_s,
        help="seconds before giving up on the whole run (default: %(default)s)",
    )
    parser.add_argument(
        "--transfer-timeout",
        type=positive_seconds,
        default=300.0,
        help="seconds a transfer waits for a stalled peer before failing (TransferFailed) "
        "(default: %(default)s)",
    )


def _add_demo_parser(sub) -> None:
    """The ``demo`` subcommand's options (every one with its help and default)."""
    demo = sub.add_parser("demo", help="check and time every strategy on a small problem")
    demo.add_argument(
        "--world-size",
        type=positive_int,
        default=None,
        help="processes (default: all GPUs, else 4 CPU processes)",
    )
    demo.add_argument(
        "--seq-len",
        type=positive_int,
        default=1024,
        help="global sequence length (default: %(default)s)",
    )
    demo.add_argument(
        "--heads", type=positive_int, default=8, help="query heads (default: %(default)s)"
    )
    demo.add_argument(
        "--heads-kv",
        type=positive_int,
        default=None,
        help="key/value heads, fewer for GQA (default: --heads)",
    )
    demo.add_argument(
        "--head-dim",
        type=positive_int,
        default=64,
        help="dimension of a head (default: %(default)s)",
    )
    demo.add_argument(
        "--dtype",
        type=_demo_dtype,
        default="auto",
        metavar="{auto,bf16,fp16,fp32}",
        help=f"auto, {DTYPE_HELP} (default: auto: float32 on CPU, bfloat16 on GPU)",
    )
    demo.add_argument(
        "--repeats",
        type=positive_int,
        default=5,
        help="timed calls per case (default: %(default)s)",
    )
    demo.add_argument(
        "--output",
        default="tokenring-demo-timeline.png",
        help="timeline PNG path (default: %(default)s)",
    )
    _add_timeouts(demo, 900.0)


def _add_bench_parser(sub) -> None:
    """The ``bench`` subcommand's options (every one with its help and default)."""
    bench = sub.add_parser(
        "bench", help="docs/benchmarking.md: time, check and compare every method"
    )
    bench.add_argument(
        "--world-size",
        type=positive_int,
        default=None,
        help="processes (default: all GPUs, else 2 CPU processes)",
    )
    bench.add_argument(
        "--cases",
        nargs="*",
        choices=CASE_NAMES,
        help="cases to run (default: all; docs/benchmarking.md)",
    )
    bench.add_argument(
        "--seq",
        nargs="*",
        type=positive_int,
        help="sequence lengths to run instead of each case's own (default: the case's)",
    )
    bench.add_argument(
        "--passes",
        nargs="*",
        default=["forward", "forward_backward"],
        choices=["forward", "forward_backward"],
        help="passes to time (default: both)",
    )
    bench.add_argument(
        "--methods",
        nargs="*",
        default=None,
        help="our strategies and peers to run (default: every one there is)",
    )
    bench.add_argument(
        "--repeats",
        type=positive_int,
        default=20,
        help="timed calls per row (default: %(default)s)",
    )
    bench.add_argument(
        "--timing",
        choices=["steady", "isolated"],
        default="steady",
        help="steady: calls back to back, as in a training loop (host time hidden where the "
        "GPU is busier); isolated: each call from idle ranks (host time exposed) "
        "(default: %(default)s)",
    )
    bench.add_argument(
        "--timeline-seq",
        type=positive_int,
        default=32768,
        help="llama2-mha length whose per-step timeline is drawn on GPUs; 256 on CPU "
        "(default: %(default)s)",
    )
    bench.add_argument(
        "--output-dir", default="bench-out", help="JSON and PNG go here (default: %(default)s)"
    )
    _add_timeouts(bench, 3000.0)


def build_parser() -> argparse.ArgumentParser:
    """The ``tokenring`` command line: demo, bench, plan and calibrate."""
    parser = argparse.ArgumentParser(prog="tokenring", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_demo_parser(sub)
    _add_bench_parser(sub)
    add_plan_parser(sub)
    add_calibrate_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one ``tokenring`` subcommand; returns its exit status."""
    args = build_parser().parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 160)
    if args.command == "demo":
        return _demo(args, console)
    if args.command == "plan":
        return run_plan(args, console)
    if args.command == "calibrate":
        return run_calibrate(args, console)
    return _bench(args, console)


if __name__ == "__main__":
    sys.exit(main())
