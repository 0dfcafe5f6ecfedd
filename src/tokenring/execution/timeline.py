"""Measured per-step timelines: when each block computed and each lane's moves ran.

On CUDA the spans come from CUDA events: a compute span brackets the kernel
and its merge on the compute stream; a move's span starts where the compute
stream was when it was posted (NCCL waits for it) and ends when the
communicator's work completes, observed from a per-lane side stream that only
waits on it. On CPU (gloo) spans are wall-clock times; gloo's work has no
completion callback, so a move's end is the moment ``wait()`` returned on this
rank (an upper bound). Drawing them is the benchmark package's job
(``tokenring_bench.plots``).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..schedules.ir import Compute, Post, SlotKind

__all__ = ["Recorder", "Sent", "Span"]


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


@dataclass(frozen=True)
class Sent:
    """Bytes one posted move sends to other ranks, on one lane, from a slot of ``kind``."""

    lane: int
    nbytes: int
    kind: SlotKind


def _owner(rank: int | None) -> str:
    return "*" if rank is None else str(rank)


class Recorder:
    """Collects spans for one rank; ``spans()`` resolves them (after a device sync).

    ``sent_bytes`` counts, per (phase, slot kind), the bytes this rank sent to
    other ranks (for a collective: the data addressed to other members).
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
            f"Q{_owner(op.q_owner)}[{op.q.start}:{op.q.stop}]"
            f"·KV{_owner(op.kv_owner)}[{op.kv.start}:{op.kv.stop}]"
        )
        if op.q.part.count > 1:
            label += f" h{op.q.part.index}/{op.q.part.count}"
        return ("compute", op.step, label, self._mark(), 0)

    def compute_end(self, token) -> None:
        track, step, label, start, nbytes = token
        self._raw.append([track, step, label, start, self._mark(), nbytes, self.phase])

    def comm(self, op: Post, sent: list[Sent], works: dict[int, list]) -> None:
        """Note a posted move: its bytes, and (CUDA) when each lane's part completes."""
        start = self._mark()
        sizes: Counter[int] = Counter()
        for s in sent:
            sizes[s.lane] += s.nbytes
            self.sent_bytes[(self.phase, s.kind.value)] += s.nbytes
        for lane in sorted(works):
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
        """On CPU, a move's end is when this rank's wait on it returned."""
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
