"""Runs any schedule, forward or backward, on real tensors.

The schedule says what happens; this module says how, for each operation:

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

Slot storage and views live in ``slots.py``; what each slot kind holds is
``schedules.ir.COMPONENTS``. See docs/architecture.md.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from functools import cached_property

import torch
import torch.distributed as dist

from ..options import Pass
from ..schedules.ir import Compute, Merge, Post, Schedule, Wait
from ..schedules.masks import BlockKind
from .collectives import post_collective
from .comm import Lanes
from .kernels import BlockMask, KernelBackend
from .kernels.base import accum_dtype
from .merge import merge_into, write_into
from .records import pack_records
from .slots import (
    ComputeStep,
    MergeStep,
    Run,
    SlotGeometry,
    SlotStore,
    TransferStep,
    from_rowmajor,
    to_rowmajor,
)
from .timeline import Recorder, Sent

__all__ = ["Execution", "TransferFailed", "run_backward", "run_forward"]


@dataclass(frozen=True)
class Execution:
    """How one call runs: its kernel, the lanes of each axis its schedule moves data on
    (none on one rank), settings and recorder."""

    kernel: KernelBackend
    lanes: Mapping[str, Lanes]
    timeout: timedelta
    fused_merge: bool
    recorder: Recorder | None = None
    workspace_bytes: int = 0
    """The largest scratch buffer a plan keeps for its next call, where that is safe (on
    the CPU: ``storage.py``)."""

    @cached_property
    def packs(self) -> bool:
        """Whether this call's transfers pack several components into one message (gloo)."""
        return any(lanes.backend == "gloo" for lanes in self.lanes.values())


class TransferFailed(RuntimeError):
    """A transfer or collective with peers failed or timed out; says which rank, step
    and peers."""


@dataclass
class _Pending:
    """Work in flight for one handle, and what to do once it has completed."""

    post: Post
    works: dict[int, list[dist.Work]]  # lane -> works
    finish: Callable[[], None] | None = None


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
            tensors = [views[i] if views[i].is_contiguous() else views[i].contiguous()
                       for i in step.views]  # fmt: skip
        else:
            tensors = [views[i] for i in step.views]
        ops = by_lane.setdefault(step.lane, [])
        ops += [lanes.p2p(x, step.peer, step.send, step.lane) for x in tensors]
    return {lane: lanes.post_ops(by_lane[lane]) for lane in sorted(by_lane)}, sent


def _post(store: SlotStore, op: Post, steps, ex: Execution) -> _Pending:
    axis = op.moves[0].axis
    lanes = ex.lanes.get(axis)
    if lanes is None:
        raise AssertionError(f"a schedule that moves data on axis {axis!r} needs its lanes")
    move = op.collective
    if move is None:
        works, sent = _post_transfers(store, steps, lanes, ex.recorder is not None)
        pending = _Pending(op, works)
    else:
        work, finish, sent = post_collective(store, move, lanes, lanes.rank)
        pending = _Pending(op, {move.lane: [work]}, finish)
    if ex.recorder is not None:
        ex.recorder.comm(op, sent, pending.works)
    return pending


def _complete(schedule: Schedule, pass_: Pass, pending: _Pending, ex: Execution) -> None:
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


def _block_mask(store: SlotStore, op: Compute) -> BlockMask | None:
    """The explicit mask of a PARTIAL block (made once per plan), else None."""
    if op.kind is not BlockKind.PARTIAL:
        return None
    return store.geometry.block_mask(op, store.device)


def _compute_forward(store: SlotStore, op: Compute, step: ComputeStep, ex: Execution) -> None:
    views = store.views
    q, k, v = step.inputs
    lengths = None if step.ragged is None else store.key_lengths[step.ragged]
    out_b, lse_b = ex.kernel.forward(
        views[q], views[k], views[v], step.causal, store.geometry.scale, _block_mask(store, op),
        key_lengths=lengths,
    )  # fmt: skip
    for run in step.q_runs:
        out, lse = run.targets
        part, part_lse = (
            (out_b, lse_b) if run.whole else (out_b[:, run.start : run.stop],
                                              lse_b[:, :, run.start : run.stop])
        )  # fmt: skip
        if run.fresh:
            write_into(views[out], views[lse], part, part_lse)
        else:
            merge_into(
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


def _compute_backward(store: SlotStore, op: Compute, step: ComputeStep, ex: Execution) -> None:
    views = store.views
    do, q, k, v, out, lse, delta = (views[i] for i in step.inputs)
    dq, dk, dv = ex.kernel.backward(
        do, q, k, v, out, lse, delta, step.causal, store.geometry.scale, _block_mask(store, op)
    )
    _accumulate(views, step.q_runs, (dq,))
    if step.kv_runs:
        _accumulate(views, step.kv_runs, (dk, dv))


def _merge(store: SlotStore, step: MergeStep, pass_: Pass, ex: Execution) -> None:
    views = store.views
    if pass_ is Pass.FORWARD:
        (out, lse), (part, part_lse) = step.dst, step.src
        merge_into(
            views[out], views[lse], views[part], views[part_lse], fused=ex.fused_merge,
            empty_rows=store.geometry.rows_may_be_empty,
        )  # fmt: skip
        return
    for dst, src in zip(step.dst, step.src):
        views[dst].add_(views[src])


def _execute(schedule: Schedule, pass_: Pass, store: SlotStore, ex: Execution) -> None:
    pending: dict[str, _Pending] = {}
    recorder = ex.recorder
    if recorder is not None:
        recorder.phase = pass_.value
    forward = pass_ is Pass.FORWARD
    for op, step in zip(schedule.ops, store.geometry.steps):
        match op:
            case Post():
                pending[op.handle] = _post(store, op, step, ex)
            case Wait():
                _complete(schedule, pass_, pending.pop(op.handle), ex)
            case Compute():
                if step.empty:
                    continue  # a cell of no tokens
                token = recorder.compute_start(op) if recorder is not None else None
                if forward:
                    _compute_forward(store, op, step, ex)
                else:
                    _compute_backward(store, op, step, ex)
                if recorder is not None:
                    recorder.compute_end(token)
            case Merge():
                _merge(store, step, pass_, ex)
    if pending:
        raise AssertionError(f"schedule left moves unwaited: {sorted(pending)}")


def _store(geometry: SlotGeometry, local: dict, inputs: dict, device: torch.device,
           ex: Execution, key_lengths: Mapping[int, torch.Tensor] | None = None,
           ) -> SlotStore:  # fmt: skip
    """The call's slot storage; its scratch reused from the plan's last call where every
    operation completes before the call returns (the CPU) and it is small enough."""
    joint = ex.packs
    pool = geometry.pool(joint, ex.workspace_bytes) if device.type == "cpu" else None
    return SlotStore(geometry, local, device, key_lengths, joint, pool, inputs)


def run_forward(
    geometry: SlotGeometry,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ex: Execution,
    *,
    keep_accum: bool = False,
    key_lengths: Mapping[int, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward pass of one rank (``geometry``: its schedule and call) on ``q, k, v`` of
    ``[B, L, H, D]`` (any strides: a KV cache's batch-major storage is bound as it is):
    returns ``out`` ``[B, L, H, D]`` (input dtype, or with ``keep_accum`` the accumulation
    dtype, for more merging) and ``lse`` in row-major storage ``[L, B, H]`` (float32).
    ``key_lengths``: the valid tokens per batch row of each ragged piece
    (``Geometry.ragged``)."""
    schedule, call = geometry.schedule, geometry.call
    inputs = {"q": {"q": q}, "kv": {"k": k, "v": v}}
    store = _store(geometry, {}, inputs, q.device, ex, key_lengths)
    _execute(schedule, Pass.FORWARD, store, ex)
    store.release()
    result = schedule.query_result
    lse = store.own(result, "lse")
    if keep_accum:
        return from_rowmajor(store.own(result, "out"), accum_dtype(call.dtype)), lse
    return store.result(result, "out"), lse


def run_backward(
    geometry: SlotGeometry,
    tensors: dict[str, torch.Tensor],
    ex: Execution,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward pass of one rank.

    ``tensors`` holds ``q, k, v, out, do`` as ``[B, L, H, D]`` and ``lse`` in
    row-major storage ``[L, B, H]`` (as ``run_forward`` returned it), and ``dlse``, the
    LSE's gradient in the same storage, when it has one. Returns
    ``dq, dk, dv`` in the input dtype.
    """
    schedule, call = geometry.schedule, geometry.call
    out, do = tensors["out"], tensors["do"]
    wide = accum_dtype(call.dtype)
    delta = to_rowmajor((do.to(wide) * out.to(wide)).sum(dim=-1))
    query = {"lse": tensors["lse"], "delta": delta}
    given = {"q": tensors["q"], "do": do}
    if "dlse" in tensors:  # the LSE's own gradient (``passes.backward_pass``): kernels
        # then form delta from ``delta`` (``delta_surrogate``), not from ``out``
        query["delta"] = delta - tensors["dlse"].to(wide)
    else:
        given["out"] = out
    inputs = {"q": given, "kv": {"k": tensors["k"], "v": tensors["v"]}}
    store = _store(geometry, {"q": query}, inputs, tensors["q"].device, ex)
    _execute(schedule, Pass.BACKWARD, store, ex)
    store.release()
    if schedule.kv_result is None:
        raise AssertionError("a backward schedule must name its key/value result slot")
    return (
        store.result(schedule.query_result, "dq"),
        store.result(schedule.kv_result, "dk"),
        store.result(schedule.kv_result, "dv"),
    )
