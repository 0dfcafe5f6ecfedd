"""Which block shapes crash cuDNN's attention backward (one subprocess per shape, so a
segmentation fault ends only its own): the sub-calls of a packed block can be as small
as one token.

    python benchmarks/cudnn_small_probe.py
"""

from __future__ import annotations

import subprocess
import sys

CASE = """
import torch
from tokenring.execution.kernels.cuda_sdpa import CudnnAttention
lq, lk, causal, hkv = {lq}, {lk}, {causal}, {hkv}
q = torch.randn(2, lq, 8, 64, device="cuda", dtype=torch.bfloat16)
k, v = (torch.randn(2, lk, hkv, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
do = torch.randn_like(q)
kernel = CudnnAttention()
out, lse = kernel.forward(q, k, v, causal, 0.125)
delta = (do.float() * out.float()).sum(-1).transpose(1, 2)
kernel.backward(do, q, k, v, out, lse, delta, causal, 0.125)
kernel.backward(do, q, k, v, None, lse, delta, causal, 0.125)
torch.cuda.synchronize()
print("ok")
"""


def main() -> None:
    shapes = [
        (1, 1, True),
        (1, 1, False),
        (1, 300, False),
        (2, 2, True),
        (7, 7, True),
        (16, 16, True),
        (63, 63, True),
        (64, 64, True),
        (300, 1, False),
        (299, 299, True),
    ]
    for (lq, lk, causal), hkv in [(s, h) for s in shapes for h in (8, 2)]:
        code = CASE.format(lq=lq, lk=lk, causal=causal, hkv=hkv)
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=120)  # fmt: skip
        last = (done.stdout + done.stderr).strip().splitlines()[-1:] or [""]
        what = f"lq={lq:4d} lk={lk:4d} causal={causal!s:5} heads_kv={hkv}"
        print(f"{what}: exit {done.returncode} {last[0][:90]}")


if __name__ == "__main__":
    main()
