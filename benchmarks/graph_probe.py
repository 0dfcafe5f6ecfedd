"""How fast is a sharded forward without host time? Capture one whole call in a CUDA graph.

Below 16K every strategy is host-bound on the H100 machine (RESULTS.md). This
probe captures one forward call of each strategy (causal zigzag, 32 heads,
head dim 128, bf16), NCCL transfers included, in a CUDA graph. It checks that
the replay gives the eager result, and times eager calls and replays back to
back (the bench's steady timing) next to the single-device cuDNN kernel on
the whole sequence. Run on the GPU machine with ``PYTHONPATH=src``.
"""

from __future__ import annotations

import sys

import torch

import tokenring as tr
from tokenring.execution.kernels import select_kernel
from tokenring.execution.kernels.base import BlockSpec
from tokenring_bench.launch import run_local, sync_ranks
from tokenring_bench.metrics import rel_err
from tokenring_bench.runner import time_ms


def worker(ctx, seqs: list[int]) -> list[dict]:
    device, rows = ctx.device, []
    for seq in seqs:
        g = torch.Generator(device=device).manual_seed(seq)
        full = [
            torch.randn(1, seq, 32, 128, device=device, dtype=torch.bfloat16, generator=g)
            for _ in range(3)
        ]
        spec = BlockSpec("cuda", torch.bfloat16, 128, 32, 32, True)
        kernel = select_kernel("cudnn", spec)
        with torch.no_grad():
            t1 = time_ms(lambda _: kernel.forward(*full, True, 128**-0.5), 20, 3, device)
        q, k, v = (tr.shard(x, layout="zigzag") for x in full)
        for strategy in ("tokenring", "ring"):
            row = {"seq": seq, "strategy": strategy, "t1_ms": t1}

            def call(q, k, v, strategy=strategy):
                return tr.attention(q, k, v, strategy=strategy, causal=True, layout="zigzag")

            try:
                graph = tr.CapturedCall(call, q, k, v, warmup=3, clone_outputs=False)
                sync_ranks(device)
                captured = graph.replay()
                with torch.no_grad():
                    eager = call(q, k, v)
                    row["replay_vs_eager"] = rel_err(captured, eager)
                    row["eager_ms"] = time_ms(lambda _: call(q, k, v), 20, 3, device)
                row["graph_ms"] = time_ms(lambda _: graph.replay(), 20, 3, device)
            except Exception as err:  # report, do not hide: the probe's answer
                row["error"] = f"{type(err).__name__}: {err}"[:400]
                torch.cuda.synchronize(device)
            for key in ("eager_ms", "graph_ms"):
                if key in row:
                    row[key.replace("ms", "eff")] = t1 / (ctx.world * row[key])
            rows.append(row)
            ctx.report(row)
    return rows


if __name__ == "__main__":
    seqs = [int(s) for s in sys.argv[1:]] or [8192, 16384, 32768]
    world = torch.cuda.device_count()
    for row in run_local(worker, (seqs,), world=world, backend="nccl", timeout_s=300)[0]:
        print(row)
