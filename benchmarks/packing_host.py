"""Host time per call with a fresh packing every call against a repeated one (issue 19,
"plans that follow the data"): packed batches change ``cu_seqlens`` every step.

One process (a rank's own work: the description, the plan, the block masks), tiny
tensors so that host time is what is measured; ``--world 2`` runs two gloo processes
(the agreement's exchange included).

    python benchmarks/packing_host.py [--world 2] [--seq 4096] [--documents 8]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time

import torch

import tokenring as tr


def _packing(rng: random.Random, seq: int, documents: int) -> list[int]:
    cuts = sorted(rng.sample(range(1, seq), documents - 1))
    return [0, *cuts, seq]


def measure(seq: int, documents: int, calls: int, layout: str, group=None) -> dict:
    rng = random.Random(0)
    q = torch.randn(1, seq, 1, 8)
    fixed = _packing(rng, seq, documents)
    packings = [_packing(rng, seq, documents) for _ in range(calls)]
    world = 1 if group is None else torch.distributed.get_world_size(group)

    def call(cu):
        part = tr.shard(q, layout=layout, cu_seqlens=cu, group=group)
        t = time.perf_counter()
        tr.attention(part, part, part, causal=True, layout=layout, cu_seqlens=cu, group=group)
        return time.perf_counter() - t

    call(fixed)
    # alternated, so that a change in the machine's load moves both alike
    times = [(call(fixed), call(cu)) for cu in packings]
    repeated = statistics.median(t for t, _ in times)
    fresh = statistics.median(t for _, t in times)
    return dict(
        world=world, seq=seq, documents=documents, layout=layout, repeated_ms=repeated * 1e3,
        fresh_ms=fresh * 1e3, ratio=fresh / repeated,
    )  # fmt: skip


def _worker(rank: int, world: int, port: int, args) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    if args.profile and rank == 0:
        import cProfile
        import pstats

        profile = cProfile.Profile()
        profile.enable()
    row = measure(args.seq, args.documents, args.calls, args.layout, torch.distributed.group.WORLD)
    if rank == 0:
        print(row)
        if args.profile:
            profile.disable()
            pstats.Stats(profile).sort_stats("cumulative").print_stats(25)
    torch.distributed.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", type=int, default=1)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--documents", type=int, default=8)
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--layout", default="zigzag")
    parser.add_argument("--profile", action="store_true", help="cProfile rank 0 (world > 1)")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    if args.world == 1:
        print(measure(args.seq, args.documents, args.calls, args.layout))
        return
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_worker, args=(args.world, port, args), nprocs=args.world)


if __name__ == "__main__":
    main()
