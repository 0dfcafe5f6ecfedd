"""How each operation of a schedule runs on real tensors, one at a time.

- ``Post``: point-to-point transfers go out as one batch per lane, every
  buffer a contiguous piece of slot storage; a collective is packed into one
  flat buffer and is one asynchronous torch.distributed call, unpacked into
  its slots when its ``Wait`` completes (``collectives.py``).
- ``Wait``: completes the handle's work (on gloo the host waits, bounded by
  the runtime's timeout; on NCCL the compute stream is ordered after it).
- ``Compute``: one block-attention kernel call (no mask, causal, or an explicit
  mask made from the block's positions, by the block's kind); its result is
  written or LSE-merged (forward) / added (backward) into the result rows.
- ``Merge``: LSE merge (forward) or sum (backward) of result rows.

These functions define what each operation does. A call runs its schedule as the
straight-line code ``program.py`` translates it into once per plan: that code writes
the common forms of these operations out and calls these functions for the rest.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from ..options import Pass
from ..schedules.ir import Compute, Post, Schedule
from ..schedules.masks import BlockKind
from . import merge as merging
from .collectives import post_collective
from .comm import Lanes
from .kernels import BlockMask
from .records import pack_records
from .slots import ComputeStep, MergeStep, Run, SlotStore, TransferStep
from .timeline import Sent

if TYPE_CHECKING:  # executor.py imports this module
    from .executor import Execution

__all__ = [
    "Pending", "TransferFailed", "block_mask_of", "complete", "compute_backward",
    "compute_forward", "lanes_of", "merge", "post", "sendable",
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


def block_mask_of(store: SlotStore, op: Compute) -> BlockMask | None:
    """The explicit mask of a PARTIAL block (made once per plan), else None."""
    if op.kind is not BlockKind.PARTIAL:
        return None
    return store.geometry.block_mask(op, store.device)


def compute_forward(store: SlotStore, op: Compute, step: ComputeStep, ex: Execution) -> None:
    views = store.views
    q, k, v = step.inputs
    lengths = None if step.ragged is None else store.key_lengths[step.ragged]
    out_b, lse_b = ex.kernel.forward(
        views[q], views[k], views[v], step.causal, store.geometry.scale, block_mask_of(store, op),
        key_lengths=lengths,
    )  # fmt: skip
    for run in step.q_runs:
        out, lse = run.targets
        part, part_lse = (
            (out_b, lse_b) if run.whole else (out_b[:, run.start : run.stop],
                                              lse_b[:, :, run.start : run.stop])
        )  # fmt: skip
        if run.fresh:
            merging.write_into(views[out], views[lse], part, part_lse)
        else:
            merging.merge_into(
                views[out], views[lse], part, part_lse, fused=ex.fused_merge,
                empty_rows=store.geometry.rows_may_be_empty,
            )  # fmt: skip


def _accumulate(views: list, runs: tuple[Run, ...], parts: tuple[torch.Tensor, ...]) -> None:
    for run in runs:
        for target, value in zip(run.targets, parts):
            if not run.whole:
                value = value[:, run.start : run.stop]
            if run.fresh:
                views[target].copy_(value)
            else:
                views[target].add_(value)


def compute_backward(store: SlotStore, op: Compute, step: ComputeStep, ex: Execution) -> None:
    views = store.views
    do, q, k, v, out, lse, delta = (views[i] for i in step.inputs)
    dq, dk, dv = ex.kernel.backward(
        do, q, k, v, out, lse, delta, step.causal, store.geometry.scale, block_mask_of(store, op)
    )
    _accumulate(views, step.q_runs, (dq,))
    if step.kv_runs:
        _accumulate(views, step.kv_runs, (dk, dv))


def merge(store: SlotStore, step: MergeStep, pass_: Pass, ex: Execution) -> None:
    views = store.views
    if pass_ is Pass.FORWARD:
        (out, lse), (part, part_lse) = step.dst, step.src
        merging.merge_into(
            views[out], views[lse], views[part], views[part_lse], fused=ex.fused_merge,
            empty_rows=store.geometry.rows_may_be_empty,
        )  # fmt: skip
        return
    for dst, src in zip(step.dst, step.src):
        views[dst].add_(views[src])
