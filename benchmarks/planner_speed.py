"""How long the planner takes to answer, as a user asks it, and whether it still says the
same: ``tokenring plan`` timed end to end (a fresh process: imports, planning, the table)
for 64 GPUs and 1,024 GPUs of ``h100-ib`` at 1M tokens (32 query heads, 8 key/value heads
of 128, causal), and the planner's predictions for three larger calls compared with those
the planner made before its speed-ups (``runs/2026-12-06-planner-predictions-46bf769.json``,
made by ``tests/planner_golden.py``'s ``predictions`` at commit 46bf769).

Targets (issue 22): at most 3 s for 64 GPUs and 10 s for 1,024, the same predictions.

    PYTHONPATH=src python benchmarks/planner_speed.py [--repeats 3] [--skip-1024] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from planner_golden import flat, predictions  # noqa: E402

RECORDED = HERE / "runs" / "2026-12-06-planner-predictions-46bf769.json"
QUESTION = ["--topology", "h100-ib", "--seq", "1048576", "--heads-q", "32", "--heads-kv", "8",
            "--head-dim", "128", "--causal"]  # fmt: skip
TARGETS_S = {64: 3.0, 1024: 10.0}
CALLS = {  # what RECORDED holds
    "64": dict(topology="h100-ib", gpus=64, seq=1048576, heads_q=32, heads_kv=8, head_dim=128,
               causal=True),
    "32bw": dict(topology="h100-ib", gpus=32, seq=262144, heads_q=32, heads_kv=8, head_dim=128,
                 causal=True, backward=True),
    "64docs": dict(topology="h100-ib", gpus=64, seq=262144, heads_q=32, heads_kv=8,
                   head_dim=128, causal=True, documents=[100000, 62144, 100000]),
}  # fmt: skip


def time_command(gpus: int, repeats: int) -> list[float]:
    """Wall seconds of ``tokenring plan`` for ``gpus``, one fresh process per repeat."""
    found = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "tokenring_bench", "plan", "--gpus", str(gpus), *QUESTION],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        found.append(time.perf_counter() - start)
    return found


def largest_difference() -> float:
    """The largest relative difference of any predicted number from the recorded ones
    (choices, refusals and slowest ranks must be equal)."""
    recorded, worst = json.loads(RECORDED.read_text()), 0.0
    for name, call in CALLS.items():
        now, before = flat(predictions(call)), flat(recorded[name])
        if now.keys() != before.keys():
            raise SystemExit(f"{name}: the candidates or their fields changed")
        for key, old in before.items():
            new = now[key]
            if isinstance(old, str) or key.endswith("slowest_rank"):
                if new != old:
                    raise SystemExit(f"{name}: {key} is {new!r}, was {old!r}")
            else:
                worst = max(worst, abs(new - old) / max(abs(old), 1e-12))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs per size (default: 3)")
    parser.add_argument("--skip-1024", action="store_true", help="time 64 GPUs only")
    parser.add_argument("--json", help="write the numbers here")
    args = parser.parse_args()
    report: dict = {"largest_relative_difference": largest_difference()}
    print(f"predictions against {RECORDED.name}: largest relative difference "
          f"{report['largest_relative_difference']:.1e}")  # fmt: skip
    for gpus in (64,) if args.skip_1024 else (64, 1024):
        times = time_command(gpus, args.repeats)
        median = statistics.median(times)
        report[f"plan_{gpus}_s"] = times
        verdict = "met" if median <= TARGETS_S[gpus] else f"MISSED (target {TARGETS_S[gpus]} s)"
        print(f"tokenring plan --gpus {gpus}: median {median:.2f} s "
              f"(runs {', '.join(f'{t:.2f}' for t in times)})  {verdict}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
