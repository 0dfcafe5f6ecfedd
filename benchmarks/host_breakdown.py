"""Where the host time of one call goes on 2 gloo processes, phase by phase.

``host_overhead.py`` compares whole calls; this says where the difference lies.
Both ranks run forward calls of ring and TokenRing on ``[1, 64, 2, 16]`` float32
q, k, v (the same calls), each rank pinned to a core of its own, with
``torch.distributed.batch_isend_irecv`` replaced after a warm-up by a stub whose
works are complete at once (receives get zeros): every
microsecond measured is then work of the calling thread, not waiting. Rank 1
reports medians over many calls of:

- ``call``: the whole ``tokenring.attention`` call, and ``minimal``: the plain-torch
  loop of ``host_overhead.py`` for the same strategy, timed in turns (15 repeats of
  1,000 calls each) with the ratio taken per repeat;
- the phases of the same call, timed one after the other as ``passes.forward_pass``
  runs them for this call (no joint tokens): ``prepare`` (finding the prepared
  call), ``nan_check``, ``program`` (``executor.run_forward``: the code
  ``execution/program.py`` made of the plan, which makes the call's storage, runs
  the operations and returns the results); the whole call less their sum is
  printed as ``unattributed``: the API layer's argument handling, and what timing
  the phases one by one (each a median of its own) does not see;
- for ring, ``straight``: the same call written out as straight-line code on the
  plan's own kernel, merge and storage sizes (the lookup, the NaN check, the
  results, one packed message, the kernel calls, the merge): what running a plan
  translated once into code would cost, to bound what interpreting it costs. It is
  checked first, with real transfers, to give exactly ``tokenring.attention``'s
  output.

    PYTHONPATH=src python benchmarks/host_breakdown.py [--calls N]
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import time

import host_overhead
import torch
import torch.distributed as dist

import tokenring as tr
from tokenring.api.calls import prepare
from tokenring.execution import executor
from tokenring.execution.kernels.base import hides_nan_in
from tokenring.execution.merge import merge_into
from tokenring_bench.launch import run_local

SHAPE = (1, 64, 2, 16)
RAW = (None, "tokenring", "contiguous", False, None, "auto", False, "none", None, None, None)
"""``attention``'s options in ``OPTION_NAMES`` order, the strategy first (filled in)."""


class _Done:
    """A completed work: what the stub hands back for every message."""

    def wait(self, timeout=None) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


def _stub(ops: list) -> list:
    """Complete at once; a receive gets zeros (one dispatch per message, ours and the
    loop's alike): a kernel reading fresh uninitialised memory instead can meet
    denormals or NaN and run many times slower (the loop's ring receives into a new tensor
    every step)."""
    for op in ops:
        if op.op is dist.irecv:
            op.tensor.zero_()
    return [_Done() for _ in ops]


def _interleaved_us(fns: dict, calls: int, repeats: int = 15) -> tuple[dict, dict]:
    """Median microseconds per call of each of ``fns`` and the median per-repeat ratio of
    each to the first, the functions taking turns within every repeat (so that a slow
    spell of the machine falls on all of them alike; timed one after the other, the
    loop's median alone moved from 83 to 104 us between two runs on the 2-core box)."""
    for fn in fns.values():
        for _ in range(calls // 10):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            times[name].append((time.perf_counter() - start) / calls * 1e6)
    first = next(iter(times.values()))
    medians = {name: statistics.median(us) for name, us in times.items()}
    ratios = {name: statistics.median(t / f for t, f in zip(us, first))
              for name, us in times.items()}  # fmt: skip
    return medians, ratios


def _phases(strategy: str, q, k, v, calls: int) -> dict[str, float]:
    """Each phase of ``passes.forward_pass`` for a call of ``strategy``, in their order
    (median microseconds per call)."""
    raw = (strategy, *RAW[1:])
    found = collections.defaultdict(list)
    clock = time.perf_counter_ns
    for n in range(calls * 2):
        t0 = clock()
        prepared = prepare(q, k, v, (None, None, None), raw, group=None, mesh=None,
                           wants_grad=False)  # fmt: skip
        t1 = clock()
        hides_nan_in(prepared.ex.kernel, q)
        t2 = clock()
        executor.run_forward(prepared.plan.forward_geometry, q, k, v, prepared.ex)
        t3 = clock()
        if n >= calls:  # the first half warms up
            for name, ns in (("prepare", t1 - t0), ("nan_check", t2 - t1), ("program", t3 - t2)):
                found[name].append(ns / 1000)
    return {name: statistics.median(us) for name, us in found.items()}


def _straight_ring(q, k, v):
    """Ring's forward at P=2 written out on its plan's kernel and merge: a function of
    ``(q, k, v)`` with this rank's storage made once."""
    raw = ("ring", *RAW[1:])
    call = prepare(q, k, v, (None, None, None), raw, group=None, mesh=None, wants_grad=False)
    kernel, scale = call.ex.kernel, call.plan.description.scale
    lanes = next(iter(call.ex.lanes.values()))
    peer = lanes.global_ranks[1 - lanes.rank]
    group = lanes.groups[0]
    b, length, heads, dim = k.shape
    arrived = torch.empty(length, 2, b, heads, dim)  # the peer's k and v, as records
    their_k, their_v = arrived[:, 0].transpose(0, 1), arrived[:, 1].transpose(0, 1)

    def forward(q, k, v):
        prepare(q, k, v, (None, None, None), raw, group=None, mesh=None, wants_grad=False)
        hides_nan_in(kernel, q)
        out = torch.empty(length, b, heads, dim)
        lse = torch.empty(length, b, heads)
        out_view, lse_view = out.transpose(0, 1), lse.permute(1, 2, 0)
        sent = torch.stack([k.transpose(0, 1), v.transpose(0, 1)], dim=1)
        ops = [dist.P2POp(dist.isend, sent, peer, group),
               dist.P2POp(dist.irecv, arrived, peer, group)]  # fmt: skip
        works = dist.batch_isend_irecv(ops)
        part, part_lse = kernel.forward(q, k, v, False, scale)
        out_view.copy_(part)
        lse_view.copy_(part_lse)
        for work in works:
            work.wait()
        part, part_lse = kernel.forward(q, their_k, their_v, False, scale)
        merge_into(out_view, lse_view, part, part_lse, fused=False, empty_rows=False)
        return out_view, lse_view

    return forward


def _worker(ctx, calls: int) -> dict:
    torch.set_num_threads(1)
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[ctx.rank]})
    torch.manual_seed(ctx.rank)
    q, k, v = (torch.randn(SHAPE) for _ in range(3))
    scale = SHAPE[-1] ** -0.5
    report = {}
    with torch.no_grad():
        for s in ("ring", "tokenring"):
            tr.attention(q, k, v, strategy=s)
        straight = _straight_ring(q, k, v)
        if not torch.equal(straight(q, k, v)[0], tr.attention(q, k, v, strategy="ring")):
            raise AssertionError("the straight-line ring differs from tokenring.attention")
        dist.barrier()
        real, dist.batch_isend_irecv = dist.batch_isend_irecv, _stub
        try:
            for s, minimal in (("ring", host_overhead._minimal_ring),
                               ("tokenring", host_overhead._minimal_tokenring)):  # fmt: skip
                fns = {
                    "minimal": lambda: minimal(q, k, v, scale),
                    "call": lambda: tr.attention(q, k, v, strategy=s),
                }
                if s == "ring":
                    fns["straight"] = lambda: straight(q, k, v)
                row, ratios = _interleaved_us(fns, calls)
                report[s] = (row | _phases(s, q, k, v, calls), ratios)
        finally:
            dist.batch_isend_irecv = real
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=1000, help="calls per repeat (default 1000)")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("host_breakdown.py pins each rank to a core: it needs 2 cores")
    report = run_local(_worker, (args.calls,), world=2, backend="gloo", timeout_s=900)[1]
    for strategy, (row, ratios) in report.items():
        phases = {n: us for n, us in row.items() if n not in ("call", "minimal", "straight")}
        rest = row["call"] - sum(phases.values())
        print(f"== {strategy} (rank 1, communication stubbed; us per call; ratio: the median")
        print("   of the per-repeat ratios to the minimal loop, timed in turns)")
        print(f"  {'whole call':<14}{row['call']:8.1f}   minimal loop {row['minimal']:8.1f}"
              f"   ratio {ratios['call']:.2f}x")  # fmt: skip
        if "straight" in row:
            print(f"  {'straight-line':<14}{row['straight']:8.1f}"
                  f"   ratio {ratios['straight']:.2f}x")  # fmt: skip
        for name, us in phases.items():
            print(f"    {name:<12}{us:8.1f}")
        print(f"    {'unattributed':<12}{rest:8.1f}  (the whole call less its phases)")


if __name__ == "__main__":
    main()
