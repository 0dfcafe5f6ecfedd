"""Find where the fused Triton merge disagrees with the torch merge on a GPU.

Runs the kernel on the GPU test's inputs in several variants (partial dtype,
partial layout, rows per program, warps) and prints the mismatching rows with
their LSE values, so the pattern shows what the compiled kernel gets wrong.
"""

from __future__ import annotations

import torch
import triton

from tokenring.merge import merge_into_torch
from tokenring.merge_triton import _merge_kernel


def run(dtype, part_rowmajor, block_r, warps):
    g = torch.Generator(device="cuda").manual_seed(0)
    b, n, h, d = 2, 300, 5, 80
    out = torch.randn(n, b, h, d, device="cuda", generator=g).permute(1, 0, 2, 3)
    lse = torch.randn(n, b, h, device="cuda", generator=g).permute(1, 2, 0)
    part = torch.randn(b, n, h, d, device="cuda", generator=g).to(dtype)
    if part_rowmajor:
        part = part.transpose(0, 1).contiguous().transpose(0, 1)
    plse = torch.randn(b, h, n, device="cuda", generator=g)
    ref_out, ref_lse = out.clone(), lse.clone()
    merge_into_torch(ref_out, ref_lse, part, plse)
    n_rows = b * n * h
    _merge_kernel[(triton.cdiv(n_rows, block_r),)](
        out,
        lse,
        part,
        plse,
        n_rows,
        n,
        h,
        d,
        out.stride(0),
        out.stride(1),
        out.stride(2),
        lse.stride(0),
        lse.stride(1),
        lse.stride(2),
        part.stride(0),
        part.stride(1),
        part.stride(2),
        plse.stride(0),
        plse.stride(1),
        plse.stride(2),
        BLOCK_R=block_r,
        BLOCK_D=triton.next_power_of_2(d),
        num_warps=warps,
    )
    torch.cuda.synchronize()
    bad = ((out - ref_out).abs() > 1e-4).any(-1).nonzero().tolist()
    lse_bad = ((lse - ref_lse).abs() > 1e-4).nonzero().tolist()
    print(
        f"{dtype!s:15} rowmajor={part_rowmajor!s:5} block_r={block_r:3} warps={warps}: "
        f"{len(bad)} bad out rows {bad[:6]}, {len(lse_bad)} bad lse {lse_bad[:4]}"
    )
    for bb, pos, hh in bad[:2]:
        print(
            "   lse",
            lse[bb, hh, pos].item(),
            "ref",
            ref_lse[bb, hh, pos].item(),
            "part_lse",
            plse[bb, hh, pos].item(),
            "out",
            out[bb, pos, hh, :4].tolist(),
            "ref",
            ref_out[bb, pos, hh, :4].tolist(),
        )


if __name__ == "__main__":
    for dtype in (torch.float32, torch.bfloat16):
        for rowmajor in (False, True):
            for block_r, warps in ((32, 4), (1, 1), (8, 4), (32, 8)):
                run(dtype, rowmajor, block_r, warps)
