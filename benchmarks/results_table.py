"""Render a ``tokenring bench`` JSON file as the markdown tables of RESULTS.md."""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def render(path: str) -> str:
    with open(path) as f:
        records = json.load(f)
    env = records[0]
    world = max(r["world"] for r in records)
    lines = [
        f"{world} x {env['card']}, torch {env['torch']} (CUDA {env['cuda']}), "
        f"commit {env['commit']}, {env['date']}",
        "",
    ]
    by_case = defaultdict(list)
    for r in records:
        by_case[(r["case"], r["pass"])].append(r)
    for (case, pass_), rows in by_case.items():
        methods = [m for m in dict.fromkeys(r["method"] for r in rows) if not m.startswith("ideal")]
        seqs = sorted({r["seq"] for r in rows})
        lines.append(f"**{case}, {pass_.replace('_', '+')}**: ms per call (efficiency T1/(P T_P))")
        lines.append("")
        lines.append("| method | " + " | ".join(f"S={s // 1024}K" for s in seqs) + " |")
        lines.append("|---|" + "---|" * len(seqs))
        not_run = []
        for m in methods:
            mine = [x for x in rows if x["method"] == m]
            if all(x["status"].startswith("skipped") for x in mine):
                not_run.append(f"{m} ({mine[0]['status'].removeprefix('skipped: ')})")
                continue
            cells = []
            for s in seqs:
                r = next((x for x in mine if x["seq"] == s), None)
                if r is None:
                    cells.append("")
                elif r["status"] != "ok":
                    cells.append(r["status"][:40])
                else:
                    cells.append(f"{r['ms']:.2f} ({r['efficiency']:.3f})")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
        if not_run:
            lines += ["Not run: " + "; ".join(not_run), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(sys.argv[1]))
