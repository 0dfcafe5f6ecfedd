"""Runs any schedule, forward or backward, on real tensors.

The schedule says what happens; ``operations.py`` says how each operation runs, and
``program.py`` translates a plan's operations once into straight-line code, which a
call runs. This module makes a call's slot storage (``slots.py``, ``storage.py``),
runs the code on it and returns the results. See docs/architecture.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from functools import cached_property

import torch

from .comm import Lanes
from .kernels import KernelBackend
from .kernels.base import accum_dtype
from .program import translate
from .slots import SlotGeometry, SlotStore, from_rowmajor, to_rowmajor
from .timeline import Recorder

__all__ = ["Execution", "run_backward", "run_forward"]


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
    def gloo_axes(self) -> frozenset[str]:
        """The axes whose lanes run on gloo: there a transfer of several components goes
        as one message of records (``operations.py``)."""
        return frozenset(axis for axis, lanes in self.lanes.items() if lanes.backend == "gloo")

    @cached_property
    def packs(self) -> bool:
        """Whether this call's transfers pack several components into one message (gloo)."""
        return bool(self.gloo_axes)


def _execute(geometry: SlotGeometry, store: SlotStore, ex: Execution) -> None:
    """Every operation of the pass, as the code its plan was translated into (made on
    the first call that runs this way: ``program.py``)."""
    key = (ex.gloo_axes, ex.recorder is not None)
    program = geometry.programs.get(key)
    if program is None:
        program = geometry.programs[key] = translate(geometry, *key)
    program.run(store, ex)


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
    _execute(geometry, store, ex)
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
    _execute(geometry, store, ex)
    store.release()
    if schedule.kv_result is None:
        raise AssertionError("a backward schedule must name its key/value result slot")
    return (
        store.result(schedule.query_result, "dq"),
        store.result(schedule.kv_result, "dk"),
        store.result(schedule.kv_result, "dv"),
    )
