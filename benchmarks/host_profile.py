"""Where the host time of one call goes, on the GPU machine (S=8K, where it dominates).

Rank 0 profiles 50 forward calls of each strategy with cProfile and prints
the functions with the most own time; both ranks report host time per call
(enqueue only) next to the GPU time per call.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import time

import torch
import torch.distributed as dist

import tokenring as tr
from tokenring_bench.launch import run_local


def worker(ctx, seq: int):
    local = seq // ctx.world
    q, k, v = (
        torch.randn(1, local, 32, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3)
    )
    report = []
    for strategy in ("tokenring", "ring"):
        with torch.no_grad():
            for _ in range(5):
                tr.attention(q, k, v, strategy=strategy, causal=True, layout="zigzag")
            torch.cuda.synchronize()
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(50):
                tr.attention(q, k, v, strategy=strategy, causal=True, layout="zigzag")
            host = (time.perf_counter() - t0) / 50
            torch.cuda.synchronize()
            total = (time.perf_counter() - t0) / 50
            profile = cProfile.Profile()
            profile.enable()
            for _ in range(50):
                tr.attention(q, k, v, strategy=strategy, causal=True, layout="zigzag")
            torch.cuda.synchronize()
            profile.disable()
        text = io.StringIO()
        pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(22)
        report.append(
            f"== {strategy}: host {host * 1e3:.3f} ms/call to enqueue, "
            f"{total * 1e3:.3f} ms/call with the GPU\n{text.getvalue()}"
        )
        dist.barrier()
    return "\n".join(report)


if __name__ == "__main__":
    print(
        run_local(worker, (8192,), world=torch.cuda.device_count(), backend="nccl", timeout_s=200)[
            0
        ]
    )
