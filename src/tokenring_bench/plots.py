"""Drawing measured (and, later, predicted) per-step timelines as a PNG (matplotlib)."""

from __future__ import annotations

from tokenring.execution.timeline import Span

__all__ = ["plot_timelines"]


def plot_timelines(panels: dict[str, list[Span]], path: str) -> None:
    """One panel per title; in each, one row per (rank, track) and bars coloured by step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tracks = [
        "compute",
        *sorted({s.track for spans in panels.values() for s in spans} - {"compute"}),
    ]
    layouts = []
    for spans in panels.values():
        ranks = sorted({s.rank for s in spans})
        rows = [
            (r, t)
            for r in ranks
            for t in tracks
            if any(s.rank == r and s.track == t for s in spans)
        ]
        layouts.append(rows)
    heights = [0.4 * len(rows) + 1.2 for rows in layouts]
    fig, axes = plt.subplots(
        len(panels),
        1,
        figsize=(12, sum(heights)),
        squeeze=False,
        gridspec_kw={"height_ratios": heights},
    )
    cmap = plt.get_cmap("tab10")
    for ax, (title, spans), rows in zip(axes[:, 0], panels.items(), layouts):
        for y, (rank, track) in enumerate(rows):
            for s in spans:
                if s.rank == rank and s.track == track:
                    ax.barh(
                        y,
                        max(s.end_ms - s.start_ms, 1e-3),
                        left=s.start_ms,
                        height=0.7,
                        color=cmap(s.step % 10),
                        edgecolor="black",
                        linewidth=0.3,
                    )
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels([f"rank {r} {t}" for r, t in rows], fontsize="small")
        ax.invert_yaxis()
        ax.set_title(title, fontsize="medium")
        steps = max((s.step for s in spans), default=0) + 1
        handles = [plt.Rectangle((0, 0), 1, 1, color=cmap(i % 10)) for i in range(steps)]
        ax.legend(
            handles,
            [f"step {i}" for i in range(steps)],
            loc="upper right",
            fontsize="x-small",
            ncol=min(steps, 8),
        )
    axes[-1, 0].set_xlabel("time since the call started (ms)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
