"""Benchmark output: the table, the JSON records and the plots."""

from __future__ import annotations

import datetime
import itertools
import json
import os
import platform
import subprocess
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from rich.text import Text

from tokenring.execution.timeline import Span

from .plan_cli import USP_NAMING
from .plots import plot_timelines

__all__ = [
    "environment",
    "footnotes",
    "not_run",
    "plot_efficiency",
    "print_results",
    "table",
    "write_outputs",
]


def _commit() -> str:
    if os.environ.get("TOKENRING_COMMIT"):
        return os.environ["TOKENRING_COMMIT"]
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(world: int, backend: str) -> dict:
    """What the numbers were measured on (stored with every record)."""
    card = (
        torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    )
    return {
        "card": card,
        "world": world,
        "backend": backend,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "commit": _commit(),
        "date": datetime.date.today().isoformat(),
    }


def _blank(value) -> bool:
    """No number to show: not measured (None) or not a number (NaN, older records)."""
    return value is None or value != value


def _fmt(value, spec: str) -> str:
    return "" if _blank(value) else format(value, spec)


def _ran(record: dict) -> bool:
    return not record["status"].startswith("skipped")


def table(records: list[dict], title: str) -> Table:
    """The rows that ran (the skipped ones are ``not_run``'s), every name printed as is."""
    t = Table(title=title)
    for col in (
        "case",
        "S",
        "pass",
        "method",
        "ms",
        "eff",
        "TFLOP/s/dev",
        "peak+ GB",
        "err",
        "status",
    ):
        t.add_column(
            col, justify="right" if col not in ("case", "pass", "method", "status") else "left"
        )
    for r in filter(_ran, records):
        status = r["status"]
        t.add_row(
            Text(r["case"]),
            str(r["seq"]),
            "fwd" if r["pass"] == "forward" else "fwd+bwd",
            Text(r["method"]),
            _fmt(r.get("ms"), ".2f"),
            _fmt(r.get("efficiency"), ".3f"),
            _fmt(r.get("tflops_per_device"), ".3g"),
            _fmt(r.get("peak_extra_gb"), ".2f"),
            _fmt(r.get("max_rel_err"), ".1e"),
            Text(status, style="green" if status == "ok" else "red"),
        )
    return t


def footnotes(records: list[dict]) -> list[str]:
    """A line for each column the table leaves blank in a row that ran, saying why."""
    ran = [r for r in records if _ran(r) and not r["method"].startswith("ideal")]
    notes = []
    if any(_blank(r.get("peak_extra_gb")) for r in ran):
        notes.append(
            "peak+ GB: device memory one call allocates beyond its inputs, max over ranks; "
            "CUDA only (blank on CPU)"
        )
    if any(r["method"].startswith("ideal") for r in records):
        notes.append(
            "ideal (T1/P): the single-device time over P, computed, not run "
            "(no error or memory of its own)"
        )
    if any(r["method"].startswith("usp-") for r in records):
        notes.append(USP_NAMING)
    return notes


def not_run(records: list[dict], width: int = 150) -> list[str]:
    """One line per method with rows that could not run here: its name, how many rows,
    and the first such row's reason, cut to ``width`` characters (bench.json keeps all)."""
    skipped: dict[str, list[str]] = {}
    for r in records:
        if not _ran(r):
            skipped.setdefault(r["method"], []).append(r["status"].removeprefix("skipped: "))
    lines = []
    for method, reasons in skipped.items():
        rows = f"{len(reasons)} row{'s' if len(reasons) > 1 else ''}"
        line = f"{method} ({rows}): {' '.join(reasons[0].split())}"
        lines.append(line if len(line) <= width else line[: width - 1] + "…")
    return lines


def print_results(console: Console, records: list[dict], title: str) -> None:
    """The table of the rows that ran, a note for each blank column, then one line per
    method that could not run here (its reason cut to the line; all of it in bench.json)."""
    console.print(table(records, title))
    for note in footnotes(records):
        console.print(Text(note, style="dim"))
    skipped = not_run(records, width=console.width - 2)
    if skipped:
        rows = sum(not _ran(r) for r in records)
        console.print(Text(f"not run here ({rows} rows; every reason in bench.json):"))
        for line in skipped:
            console.print(Text(f"  {line}", style="yellow"), no_wrap=True, overflow="ellipsis")


def plot_efficiency(records: list[dict], path: Path) -> None:
    """Efficiency T1 / (P * T_P) against sequence length, one panel per case and pass."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = sorted({r["case"] for r in records})
    passes = [p for p in ("forward", "forward_backward") if any(r["pass"] == p for r in records)]
    fig, axes = plt.subplots(
        len(passes), len(cases), figsize=(4.4 * len(cases), 3.6 * len(passes)), squeeze=False
    )
    for (row, pass_), (col, case) in itertools.product(enumerate(passes), enumerate(cases)):
        ax = axes[row][col]
        rows = [
            r
            for r in records
            if r["case"] == case
            and r["pass"] == pass_
            and r.get("efficiency") is not None
            and r["status"] == "ok"
            and not r["method"].startswith("single")
        ]
        for method in sorted({r["method"] for r in rows}):
            pts = sorted((r["seq"], r["efficiency"]) for r in rows if r["method"] == method)
            style = "k--" if method.startswith("ideal") else "o-"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=method)
        ax.set_xscale("log", base=2)
        ax.set_ylim(0, 1.1)
        ax.set_title(f"{case}, {pass_.replace('_', '+')}", fontsize="medium")
        ax.set_xlabel("sequence length")
        ax.grid(alpha=0.3)
    for row in axes:
        row[0].set_ylabel("efficiency T1 / (P T_P)")
    axes[0][-1].legend(fontsize="x-small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(result: dict, env: dict, out_dir: Path) -> dict[str, Path]:
    """JSON (one record per row, with the environment), efficiency plot, timelines."""
    out_dir.mkdir(parents=True, exist_ok=True)
    records = [{**env, **r} for r in result["records"]]
    paths = {"json": out_dir / "bench.json", "efficiency": out_dir / "efficiency.png"}
    paths["json"].write_text(json.dumps(records, indent=1))
    plot_efficiency(records, paths["efficiency"])
    if result["timelines"]:
        paths["timeline"] = out_dir / "timelines.png"
        panels = {
            f"{title} (measured)": [Span(**s) for s in spans]
            for title, spans in result["timelines"].items()
        }
        plot_timelines(panels, str(paths["timeline"]))
    return paths
