"""``tokenring plan`` (rank every strategy by predicted time) and ``tokenring calibrate``
(measure this machine into a topology file): docs/scaling.md."""

from __future__ import annotations

import argparse
import json
import os

from rich.console import Console
from rich.table import Table

import tokenring as tr
from tokenring.planner import PlanReport, load_topology, preset_names

from .argtypes import positive_int

__all__ = ["add_calibrate_parser", "add_plan_parser", "run_calibrate", "run_plan"]


def add_plan_parser(sub) -> None:
    p = sub.add_parser("plan", help="rank every strategy for one call by predicted time")
    p.add_argument(
        "--topology",
        required=True,
        help=f"a preset ({', '.join(preset_names())}) or a topology file",
    )
    p.add_argument("--gpus", type=positive_int, required=True, help="devices the sequence spans")
    p.add_argument("--seq", type=positive_int, required=True, help="global sequence length")
    p.add_argument("--heads-q", type=positive_int, required=True)
    p.add_argument("--heads-kv", type=positive_int, required=True)
    p.add_argument("--head-dim", type=positive_int, required=True)
    p.add_argument("--batch", type=positive_int, default=1)
    p.add_argument("--causal", action="store_true")
    p.add_argument("--backward", action="store_true", help="forward + backward (training)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument(
        "--layout",
        choices=["contiguous", "zigzag"],
        default=None,
        help="default: zigzag when causal, else contiguous",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead")
    p.add_argument(
        "--timeline",
        default=None,
        help="also draw the predicted per-step timelines of the four fastest here (PNG), "
        "in the format of the measured ones (tokenring bench)",
    )


def _table(report: PlanReport) -> Table:
    table = Table(title=f"tokenring plan: {report.world} x {report.topology}, S={report.shape.seq}")
    for column in (
        "strategy",
        "predicted ms",
        "compute ms",
        "exposed comm ms",
        "host ms",
        "dominant",
        "slowest step (ms: compute / comm)",
    ):
        table.add_column(column, justify="left" if column in ("strategy", "dominant") else "right")
    for c in report.candidates:
        if c.refused:
            table.add_row(c.name, "refused", "", "", "", "", c.refused)
            continue
        steps = [s for _, p in c.passes for s in p.steps]
        worst = max(steps, key=lambda s: s.ms)
        table.add_row(
            c.name,
            f"{c.predicted_ms:.3f}",
            f"{c.term_ms('compute'):.3f}",
            f"{c.term_ms('comm'):.3f}",
            f"{c.term_ms('host'):.3f}",
            c.dominant or "",
            f"step {worst.step}: {worst.ms:.3f} ({worst.compute_ms:.3f} / {worst.comm_ms:.3f})",
        )
    return table


def run_plan(args: argparse.Namespace, console: Console) -> int:
    try:
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
        )
    except ValueError as error:
        console.print(f"[red]tokenring plan: {error}[/red]")
        return 2
    if args.timeline and report.priced:
        from .plots import plot_timelines

        panels = {
            f"{c.name} (predicted, {pass_.value}): {p.ms:.2f} ms": list(p.spans)
            for c in report.priced[:4]
            for pass_, p in c.passes[:1]
        }
        plot_timelines(panels, args.timeline)
    if args.json:
        print(json.dumps(report.to_dict()))
        return 0
    console.print(_table(report))
    if not report.priced:
        console.print("[red]no strategy can run this call[/red]")
        return 1
    console.print(f"choice: [bold]{report.choice}[/bold]")
    console.print(report.explain())
    if args.timeline:
        console.print(f"predicted timelines: {args.timeline}")
    return 0


def add_calibrate_parser(sub) -> None:
    p = sub.add_parser("calibrate", help="measure this machine into a topology file")
    p.add_argument("--output", default="tokenring-topology.json", help="topology file to write")
    p.add_argument(
        "--base",
        default=None,
        help="preset whose links fill what cannot be measured here "
        "(default: matched to the device)",
    )
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")


def run_calibrate(args: argparse.Namespace, console: Console) -> int:
    import torch
    import torch.distributed as dist

    from tokenring.planner import topology_for

    from .calibrate import calibrate

    started = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        # under torchrun: every rank calibrates its device; rank 0 writes the file
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        started = True
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    try:
        base = load_topology(args.base, max(world, 1)) if args.base else topology_for(device, world)
    except ValueError as error:
        console.print(f"[red]tokenring calibrate: {error}[/red]")
        return 2
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    if device.type == "cpu" and dtype is not torch.float32:
        console.print("CPU: calibrating float32 (the CPU kernels' dtype)")
        dtype = torch.float32
    console.print(f"tokenring calibrate on {device} ({world} process(es)), base {base.name}")
    topo = calibrate(base, device, dtype, progress=console.print)
    if not (dist.is_initialized() and dist.get_rank() != 0):
        topo.save(args.output)
        for note in topo.notes:
            console.print(f"  {note}")
        console.print(f"topology file: {args.output}")
    if started:
        dist.destroy_process_group()
    return 0
