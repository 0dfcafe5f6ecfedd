"""Runs any schedule, forward or backward, on real tensors.

The executor owns the mapping from a schedule's slots to tensors:

- every slot is stored *row-major* (sequence outermost: ``[L, B, H, D]`` and
  ``[L, B, H]``), so any run of rows is one contiguous piece of memory that
  can be sent as is; kernels get ``[B, L, H, D]`` / ``[B, H, L]`` views;
- the kinds of slot hold, per pass:

  ========== ======================== ==================
  kind       forward                  backward
  ========== ======================== ==================
  query      q                        q, do, lse, delta
  kv         k, v                     k, v
  q result   out, lse                 dq
  kv result  (none)                   dk, dv
  ========== ======================== ==================

- result slots declared ``ACCUM`` are float32; ``WIRE`` ones use the input
  dtype (LSE and delta are always float32); float64 inputs use float64 for all
  of these (``kernels.accum_dtype``);
- all buffers are allocated once per call, before the first step.

See docs/algorithms.md for the schedules themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .comm import Lanes
from .kernels import KernelBackend
from .kernels.base import accum_dtype
from .layouts import local_bounds
from .merge import merge_into, write_into
from .options import Pass
from .schedules.ir import Compute, Merge, Post, Precision, Rows, Schedule, SlotKind, Wait
from .timeline import Recorder

__all__ = ["Problem", "TransferFailed", "run_backward", "run_forward", "to_rowmajor"]


@dataclass(frozen=True)
class Problem:
    """Shapes and options shared by every rank for one call."""

    batch: int
    length: int  # local sequence length
    heads_q: int
    heads_kv: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    causal: bool
    scale: float


# component -> shape family ("q": query heads, "kv": key/value heads, "row": one value per head)
_FAMILY = {
    "q": "q",
    "do": "q",
    "out": "q",
    "dq": "q",
    "k": "kv",
    "v": "kv",
    "dk": "kv",
    "dv": "kv",
    "lse": "row",
    "delta": "row",
}
_COMPONENTS = {
    (Pass.FORWARD, SlotKind.QUERY): ("q",),
    (Pass.FORWARD, SlotKind.KV): ("k", "v"),
    (Pass.FORWARD, SlotKind.QUERY_RESULT): ("out", "lse"),
    (Pass.FORWARD, SlotKind.KV_RESULT): (),
    (Pass.BACKWARD, SlotKind.QUERY): ("q", "do", "lse", "delta"),
    (Pass.BACKWARD, SlotKind.KV): ("k", "v"),
    (Pass.BACKWARD, SlotKind.QUERY_RESULT): ("dq",),
    (Pass.BACKWARD, SlotKind.KV_RESULT): ("dk", "dv"),
}


def to_rowmajor(x: torch.Tensor) -> torch.Tensor:
    """``[B, L, ...] -> [L, B, ...]`` contiguous; a view when B == 1 and ``x`` is contiguous."""
    return x.transpose(0, 1).contiguous()


def _logical(phys: torch.Tensor) -> torch.Tensor:
    """Row-major storage as kernel-facing views: [L,B,H,D] -> [B,L,H,D], [L,B,H] -> [B,H,L]."""
    return phys.permute(1, 0, 2, 3) if phys.dim() == 4 else phys.permute(1, 2, 0)


class _Slots:
    """Tensors behind a schedule's slots for one call."""

    def __init__(self, schedule: Schedule, pass_: Pass, problem: Problem, local: dict[str, dict]):
        self.problem = problem
        self.bounds = local_bounds(problem.length)
        self.tensors: dict[str, dict[str, torch.Tensor]] = {}
        used = schedule.used_slots
        for name, spec in schedule.slots.items():
            if name not in used:
                continue
            if spec.local and name in local:
                self.tensors[name] = local[name]
                continue
            comps = _COMPONENTS[(pass_, spec.kind)]
            self.tensors[name] = {c: self._alloc(c, spec.precision) for c in comps}

    def _alloc(self, component: str, precision: Precision) -> torch.Tensor:
        p = self.problem
        family = _FAMILY[component]
        if family == "row":
            shape, dtype = (p.length, p.batch, p.heads_q), accum_dtype(p.dtype)
        else:
            heads = p.heads_q if family == "q" else p.heads_kv
            shape = (p.length, p.batch, heads, p.head_dim)
            dtype = accum_dtype(p.dtype) if precision is Precision.ACCUM else p.dtype
        return torch.empty(shape, dtype=dtype, device=p.device)

    def span(self, rows: Rows) -> tuple[int, int]:
        return self.bounds[rows.start], self.bounds[rows.stop]

    def phys(self, rows: Rows, component: str) -> torch.Tensor:
        a, b = self.span(rows)
        return self.tensors[rows.slot][component][a:b]

    def view(self, rows: Rows, component: str) -> torch.Tensor:
        return _logical(self.phys(rows, component))

    def has(self, rows: Rows, component: str) -> bool:
        return component in self.tensors[rows.slot]

    def sub_runs(self, rows: Rows, fresh: tuple[bool, ...]) -> list[tuple[Rows, bool, int, int]]:
        """Split ``rows`` into runs of equal freshness, with offsets relative to ``rows``."""
        runs = []
        base = self.bounds[rows.start]
        i = rows.start
        while i < rows.stop:
            j = i
            while j + 1 < rows.stop and fresh[j + 1 - rows.start] == fresh[i - rows.start]:
                j += 1
            sub = Rows(rows.slot, i, j + 1)
            a, b = self.span(sub)
            runs.append((sub, fresh[i - rows.start], a - base, b - base))
            i = j + 1
        return runs


def _transfer_tensors(slots: _Slots, schedule: Schedule, pass_: Pass, op: Post):
    """The contiguous tensors ``op`` moves (one message per component) and their slot kinds."""
    tensors, kinds = [], []
    for t in op.transfers:
        kind = schedule.slots[t.rows.slot].kind
        for comp in _COMPONENTS[(pass_, kind)]:
            tensors.append((slots.phys(t.rows, comp), t.peer, t.send, t.lane))
            kinds.append(kind)
    return tensors, kinds


def _execute(
    schedule: Schedule,
    pass_: Pass,
    slots: _Slots,
    kernel: KernelBackend,
    lanes: Lanes | None,
    recorder: Recorder | None,
) -> None:
    problem = slots.problem
    pending: dict[str, dict] = {}
    posts: dict[str, Post] = {}
    if recorder:
        recorder.phase = pass_.value
    for op in schedule.ops:
        if isinstance(op, Post):
            tensors, kinds = _transfer_tensors(slots, schedule, pass_, op)
            if lanes is None:
                raise AssertionError("a schedule with transfers needs lanes")
            token = recorder.comm_start(op, tensors, kinds) if recorder else None
            works = lanes.post(tensors)
            pending[op.handle] = works
            posts[op.handle] = op
            if recorder:
                recorder.comm_posted(token, works)
        elif isinstance(op, Wait):
            _wait(schedule, pass_, posts.pop(op.handle), pending.pop(op.handle), lanes)
            if recorder:
                recorder.comm_waited(op.handle)
        elif isinstance(op, Compute):
            if (
                slots.span(op.q)[0] == slots.span(op.q)[1]
                or slots.span(op.kv)[0] == slots.span(op.kv)[1]
            ):
                continue  # an empty sub-chunk (contiguous shards of one token)
            token = recorder.compute_start(op) if recorder else None
            if pass_ is Pass.FORWARD:
                _compute_forward(slots, op, kernel, problem)
            else:
                _compute_backward(slots, op, kernel, problem)
            if recorder:
                recorder.compute_end(token)
        else:
            _merge(slots, op, pass_)
    if pending:
        raise AssertionError(f"schedule left transfers unwaited: {sorted(pending)}")


class TransferFailed(RuntimeError):
    """A transfer with a peer failed or timed out; says which rank, step and peers."""


def _wait(schedule: Schedule, pass_: Pass, post: Post, works: dict, lanes: Lanes) -> None:
    """Wait for one Post's transfers; a failure names this rank, the step and the peers.

    On gloo the host blocks here, bounded by the lanes' timeout (gloo's point-to-point
    waits have none of their own). On NCCL ``wait()`` only orders the compute stream
    after the transfer; NCCL's watchdog enforces the process group's timeout.
    """
    try:
        for lane_works in works.values():
            for work in lane_works:
                if lanes.backend == "gloo":
                    work.wait(lanes.timeout)
                else:
                    work.wait()
    except RuntimeError as err:
        peers = sorted({t.peer for t in post.transfers})
        raise TransferFailed(
            f"tokenring {schedule.strategy} {pass_.value}: rank {schedule.rank} of "
            f"{schedule.world}, step {post.step}, transfer {post.handle!r} with group "
            f"rank(s) {peers} failed (a peer died, or did not reach this step within the "
            f"timeout, TOKENRING_TIMEOUT_S): {err}"
        ) from err


def _compute_forward(slots: _Slots, op: Compute, kernel: KernelBackend, problem: Problem) -> None:
    q = slots.view(op.q, "q")
    out_b, lse_b = kernel.forward(
        q, slots.view(op.kv, "k"), slots.view(op.kv, "v"), op.causal, problem.scale
    )
    for sub, fresh, a, b in slots.sub_runs(op.q_out, op.fresh_q):
        apply = write_into if fresh else merge_into
        apply(slots.view(sub, "out"), slots.view(sub, "lse"), out_b[:, a:b], lse_b[:, :, a:b])


def _accumulate(
    slots: _Slots, rows: Rows, fresh: tuple[bool, ...], parts: dict[str, torch.Tensor]
) -> None:
    for sub, is_fresh, a, b in slots.sub_runs(rows, fresh):
        for comp, value in parts.items():
            target = slots.view(sub, comp)
            if is_fresh:
                target.copy_(value[:, a:b])
            else:
                target.add_(value[:, a:b])


def _compute_backward(slots: _Slots, op: Compute, kernel: KernelBackend, problem: Problem) -> None:
    out = slots.view(op.q, "out") if slots.has(op.q, "out") else None
    dq, dk, dv = kernel.backward(
        slots.view(op.q, "do"),
        slots.view(op.q, "q"),
        slots.view(op.kv, "k"),
        slots.view(op.kv, "v"),
        out,
        slots.view(op.q, "lse"),
        slots.view(op.q, "delta"),
        op.causal,
        problem.scale,
    )
    _accumulate(slots, op.q_out, op.fresh_q, {"dq": dq})
    if op.kv_out is not None:
        _accumulate(slots, op.kv_out, op.fresh_kv, {"dk": dk, "dv": dv})


def _merge(slots: _Slots, op: Merge, pass_: Pass) -> None:
    if pass_ is Pass.FORWARD:
        merge_into(
            slots.view(op.dst, "out"),
            slots.view(op.dst, "lse"),
            slots.view(op.src, "out"),
            slots.view(op.src, "lse"),
        )
        return
    for comp in slots.tensors[op.src.slot]:
        slots.view(op.dst, comp).add_(slots.view(op.src, comp))


def _from_rowmajor(phys: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Row-major ``[L, B, H, D]`` storage to a fresh contiguous ``[B, L, H, D]`` in ``dtype``."""
    return phys.transpose(0, 1).to(dtype, memory_format=torch.contiguous_format)


def run_forward(
    schedule: Schedule,
    problem: Problem,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel: KernelBackend,
    lanes: Lanes | None,
    recorder: Recorder | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward pass of one rank: returns ``out`` ``[B, L, H, D]`` (input dtype) and
    ``lse`` in row-major storage ``[L, B, H]`` float32."""
    local = {"q": {"q": to_rowmajor(q)}, "kv": {"k": to_rowmajor(k), "v": to_rowmajor(v)}}
    slots = _Slots(schedule, Pass.FORWARD, problem, local)
    _execute(schedule, Pass.FORWARD, slots, kernel, lanes, recorder)
    acc = slots.tensors[schedule.query_result]
    return _from_rowmajor(acc["out"], problem.dtype), acc["lse"]


def run_backward(
    schedule: Schedule,
    problem: Problem,
    tensors: dict[str, torch.Tensor],
    kernel: KernelBackend,
    lanes: Lanes | None,
    recorder: Recorder | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward pass of one rank.

    ``tensors`` holds ``q, k, v, out, do`` as ``[B, L, H, D]`` and ``lse`` in
    row-major storage ``[L, B, H]`` (as ``run_forward`` returned it). Returns
    ``dq, dk, dv`` in the input dtype.
    """
    out = to_rowmajor(tensors["out"])
    do = to_rowmajor(tensors["do"])
    wide = accum_dtype(problem.dtype)
    delta = (do.to(wide) * out.to(wide)).sum(dim=-1)
    query = {
        "q": to_rowmajor(tensors["q"]),
        "do": do,
        "lse": tensors["lse"],
        "delta": delta,
        "out": out,
    }
    local = {"q": query, "kv": {"k": to_rowmajor(tensors["k"]), "v": to_rowmajor(tensors["v"])}}
    slots = _Slots(schedule, Pass.BACKWARD, problem, local)
    _execute(schedule, Pass.BACKWARD, slots, kernel, lanes, recorder)
    dq = slots.tensors[schedule.query_result]["dq"]
    if schedule.kv_result is None:
        raise AssertionError("a backward schedule must name its key/value result slot")
    dkv = slots.tensors[schedule.kv_result]
    return (
        _from_rowmajor(dq, problem.dtype),
        _from_rowmajor(dkv["dk"], problem.dtype),
        _from_rowmajor(dkv["dv"], problem.dtype),
    )
