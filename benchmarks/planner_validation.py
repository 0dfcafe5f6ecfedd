"""The planner against the committed 2 x H100 rows: one markdown table for docs/scaling.md.

Every row of ours (tokenring, ring) in ``benchmarks/runs/2026-11-25-h100x2-session2.json``,
predicted on ``h100-nvlink-2`` with the host costs of the commit those rows were measured
at (8.3 x today's per operation: RESULTS.md, targets table), next to the measurement.

    PYTHONPATH=src python benchmarks/planner_validation.py
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from tokenring.call.description import CallDescription
from tokenring.options import Layout, Pass, Strategy
from tokenring.planner import preset, simulate_timing
from tokenring.schedules import build_schedule

ROWS = Path(__file__).resolve().parent / "runs" / "2026-11-25-h100x2-session2.json"
HOST_THEN = 8.3


def main() -> None:
    topo = preset("h100-nvlink-2", 2)
    host = topo.device.host
    then = type(host)(**{k: v * HOST_THEN for k, v in host.to_dict().items()})
    topo = replace(topo, device=replace(topo.device, host=then))
    rows = [
        r
        for r in json.loads(ROWS.read_text())
        if r["status"] == "ok" and r["world"] == 2 and r["method"] in ("tokenring", "ring")
    ]
    print("| case | S | pass | method | measured ms | predicted ms | error | dominant |")
    print("|---|---:|---|---|---:|---:|---:|---|")
    worst = 0.0
    for r in rows:
        call = CallDescription.of_shape(
            world=2, seq_len=r["seq"], heads_q=r["heads_q"], heads_kv=r["heads_kv"],
            head_dim=r["head_dim"], layout=Layout(r["layout"]), causal=r["causal"],
            strategy=Strategy(r["method"]),
        )  # fmt: skip
        passes = [Pass.FORWARD] if r["pass"] == "forward" else list(Pass)
        total, dominant = 0.0, set()
        for p in passes:
            scheds = [build_schedule(call.schedule_key(k, p)) for k in range(2)]
            pred = simulate_timing(scheds, p, call, topo)
            total += pred.ms
            dominant.add(pred.dominant)
        err = total / r["ms"] - 1
        if r["seq"] >= 16384:
            worst = max(worst, abs(err))
        print(
            f"| {r['case']} | {r['seq'] // 1024}K | {r['pass']} | {r['method']} | "
            f"{r['ms']:.3f} | {total:.3f} | {err * 100:+.1f}% | {'/'.join(sorted(dominant))} |"
        )
    print(f"\nlargest |error| from 16K up: {worst * 100:.1f}%")


if __name__ == "__main__":
    main()
