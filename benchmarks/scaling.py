"""The planner's predicted efficiency for docs/scaling.md: vs GPUs and vs sequence length.

Efficiency is the benchmark's ``T1 / (P * T_P)``: ``T1`` the model's time of one kernel
call on the whole sequence on one device, ``T_P`` the predicted time of the sharded
call. Two figures and the numbers behind them:

- ``docs/scaling-gpus.png``: ``h100-ib`` (nodes of 8 H100, 400 Gb/s per GPU), 8 to
  1,024 GPUs at 16K tokens per GPU, causal zigzag forward, MHA 32/32 and GQA 32/8;
  each strategy where it runs (Ulysses up to the head count) and where simulating it
  takes seconds to minutes here (1-D rings up to 128 ranks, all-gather up to 256;
  USP with Ulysses inside each node across all sizes);
- ``docs/scaling-seq.png``: every preset at its largest size (``h100-ib`` at 32),
  8K to 512K tokens, causal zigzag forward + backward, the best of each strategy
  family.

    PYTHONPATH=src python benchmarks/scaling.py [--quick] [--json benchmarks/runs/X.json]

``--quick`` stops the GPU sweep at 256 (a minute instead of about fifteen).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from rich.progress import Progress

from tokenring.call.description import CallDescription
from tokenring.options import Pass, RingImpl, Strategy
from tokenring.planner import preset
from tokenring.planner.choose import plan_call
from tokenring.planner.timing import simulate_timing
from tokenring.schedules import build_schedule
from tokenring.schedules.usp import mesh_axes

DOCS = Path(__file__).resolve().parent.parent / "docs"
HEADS = {"MHA 32/32": (32, 32), "GQA 32/8": (32, 8)}
PER_GPU = 16384
GPUS = (8, 16, 32, 64, 128, 256, 512, 1024)
LIMITS = {"tokenring": 128, "ring": 128, "allgather": 256, "ulysses": 32}
SEQS = (8192, 16384, 32768, 65536, 131072, 262144, 524288)
PRESET_SIZES = {"a10-pcie-4": 4, "h100-nvlink-2": 2, "h100-nvswitch-8": 8, "npu-mesh-8": 8,
                "h100-ib": 32}  # fmt: skip


def t1_ms(topo, call: CallDescription, passes) -> float:
    """One kernel call on the whole sequence on one device (the benchmark's T1)."""
    k = topo.device.kernel
    heads, s = call.batch * call.heads_q, call.seq_len
    return sum(
        k.seconds(p, s, s, True, heads, call.head_dim, call.itemsize >= 4) * 1e3 for p in passes
    )


def sweep_gpus(progress: Progress, limit: int) -> list[dict]:
    rows = []
    sizes = [g for g in GPUS if g <= limit]
    runs = [(label, hq, hkv, g, name) for label, (hq, hkv) in HEADS.items() for g in sizes
            for name in ("tokenring", "ring", "allgather", "ulysses", "usp-8-tokenring",
                         "usp-8-ring")]  # fmt: skip
    task = progress.add_task("GPUs sweep", total=len(runs))
    for label, hq, hkv, g, name in runs:
        progress.advance(task)
        usp = name.startswith("usp")
        if (usp and g < 16) or (not usp and g > LIMITS[name]) or (name == "ulysses" and hq % g):
            continue
        topo = preset("h100-ib", g)
        call = CallDescription.of_shape(
            world=g, seq_len=PER_GPU * g, heads_q=hq, heads_kv=hkv, head_dim=128, causal=True
        )
        if usp:
            ring_impl = RingImpl(name.split("-")[-1])
            call = call.with_strategy(Strategy.USP, ring_impl, ulysses=8)
            axes = mesh_axes(g // 8, 8)
        else:
            call, axes = call.with_strategy(Strategy(name)), None
        scheds = [build_schedule(call.schedule_key(r, Pass.FORWARD)) for r in range(g)]
        p = simulate_timing(scheds, Pass.FORWARD, call, topo, axes)
        rows.append({
            "heads": label, "gpus": g, "strategy": name, "ms": p.ms, "dominant": p.dominant,
            "efficiency": t1_ms(topo, call, [Pass.FORWARD]) / (g * p.ms),
        })  # fmt: skip
    return rows


def sweep_seq(progress: Progress) -> list[dict]:
    rows = []
    runs = [(n, g, label, hq, hkv, s) for n, g in PRESET_SIZES.items()
            for label, (hq, hkv) in HEADS.items() for s in SEQS]  # fmt: skip
    task = progress.add_task("sequence sweep", total=len(runs))
    for name, g, label, hq, hkv, seq in runs:
        progress.advance(task)
        topo = preset(name, g)
        call = CallDescription.of_shape(
            world=g, seq_len=seq, heads_q=hq, heads_kv=hkv, head_dim=128, causal=True
        )
        report = plan_call(topo, call, backward=True)
        t1 = t1_ms(topo, call, list(Pass))
        for c in report.priced:
            family = "usp" if c.strategy is Strategy.USP else c.name
            rows.append({
                "preset": name, "gpus": g, "heads": label, "seq": seq, "strategy": c.name,
                "family": family, "ms": c.predicted_ms, "dominant": c.dominant,
                "efficiency": t1 / (g * c.predicted_ms), "chosen": c.name == report.choice,
            })  # fmt: skip
    return rows


def plot_gpus(rows: list[dict], path: Path) -> None:
    fig, axes = plt.subplots(1, len(HEADS), figsize=(12, 4.5), sharey=True)
    for ax, label in zip(axes, HEADS):
        for name in sorted({r["strategy"] for r in rows}):
            pts = sorted((r["gpus"], r["efficiency"]) for r in rows
                         if r["heads"] == label and r["strategy"] == name)  # fmt: skip
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_title(f"h100-ib, {label}, {PER_GPU // 1024}K tokens per GPU, causal forward")
        ax.set_xlabel("GPUs")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("predicted efficiency T1 / (P T_P)")
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_seq(rows: list[dict], path: Path) -> None:
    presets = list(PRESET_SIZES)
    fig, axes = plt.subplots(len(HEADS), len(presets), figsize=(20, 7.5), sharey=True)
    for i, label in enumerate(HEADS):
        for j, name in enumerate(presets):
            ax = axes[i][j]
            for family in ("tokenring", "ring", "ulysses", "allgather", "usp"):
                best: dict[int, float] = {}
                for r in rows:
                    if (r["preset"], r["heads"], r["family"]) == (name, label, family):
                        best[r["seq"]] = max(best.get(r["seq"], 0.0), r["efficiency"])
                if best:
                    ax.plot(*zip(*sorted(best.items())), marker="o", label=family)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{name} x{PRESET_SIZES[name]}, {label}", fontsize=9)
            ax.grid(alpha=0.3)
            if i == len(HEADS) - 1:
                ax.set_xlabel("sequence length")
        axes[i][0].set_ylabel("efficiency (fwd+bwd)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="GPU sweep up to 256 only")
    parser.add_argument("--json", default=None, help="write every number here")
    args = parser.parse_args()
    with Progress() as progress:
        seq_rows = sweep_seq(progress)
        gpu_rows = sweep_gpus(progress, 256 if args.quick else max(GPUS))
    plot_seq(seq_rows, DOCS / "scaling-seq.png")
    plot_gpus(gpu_rows, DOCS / "scaling-gpus.png")
    if args.json:
        Path(args.json).write_text(json.dumps({"gpus": gpu_rows, "seq": seq_rows}, indent=1))
    print(f"wrote {DOCS / 'scaling-seq.png'} and {DOCS / 'scaling-gpus.png'}")


if __name__ == "__main__":
    main()
