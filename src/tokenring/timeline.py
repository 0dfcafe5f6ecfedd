"""Measured per-step timelines: when each block computed and each lane's transfers ran.

On CUDA the spans come from CUDA events: a compute span brackets the kernel
and its merge on the compute stream; a transfer span starts where the
compute stream was when the transfer was posted (NCCL waits for it) and ends
when the communicator's work completes, observed from a per-lane side stream
that only waits on it. On CPU (gloo) spans are wall-clock times; gloo's
point-to-point work has no completion callback, so a transfer's end is the
moment ``wait()`` returned on this rank (an upper bound).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .schedules.ir import Compute, Post, SlotKind

__all__ = ["Recorder", "Span", "plot_timelines"]


@dataclass(frozen=True)
class Span:
    rank: int
    step: int
    track: str  # "compute", "lane0", "lane1"
    label: str
    start_ms: float
    end_ms: float
    nbytes: int = 0
    phase: str = "forward"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Recorder:
    """Collects spans for one rank; ``spans()`` resolves them (after a device sync).

    ``sent_bytes`` counts, per (phase, slot kind), the bytes this rank sent.
    """

    def __init__(self, rank: int, device: torch.device):
        self.rank = rank
        self.cuda = device.type == "cuda"
        self.phase = "forward"
        self.sent_bytes: Counter[tuple[str, str]] = Counter()
        self._raw: list[list] = []
        self._side: dict[int, torch.cuda.Stream] = {}
        self._origin = self._mark()

    def _mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _elapsed_ms(self, mark) -> float:
        if self.cuda:
            return self._origin.elapsed_time(mark)
        return (mark - self._origin) * 1e3

    def compute_start(self, op: Compute):
        label = (
            f"Q{op.q_owner}[{op.q.start}:{op.q.stop}]·KV{op.kv_owner}[{op.kv.start}:{op.kv.stop}]"
        )
        return ("compute", op.step, label, self._mark(), 0)

    def compute_end(self, token) -> None:
        track, step, label, start, nbytes = token
        self._raw.append([track, step, label, start, self._mark(), nbytes, self.phase])

    def comm_start(
        self, op: Post, tensors: list[tuple[torch.Tensor, int, bool, int]], kinds: list[SlotKind]
    ):
        sizes: dict[int, int] = {}
        for (tensor, _, is_send, lane), kind in zip(tensors, kinds):
            sizes.setdefault(lane, 0)
            if is_send:
                nbytes = tensor.numel() * tensor.element_size()
                sizes[lane] += nbytes
                self.sent_bytes[(self.phase, kind.value)] += nbytes
        return (op, sorted(sizes), sizes, self._mark())

    def comm_posted(self, token, works: dict[int, list]) -> None:
        """Note when the just-posted transfers complete, per lane (see the module docstring)."""
        op, lanes, sizes, start = token
        for lane in lanes:
            end = None
            if self.cuda:
                side = self._side.setdefault(lane, torch.cuda.Stream())
                with torch.cuda.stream(side):
                    for work in works[lane]:
                        work.wait()
                    end = torch.cuda.Event(enable_timing=True)
                    end.record(side)
            self._raw.append(
                [f"lane{lane}", op.step, op.handle, start, end, sizes[lane], self.phase]
            )

    def comm_waited(self, handle: str) -> None:
        """On CPU, a transfer's end is when this rank's wait on it returned."""
        if self.cuda:
            return
        now = time.perf_counter()
        for raw in self._raw:
            if raw[2] == handle and raw[4] is None and raw[6] == self.phase:
                raw[4] = now

    def spans(self) -> list[Span]:
        """All spans in milliseconds since the recorder was made."""
        if self.cuda:
            torch.cuda.synchronize()
        return [
            Span(
                self.rank,
                step,
                track,
                label,
                self._elapsed_ms(start),
                self._elapsed_ms(end),
                nbytes,
                phase,
            )
            for track, step, label, start, end, nbytes, phase in self._raw
        ]


def plot_timelines(panels: dict[str, list[Span]], path: str) -> None:
    """One panel per title; in each, one row per (rank, track) and bars coloured by step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tracks = ["compute", "lane0", "lane1"]
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
