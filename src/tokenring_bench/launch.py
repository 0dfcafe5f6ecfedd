"""Start one worker process per device on this machine and collect their results.

Used by ``tokenring demo`` and ``tokenring bench``: with GPUs, one process per
GPU and NCCL; without, ``cpu_workers`` processes and gloo. Workers send
progress messages to the parent, which owns the terminal. A run that does not
finish within its timeout is killed (all workers), never left hanging.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["WorkerContext", "WorkerFailed", "default_world", "run_local", "sync_ranks"]

# Never let NCCL or PyTorch use NVLink multicast (NVLS): docs/benchmarking.md says why.
SAFE_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}


class WorkerFailed(RuntimeError):
    """A worker raised, died or timed out; the message says which and why."""


@dataclass
class WorkerContext:
    """What a worker function gets."""

    rank: int
    world: int
    device: torch.device
    _messages: Any

    def report(self, message: Any) -> None:
        """Send ``message`` to the parent (only rank 0's are shown)."""
        if self.rank == 0:
            self._messages.put(("message", 0, message))


def sync_ranks(device: torch.device) -> None:
    """Wait for this rank's device work, then for every rank (before timing a call)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier()


def default_world(cpu_workers: int = 4) -> tuple[int, str]:
    """(process count, backend) for this machine: every GPU with NCCL, else CPUs with gloo."""
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        return torch.cuda.device_count(), "nccl"
    return cpu_workers, "gloo"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, backend, port, fn, args, messages, timeout_s, transfer_timeout_s):
    os.environ.update(SAFE_ENV)
    import tokenring

    tokenring.configure(timeout=timedelta(seconds=transfer_timeout_s))
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
            device = torch.device("cuda", rank)
        else:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
            device = torch.device("cpu")
        dist.init_process_group(
            backend,
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=timeout_s),
        )
        result = fn(WorkerContext(rank, world, device, messages), *args)
        messages.put(("result", rank, result))
    except BaseException:
        messages.put(("error", rank, traceback.format_exc()))
    finally:
        tokenring.destroy_lanes()
        if dist.is_initialized():
            dist.destroy_process_group()


def run_local(
    fn: Callable,
    args: tuple = (),
    *,
    world: int,
    backend: str,
    timeout_s: float = 600.0,
    transfer_timeout_s: float = 300.0,
    on_message: Callable[[Any], None] | None = None,
) -> list[Any]:
    """Run ``fn(ctx, *args)`` in ``world`` processes; return their results by rank.

    ``timeout_s`` bounds the whole run (all workers are killed after it);
    ``transfer_timeout_s`` is the workers' ``tokenring`` transfer timeout (how long a
    transfer waits for a stalled peer before ``TransferFailed``).
    """
    os.environ.update(SAFE_ENV)
    ctx = mp.get_context("spawn")
    messages = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(
            target=_worker,
            args=(r, world, backend, port, fn, args, messages, timeout_s, transfer_timeout_s),
            daemon=True,
        )
        for r in range(world)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(results) < world:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WorkerFailed(f"workers did not finish within {timeout_s:.0f}s")
            try:
                kind, rank, payload = messages.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if dead:
                    raise WorkerFailed(
                        f"worker {dead[0]} exited with code {procs[dead[0]].exitcode}"
                    ) from None
                continue
            if kind == "error":
                raise WorkerFailed(f"worker {rank} failed:\n{payload}")
            if kind == "message":
                if on_message is not None:
                    on_message(payload)
            else:
                results[rank] = payload
    finally:
        # all results in: let the workers tear down; a failure: the others may be waiting
        # on the failed one, so stop them now
        grace = 10 if len(results) == world else 0
        for p in procs:
            p.join(timeout=grace)
            if p.is_alive():
                p.kill()
                p.join()
    return [results[r] for r in range(world)]
