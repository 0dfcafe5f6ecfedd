"""Drawing per-step timelines, measured or predicted, as a PNG (matplotlib).

The picture stays readable at any scale: a panel draws every rank only up to
``MAX_RANKS_DRAWN`` ranks and beyond that the slowest rank and a typical one (its
title says which); steps share ``MAX_STEP_COLOURS`` distinct colours by range, in
one legend; and the figure is never taller than ``MAX_HEIGHT_PX`` (more panels go
into more columns, and rows get thinner where that is not enough).
"""

from __future__ import annotations

import math
import statistics
from typing import TYPE_CHECKING

from tokenring.execution.timeline import Span

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["MAX_HEIGHT_PX", "MAX_RANKS_DRAWN", "MAX_STEP_COLOURS", "plot_timelines"]

MAX_HEIGHT_PX = 4000
MAX_RANKS_DRAWN = 4
MAX_STEP_COLOURS = 10  # tab10's distinct colours
DPI = 110
COLUMN_WIDTH_IN = 12.0
ROW_IN = 0.4  # one (rank, track) row
PANEL_HEADER_IN = 1.2  # title, axis and margins of one panel
LEGEND_IN = 0.8


def _ranks_drawn(spans: list[Span]) -> tuple[list[tuple[int, str]], str]:
    """The ranks one panel draws, each with a note, and what the title says about them:
    every rank up to ``MAX_RANKS_DRAWN``; beyond, the one that finishes last (it sets
    the call's time) and the one whose finish is the median of the others (typical)."""
    finish: dict[int, float] = {}
    for s in spans:
        finish[s.rank] = max(finish.get(s.rank, 0.0), s.end_ms)
    ranks = sorted(finish)
    if len(ranks) <= MAX_RANKS_DRAWN:
        return [(r, "") for r in ranks], ""
    slowest = max(ranks, key=lambda r: (finish[r], -r))
    others = [r for r in ranks if r != slowest]
    middle = statistics.median_low(finish[r] for r in others)
    typical = min(r for r in others if finish[r] == middle)
    note = f"{len(ranks)} ranks; drawn: rank {slowest} (slowest), rank {typical} (typical)"
    return [(slowest, "slowest"), (typical, "typical")], note


def _rows(spans: list[Span], ranks: list[tuple[int, str]]) -> list[tuple[int, str, str]]:
    """(rank, note, track) rows of one panel: compute first, then the lanes by name."""
    tracks = ["compute", *sorted({s.track for s in spans} - {"compute"})]
    present = {(s.rank, s.track) for s in spans}
    return [(r, note, t) for r, note in ranks for t in tracks if (r, t) in present]


def _step_ranges(steps: int) -> list[range]:
    """Steps grouped into at most ``MAX_STEP_COLOURS`` consecutive ranges (one colour each)."""
    size = max(1, math.ceil(steps / MAX_STEP_COLOURS))
    return [range(first, min(first + size, steps)) for first in range(0, steps, size)]


def _range_label(steps: range) -> str:
    return f"step {steps[0]}" if len(steps) == 1 else f"steps {steps[0]}-{steps[-1]}"


def _grid(heights: list[float], columns: int | None) -> tuple[int, int, list[float]]:
    """(grid rows, columns, height of each grid row in inches): as many columns as keep
    the panels under the height limit (unless ``columns`` is given), then rows scaled
    down where even that is not enough."""
    limit = (MAX_HEIGHT_PX - 1) / DPI - LEGEND_IN  # a pixel to spare for rounding
    if columns is None:
        columns = max(1, math.ceil(sum(heights) / limit))
    rows = math.ceil(len(heights) / columns)
    row_heights = [max(heights[i * columns : (i + 1) * columns]) for i in range(rows)]
    scale = min(1.0, limit / sum(row_heights))
    return rows, columns, [h * scale for h in row_heights]


def plot_timelines(
    panels: dict[str, list[Span]], path: str, *, columns: int | None = None
) -> Figure:
    """Draw one panel per title (row-major on a grid of ``columns``; default: as many as
    keep the picture under ``MAX_HEIGHT_PX``) to a PNG at ``path``; in each, one row per
    (rank, track) drawn and one bar per span, coloured by its step's range. Returns the
    figure (already saved and closed) so that callers and tests can inspect it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = {title: _ranks_drawn(spans) for title, spans in panels.items()}
    layouts = {title: _rows(spans, chosen[title][0]) for title, spans in panels.items()}
    heights = [ROW_IN * max(len(rows), 1) + PANEL_HEADER_IN for rows in layouts.values()]
    grid_rows, columns, row_heights = _grid(heights, columns)
    fig = plt.figure(
        figsize=(COLUMN_WIDTH_IN * columns, sum(row_heights) + LEGEND_IN),
        dpi=DPI,
        layout="constrained",
    )
    axes = fig.subplots(grid_rows, columns, squeeze=False, height_ratios=row_heights).ravel()
    steps = 1 + max((s.step for spans in panels.values() for s in spans), default=0)
    ranges = _step_ranges(steps)
    colour_of = {step: i for i, r in enumerate(ranges) for step in r}
    cmap = plt.get_cmap("tab10")
    for ax, (title, spans) in zip(axes, panels.items()):
        rows = layouts[title]
        for y, (rank, _, track) in enumerate(rows):
            mine = [s for s in spans if s.rank == rank and s.track == track]
            ax.broken_barh(
                [(s.start_ms, max(s.end_ms - s.start_ms, 1e-3)) for s in mine],
                (y - 0.35, 0.7),
                facecolors=[cmap(colour_of[s.step]) for s in mine],
                edgecolor="black",
                linewidth=0.3,
            )
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels(
            [f"rank {r}{f' ({note})' if note else ''} {t}" for r, note, t in rows],
            fontsize="small",
        )
        ax.set_ylim(len(rows) - 0.5, -0.5)
        note = chosen[title][1]
        ax.set_title(f"{title}\n{note}" if note else title, fontsize="medium")
        ax.set_xlabel("time since the call started (ms)", fontsize="small")
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    handles = [plt.Rectangle((0, 0), 1, 1, color=cmap(i)) for i in range(len(ranges))]
    fig.legend(
        handles,
        [_range_label(r) for r in ranges],
        loc="outside upper center",
        ncol=len(ranges),
        fontsize="small",
    )
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return fig
