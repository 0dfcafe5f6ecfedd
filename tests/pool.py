"""A pool of gloo worker processes started once per test session.

Four CPU processes join one gloo world and split it into groups of each
size: {0}{1}{2}{3}, {0,1}{2,3}, {0,1,2}{3} and the world. Every rank is in
one group of each size, so all ranks create the same process groups in the
same order (what ``new_group(use_local_synchronization=True)`` needs), and
``tokenring.setup_lanes`` runs for each group at start-up. A case for world
size n runs on every group of n ranks at once (two independent runs for
n = 2, four for n = 1). The driver sends a batch of cases to every worker;
each returns one result (or a traceback) per case. A batch that does not finish
within its timeout kills the pool, which the fixture then restarts.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import socket
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

WORLD = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Worker:
    """What a case function gets: its rank and the groups of each size."""

    rank: int
    groups: dict[int, Any]

    def group(self, size: int):
        """This rank's group of ``size`` ranks (None if it has none)."""
        return self.groups.get(size)


class CaseError(Exception):
    """A case raised inside a worker; the message holds the worker's traceback."""


def _worker_main(rank: int, world: int, port: int, tasks, results) -> None:
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    import tokenring

    tokenring.configure(timeout=timedelta(seconds=60))
    groups = {world: dist.group.WORLD}
    own = {world: dist.group.WORLD}  # this rank's group in each partition (leftovers included)
    for size in range(1, world):
        for start in range(0, world, size):
            members = list(range(start, min(start + size, world)))
            pg = dist.new_group(members)
            if rank in members:
                own[size] = pg
                if len(members) == size:
                    groups[size] = pg
    for size in sorted(own):
        tokenring.setup_lanes(own[size])
    worker = Worker(rank, groups)
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, cases = task
        out = []
        for case in cases:
            if worker.group(case.get("world", world)) is None:
                out.append(("skip", None))
                continue
            try:
                out.append(("ok", fn(worker, **case)))
            except BaseException:
                out.append(("error", traceback.format_exc()))
        results.put((rank, out))
    tokenring.destroy_lanes()
    dist.destroy_process_group()


class WorkerPool:
    def __init__(self, world: int = WORLD):
        ctx = mp.get_context("spawn")
        self.world = world
        self.tasks = [ctx.Queue() for _ in range(world)]
        self.results = ctx.Queue()
        port = free_port()
        self.procs = [
            ctx.Process(
                target=_worker_main,
                args=(r, world, port, self.tasks[r], self.results),
                daemon=True,
            )
            for r in range(world)
        ]
        for p in self.procs:
            p.start()
        self.alive = True

    def run(self, fn: Callable, cases: list[dict], timeout: float = 300.0) -> list[list[Any]]:
        """Run ``fn(worker, **case)`` for every case; return per case the results of
        every rank that ran it (rank order). Raises CaseError if any rank failed."""
        if not self.alive:
            raise RuntimeError("worker pool is dead")
        for q in self.tasks:
            q.put((fn, cases))
        per_rank: dict[int, list] = {}
        try:
            while len(per_rank) < self.world:
                rank, out = self.results.get(timeout=timeout)
                per_rank[rank] = out
        except queue.Empty:
            self.kill()
            raise TimeoutError(f"workers did not finish {fn.__name__} within {timeout}s") from None
        results = []
        for i, case in enumerate(cases):
            row = []
            for rank in range(self.world):
                status, value = per_rank[rank][i]
                if status == "error":
                    raise CaseError(f"case {case} failed on rank {rank}:\n{value}")
                if status == "ok":
                    row.append(value)
            results.append(row)
        return results

    def kill(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
        for p in self.procs:
            p.join(timeout=10)
        self.alive = False

    def close(self) -> None:
        if self.alive:
            for q in self.tasks:
                q.put(None)
            for p in self.procs:
                p.join(timeout=30)
        self.kill()
