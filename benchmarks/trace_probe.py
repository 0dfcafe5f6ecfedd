"""Profiler traces of back-to-back forward calls, eager and replayed from a CUDA graph.

Written to find where eager calls lose GPU time that a graph replay does not
(RESULTS.md, section 3). Rank 0 writes one Chrome trace per strategy and mode
(S=32K, llama2-mha, causal zigzag), and prints the kernels by GPU time. Run on
the GPU machine: ``PYTHONPATH=src python benchmarks/trace_probe.py OUT_DIR``.
"""

from __future__ import annotations

import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

import tokenring as tr
from tokenring_bench.launch import run_local, sync_ranks


def worker(ctx, out_dir: str) -> str:
    full = [
        torch.randn(1, 32768, 32, 128, device=ctx.device, dtype=torch.bfloat16) for _ in range(3)
    ]
    q, k, v = (tr.shard(x, layout="zigzag") for x in full)
    lines = []
    for strategy in ("ring", "tokenring"):

        def call(q=q, k=k, v=v, strategy: str = strategy) -> torch.Tensor:
            return tr.attention(q, k, v, strategy=strategy, causal=True, layout="zigzag")

        graph = tr.CapturedCall(call, q, k, v, warmup=3, clone_outputs=False)
        sync_ranks(ctx.device)
        with torch.no_grad():
            for mode, fn in (("eager", call), ("graph", graph.replay)):
                for _ in range(3):
                    fn()
                sync_ranks(ctx.device)
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    for _ in range(5):
                        fn()
                    torch.cuda.synchronize(ctx.device)
                if ctx.rank == 0:
                    prof.export_chrome_trace(os.path.join(out_dir, f"{strategy}-{mode}.json"))
                    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=12)
                    lines.append(f"== {strategy} {mode}\n{table}")
                sync_ranks(ctx.device)
    return "\n".join(lines)


if __name__ == "__main__":
    world = torch.cuda.device_count()
    print(run_local(worker, (sys.argv[1],), world=world, backend="nccl", timeout_s=150)[0])
