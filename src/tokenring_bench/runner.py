"""The per-rank benchmark loop: for every case and pass, time every method, check it
against the single-device result, and measure its peak memory."""

from __future__ import annotations

import itertools
import statistics
import time
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist

from tokenring.execution.timeline import Recorder

from .cases import PASSES, Case, cases_for, flops
from .launch import WorkerContext, sync_ranks
from .methods import GlobalInputs, Method, SingleDevice, Usp
from .methods import Strategy as StrategyMethod
from .metrics import max_over_ranks, rel_err

__all__ = ["BenchConfig", "bench_worker", "time_ms", "tolerance"]


@dataclass(frozen=True)
class BenchConfig:
    case_names: tuple[str, ...] | None
    seqs: tuple[int, ...] | None
    passes: tuple[str, ...] = PASSES
    repeats: int = 20
    warmup: int = 3
    timing: str = "steady"  # or "isolated": see time_ms
    input_sets: int = 2
    timeline_seq: int | None = None  # llama2-mha length whose per-step timeline is drawn


def tolerance(dtype: str) -> float:
    """Largest relative difference from the single-device result that still counts as
    correct: two float32 computations, or two 16-bit ones that each round their
    output (the single-device kernel once, the sharded one once per step)."""
    return 1e-4 if dtype == "float32" else 3e-2


def time_ms(fn, reps: int, warmup: int, device: torch.device, timing: str = "steady") -> float:
    """Median over ``reps`` calls of the slowest rank's time per call, in ms.

    ``steady``: the calls are enqueued back to back, as in a training or sampling
    loop, with a CUDA event between consecutive calls; a call's time is the gap
    between its two events, so the host's enqueue time counts only where the GPU
    would have waited for it. ``isolated``: every call starts from idle ranks
    (synchronised first), so the host time before its first kernel counts too.
    On CPU both are wall-clock per call after a barrier.
    """
    for i in range(warmup):
        fn(i)
    if device.type == "cuda" and timing == "steady":
        sync_ranks(device)
        events = [torch.cuda.Event(enable_timing=True) for _ in range(reps + 1)]
        events[0].record()
        for i in range(reps):
            fn(i)
            events[i + 1].record()
        torch.cuda.synchronize(device)
        times = [a.elapsed_time(b) for a, b in itertools.pairwise(events)]
    else:
        times = []
        for i in range(reps):
            sync_ranks(device)
            if device.type == "cuda":
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                fn(i)
                end.record()
                torch.cuda.synchronize(device)
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn(i)
                times.append(1e3 * (time.perf_counter() - t0))
    slowest = torch.tensor(times, dtype=torch.float64, device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return statistics.median(slowest.tolist())


def _peak_extra_gb(fn, device: torch.device) -> float | None:
    """Peak device memory one call allocates beyond what was live before it (max over
    ranks); None off CUDA, where there is no allocator to ask (JSON null, not NaN)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn(0)
    torch.cuda.synchronize(device)
    peak = torch.tensor([(torch.cuda.max_memory_allocated(device) - base) / 2**30], device=device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return peak.item()


def _max_err(pieces, device) -> float:
    """Worst relative error over every (name, ours, expected) piece and every rank."""
    return max_over_ranks(max((rel_err(a, e) for _, a, e in pieces), default=0.0), device)


def _inputs(case: Case, sets: int, device: torch.device, seed: int = 0) -> GlobalInputs:
    dtype = getattr(torch, case.dtype)
    g = torch.Generator(device=device).manual_seed(seed)
    shape_q = (case.batch, case.seq, case.heads_q, case.head_dim)
    shape_kv = (case.batch, case.seq, case.heads_kv, case.head_dim)
    return GlobalInputs(
        [
            tuple(
                torch.randn(s, generator=g, device=device, dtype=dtype)
                for s in (shape_q, shape_kv, shape_kv, shape_q)
            )
            for _ in range(sets)
        ]
    )


def _record(case: Case, pass_: str, method: str, world: int, **fields) -> dict:
    rec = {
        "case": case.name,
        "seq": case.seq,
        "heads_q": case.heads_q,
        "heads_kv": case.heads_kv,
        "head_dim": case.head_dim,
        "causal": case.causal,
        "layout": case.layout,
        "dtype": case.dtype,
        "documents": max(len(case.documents) - 1, 1),
        "window": list(case.window),
        "pass": pass_,
        "method": method,
        "world": world,
    }
    rec.update(fields)
    return rec


def _method_row(ctx, cfg, case, pass_, method, inputs, full, t1) -> tuple[dict, object]:
    """Check, time and measure one method on one case and pass."""
    device, world = ctx.device, ctx.world
    backward = pass_ == "forward_backward"
    reasons = method.not_supported_reasons(case, world, backward)
    if reasons:
        return _record(
            case, pass_, method.name, world, status="skipped: " + "; ".join(reasons)
        ), None
    prepared = method.prepare(case, inputs, backward)
    err = _max_err(prepared.local_results(backward, full), device)
    run = partial(_run, prepared, backward)
    with prepared.session():
        ms = time_ms(run, cfg.repeats, cfg.warmup, device, cfg.timing)
    work = flops(case, pass_)
    return _record(
        case,
        pass_,
        method.name,
        world,
        ms=ms,
        efficiency=t1 / (world * ms),
        tflops_per_device=work / (world * ms) / 1e9,
        peak_extra_gb=_peak_extra_gb(run, device),
        max_rel_err=err,
        status="ok" if err <= tolerance(case.dtype) else "FAILED: wrong result",
    ), prepared


def _case_rows(
    ctx: WorkerContext,
    cfg: BenchConfig,
    case: Case,
    methods: list[Method],
    progress: list[int],
    timelines: dict[str, list[dict]],
    single_ms: dict[tuple[str, int, str], float],
    guarded: bool,
) -> None:
    """Every pass and method of one case, each record sent to the parent as it is made.

    The first time a case is seen its single-device time (T1) is measured and
    kept in ``single_ms``. ``guarded`` turns a method's exception into a failed
    row instead of ending the run (for peers, which are not ours to fix).
    """
    device, world = ctx.device, ctx.world
    inputs = _inputs(case, cfg.input_sets, device)
    reference = SingleDevice().prepare(case, inputs)
    for pass_ in cfg.passes:
        backward = pass_ == "forward_backward"
        full = reference.call(0, backward)
        key = (case.name, case.seq, pass_)
        if key not in single_ms:
            ctx.report(("case", progress[0], progress[1], f"{case.label} {pass_} single-device"))
            run_single = partial(_run, reference, backward)
            t1 = single_ms[key] = time_ms(run_single, cfg.repeats, cfg.warmup, device, cfg.timing)
            tflops = flops(case, pass_) / t1 / 1e9
            ctx.report(
                (
                    "record",
                    _record(
                        case,
                        pass_,
                        f"single-device ({reference.kernel.name})",
                        1,
                        ms=t1,
                        efficiency=1.0,
                        tflops_per_device=tflops,
                        peak_extra_gb=_peak_extra_gb(run_single, device),
                        max_rel_err=0.0,
                        status="ok",
                    ),
                )
            )
            ctx.report(
                (
                    "record",
                    _record(
                        case,
                        pass_,
                        "ideal (T1/P)",
                        world,
                        ms=t1 / world,
                        efficiency=1.0,
                        tflops_per_device=tflops,
                        status="ok",
                    ),
                )
            )
        for method in methods:
            ctx.report(("case", progress[0], progress[1], f"{case.label} {pass_} {method.name}"))
            progress[0] += 1
            try:
                row, prepared = _method_row(
                    ctx, cfg, case, pass_, method, inputs, full, single_ms[key]
                )
            except Exception as err:
                if not guarded:
                    raise
                row, prepared = (
                    _record(
                        case,
                        pass_,
                        method.name,
                        world,
                        status=f"FAILED: {type(err).__name__}: {err}"[:200],
                    ),
                    None,
                )
            ctx.report(("record", row))
            if (
                prepared is not None
                and case.name == "llama2-mha"
                and case.seq == cfg.timeline_seq
                and isinstance(method, (StrategyMethod, Usp))
            ):
                timelines[f"{method.name} {pass_} {case.label}"] = _timeline(
                    ctx, prepared, backward
                )
            del prepared
        del full
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _run(prepared, backward: bool, index: int) -> None:
    prepared.run(index, backward)


def _timeline(ctx: WorkerContext, prepared, backward: bool) -> list[dict]:
    """One call recorded step by step on every rank, gathered (rank 0 keeps it)."""
    recorder = Recorder(ctx.rank, ctx.device)
    sync_ranks(ctx.device)
    prepared.run(0, backward, recorder)
    spans = [s.as_dict() for s in recorder.spans()]
    gathered: list = [None] * ctx.world
    dist.all_gather_object(gathered, spans)
    return [s for part in gathered for s in part]


def bench_worker(
    ctx: WorkerContext, cfg: BenchConfig, methods: list[Method], peers: list[Method]
) -> dict:
    """Runs on every rank. Records stream to the parent as ("record", row) messages;
    rank 0's return value holds the timelines. Our methods run first over every
    case, then the peers, so a peer that fails cannot cost our rows."""
    cases = cases_for(
        ctx.device.type,
        list(cfg.case_names) if cfg.case_names else None,
        list(cfg.seqs) if cfg.seqs else None,
    )
    progress = [0, len(cases) * len(cfg.passes) * (len(methods) + len(peers))]
    timelines: dict[str, list[dict]] = {}
    single_ms: dict[tuple[str, int, str], float] = {}
    for group, guarded in ((methods, False), (peers, True)):
        if not group:
            continue
        for case in cases:
            _case_rows(ctx, cfg, case, group, progress, timelines, single_ms, guarded)
    return {"timelines": timelines}
