"""How a schedule's moves run: collectives posted, any move waited for.

- A collective ``Post`` is packed into one flat buffer and is one asynchronous
  torch.distributed call, unpacked into its slots when its ``Wait`` completes
  (``collectives.py``). Point-to-point posts are written out by ``program.py``
  (one batch per lane; ``sent_of`` tells a ``Recorder`` their bytes).
- ``Wait`` on a collective: completes its work (on gloo the host waits, bounded
  by the runtime's timeout; on NCCL the compute stream is ordered after it) and
  unpacks it. Point-to-point waits are written out by ``program.py``. Either way
  a failure names the rank, the step and the peers (``transfer_failed``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from ..options import Pass
from ..schedules.ir import Post, Schedule
from .collectives import post_collective
from .comm import Lanes
from .slots import SlotStore, TransferStep
from .timeline import Sent

if TYPE_CHECKING:  # executor.py imports program.py, which imports this module
    from .executor import Execution

__all__ = [
    "Pending", "TransferFailed", "complete", "lanes_of", "sent_of", "start_collective",
    "transfer_failed",
]  # fmt: skip


class TransferFailed(RuntimeError):
    """A transfer or collective with peers failed or timed out; says which rank, step
    and peers."""


@dataclass
class Pending:
    """Work in flight for one handle, and what to do once it has completed."""

    post: Post
    works: dict[int, list[dist.Work]]  # lane -> works
    finish: Callable[[], None] | None = None


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def sent_of(store: SlotStore, steps: tuple[TransferStep, ...]) -> list[Sent]:
    """What a point-to-point post's sends carry, by lane and slot kind (for a
    ``Recorder``): each view's bytes, or the layout's count where the view is packed
    when sent."""
    views, nbytes = store.views, store.layout.nbytes
    return [
        Sent(t.lane, sum(_nbytes(views[i]) if views[i] is not None else nbytes[i]
                         for i in t.views), t.kind)
        for t in steps
        if t.send
    ]  # fmt: skip


def lanes_of(ex: Execution, axis: str) -> Lanes:
    """The lanes a call moves data on along ``axis``."""
    lanes = ex.lanes.get(axis)
    if lanes is None:
        raise AssertionError(f"a schedule that moves data on axis {axis!r} needs its lanes")
    return lanes


def start_collective(store: SlotStore, op: Post, ex: Execution) -> Pending:
    """Post a collective move (``collectives.py``); its ``Wait`` unpacks what arrived."""
    lanes = lanes_of(ex, op.moves[0].axis)
    move = op.collective
    if move is None:
        raise AssertionError(f"{op.handle!r} moves point to point, not as a collective")
    work, finish, sent = post_collective(store, move, lanes, lanes.rank)
    pending = Pending(op, {move.lane: [work]}, finish)
    if ex.recorder is not None:
        ex.recorder.comm(op, sent, pending.works)
    return pending


def transfer_failed(
    schedule: Schedule, pass_: Pass, post: Post, ex: Execution, err: RuntimeError
) -> TransferFailed:
    """The error for a move whose wait failed: names this rank, the step and the peers."""
    axis = post.moves[0].axis
    if post.collective is None:
        peers = sorted({t.peer for t in post.moves})
        what = f"transfer {post.handle!r} with {axis} rank(s) {peers}"
    else:
        what = f"{type(post.collective).__name__} {post.handle!r} over the {axis} axis"
    return TransferFailed(
        f"tokenring {schedule.strategy} {pass_.value}: rank {schedule.rank} of "
        f"{schedule.world}, step {post.step}, {what} failed (a peer died, or did not "
        f"reach this step within the timeout of {ex.timeout.total_seconds():g} s; "
        f"see tokenring.configure): {err}"
    )


def complete(schedule: Schedule, pass_: Pass, pending: Pending, ex: Execution) -> None:
    """Wait for a collective's work, then unpack what arrived; a failure names this rank,
    the step and the peers (``transfer_failed``). Point-to-point waits are written out
    by ``program.py`` the same way.

    On gloo the host blocks here, bounded by the runtime's timeout (gloo's waits
    have none of their own). On NCCL ``wait()`` only orders the compute stream
    after the work; NCCL's watchdog enforces the lanes' timeout.
    """
    post = pending.post
    gloo = ex.lanes[post.moves[0].axis].backend == "gloo"
    try:
        for works in pending.works.values():
            for work in works:
                if gloo:
                    work.wait(ex.timeout)
                else:
                    work.wait()
    except RuntimeError as err:
        raise transfer_failed(schedule, pass_, post, ex, err) from err
    if pending.finish is not None:
        pending.finish()
    if ex.recorder is not None:
        ex.recorder.comm_waited(post.handle)
