"""``tokenring demo``: run every strategy on a small problem, check it, time it, draw it.

Each case runs on all local devices (GPUs with NCCL, else CPU processes with
gloo), compares forward outputs, LSE and gradients with float64 attention on
the whole sequence, and reports a median time per forward call. One zigzag
causal call per strategy is recorded step by step and drawn as a timeline.
"""

from __future__ import annotations

import itertools
import statistics
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from tokenring.api.attention import attention
from tokenring.api.meshes import sp_mesh
from tokenring.api.sharding import shard
from tokenring.call.checks import strategy_refusals
from tokenring.execution.timeline import Recorder
from tokenring.options import Layout, Strategy

from .launch import WorkerContext, sync_ranks
from .metrics import max_over_ranks, rel_err

__all__ = ["DemoConfig", "demo_worker", "refusal", "tolerance", "usp_split"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class DemoConfig:
    seq_len: int
    heads: int
    heads_kv: int
    head_dim: int
    dtype: str
    repeats: int
    seed: int = 0


def tolerance(dtype: str) -> float:
    """Max relative error the demo accepts: fp32 arithmetic, or one low-precision rounding
    per step on top of the kernel's own (see tests/test_attention.py for the test bar)."""
    return 1e-5 if dtype == "float32" else 3e-2


def _reference(q, k, v, causal: bool):
    """Float64 attention with autograd on the gathered sequence: (out, lse)."""
    group = q.shape[2] // k.shape[2]
    kx, vx = k.repeat_interleave(group, 2), v.repeat_interleave(group, 2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, kx) * q.shape[-1] ** -0.5
    if causal:
        n = q.shape[1]
        mask = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(scores, -1), vx), lse


def usp_split(world: int, heads: int) -> tuple[int, int]:
    """(ulysses, ring) for the demo's hybrid: the most even split of the world whose
    Ulysses degree divides the heads."""
    return max(
        ((u, world // u) for u in range(1, world + 1) if world % u == 0 and heads % u == 0),
        key=lambda split: (min(split), split[0]),
    )


def _run_case(
    ctx: WorkerContext, cfg: DemoConfig, strategy: Strategy, layout: Layout, causal: bool, mesh
):
    device, dtype = ctx.device, DTYPES[cfg.dtype]
    g = torch.Generator(device="cpu").manual_seed(cfg.seed)
    shape_q = (1, cfg.seq_len, cfg.heads, cfg.head_dim)
    shape_kv = (1, cfg.seq_len, cfg.heads_kv, cfg.head_dim)
    full = [
        torch.randn(s, generator=g, dtype=torch.float64).to(dtype)
        for s in (shape_q, shape_kv, shape_kv, shape_q)
    ]
    q, k, v, do = (t.to(device) for t in full)
    ref_in = [t.double().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = _reference(*ref_in, causal)
    ref_grads = torch.autograd.grad(ref_out, ref_in, do.double())

    where = {"mesh": mesh} if strategy is Strategy.USP else {}

    def local(x, dim=1):
        return shard(x, layout=layout, dim=dim, **where)

    ql, kl, vl = (local(t).requires_grad_() for t in (q, k, v))
    out, lse = attention(
        ql, kl, vl, strategy=strategy, causal=causal, layout=layout, return_lse=True,
        seq_len=cfg.seq_len, **where,
    )  # fmt: skip
    grads = torch.autograd.grad(out, (ql, kl, vl), local(do))
    out_err = max(rel_err(out, local(ref_out.detach())), rel_err(lse, local(ref_lse.detach(), 2)))
    grad_err = max(rel_err(gr, local(r)) for gr, r in zip(grads, ref_grads))

    times = []
    with torch.no_grad():
        for _ in range(cfg.repeats + 1):
            sync_ranks(device)
            start = time.perf_counter()
            attention(ql, kl, vl, strategy=strategy, causal=causal, layout=layout,
                      seq_len=cfg.seq_len, **where)  # fmt: skip
            sync_ranks(device)
            times.append(time.perf_counter() - start)
    return {
        "strategy": strategy.value,
        "layout": layout.value,
        "causal": causal,
        "out_err": max_over_ranks(out_err, device),
        "grad_err": max_over_ranks(grad_err, device),
        "ms": 1e3 * statistics.median(times[1:]),
    }


def _timeline(ctx: WorkerContext, cfg: DemoConfig, strategy: Strategy, mesh) -> list[dict]:
    device, dtype = ctx.device, DTYPES[cfg.dtype]
    g = torch.Generator(device="cpu").manual_seed(cfg.seed)
    where = {"mesh": mesh} if strategy is Strategy.USP else {}
    q, kv = (
        shard(torch.randn(1, cfg.seq_len, heads, cfg.head_dim, generator=g).to(device, dtype),
              layout="zigzag", **where)
        for heads in (cfg.heads, cfg.heads_kv)
    )  # fmt: skip
    with torch.no_grad():
        run = dict(strategy=strategy, causal=True, layout="zigzag", seq_len=cfg.seq_len, **where)
        attention(q, kv, kv, **run)  # warm-up
        sync_ranks(device)
        recorder = Recorder(ctx.rank, device)
        attention(q, kv, kv, recorder=recorder, **run)
        spans = [s.as_dict() for s in recorder.spans()]
    gathered: list = [None] * ctx.world
    dist.all_gather_object(gathered, spans)
    return [s for part in gathered for s in part]


def refusal(cfg: DemoConfig, world: int, strategy: Strategy, layout: Layout, causal: bool) -> str:
    """Why ``strategy`` cannot run this demo's shape ("" if it can)."""
    ulysses = usp_split(world, cfg.heads)[0] if strategy is Strategy.USP else 1
    reasons = strategy_refusals(
        strategy, world=world, ulysses=ulysses, layout=layout, causal=causal,
        heads_q=cfg.heads, heads_kv=cfg.heads_kv, seq_len=cfg.seq_len,
    )  # fmt: skip
    return "; ".join(reasons)


def demo_worker(ctx: WorkerContext, cfg: DemoConfig) -> dict:
    """Runs on every rank; rank 0's return value holds the table rows and timelines.
    The hybrid runs on the most even ulysses x ring split of the ranks (``usp_split``).
    A strategy that cannot run the shape (Ulysses with heads the ranks do not divide)
    gets a row that says why instead."""
    cases = list(itertools.product(Strategy, Layout, (False, True)))
    ulysses, ring = usp_split(ctx.world, cfg.heads)
    mesh = sp_mesh(ulysses=ulysses, ring=ring)
    names = {s: s.value for s in Strategy} | {Strategy.USP: f"usp {ulysses}x{ring}"}
    rows = []
    for i, (strategy, layout, causal) in enumerate(cases):
        ctx.report(("case", i, len(cases), f"{strategy.value} {layout.value} causal={causal}"))
        why = refusal(cfg, ctx.world, strategy, layout, causal)
        row = {"strategy": names[strategy], "layout": layout.value, "causal": causal}
        if why:
            rows.append({**row, "refused": why})
            continue
        rows.append({**_run_case(ctx, cfg, strategy, layout, causal, mesh), **row})
    timelines = {}
    for strategy in Strategy:
        if refusal(cfg, ctx.world, strategy, Layout.ZIGZAG, True):
            continue
        ctx.report(("case", len(cases), len(cases), f"timeline {names[strategy]}"))
        timelines[names[strategy]] = _timeline(ctx, cfg, strategy, mesh)
    return {"rows": rows, "timelines": timelines, "config": asdict(cfg)}
