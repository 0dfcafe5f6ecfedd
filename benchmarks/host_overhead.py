"""Host time per call, side by side with what it is compared against, and the ratios.

Runs where it is started, in one go:

- **one rank** (no process group): ``tr.attention`` for every strategy against one
  bare ``F.scaled_dot_product_attention`` call on the same ``[B, L, H, D]`` inputs
  (what a user would write: transposed in and out of SDPA's ``[B, H, L, D]``). On CPU the
  tensors are tiny, so time per call *is* host time; on a GPU the GPU work is
  kept larger than the host time and the wall time of queuing calls back to
  back, without waiting, is the host time (enqueue only).
- **2 gloo processes** (CPU): ring and TokenRing against a minimal pass-KV ring
  written here (one ``batch_isend_irecv``, one kernel call and one merge per
  step), tiny tensors, forward; and, to tell our overhead from the algorithm's,
  TokenRing against a minimal TokenRing loop written here (its partials need a
  second round of messages per step, which a pass-KV ring does not make).
- **several GPUs** (when there are): TokenRing's forward host time at S=8K per
  rank.

Targets (issue: host time): one rank on a GPU at most 1.5x the SDPA call; on CPU
one rank at most 2x, and on 2 gloo processes ring at most 1.3x and TokenRing at
most 1.8x the minimal ring; several GPUs: TokenRing at P=2, S=8K at most 0.3 ms.
Every figure is a median over repeats of many calls. Prints a table; with
``--json PATH`` also writes the numbers.

    PYTHONPATH=src python benchmarks/host_overhead.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import tokenring as tr
from tokenring.execution.kernels.cpu_flash import CpuFlash
from tokenring.execution.merge import merge_into
from tokenring_bench.launch import run_local

STRATEGIES = ("tokenring", "ring", "ulysses", "allgather")


def _per_call(fn, calls: int, repeats: int, sync=None) -> float:
    """Median over ``repeats`` of the mean wall time of ``calls`` back-to-back calls (s)."""
    return _paired(None, fn, calls, repeats, sync)[1]


def _paired(base, fn, calls: int, repeats: int, sync=None) -> tuple[float, float, float]:
    """``(base, fn, ratio)``: per repeat, ``calls`` calls of ``base`` then of ``fn``, timed
    back to back, so both see the same machine; medians of the times and of the ratios
    (a shared, noisy CPU moves both together)."""
    runs = [f for f in (base, fn) if f is not None]
    for f in runs:
        for _ in range(max(3, calls // 10)):
            f()
    if sync:
        sync()
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(repeats):
        for i, f in enumerate(runs):
            start = time.perf_counter()
            for _ in range(calls):
                f()
            times[i].append((time.perf_counter() - start) / calls)
            if sync:
                sync()
    if base is None:
        return 0.0, statistics.median(times[0]), 0.0
    ratios = [b / a for a, b in zip(*times)]
    return statistics.median(times[0]), statistics.median(times[1]), statistics.median(ratios)


def _sdpa(q, k, v, causal: bool):
    """One bare SDPA call on ``[B, L, H, D]`` tensors."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal
    )
    return out.transpose(1, 2)


def one_rank(device: str) -> list[dict]:
    """Every strategy on one rank against the bare SDPA call it wraps."""
    cuda = device == "cuda"
    shape = (1, 8192, 32, 128) if cuda else (1, 16, 2, 8)
    dtype = torch.bfloat16 if cuda else torch.float32
    q, k, v = (torch.randn(shape, device=device, dtype=dtype) for _ in range(3))
    sync = torch.cuda.synchronize if cuda else None
    calls, repeats = (20, 15) if cuda else (2000, 7)
    rows = []
    with torch.no_grad():
        for causal in (False, True):
            for s in STRATEGIES:
                bare, ours, ratio = _paired(
                    lambda: _sdpa(q, k, v, causal),
                    lambda: tr.attention(q, k, v, strategy=s, causal=causal),
                    calls, repeats, sync,
                )  # fmt: skip
                rows.append(
                    dict(what=s, causal=causal, us=ours * 1e6, sdpa_us=bare * 1e6, ratio=ratio)
                )
    return rows


def _minimal_ring(q, k, v, kernel, scale):
    """Pass-KV ring, written plainly: the yardstick for our ring's host time."""
    world, rank = dist.get_world_size(), dist.get_rank()
    out, lse = kernel.forward(q, k, v, False, scale)
    out = out.float()
    cur = torch.stack([k, v])
    nxt = torch.empty_like(cur)
    for _ in range(world - 1):
        ops = [
            dist.P2POp(dist.isend, cur, (rank + 1) % world),
            dist.P2POp(dist.irecv, nxt, (rank - 1) % world),
        ]
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        cur, nxt = nxt, cur
        part, part_lse = kernel.forward(q, cur[0], cur[1], False, scale)
        merge_into(out, lse, part, part_lse)
    return out


def _exchange(send: torch.Tensor, to: int, recv: torch.Tensor, source: int) -> None:
    ops = [dist.P2POp(dist.isend, send, to), dist.P2POp(dist.irecv, recv, source)]
    for work in dist.batch_isend_irecv(ops):
        work.wait()


def _minimal_tokenring(q, k, v, kernel, scale):
    """Pass-Q with partials returned, written plainly (one packed message each way per
    move): TokenRing's own yardstick, with its second round of messages."""
    world, rank = dist.get_world_size(), dist.get_rank()
    out, lse = kernel.forward(q, k, v, False, scale)
    out = out.float()
    held = q
    for step in range(1, world):
        arrived = torch.empty_like(q)
        _exchange(held, (rank - 1) % world, arrived, (rank + 1) % world)
        held = arrived
        part, part_lse = kernel.forward(held, k, v, False, scale)
        packed = torch.cat([part.reshape(-1), part_lse.reshape(-1)])
        home = torch.empty_like(packed)
        _exchange(packed, (rank + step) % world, home, (rank - step) % world)
        merge_into(out, lse, home[: part.numel()].view_as(part), home[part.numel() :].view_as(lse))
    return out


def _gloo_worker(ctx, calls: int, repeats: int) -> list[dict]:
    torch.set_num_threads(1)
    q, k, v = (torch.randn(1, 8, 2, 8) for _ in range(3))
    kernel, scale = CpuFlash(), 8**-0.5
    rows = []
    with torch.no_grad():
        for s in ("ring", "tokenring"):
            minimal, ours, ratio = _paired(
                lambda: _minimal_ring(q, k, v, kernel, scale),
                lambda: tr.attention(q, k, v, strategy=s),
                calls, repeats, dist.barrier,
            )  # fmt: skip
            rows.append(dict(what=s, us=ours * 1e6, minimal_us=minimal * 1e6, ratio=ratio))
        own, ours, ratio = _paired(
            lambda: _minimal_tokenring(q, k, v, kernel, scale),
            lambda: tr.attention(q, k, v, strategy="tokenring"),
            calls, repeats, dist.barrier,
        )  # fmt: skip
        rows.append(
            dict(what="tokenring vs minimal tokenring", us=ours * 1e6, minimal_us=own * 1e6,
                 ratio=ratio, informative=True)
        )  # fmt: skip
    return rows


def _gpu_worker(ctx, seq: int) -> list[dict]:
    local = seq // ctx.world
    q, k, v = (
        torch.randn(1, local, 32, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3)
    )

    def sync():
        torch.cuda.synchronize()
        dist.barrier()

    with torch.no_grad():
        host = _per_call(
            lambda: tr.attention(q, k, v, strategy="tokenring", causal=True, layout="zigzag"),
            20, 15, sync,
        )  # fmt: skip
    return [dict(what=f"tokenring P={ctx.world} S={seq}", us=host * 1e6)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="write the numbers here")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    cuda = torch.cuda.is_available()
    report: dict[str, list[dict]] = {"one_rank_cpu": one_rank("cpu")}
    if cuda:
        report["one_rank_gpu"] = one_rank("cuda")
    report["gloo_2"] = run_local(_gloo_worker, (200, 7), world=2, backend="gloo", timeout_s=600)[0]
    if cuda and torch.cuda.device_count() >= 2:
        world = torch.cuda.device_count()
        report["gpus"] = run_local(_gpu_worker, (8192,), world=world, backend="nccl")[0]
    targets = {"one_rank_cpu": 2.0, "one_rank_gpu": 1.5}
    for name, rows in report.items():
        print(f"== {name}")
        for row in rows:
            ratio = row.get("ratio")
            target = targets.get(name, {"ring": 1.3, "tokenring": 1.8}.get(row["what"]))
            if row.get("informative"):
                target = None
            mark = ""
            if ratio is not None and target is not None:
                mark = "  met" if ratio <= target else f"  MISSED (target {target}x)"
            causal = f" causal={row['causal']}" if "causal" in row else ""
            base = row.get("sdpa_us", row.get("minimal_us"))
            against = f"vs {base:8.1f} us" if base is not None else " " * 14
            shown = f"{ratio:5.2f}x" if ratio is not None else "      "
            print(f"  {row['what']:<12}{causal:<14} {row['us']:9.1f} us {against}  {shown}{mark}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
