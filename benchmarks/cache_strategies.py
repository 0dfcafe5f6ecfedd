"""Several ranks: a KV cache's prefill chunk and decode step, strategy by strategy.

Under ``torchrun`` (one GPU per process with NCCL, or CPU processes with gloo), for a
cache already holding ``--cached`` tokens per sequence over the ranks:

- a prefill chunk of ``--chunk`` new tokens, sharded like training (``sharded=True``),
  with TokenRing (the queries travel), ring (the caches travel) and all-gather (the
  caches are gathered), each also as ``auto`` decides;
- a decode step of one new token, replicated (``sharded=False``): its time, eager and
  (CUDA) captured.

Times are medians over ``--iters`` calls, each bracketed by barriers; the cache is put
back to its length after every call. Rank 0 prints a table and writes ``--json``.

    torchrun --nproc-per-node 8 benchmarks/cache_strategies.py --cached 1048576 --chunk 4096
    torchrun --nproc-per-node 2 benchmarks/cache_strategies.py --cached 4096 --chunk 256  # CPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from datetime import timedelta

import torch
import torch.distributed as dist

import tokenring as tr

STRATEGIES = ("tokenring", "ring", "allgather", "auto")


def filled(args, device, dtype) -> tr.KVCache:
    """A cache whose every sequence holds ``args.cached`` random tokens, filled through
    its storage (rank ``r`` keeps positions ``t mod P == r``: ``ceil((n - r) / P)`` of
    them), as a prefill would leave it without the prefill's time."""
    cache = tr.KVCache(batch=args.batch, capacity=args.cached + args.chunk + args.iters + 8,
                       heads_kv=args.heads_kv, head_dim=args.head_dim, dtype=dtype,
                       device=device)  # fmt: skip
    kept = -(-(args.cached - cache.rank) // cache.world)
    cache._k[:, :kept].normal_()
    cache._v[:, :kept].normal_()
    cache.lengths.fill_(args.cached)
    cache._host = [args.cached] * args.batch
    return cache


def timed(fn, cache: tr.KVCache, iters: int, cuda: bool) -> float:
    """Median ms of ``fn()``, each call between barriers, the cache put back after it."""
    lengths, host = cache.lengths.clone(), list(cache._host)
    times = []
    for i in range(iters + 2):
        dist.barrier()
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        if i >= 2:  # two warm-up calls
            times.append((time.perf_counter() - start) * 1e3)
        cache.lengths.copy_(lengths)
        cache._host = list(host)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cached", type=int, default=1 << 20, help="tokens cached per sequence")
    parser.add_argument("--chunk", type=int, default=4096, help="prefill chunk (new tokens)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads-q", type=int, default=32)
    parser.add_argument("--heads-kv", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--json", help="write the rows here (rank 0)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=300))
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    rank, world = dist.get_rank(), dist.get_world_size()
    cache = filled(args, device, dtype)
    g = torch.Generator(device=device).manual_seed(0)  # the same chunk on every rank

    def randn(length, heads):
        shape = (args.batch, length, heads, args.head_dim)
        return torch.randn(shape, generator=g, device=device, dtype=dtype)

    q, k, v = (
        randn(args.chunk, args.heads_q),
        randn(args.chunk, args.heads_kv),
        randn(args.chunk, args.heads_kv),
    )
    mine = [tr.shard(x, layout="contiguous", dim=1) for x in (q, k, v)]
    rows = []
    for strategy in STRATEGIES:
        ms = timed(lambda s=strategy: cache.attend(*mine, sharded=True, strategy=s), cache,
                   args.iters, cuda)  # fmt: skip
        rows.append({"call": "prefill", "strategy": strategy, "ms": ms})
    one = [x[:, :1].contiguous() for x in (q, k, v)]
    rows.append({"call": "decode", "strategy": "eager",
                 "ms": timed(lambda: cache.attend(*one), cache, args.iters, cuda)})  # fmt: skip
    if cuda:
        step = cache.capture(*one, clone_outputs=False)
        rows.append({"call": "decode", "strategy": "captured",
                     "ms": timed(lambda: step(*step.inputs), cache, args.iters, cuda)})  # fmt: skip
    if rank == 0:
        backend = "NCCL" if cuda else "gloo"
        print(f"{world} ranks ({backend}), {args.cached} cached, chunk {args.chunk}, batch "
              f"{args.batch}, heads {args.heads_q}/{args.heads_kv}")  # fmt: skip
        for row in rows:
            print(f"  {row['call']:8} {row['strategy']:10} {row['ms']:9.3f} ms")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"world": world, "args": vars(args), "rows": rows}, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
