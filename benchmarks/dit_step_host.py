"""One GPU: the host time of a video DiT's attention calls per denoising step, eager and
captured in a CUDA graph.

Wan 2.1 14B has 40 blocks, each with a self-attention over the video tokens (through
tokenring when sequence parallel) and a cross-attention to 512 text tokens (local, the
model's own). For each token count this times, on one GPU, one self-attention call
through ``tokenring.attention`` eager and replayed from ``tokenring.CapturedCall``, and
the cross-attention call (PyTorch's SDPA): host microseconds per call (calls issued back
to back, the GPU queue absorbing them) and device milliseconds per call, then per step
(40 of each). On several GPUs the self-attention's share of the tokens shrinks with the
ranks while the host time per call stays: this is what bounds a step there.

    python benchmarks/dit_step_host.py --json dit-step.json
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from gpu_timing import device_ms, host_us

import tokenring as tr

HEADS, DIM, TEXT, BLOCKS = 40, 128, 512, 40
TOKENS = (4096, 32760, 75600)


def one(tokens: int) -> dict:
    def rand(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16)

    q, k, v = rand(1, tokens, HEADS, DIM), rand(1, tokens, HEADS, DIM), rand(1, tokens, HEADS, DIM)
    text_k, text_v = rand(1, TEXT, HEADS, DIM), rand(1, TEXT, HEADS, DIM)

    def self_attention(q, k, v):
        return tr.attention(q, k, v, strategy="tokenring")

    def cross_attention():
        return F.scaled_dot_product_attention(
            q.transpose(1, 2), text_k.transpose(1, 2), text_v.transpose(1, 2)
        )

    captured = tr.CapturedCall(self_attention, q, k, v, clone_outputs=False)
    row = {"tokens": tokens}
    row["self_eager_host_us"] = host_us(lambda: self_attention(q, k, v))
    row["self_captured_host_us"] = host_us(captured.replay)
    row["self_device_ms"] = device_ms(lambda: self_attention(q, k, v), iters=10, warmup=1)
    row["cross_host_us"] = host_us(cross_attention)
    row["cross_device_ms"] = device_ms(cross_attention, iters=10, warmup=1)
    for mode in ("eager", "captured"):
        host = (row[f"self_{mode}_host_us"] + row["cross_host_us"]) * BLOCKS / 1e3
        row[f"step_{mode}_host_ms"] = host
    row["step_device_ms"] = (row["self_device_ms"] + row["cross_device_ms"]) * BLOCKS
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--tokens", type=int, nargs="*", default=list(TOKENS))
    args = parser.parse_args()
    header = ("tokens", "self_eager_host_us", "self_captured_host_us", "self_device_ms",
              "cross_host_us", "cross_device_ms", "step_eager_host_ms",
              "step_captured_host_ms", "step_device_ms")  # fmt: skip
    print(torch.cuda.get_device_name())
    print(" ".join(f"{h:>12.12}" for h in header))
    rows = []
    for tokens in args.tokens:
        row = one(tokens)
        rows.append(row)
        print(" ".join(f"{row[h]:>12.4g}" for h in header), flush=True)
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
