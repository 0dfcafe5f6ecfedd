"""The LSE merge as one fused Triton kernel for CUDA tensors.

``merge.merge_into_torch`` is several elementwise kernels, two of them full passes
over the float32 accumulator; this kernel reads the accumulator, the partial
and both LSEs once and writes the accumulator once. Same maths and the same
-inf / NaN behaviour as the reference version in ``merge.py`` (tested
against it on the GPU machine, see tests/test_gpu.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["merge_into_triton"]


@triton.jit
def _merge_kernel(
    out_ptr, lse_ptr, part_ptr, plse_ptr,
    n_rows, seq, heads, dim,
    so_b, so_l, so_h, sl_b, sl_h, sl_l,
    sp_b, sp_l, sp_h, spl_b, spl_h, spl_l,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # Per-row quantities are [BLOCK_R, 1] tiles, which Triton replicates across
    # threads of several warps. The LSE is updated in place, so every warp must have
    # read the old value before any warp writes the new one: without the barrier
    # below, a warp that ran ahead overwrote a row's LSE before a lagging warp
    # loaded it, and the lagging warp scaled its part of the output row with the
    # new LSE (found on the H100: a few rows wrong, lse right, run to run different).
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
    row_ok = rows < n_rows
    b = rows // (seq * heads)
    rem = rows % (seq * heads)
    pos = rem // heads
    h = rem % heads
    lse_off = b * sl_b + h * sl_h + pos * sl_l
    lse_a = tl.load(lse_ptr + lse_off, mask=row_ok, other=0.0)
    lse_b = tl.load(plse_ptr + b * spl_b + h * spl_h + pos * spl_l, mask=row_ok, other=0.0)
    peak = tl.where(lse_a > lse_b, lse_a, lse_b)  # NaN in lse_b propagates
    peak = tl.where(peak == float("-inf"), 0.0, peak)
    w_a = tl.exp(lse_a - peak)
    w_b = tl.exp(lse_b - peak)
    total = w_a + w_b
    tl.debug_barrier()
    tl.store(lse_ptr + lse_off, peak + tl.log(total), mask=row_ok)
    total = tl.where(total == 0.0, 1.0, total)
    d = tl.arange(0, BLOCK_D)[None, :]
    ok = row_ok & (d < dim)
    o_off = b * so_b + pos * so_l + h * so_h + d
    p_off = b * sp_b + pos * sp_l + h * sp_h + d
    o_a = tl.load(out_ptr + o_off, mask=ok, other=0.0)
    o_b = tl.load(part_ptr + p_off, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + o_off, o_a * (w_a / total) + o_b * (w_b / total), mask=ok)


def merge_into_triton(
    out: torch.Tensor, lse: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> None:
    """Fused ``merge_into`` (same contract): ``out`` float32 ``[B, L, H, D]`` and ``lse``
    float32 ``[B, H, L]`` updated in place; any strides with a unit last stride."""
    batch, seq, heads, dim = out.shape
    n_rows = batch * seq * heads
    block_d = triton.next_power_of_2(dim)
    block_r = max(1, 4096 // block_d)
    grid = (triton.cdiv(n_rows, block_r),)
    _merge_kernel[grid](
        out, lse, out_b, lse_b,
        n_rows, seq, heads, dim,
        out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1), lse.stride(2),
        out_b.stride(0), out_b.stride(1), out_b.stride(2),
        lse_b.stride(0), lse_b.stride(1), lse_b.stride(2),
        BLOCK_R=block_r, BLOCK_D=block_d,
    )  # fmt: skip
