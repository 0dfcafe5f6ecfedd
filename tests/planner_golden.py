"""Predictions the planner made for a spread of calls, kept to hold its speed-ups to the
same answers (tests/test_planner.py::test_predictions_are_the_recorded_ones).

Every candidate's predicted time, device and host time per pass, slowest rank and
per-step times. After a deliberate change of the timing model, write them again:

    PYTHONPATH=src python tests/planner_golden.py --write
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import tokenring as tr

PATH = Path(__file__).parent / "data" / "planner_predictions.json"

CASES: dict[str, dict] = {
    "h100-ib 16 causal gqa fwd+bwd": dict(
        topology="h100-ib", gpus=16, seq=65536, heads_q=32, heads_kv=8, head_dim=128,
        causal=True, backward=True,
    ),
    "nvswitch 8 dense fwd": dict(
        topology="h100-nvswitch-8", gpus=8, seq=32768, heads_q=16, head_dim=128,
    ),
    "a10 4 causal fwd+bwd contiguous": dict(
        topology="a10-pcie-4", gpus=4, seq=16384, heads_q=8, head_dim=64, causal=True,
        backward=True, layout="contiguous",
    ),
    "npu mesh 8 causal mqa fwd": dict(
        topology="npu-mesh-8", gpus=8, seq=24576, heads_q=8, heads_kv=1, head_dim=128,
        causal=True,
    ),
    "cpu-gloo 4 causal fwd+bwd": dict(
        topology="cpu-gloo", gpus=4, seq=2048, heads_q=4, heads_kv=2, head_dim=32,
        causal=True, backward=True, dtype="fp32",
    ),
    "nvswitch 8 documents fwd+bwd": dict(
        topology="h100-nvswitch-8", gpus=8, seq=32768, heads_q=8, head_dim=128,
        causal=True, backward=True, documents=[5000, 20000, 7768],
    ),
    "h100-ib 8 window batch 2 fp16": dict(
        topology="h100-ib", gpus=8, seq=40000, heads_q=16, heads_kv=4, head_dim=64,
        causal=True, window=(4096, 0), batch=2, dtype="fp16",
    ),
}  # fmt: skip


def predictions(case: dict) -> dict:
    """Every candidate's numbers for one call, as plain JSON values."""
    report = tr.plan(**case)
    found = {"choice": report.choice, "layout": report.layout.value}
    for c in report.candidates:
        if c.refused:
            found[c.name] = {"refused": c.refused}
            continue
        found[c.name] = {
            pass_.value: {
                "ms": p.ms,
                "device_ms": p.device_ms,
                "host_ms": p.host_ms,
                "slowest_rank": p.slowest_rank,
                "steps_ms": [s.ms for s in p.steps],
            }
            for pass_, p in c.passes
        }
    return found


def flat(value, prefix: str = "") -> dict:
    """Nested dicts and lists as one dict keyed by paths (what ``pytest.approx`` compares)."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return {prefix: value}
    found: dict = {}
    for key, item in items:
        found.update(flat(item, f"{prefix}/{key}"))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"write {PATH.name}")
    args = parser.parse_args()
    found = {name: predictions(case) for name, case in CASES.items()}
    if args.write:
        PATH.write_text(json.dumps(found, indent=1) + "\n")
        print(f"wrote {PATH}")
    else:
        print(json.dumps(found, indent=1))


if __name__ == "__main__":
    main()
