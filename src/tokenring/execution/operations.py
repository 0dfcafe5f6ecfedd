"""How a schedule's moves run: posts and waits.

- ``Post``: point-to-point transfers go out as one batch per lane, every
  buffer a contiguous piece of slot storage; a collective is packed into one
  flat buffer and is one asynchronous torch.distributed call, unpacked into
  its slots when its ``Wait`` completes (``collectives.py``).
- ``Wait``: completes the handle's work (on gloo the host waits, bounded by
  the runtime's timeout; on NCCL the compute stream is ordered after it); a
  failure names the rank, the step and the peers (``TransferFailed``).

A call runs its schedule as the straight-line code ``program.py`` translates it into
once per plan. That code writes kernel calls and merges out itself; it writes a
point-to-point post out in the form ``post`` would make it, and calls ``post`` for a
collective and while a ``Recorder`` counts the bytes; every wait calls ``complete``.
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
from .records import pack_records
from .slots import SlotStore, TransferStep
from .timeline import Sent

if TYPE_CHECKING:  # executor.py imports program.py, which imports this module
    from .executor import Execution

__all__ = ["Pending", "TransferFailed", "complete", "lanes_of", "post", "sendable"]


class TransferFailed(RuntimeError):
    """A transfer or collective with peers failed or timed out; says which rank, step
    and peers."""


@dataclass
class Pending:
    """Work in flight for one handle, and what to do once it has completed."""

    post: Post
    works: dict[int, list[dist.Work]]  # lane -> works
    finish: Callable[[], None] | None = None


def sendable(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a transfer sends it: one contiguous block (a KV cache's storage is
    batch-major, so its rows are not)."""
    return t if t.is_contiguous() else t.contiguous()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _post_transfers(
    store: SlotStore, steps: tuple[TransferStep, ...], lanes: Lanes, recording: bool
) -> tuple[dict[int, list[dist.Work]], list[Sent]]:
    """Point-to-point moves of one axis (a Post's transfers share their axis): one batch
    per lane.

    On gloo every message costs a round of latency, so a transfer of several
    components (k and v; out and lse; the query bundle) goes as one message of records
    (``records.py``): the slots such transfers fill are stored that way, so only a
    call's own inputs are copied, when sent. NCCL runs a batch's messages as one group,
    so there they go as they are.
    """
    views = store.views
    pack = lanes.backend == "gloo"
    by_lane: dict[int, list[dist.P2POp]] = {}
    sent: list[Sent] = []
    for step in steps:
        if step.send and recording:
            nbytes = store.layout.nbytes
            size = sum(_nbytes(views[i]) if views[i] is not None else nbytes[i] for i in step.views)
            sent.append(Sent(step.lane, size, step.kind))
        if pack and step.records is not None:
            records = views[step.records]  # the slot's records: sent or received as they are
            if records is None:
                if not step.send:
                    raise AssertionError("a slot that receives records is stored jointly")
                records = pack_records([views[i] for i in step.views])  # the call's own rows
            tensors = [records]
        elif step.send:  # a KV cache's storage is batch-major: its rows are not one block
            tensors = [sendable(views[i]) for i in step.views]
        else:
            tensors = [views[i] for i in step.views]
        ops = by_lane.setdefault(step.lane, [])
        ops += [lanes.p2p(x, step.peer, step.send, step.lane) for x in tensors]
    return {lane: lanes.post_ops(by_lane[lane]) for lane in sorted(by_lane)}, sent


def lanes_of(ex: Execution, axis: str) -> Lanes:
    """The lanes a call moves data on along ``axis``."""
    lanes = ex.lanes.get(axis)
    if lanes is None:
        raise AssertionError(f"a schedule that moves data on axis {axis!r} needs its lanes")
    return lanes


def post(store: SlotStore, op: Post, steps, ex: Execution) -> Pending:
    lanes = lanes_of(ex, op.moves[0].axis)
    move = op.collective
    if move is None:
        works, sent = _post_transfers(store, steps, lanes, ex.recorder is not None)
        pending = Pending(op, works)
    else:
        work, finish, sent = post_collective(store, move, lanes, lanes.rank)
        pending = Pending(op, {move.lane: [work]}, finish)
    if ex.recorder is not None:
        ex.recorder.comm(op, sent, pending.works)
    return pending


def complete(schedule: Schedule, pass_: Pass, pending: Pending, ex: Execution) -> None:
    """Wait for one Post's work; a failure names this rank, the step and the peers.

    On gloo the host blocks here, bounded by the runtime's timeout (gloo's waits
    have none of their own). On NCCL ``wait()`` only orders the compute stream
    after the work; NCCL's watchdog enforces the lanes' timeout.
    """
    post = pending.post
    axis = post.moves[0].axis
    gloo = ex.lanes[axis].backend == "gloo"
    try:
        for works in pending.works.values():
            for work in works:
                if gloo:
                    work.wait(ex.timeout)
                else:
                    work.wait()
    except RuntimeError as err:
        if post.collective is None:
            peers = sorted({t.peer for t in post.moves})
            what = f"transfer {post.handle!r} with {axis} rank(s) {peers}"
        else:
            what = f"{type(post.collective).__name__} {post.handle!r} over the {axis} axis"
        raise TransferFailed(
            f"tokenring {schedule.strategy} {pass_.value}: rank {schedule.rank} of "
            f"{schedule.world}, step {post.step}, {what} failed (a peer died, or did not "
            f"reach this step within the timeout of {ex.timeout.total_seconds():g} s; "
            f"see tokenring.configure): {err}"
        ) from err
    if pending.finish is not None:
        pending.finish()
    if ex.recorder is not None:
        ex.recorder.comm_waited(post.handle)
