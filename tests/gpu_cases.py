"""Worker functions for the GPU tests (run in one process per GPU via tokenring_bench.launch)."""

from __future__ import annotations

import zlib

import torch

import tokenring as tr
from reference import attention_reference, rel_err
from tokenring.execution.kernels import select_kernel
from tokenring.execution.kernels.base import BlockSpec

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
HEADS = {"mha": (8, 8), "gqa": (8, 2), "mqa": (8, 1)}
# one low-precision rounding per step (see tests/test_attention.py)
STEP_ROUNDING = {"bfloat16": 2.0**-8, "float16": 2.0**-11, "float32": 1e-6}


def _inputs(seed, batch, seq, heads, dim, dtype, device):
    g = torch.Generator().manual_seed(seed)
    shapes = [
        (batch, seq, heads[0], dim),
        (batch, seq, heads[1], dim),
        (batch, seq, heads[1], dim),
        (batch, seq, heads[0], dim),
    ]
    return [
        torch.randn(s, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
        for s in shapes
    ]


def kernel_errors(kernel_name, q, k, v, do, causal):
    """Single-device errors of one kernel on whole tensors vs float64 attention."""
    spec = BlockSpec("cuda", q.dtype, q.shape[3], q.shape[2], k.shape[2], causal, backward=True)
    kernel = select_kernel(kernel_name, spec)
    scale = q.shape[-1] ** -0.5
    qr, kr, vr = (t.double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = attention_reference(qr, kr, vr, causal=causal)
    ref_grads = torch.autograd.grad(ref, (qr, kr, vr), do.double())
    out, lse = kernel.forward(q, k, v, causal, scale)
    delta = (do.float() * out.float()).sum(-1).transpose(1, 2)
    errs = {"out": rel_err(out, ref), "lse": rel_err(lse, ref_lse)}
    # the executor hands over out and do as views of row-major storage, like q, k, v
    out, do = (t.transpose(0, 1).contiguous().transpose(0, 1) for t in (out, do))
    for tag, given_out in (("", out), ("_from_delta", None)):
        grads = kernel.backward(do, q, k, v, given_out, lse, delta, causal, scale)
        for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
            errs[name + tag] = rel_err(g, r)
    again = kernel.backward(do, q, k, v, out, lse, delta, causal, scale)
    errs["deterministic"] = float(
        all(
            torch.equal(a, b)
            for a, b in zip(again, kernel.backward(do, q, k, v, out, lse, delta, causal, scale))
        )
    )
    return errs


def distributed_cases(ctx, cases: list[dict]) -> list[dict]:
    """Each case on all ranks: errors vs float64 and the single-device kernel's own errors."""
    out = []
    baselines: dict[tuple, dict] = {}
    for i, case in enumerate(cases):
        ctx.report(("case", i, len(cases), str(case)))
        dtype = DTYPES[case["dtype"]]
        heads = HEADS[case["heads"]]
        # cases that differ only in strategy or layout share inputs and the baseline
        key = (
            case["dtype"],
            case["heads"],
            case["causal"],
            case["kernel"],
            case["seq"],
            case["dim"],
        )
        q, k, v, do = _inputs(
            zlib.crc32(repr(key).encode()), 1, case["seq"], heads, case["dim"], dtype, ctx.device
        )
        qr, kr, vr = (t.double().requires_grad_() for t in (q, k, v))
        ref, ref_lse = attention_reference(qr, kr, vr, causal=case["causal"])
        ref_grads = torch.autograd.grad(ref, (qr, kr, vr), do.double())

        def local(x, dim=1, layout=case["layout"]):
            return tr.shard(x, layout=layout, dim=dim)

        ql, kl, vl = (local(t).requires_grad_() for t in (q, k, v))
        o, lse = tr.attention(
            ql,
            kl,
            vl,
            strategy=case["strategy"],
            causal=case["causal"],
            layout=case["layout"],
            return_lse=True,
            kernel=case["kernel"],
        )
        grads = torch.autograd.grad(o, (ql, kl, vl), local(do))
        errs = {
            "out": rel_err(o, local(ref.detach())),
            "lse": rel_err(lse, local(ref_lse.detach(), 2)),
        }
        for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
            errs[name] = rel_err(g, local(r))
        errs["dtype_ok"] = float(o.dtype == dtype and all(g.dtype == dtype for g in grads))
        if key not in baselines:
            baselines[key] = kernel_errors(case["kernel"], q, k, v, do, case["causal"])
        out.append({"case": case, "errors": errs, "single": baselines[key]})
    return out


def soak_case(ctx, strategies: list[str], calls: int, warmup: int, seq: int) -> list[dict]:
    """``calls`` forward+backward calls per strategy (causal zigzag, bf16, 32 heads, dim 128,
    global length ``seq``); CUDA memory after ``warmup`` calls and at the end.

    ``memory_allocated`` counts live tensors only, so a leak of any size shows as growth;
    the peak is reset after warm-up, so a peak that creeps up over the calls shows too.
    The last call must still agree with the first (a soak that degrades quietly fails).
    """
    mib = 2.0**20
    q, k, v, do = _inputs(7, 1, seq, (32, 32), 128, torch.bfloat16, ctx.device)
    local = [tr.shard(t, layout="zigzag") for t in (q, k, v, do)]
    results = []
    for strategy in strategies:
        ctx.report(("soak", strategy, calls))

        def one_call(strategy: str = strategy) -> list[torch.Tensor]:
            parts = [t.detach().requires_grad_() for t in local[:3]]
            out = tr.attention(*parts, strategy=strategy, causal=True, layout="zigzag")
            return [out.detach(), *torch.autograd.grad(out, parts, local[3])]

        first = last = one_call()
        for _ in range(warmup - 1):
            last = one_call()
        # from here on the live set is the inputs, `first` and one call's results
        torch.cuda.synchronize(ctx.device)
        warm_peak = torch.cuda.max_memory_allocated(ctx.device)
        before = torch.cuda.memory_allocated(ctx.device)
        torch.cuda.reset_peak_memory_stats(ctx.device)
        for _ in range(calls - warmup):
            last = one_call()
        torch.cuda.synchronize(ctx.device)
        results.append(
            {
                "strategy": strategy,
                "calls": calls,
                "allocated_before_mib": before / mib,
                "allocated_after_mib": torch.cuda.memory_allocated(ctx.device) / mib,
                "peak_warmup_mib": warm_peak / mib,
                "peak_soak_mib": torch.cuda.max_memory_allocated(ctx.device) / mib,
                "max_diff_vs_first": max(rel_err(a, b) for a, b in zip(last, first)),
            }
        )
        del first, last
    return results


def graph_case(ctx, cases: list[dict]) -> list[dict]:
    """Capture one forward call per case in a CUDA graph (NCCL transfers included), then
    replay it on new inputs copied into the captured ones; errors vs float64 attention.

    The replay must compute on the new inputs (not return what capture saw) and agree
    with an eager call on them bit for bit.
    """
    results = []
    for case in cases:
        heads = HEADS[case["heads"]]
        layout, causal, seq = case["layout"], case["causal"], case["seq"]

        def local(x, layout=layout):
            return tr.shard(x, layout=layout)

        first = [local(t) for t in _inputs(1, 1, seq, heads, 128, torch.bfloat16, ctx.device)[:3]]

        def call(q, k, v, causal=causal, layout=layout, strategy=case["strategy"]):
            return tr.attention(q, k, v, strategy=strategy, causal=causal, layout=layout)

        graph = tr.CapturedCall(call, *first)
        q, k, v, _ = _inputs(2, 1, seq, heads, 128, torch.bfloat16, ctx.device)
        new = [local(t) for t in (q, k, v)]
        replayed = graph(*new)
        with torch.no_grad():
            eager = call(*new)
        ref, _ = attention_reference(q.double(), k.double(), v.double(), causal=causal)
        results.append(
            {
                "case": case,
                "err": rel_err(replayed, local(ref)),
                "bitwise_eager": float(torch.equal(replayed, eager)),
            }
        )
    return results
