"""Block kernels under document and window masks against dense causal cuDNN, per
allowed token pair (issue 19's yardstick), on one GPU, side by side in one run.

For each mask over a block of S queries and S keys (bf16, 32 heads, head_dim 128,
batch 1): the time of one kernel call forward, and forward + backward, through
the library's kernel contract (``tokenring.execution.kernels``), and the rate in
allowed pairs per second divided by the dense causal cuDNN rate (its pairs:
``S (S + 1) / 2``). Two ways per mask: one call of the memory-efficient kernel
with an additive bias over the whole block (every pair computed, the masked ones
thrown away), and the block cut into sub-calls (``execution/block_masks.py``):
dense and causal calls of the best kernel per document, a masked call only where
a window cuts.

    python benchmarks/mask_kernels.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import random

import torch

from tokenring.execution.block_masks import block_mask
from tokenring.execution.kernels import BlockMask, select_kernel
from tokenring.execution.kernels.base import BlockSpec
from tokenring.schedules.masks import Mask
from tokenring_bench.calibrate import call_timer


def _documents(seq: int, low: int, high: int, seed: int) -> tuple[int, ...]:
    rng = random.Random(seed)
    bounds = [0]
    while bounds[-1] < seq:
        bounds.append(min(seq, bounds[-1] + rng.randint(low, high)))
    return tuple(bounds)


def measure(seq: int, heads: int, dim: int) -> list[dict]:
    dt = torch.bfloat16
    q, k, v, do = (torch.randn(1, seq, heads, dim, device="cuda", dtype=dt) for _ in range(4))
    scale = dim**-0.5
    dense = select_kernel("cudnn", BlockSpec("cuda", dt, dim, heads, heads, True, backward=True))
    masked = select_kernel(
        "auto", BlockSpec("cuda", dt, dim, heads, heads, False, backward=True, masked=True)
    )
    positions = torch.arange(seq, device="cuda")
    timer = call_timer(q.device)  # median of 5 CUDA-event timed calls, after a warm-up

    cases = {
        "documents 2K-8K": Mask(True, (-1, -1), _documents(seq, 2048, 8192, 0)),
        "window 4K": Mask(True, (4095, 0)),
        "64 documents of 512": Mask(True, (-1, -1), tuple(range(0, seq + 1, 512))[:65]),
    }
    rows = []

    def run(kernel, causal, mask, backward):
        out, lse = kernel.forward(q, k, v, causal, scale, mask)
        if backward:
            delta = (do.float() * out.float()).sum(-1).transpose(1, 2)
            kernel.backward(do, q, k, v, out, lse, delta, causal, scale, mask)

    dense_pairs = seq * (seq + 1) // 2
    base = {b: timer(lambda b=b: run(dense, True, None, b), 5) for b in (False, True)}
    rows.append(dict(mask="dense causal", how="one call", kernel=dense.name, calls=1,
                     pairs=dense_pairs,
                     forward_s=base[False], fwd_bwd_s=base[True], rate_fwd=1.0,
                     rate_fwd_bwd=1.0))  # fmt: skip
    for name, mask in cases.items():
        if seq < 64 * 512 and name.startswith("64"):
            continue
        allowed = mask.allowed(positions, positions)
        pairs = int(allowed.sum())
        cells = (((0, seq),),)
        windowed = mask.window != Mask(True).window
        auto = select_kernel(
            "auto", BlockSpec("cuda", dt, dim, heads, heads, False, backward=True,
                              masked=windowed)
        )  # fmt: skip
        ways = {
            "one call, additive bias": (masked, BlockMask(allowed)),
            "sub-calls": (auto, block_mask(cells, cells, mask, q.device)),
        }
        for how, (kernel, block) in ways.items():
            t = {
                b: timer(lambda b=b, k=kernel, m=block: run(k, False, m, b), 5)
                for b in (False, True)
            }
            calls = len(block.calls) if block.calls is not None else 1
            rows.append(dict(
                mask=name, how=how, kernel=kernel.name, calls=calls, pairs=pairs,
                forward_s=t[False], fwd_bwd_s=t[True],
                rate_fwd=(pairs / t[False]) / (dense_pairs / base[False]),
                rate_fwd_bwd=(pairs / t[True]) / (dense_pairs / base[True]),
            ))  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq", type=int, default=32768)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    rows = measure(args.seq, args.heads, args.head_dim)
    print(f"S={args.seq}, heads {args.heads}, head_dim {args.head_dim}, bf16, one block")
    for r in rows:
        print(f"  {r['mask']:<20} {r['how']:<24} {r['kernel']:<9} x{r['calls']:<4} "
              f"pairs {r['pairs']:>12,}  "
              f"fwd {r['forward_s'] * 1e3:8.2f} ms ({r['rate_fwd']:.2f}x)  "
              f"fwd+bwd {r['fwd_bwd_s'] * 1e3:8.2f} ms ({r['rate_fwd_bwd']:.2f}x)")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
