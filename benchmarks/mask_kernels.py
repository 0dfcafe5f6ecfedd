"""Block kernels under document and window masks against dense causal cuDNN, per
allowed token pair (issue 19's yardstick), on one GPU, side by side in one run.

For each mask over a block of S queries and S keys (bf16, 32 heads, head_dim 128,
batch 1): the time of one kernel call forward, and forward + backward, through
the library's kernel contract (``tokenring.execution.kernels``), and the rate in
allowed pairs per second divided by the dense causal cuDNN rate (its pairs:
``S (S + 1) / 2``; dense causal flash is timed too, for scale). Three ways per
mask: one call of the memory-efficient kernel with an additive bias over the
whole block (every pair computed, the masked ones thrown away); the block cut
into sub-calls (``execution/block_masks.py``): dense and causal cuDNN calls per
document, a masked memory-efficient call only where a window cuts; and the block
as flash's variable-length calls, one per window (``kernels/varlen.py``). Under
documents alone, cuDNN's own variable-length call is probed as well (the op
called directly, its output checked against flash's): a candidate, not yet a
kernel of the library.

    python benchmarks/mask_kernels.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import random

import torch

from tokenring.execution.block_masks import block_mask
from tokenring.execution.kernels import BlockMask, SplitMasks, select_kernel
from tokenring.execution.kernels.base import BlockSpec
from tokenring.schedules.masks import Mask
from tokenring_bench.calibrate import call_timer


def _documents(seq: int, low: int, high: int, seed: int) -> tuple[int, ...]:
    rng = random.Random(seed)
    bounds = [0]
    while bounds[-1] < seq:
        bounds.append(min(seq, bounds[-1] + rng.randint(low, high)))
    return tuple(bounds)


def _cudnn_varlen_probe(q, k, v, do, mask: Mask, scale: float, timer) -> dict:
    """cuDNN's variable-length call on a documents-only causal block (each document one
    causal sequence): its times, LSE shape and largest difference from flash's."""
    aten = torch.ops.aten
    bounds = torch.tensor(mask.documents, dtype=torch.int32, device=q.device)
    longest = int((bounds[1:] - bounds[:-1]).max())
    q3, k3, v3, do3 = (t[0] for t in (q, k, v, do))

    def forward():
        return aten._cudnn_attention_forward(
            q3, k3, v3, None, bounds, bounds, longest, longest, True, 0.0, True, False,
            scale=scale,
        )  # fmt: skip

    found: dict = {}
    try:
        out, lse, *_, seed, offset, _ = forward()
        found["lse_shape"] = list(lse.shape)
        flash, flash_lse, *_ = aten._flash_attention_forward(
            q3, k3, v3, bounds, bounds, longest, longest, 0.0, True, False, scale=scale
        )
        found["max_out_diff_vs_flash"] = float((out.float() - flash.float()).abs().max())
        found["forward_s"] = timer(forward, 5)

        def both():
            o, lse_, *_, sd, off, _ = forward()
            aten._cudnn_attention_backward(
                do3, q3, k3, v3, o, lse_, sd, off, None, bounds, bounds, longest, longest,
                0.0, True, scale=scale,
            )  # fmt: skip

        grads = aten._cudnn_attention_backward(
            do3, q3, k3, v3, out, lse, seed, offset, None, bounds, bounds, longest, longest,
            0.0, True, scale=scale,
        )  # fmt: skip
        flash_grads = aten._flash_attention_backward(
            do3, q3, k3, v3, flash, flash_lse, bounds, bounds, longest, longest, 0.0, True,
            *(torch.zeros((), dtype=torch.int64, device=q.device) for _ in range(2)),
            scale=scale,
        )  # fmt: skip
        dq_diff = (grads[0].float() - flash_grads[0].float()).abs().max()
        found["max_dq_diff_vs_flash"] = float(dq_diff)
        found["fwd_bwd_s"] = timer(both, 5)
    except Exception as err:  # a probe: record what failed and go on
        found["error"] = f"{type(err).__name__}: {err}"[:500]
    return found


def measure(seq: int, heads: int, dim: int) -> list[dict]:
    dt = torch.bfloat16
    q, k, v, do = (torch.randn(1, seq, heads, dim, device="cuda", dtype=dt) for _ in range(4))
    scale = dim**-0.5

    def kernel(name: str, masked: bool = False):
        spec = BlockSpec("cuda", dt, dim, heads, heads, True, backward=True, masked=masked)
        return select_kernel(name, spec)

    dense, flash = kernel("cudnn"), kernel("flash")
    bias = kernel("efficient", masked=True)
    split = SplitMasks(dense, bias)
    varlen = kernel("flash-varlen", masked=True)
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
    for kern in (dense, flash):
        t = base if kern is dense else {
            b: timer(lambda b=b: run(flash, True, None, b), 5) for b in (False, True)
        }  # fmt: skip
        rows.append(dict(mask="dense causal", how="one call", kernel=kern.name, calls=1,
                         pairs=dense_pairs, forward_s=t[False], fwd_bwd_s=t[True],
                         rate_fwd=base[False] / t[False],
                         rate_fwd_bwd=base[True] / t[True]))  # fmt: skip
    for name, mask in cases.items():
        if seq < 64 * 512 and name.startswith("64"):
            continue
        allowed = mask.allowed(positions, positions)
        pairs = int(allowed.sum())
        cells = (((0, seq),),)
        ways = {
            "one call, additive bias": (bias, BlockMask(allowed)),
            "sub-calls": (split, block_mask(cells, cells, mask, q.device)),
            "varlen calls": (varlen, block_mask(cells, cells, mask, q.device)),
        }
        for how, (kern, block) in ways.items():
            t = {
                b: timer(lambda b=b, k=kern, m=block: run(k, False, m, b), 5) for b in (False, True)
            }
            if how == "varlen calls":
                calls = len(block.varlen.groups)
            else:
                calls = len(block.calls) if block.calls is not None else 1
            rows.append(dict(
                mask=name, how=how, kernel=kern.name, calls=calls, pairs=pairs,
                forward_s=t[False], fwd_bwd_s=t[True],
                rate_fwd=(pairs / t[False]) / (dense_pairs / base[False]),
                rate_fwd_bwd=(pairs / t[True]) / (dense_pairs / base[True]),
            ))  # fmt: skip
        if not mask.windowed:
            probe = _cudnn_varlen_probe(q, k, v, do, mask, scale, timer)
            row = dict(mask=name, how="cudnn varlen (probe)", kernel="cudnn-op", calls=1,
                       pairs=pairs, probe=probe)  # fmt: skip
            if "fwd_bwd_s" in probe:
                row.update(forward_s=probe["forward_s"], fwd_bwd_s=probe["fwd_bwd_s"],
                           rate_fwd=(pairs / probe["forward_s"]) / (dense_pairs / base[False]),
                           rate_fwd_bwd=(pairs / probe["fwd_bwd_s"])
                           / (dense_pairs / base[True]))  # fmt: skip
            rows.append(row)
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
        if "forward_s" not in r:
            print(f"  {r['mask']:<20} {r['how']:<24} {r.get('probe')}")
            continue
        print(f"  {r['mask']:<20} {r['how']:<24} {r['kernel']:<9} x{r['calls']:<4} "
              f"pairs {r['pairs']:>12,}  "
              f"fwd {r['forward_s'] * 1e3:8.2f} ms ({r['rate_fwd']:.2f}x)  "
              f"fwd+bwd {r['fwd_bwd_s'] * 1e3:8.2f} ms ({r['rate_fwd_bwd']:.2f}x)")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
