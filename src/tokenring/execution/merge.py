"""Merging partial attention results by their log-sum-exp, in float32.

Two partials of the same query rows over disjoint key sets, ``(o_a, lse_a)``
and ``(o_b, lse_b)``, combine to ``lse = log(exp(lse_a) + exp(lse_b))`` and
``o = (exp(lse_a - lse) o_a + exp(lse_b - lse) o_b)``, that is ``o_a`` moved
towards ``o_b`` by ``sigmoid(lse_b - lse_a)``. A row that has seen no key yet
(``lse = -inf``) merges without NaN: two empty rows stay ``0`` with ``lse = -inf``.
"""

from __future__ import annotations

from functools import cache

import torch

__all__ = ["merge_into", "merge_into_torch", "write_into"]


@cache
def _fused_merge():
    """The fused CUDA merge, or None where Triton is not installed (a fact of the
    installation, looked up once)."""
    try:
        from .merge_triton import merge_into_triton
    except ImportError:
        return None
    return merge_into_triton


def _rows(w: torch.Tensor) -> torch.Tensor:
    """``[B, H, L]`` weights as ``[B, L, H, 1]`` to scale ``[B, L, H, D]`` outputs."""
    return w.transpose(1, 2).unsqueeze(-1)


def merge_into(
    out: torch.Tensor,
    lse: torch.Tensor,
    out_b: torch.Tensor,
    lse_b: torch.Tensor,
    *,
    fused: bool = True,
    empty_rows: bool = True,
) -> None:
    """Merge ``(out_b, lse_b)`` into the accumulator ``(out, lse)`` in place.

    ``out``: float32 ``[B, L, H, D]``; ``lse``: float32 ``[B, H, L]`` (or both float64); the
    partial may be any float dtype. A row with an LSE of -inf holds 0 on either side
    (what kernels give a row with no key, and what zeroed slots start as). NaN in either
    input propagates. ``empty_rows=False`` promises that no row is -inf on both sides
    (every block of the call gives every query row a key: no mask, no ragged keys, no
    result that starts empty), which spares the guard for such rows (two dispatches of
    host time per merge on the torch path).

    With ``fused`` (the runtime's ``fused_merge`` setting), on CUDA with Triton
    installed, this runs the fused kernel of ``merge_triton`` (one kernel: 230
    against 685 us for a 16K x 32-head block on the H100 against the torch version
    of the time, which made two passes over the accumulator, benchmarks/RESULTS.md;
    the torch version now makes one, ``merge_into_torch``); otherwise the torch
    version.
    """
    kernel = _fused_merge() if fused and out.is_cuda else None
    if (
        kernel is not None
        and out_b.stride(-1) == 1
        and out.dtype == lse.dtype == lse_b.dtype == torch.float32
    ):
        kernel(out, lse, out_b, lse_b)
    else:
        merge_into_torch(out, lse, out_b, lse_b, empty_rows)


def merge_into_torch(
    out: torch.Tensor,
    lse: torch.Tensor,
    out_b: torch.Tensor,
    lse_b: torch.Tensor,
    empty_rows: bool = True,
) -> None:
    """``merge_into`` written with torch operations (any device; the reference).

    The partial's share of a merged row is ``exp(lse_b) / (exp(lse) + exp(lse_b))``,
    that is ``sigmoid(lse_b - lse)``, so the output moves towards the partial by that
    share: one ``lerp_`` over the large tensors (one pass, six dispatches in all, where
    scaling both sides and adding took twelve). A row the partial gave no key
    (``lse_b = -inf``) keeps its share at 0, also where the row has seen none either
    (``-inf - -inf`` would be NaN): that guard is two dispatches, spared where no row
    can be empty. NaN in either side propagates."""
    if lse_b.dtype != lse.dtype:
        lse_b = lse_b.to(lse.dtype)
    diff = lse_b - lse
    if empty_rows:
        diff = diff.masked_fill(lse_b == float("-inf"), float("-inf"))
    if out_b.dtype != out.dtype:  # lerp_ reads its ends in one dtype
        out_b = out_b.to(out.dtype)
    out.lerp_(out_b, _rows(torch.sigmoid(diff)))
    torch.logaddexp(lse, lse_b, out=lse)  # stable; -inf with -inf gives -inf


def write_into(
    out: torch.Tensor, lse: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> None:
    """Overwrite the accumulator rows with a first partial (casting as needed)."""
    out.copy_(out_b)
    lse.copy_(lse_b)
