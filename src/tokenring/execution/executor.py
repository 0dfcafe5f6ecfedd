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
from .slots import SlotGeometry, to_rowmajor
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


def _execute(
    geometry: SlotGeometry,
    ex: Execution,
    inputs: dict,
    given: dict,
    device: torch.device,
    key_lengths: Mapping[int, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, ...]:
    """Run the pass as the code its plan was translated into (made on the first call that
    runs this way: ``program.py``): it makes the call's storage, performs every operation
    and returns the results (``[B, L, H, D]``; the LSE ``[B, H, L]``; this rank's own
    tokens). The scratch is taken from the plan's last call, and left for the next,
    where every operation completes before the call returns (the CPU) and it is small
    enough (``storage.py``)."""
    joint = ex.packs
    pool = geometry.pool(joint, ex.workspace_bytes) if device.type == "cpu" else None
    workspace = pool.take() if pool is not None else None
    key = (ex.gloo_axes, ex.recorder is not None, workspace is not None, pool is not None)
    program = geometry.programs.get(key)
    if program is None:
        program = geometry.programs[key] = translate(geometry, *key)
    results, spare = program.run(ex, inputs, given, device, key_lengths or {}, workspace)
    if pool is not None and spare is not None:
        pool.give(spare)
    return results


def _output(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A result ``[B, L, H, D]`` in ``dtype``: as the call computed it where it is of that
    dtype (its strides those of the storage the plan gave it, or of the kernel's output
    where that is the result, as a one-rank call returns the kernel's output), else a
    contiguous copy."""
    return t if t.dtype == dtype else t.to(dtype, memory_format=torch.contiguous_format)


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
    dtype, for more merging) and ``lse`` ``[B, H, L]`` (float32; any strides).
    ``key_lengths``: the valid tokens per batch row of each ragged piece
    (``Geometry.ragged``)."""
    inputs = {"q": {"q": q}, "kv": {"k": k, "v": v}}
    out, lse = _execute(geometry, ex, inputs, {}, q.device, key_lengths)
    dtype = geometry.call.dtype
    return _output(out, accum_dtype(dtype) if keep_accum else dtype), lse


def run_backward(
    geometry: SlotGeometry,
    tensors: dict[str, torch.Tensor],
    ex: Execution,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward pass of one rank.

    ``tensors`` holds ``q, k, v, out, do`` as ``[B, L, H, D]`` and ``lse`` in
    row-major storage ``[L, B, H]``, and ``dlse``, the
    LSE's gradient in the same storage, when it has one. Returns
    ``dq, dk, dv`` in the input dtype.
    """
    call = geometry.call
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
    results = _execute(geometry, ex, inputs, {"q": query}, tensors["q"].device)
    return tuple(_output(t, call.dtype) for t in results)
