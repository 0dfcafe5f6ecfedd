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

import torch
import torch.distributed as dist

from ..options import Pass
from ..schedules.ir import COMPONENTS, Compute, Merge, Post, Schedule, Wait
from ..schedules.masks import BlockKind
from .collectives import post_collective
from .comm import Lanes, Message
from .kernels import BlockMask, KernelBackend
from .kernels.base import accum_dtype
from .merge import merge_into, write_into
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


def _packed(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Several tensors as one byte buffer (a copy), for one message."""
    return torch.cat([t.contiguous().view(-1).view(torch.uint8) for t in tensors])


def _unpack(buffer: torch.Tensor, targets: list[torch.Tensor]) -> None:
    offset = 0
    for t in targets:
        n = t.numel() * t.element_size()
        t.copy_(buffer[offset : offset + n].view(t.dtype).view(t.shape))
        offset += n


def _post_transfers(
    store: SlotStore, op: Post, steps: tuple[TransferStep, ...], lanes: Lanes
) -> tuple[_Pending, list[Sent]]:
    """Point-to-point moves of one axis (a Post's transfers share their axis).

    On gloo every message costs a round of latency, so a transfer of several
    components (k and v; out and lse; the query bundle) goes as one packed message,
    unpacked when its ``Wait`` completes; NCCL runs a batch's messages as one group,
    so there they go as they are, without the copies.
    """
    pack = lanes.backend == "gloo"
    messages, sent, unpacks = [], [], []
    for t, step in zip(op.moves, steps):
        tensors = [store.at(step.place, comp) for comp in step.components]
        if t.send:  # a KV cache's storage is batch-major: its rows are not one block
            tensors = [x if x.is_contiguous() else x.contiguous() for x in tensors]
        if t.send:
            sent.append(Sent(t.lane, sum(_nbytes(x) for x in tensors), step.kind))
        if pack and len(tensors) > 1:
            if t.send:
                tensors = [_packed(tensors)]
            else:
                nbytes = sum(_nbytes(x) for x in tensors)
                staging = torch.empty(nbytes, dtype=torch.uint8, device=tensors[0].device)
                unpacks.append((staging, tensors))
                tensors = [staging]
        messages += [Message(x, t.peer, t.send, t.lane) for x in tensors]
    works: dict[int, list[dist.Work]] = {}
    for lane in sorted({m.lane for m in messages}):
        works[lane] = lanes.post([m for m in messages if m.lane == lane])

    def unpack() -> None:
        for staging, targets in unpacks:
            _unpack(staging, targets)

    return _Pending(op, works, unpack if unpacks else None), sent


def _post(store: SlotStore, op: Post, steps, ex: Execution) -> _Pending:
    axis = op.moves[0].axis
    lanes = ex.lanes.get(axis)
    if lanes is None:
        raise AssertionError(f"a schedule that moves data on axis {axis!r} needs its lanes")
    move = op.collective
    if move is None:
        pending, sent = _post_transfers(store, op, steps, lanes)
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
    view = store.kernel_view
    lengths = None if step.ragged is None else store.key_lengths[step.ragged]
    out_b, lse_b = ex.kernel.forward(
        view(step.q, "q"), view(step.kv, "k"), view(step.kv, "v"), step.causal,
        store.call.scale, _block_mask(store, op), key_lengths=lengths,
    )  # fmt: skip
    rows = out_b.shape[1]
    for run in step.q_runs:
        out, lse = view(run.place, "out"), view(run.place, "lse")
        a, b = run.start, run.stop
        part, part_lse = (
            (out_b, lse_b) if a == 0 and b == rows else (out_b[:, a:b], lse_b[:, :, a:b])
        )  # slicing the whole block would be two dispatches for nothing
        if run.fresh:
            write_into(out, lse, part, part_lse)
        else:
            merge_into(out, lse, part, part_lse, fused=ex.fused_merge)


def _accumulate(store: SlotStore, runs: tuple[Run, ...], parts: dict) -> None:
    for run in runs:
        for comp, value in parts.items():
            target = store.kernel_view(run.place, comp)
            if run.fresh:
                target.copy_(value[:, run.start : run.stop])
            else:
                target.add_(value[:, run.start : run.stop])


def _compute_backward(store: SlotStore, op: Compute, step: ComputeStep, ex: Execution) -> None:
    view = store.kernel_view
    out = view(step.q, "out") if "out" in store.tensors[step.q.slot] else None
    dq, dk, dv = ex.kernel.backward(
        view(step.q, "do"), view(step.q, "q"), view(step.kv, "k"), view(step.kv, "v"), out,
        view(step.q, "lse"), view(step.q, "delta"), step.causal, store.call.scale,
        _block_mask(store, op),
    )  # fmt: skip
    _accumulate(store, step.q_runs, {"dq": dq})
    if step.kv_runs:
        _accumulate(store, step.kv_runs, {"dk": dk, "dv": dv})


def _merge(store: SlotStore, step: MergeStep, pass_: Pass, ex: Execution) -> None:
    view = store.kernel_view
    if pass_ is Pass.FORWARD:
        merge_into(
            view(step.dst, "out"), view(step.dst, "lse"), view(step.src, "out"),
            view(step.src, "lse"), fused=ex.fused_merge,
        )  # fmt: skip
        return
    for comp in COMPONENTS[(pass_, store.schedule.slots[step.src.slot].kind)]:
        view(step.dst, comp).add_(view(step.src, comp))


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


def run_forward(
    geometry: SlotGeometry,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ex: Execution,
    *,
    keep_accum: bool = False,
    kv_rowmajor: bool = False,
    key_lengths: Mapping[int, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward pass of one rank (``geometry``: its schedule and call): returns ``out``
    ``[B, L, H, D]`` (input dtype, or with ``keep_accum`` the accumulation dtype, for more
    merging) and ``lse`` in row-major storage ``[L, B, H]`` (float32). ``kv_rowmajor``:
    ``k``, ``v`` are row-major already (``[L, B, H, D]``: a KV cache's storage, bound
    without a copy); ``key_lengths``: the valid tokens per batch row of each ragged piece
    (``Geometry.ragged``)."""
    schedule, call = geometry.schedule, geometry.call
    if not kv_rowmajor:
        k, v = to_rowmajor(k), to_rowmajor(v)
    local = {"q": {"q": to_rowmajor(q)}, "kv": {"k": k, "v": v}}
    store = SlotStore(geometry, local, q.device, key_lengths)
    _execute(schedule, Pass.FORWARD, store, ex)
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
    out = to_rowmajor(tensors["out"])
    do = to_rowmajor(tensors["do"])
    wide = accum_dtype(call.dtype)
    delta = (do.to(wide) * out.to(wide)).sum(dim=-1)
    query = {"q": to_rowmajor(tensors["q"]), "do": do, "lse": tensors["lse"], "delta": delta}
    if "dlse" in tensors:  # the LSE's own gradient (``passes.backward_pass``): kernels
        # then form delta from ``delta`` (``delta_surrogate``), not from ``out``
        query["delta"] = delta - tensors["dlse"].to(wide)
    else:
        query["out"] = out
    local = {"q": query, "kv": {"k": to_rowmajor(tensors["k"]), "v": to_rowmajor(tensors["v"])}}
    store = SlotStore(geometry, local, tensors["q"].device)
    _execute(schedule, Pass.BACKWARD, store, ex)
    if schedule.kv_result is None:
        raise AssertionError("a backward schedule must name its key/value result slot")
    return (
        store.result(schedule.query_result, "dq"),
        store.result(schedule.kv_result, "dk"),
        store.result(schedule.kv_result, "dv"),
    )
