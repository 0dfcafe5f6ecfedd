"""Host time per call, side by side with what it is compared against, and the ratios.

Runs where it is started, in one go:

- **one rank** (no process group): ``tr.attention`` for every strategy against one
  bare ``F.scaled_dot_product_attention`` call on the same ``[B, L, H, D]`` inputs
  (what a user would write: transposed in and out of SDPA's ``[B, H, L, D]``). On CPU the
  tensors are tiny, so time per call *is* host time; on a GPU the GPU work is
  kept larger than the host time and the wall time of queuing calls back to
  back, without waiting, is the host time (enqueue only).
- **2 gloo processes** (CPU): ring and TokenRing against minimal loops of the same
  algorithm written here in plain torch (PyTorch's CPU flash kernel, a logaddexp
  merge, one ``batch_isend_irecv`` per step: a pass-KV ring; a pass-Q ring that
  forwards the queries and returns the last partial to its owner in the same
  batch), q, k, v of ``[1, 64, 2, 16]`` float32 per rank, non-causal forward.
- **several GPUs** (when there are): TokenRing's forward host time at S=8K per
  rank.

Targets: one rank on a GPU at most 1.5x the SDPA call; on CPU one rank at most
2x; on 2 gloo processes ring and TokenRing at most 1.3x their minimal loops, pinned
and unpinned (pinned: each rank on a core of its own; the CPU time per call and the
batches and messages per call are printed next to each);
several GPUs: TokenRing at P=2, S=8K at most 0.3 ms.
Every figure is a median over repeats of many calls (on gloo 11 repeats of 200 calls,
ours and the loop alternating, their order swapped every repeat; the quartiles of the
per-repeat ratio are printed too: on a box with as many cores as ranks they span
0.2-0.5x, and whole runs differ as much). Prints a table; with
``--json PATH`` also writes the numbers.

    PYTHONPATH=src python benchmarks/host_overhead.py [--only one-rank|gloo] [--json out.json]
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


def _flash(q, k, v, scale):
    """PyTorch's CPU flash kernel on ``[B, L, H, D]``: ``(out, lse)``, lse ``[B, H, L]``."""
    out, lse = torch._scaled_dot_product_flash_attention_for_cpu(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, False, scale=scale
    )
    return out.transpose(1, 2), lse


def _merge(out, lse, part, part_lse):
    """Two partials of the same rows, merged with logaddexp (what any ring does)."""
    new = torch.logaddexp(lse, part_lse)
    weight = torch.exp(lse - new).transpose(1, 2).unsqueeze(-1)
    part_weight = torch.exp(part_lse - new).transpose(1, 2).unsqueeze(-1)
    return out * weight + part * part_weight, new


def _minimal_ring(q, k, v, scale):
    """Pass-KV ring in plain torch: per step one ``batch_isend_irecv`` (K, V on to the next
    rank, the previous rank's in), one kernel call, one merge: the yardstick for ring."""
    world, rank = dist.get_world_size(), dist.get_rank()
    out, lse = _flash(q, k, v, scale)
    held = torch.stack([k, v])
    for _ in range(world - 1):
        arrived = torch.empty_like(held)
        ops = [
            dist.P2POp(dist.isend, held, (rank + 1) % world),
            dist.P2POp(dist.irecv, arrived, (rank - 1) % world),
        ]
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        held = arrived
        out, lse = _merge(out, lse, *_flash(q, held[0], held[1], scale))
    return out


def _minimal_tokenring(q, k, v, scale):
    """Pass-Q in plain torch: per step one ``batch_isend_irecv`` that forwards the queries
    held and returns the last step's partial (out and lse in one message) to its owner;
    one more at the end for the last partial: the yardstick for TokenRing."""
    world, rank = dist.get_world_size(), dist.get_rank()
    out, lse = _flash(q, k, v, scale)
    held, partial = q, None
    for step in range(1, world + 1):
        ops, arrived, home = [], None, None
        if step < world:  # the next queries come from rank + 1
            arrived = torch.empty_like(q)
            ops += [dist.P2POp(dist.isend, held, (rank - 1) % world),
                    dist.P2POp(dist.irecv, arrived, (rank + 1) % world)]  # fmt: skip
        if partial is not None:  # the partial of step - 1 goes to its owner
            home = torch.empty_like(partial)
            ops += [dist.P2POp(dist.isend, partial, (rank + step - 1) % world),
                    dist.P2POp(dist.irecv, home, (rank - step + 1) % world)]  # fmt: skip
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        if home is not None:
            n = out.numel()
            out, lse = _merge(out, lse, home[:n].view_as(out), home[n:].view_as(lse))
        if arrived is not None:
            held = arrived
            part, part_lse = _flash(held, k, v, scale)
            partial = torch.cat([part.reshape(-1), part_lse.reshape(-1)])
    return out


class _Counted:
    """Counts the point-to-point batches and messages posted through
    ``dist.batch_isend_irecv`` while it is installed (ours and the loops alike)."""

    def __init__(self) -> None:
        self.batches = self.messages = 0
        self._real = dist.batch_isend_irecv

    def __call__(self, ops):
        self.batches += 1
        self.messages += len(ops)
        return self._real(ops)

    def per_call(self, fn, calls: int = 20) -> tuple[float, float]:
        """(batches, messages) per call of ``fn``."""
        self.batches = self.messages = 0
        dist.batch_isend_irecv = self
        try:
            for _ in range(calls):
                fn()
        finally:
            dist.batch_isend_irecv = self._real
        return self.batches / calls, self.messages / calls


def _timed(fns: dict, calls: int, repeats: int) -> dict[str, tuple[list, list]]:
    """Per repeat and function, ``calls`` calls back to back after a barrier: wall time
    and this thread's CPU time per call (s). The order alternates between repeats, so
    a drift of the machine's state favours neither."""
    found: dict[str, tuple[list, list]] = {name: ([], []) for name in fns}
    for f in fns.values():
        for _ in range(max(3, calls // 10)):
            f()
    for repeat in range(repeats):
        order = list(fns.items())
        for name, f in order[::-1] if repeat % 2 else order:
            dist.barrier()
            wall, cpu = time.perf_counter(), time.thread_time()
            for _ in range(calls):
                f()
            found[name][0].append((time.perf_counter() - wall) / calls)
            found[name][1].append((time.thread_time() - cpu) / calls)
    return found


def _quartiles(values: list[float]) -> tuple[float, float]:
    """The first and third quartiles: how far one repeat's ratio strays from another's."""
    q1, _, q3 = statistics.quantiles(values, n=4)
    return q1, q3


def _gloo_worker(ctx, calls: int, repeats: int, pinned: bool) -> list[dict]:
    """Ring and TokenRing against their minimal loops. ``pinned``: each rank on a core of
    its own (with its gloo threads), as CPU jobs are deployed; unpinned, the two
    processes and their gloo threads move between the cores and the loops' own time
    swings by up to 2x from run to run."""
    torch.set_num_threads(1)
    if pinned:
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[ctx.rank]})
    q, k, v = (torch.randn(1, 64, 2, 16) for _ in range(3))
    scale = 16**-0.5
    rows = []
    counter = _Counted()
    with torch.no_grad():
        for s, minimal in (("ring", _minimal_ring), ("tokenring", _minimal_tokenring)):
            fns = {
                "minimal": lambda: minimal(q, k, v, scale),
                "ours": lambda: tr.attention(q, k, v, strategy=s),
            }
            found = _timed(fns, calls, repeats)
            (mw, mc), (ow, oc) = found["minimal"], found["ours"]
            rows.append(
                dict(
                    what=s,
                    pinned=pinned,
                    us=statistics.median(ow) * 1e6,
                    minimal_us=statistics.median(mw) * 1e6,
                    ratio=statistics.median(o / m for o, m in zip(ow, mw)),
                    ratio_quartiles=_quartiles([o / m for o, m in zip(ow, mw)]),
                    cpu_us=statistics.median(oc) * 1e6,
                    minimal_cpu_us=statistics.median(mc) * 1e6,
                    cpu_ratio=statistics.median(o / m for o, m in zip(oc, mc)),
                    batches_messages=counter.per_call(fns["ours"]),
                    minimal_batches_messages=counter.per_call(fns["minimal"]),
                )
            )
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
    parser.add_argument(
        "--only",
        choices=("one-rank", "gloo"),
        default=None,
        help="run one part (default: every part this machine can)",
    )
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    cuda = torch.cuda.is_available()
    report: dict[str, list[dict]] = {}
    if args.only in (None, "one-rank"):
        report["one_rank_cpu"] = one_rank("cpu")
        if cuda:
            report["one_rank_gpu"] = one_rank("cuda")
    if args.only in (None, "gloo"):
        pinnable = hasattr(os, "sched_getaffinity") and len(os.sched_getaffinity(0)) >= 2
        for pinned in (True, False) if pinnable else (False,):
            report[f"gloo_2_{'pinned' if pinned else 'unpinned'}"] = run_local(
                _gloo_worker, (200, 11, pinned), world=2, backend="gloo", timeout_s=600
            )[0]
    if args.only is None and cuda and torch.cuda.device_count() >= 2:
        world = torch.cuda.device_count()
        report["gpus"] = run_local(_gpu_worker, (8192,), world=world, backend="nccl")[0]
    targets = {"one_rank_cpu": 2.0, "one_rank_gpu": 1.5}
    targets |= {"gloo_2_pinned": 1.3, "gloo_2_unpinned": 1.3}
    for name, rows in report.items():
        print(f"== {name}")
        for row in rows:
            ratio = row.get("ratio")
            target = targets.get(name)
            mark = ""
            if ratio is not None and target is not None:
                mark = "  met" if ratio <= target else f"  MISSED (target {target}x)"
            causal = f" causal={row['causal']}" if "causal" in row else ""
            base = row.get("sdpa_us", row.get("minimal_us"))
            against = f"vs {base:8.1f} us" if base is not None else " " * 14
            shown = f"{ratio:5.2f}x" if ratio is not None else "      "
            print(f"  {row['what']:<12}{causal:<14} {row['us']:9.1f} us {against}  {shown}{mark}")
            if "ratio_quartiles" in row:
                q1, q3 = row["ratio_quartiles"]
                print(f"  {'':<26} wall ratio per repeat: {q1:.2f}-{q3:.2f}x (quartiles)")
            if "cpu_us" in row:
                (b, m), (mb, mm) = row["batches_messages"], row["minimal_batches_messages"]
                print(
                    f"  {'':<26} cpu {row['cpu_us']:7.1f} us vs {row['minimal_cpu_us']:8.1f} us "
                    f" {row['cpu_ratio']:5.2f}x; per call {b:g} batches / {m:g} messages "
                    f"vs {mb:g} / {mm:g}"
                )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
