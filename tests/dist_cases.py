"""Case functions the worker pool runs (each rank runs the same function)."""

from __future__ import annotations

import torch

import tokenring as tr
from reference import allowed_pairs, attention_reference, grad_floor, rel_err
from tokenring.execution.kernels.cpu_flash import CpuFlash

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


def make_inputs(seed: int, batch: int, seq: int, heads: tuple[int, int], head_dim: int, dtype):
    """Full (global) q, k, v, do, identical on every rank, already rounded to ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    hq, hkv = heads
    q = torch.randn(batch, seq, hq, head_dim, generator=g, dtype=torch.float64)
    k = torch.randn(batch, seq, hkv, head_dim, generator=g, dtype=torch.float64)
    v = torch.randn(batch, seq, hkv, head_dim, generator=g, dtype=torch.float64)
    do = torch.randn(batch, seq, hq, head_dim, generator=g, dtype=torch.float64)
    return [t.to(dtype) for t in (q, k, v, do)]


def run_sharded(q, k, v, do, *, strategy: str, causal: bool, layout: str, group):
    """``tr.attention`` forward (with lse) and backward on this rank's shards of the
    global ``q, k, v, do``: ``(out, lse, (dq, dk, dv))``, all local."""
    parts = [tr.shard(x, layout=layout, group=group).requires_grad_() for x in (q, k, v)]
    out, lse = tr.attention(
        *parts, strategy=strategy, causal=causal, layout=layout, group=group, return_lse=True
    )
    grads = torch.autograd.grad(out, parts, tr.shard(do, layout=layout, group=group))
    return out, lse, grads


def single_device_errors(q, k, v, do, causal: bool) -> dict[str, float]:
    """Error of PyTorch's own CPU kernel on the whole sequence at the same precision:
    the yardstick for low-precision tolerances."""
    ref_out, ref_lse = attention_reference(q, k, v, causal=causal)
    qr, kr, vr = (t.double().requires_grad_() for t in (q, k, v))
    ro, _ = attention_reference(qr, kr, vr, causal=causal)
    ref_grads = torch.autograd.grad(ro, (qr, kr, vr), do.double())
    kernel = CpuFlash()
    scale = q.shape[-1] ** -0.5
    out, lse = kernel.forward(q, k, v, causal, scale)
    delta = (do.float() * out.float()).sum(-1).transpose(1, 2)
    grads = kernel.backward(do, q, k, v, out, lse, delta, causal, scale)
    errs = {"out": rel_err(out, ref_out), "lse": rel_err(lse, ref_lse)}
    errs.update({n: rel_err(g, r) for n, g, r in zip(("dq", "dk", "dv"), grads, ref_grads)})
    return errs


def check_attention(
    w,
    *,
    world: int,
    strategy: str,
    layout: str,
    causal: bool,
    heads: tuple[int, int],
    dtype: str,
    batch: int,
    head_dim: int,
    seq: int,
    seed: int = 0,
    backward: bool = True,
    kernel: str = "auto",
    stream_tail: bool = False,
    seq_len: bool = False,
    window: tuple[int, int] | None = None,
    documents: tuple[int, ...] | None = None,
) -> dict[str, float]:
    """Run one strategy on this rank's shard and return its errors against float64 attention.
    ``stream_tail``: make TokenRing stream its last partial even at these small sizes;
    ``seq_len``: pass the global length (what shards of unequal length need);
    ``window``, ``documents``: ``window_size`` and ``cu_seqlens`` (the reference's mask
    from their definition)."""
    if stream_tail:
        previous = tr.runtime().settings.stream_tail_min
        tr.configure(stream_tail_min=0)
        try:
            return check_attention(
                w, world=world, strategy=strategy, layout=layout, causal=causal, heads=heads,
                dtype=dtype, batch=batch, head_dim=head_dim, seq=seq, seed=seed,
                backward=backward, kernel=kernel, seq_len=seq_len, window=window,
                documents=documents,
            )  # fmt: skip
        finally:
            tr.configure(stream_tail_min=previous)
    group = w.group(world)
    dt = DTYPES[dtype]
    q, k, v, do = make_inputs(seed, batch, seq, heads, head_dim, dt)
    qr, kr, vr = (t.double().requires_grad_() for t in (q, k, v))
    allowed = allowed_pairs(seq, causal, window, documents)
    ref_out, ref_lse = attention_reference(qr, kr, vr, causal=causal, allowed=allowed)
    ref_grads = torch.autograd.grad(ref_out, (qr, kr, vr), do.double()) if backward else None

    def local(x, dim=1):
        return tr.shard(x, layout=layout, group=group, dim=dim, cu_seqlens=documents)

    ql, kl, vl = (local(t).requires_grad_(backward) for t in (q, k, v))
    out, lse = tr.attention(
        ql,
        kl,
        vl,
        strategy=strategy,
        causal=causal,
        layout=layout,
        group=group,
        return_lse=True,
        kernel=kernel,
        seq_len=seq if seq_len else None,
        window_size=window,
        cu_seqlens=list(documents) if documents is not None else None,
    )
    errs = {
        "out": rel_err(out, local(ref_out.detach())),
        "lse": rel_err(lse, local(ref_lse.detach(), dim=2)),
        "dtype_ok": float(out.dtype == dt and lse.dtype == torch.float32),
    }
    if backward:
        grads = torch.autograd.grad(out, (ql, kl, vl), local(do))
        for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
            errs[name] = rel_err(g, local(r), grad_floor(local(r), ref_grads))
        errs["dtype_ok"] *= float(all(g.dtype == dt for g in grads))
    return errs


def assert_errors_within(
    tol: float, cases: list[dict], results: list, keys=("out", "lse", "dq", "dk", "dv")
) -> None:
    """Every rank's error of every case within ``tol`` (one message listing each miss)."""
    failures = []
    for case, per_rank in zip(cases, results):
        for key in keys:
            worst = max(r[key] for r in per_rank)
            if not worst <= tol:
                failures.append(f"{key} error {worst:.3g} in {case}")
    assert not failures, "\n".join(failures)


def expect_error(w, *, world: int, make, call: str = "token_ring_attn", **kwargs) -> str:
    """Call the API with inputs from ``make(group_rank, world)``; return the ValueError message."""
    group = w.group(world)
    q, k, v, extra = make(torch.distributed.get_rank(group), world)
    fn = getattr(tr, call)
    try:
        fn(q, k, v, group=group, **extra, **kwargs)
    except ValueError as err:
        return str(err)
    return "<no error>"


def shard_check_case(w, *, world: int, differ: str, mesh: bool = False) -> str:
    """``tr.shard(check=True)`` of a global tensor every rank makes alike but the last,
    whose tensor ``differ``s: "" (not), "value" (one element by one unit in the last
    place), "length" (a token more), "dtype" (float64); over the group of ``world`` ranks
    or (``mesh``) a 2 x 2 mesh. The ValueError's message, or whether the shard equals the
    unchecked one."""
    from usp_cases import mesh_of

    where = {"mesh": mesh_of(2, 2, True)} if mesh else {"group": w.group(world)}
    group = where.get("group")
    x = torch.randn(2, 4 * world + 1, 3, 8, generator=torch.Generator().manual_seed(5))
    if torch.distributed.get_rank(group) == world - 1:
        if differ == "value":
            x[1, 3, 2, 7] = torch.nextafter(x[1, 3, 2, 7], torch.tensor(1.0))
        elif differ == "length":
            x = torch.cat([x, x[:, :1]], dim=1)
        elif differ == "dtype":
            x = x.double()
    try:
        checked = tr.shard(x, layout="zigzag", check=True, **where)
    except ValueError as err:
        return str(err)
    return f"same shard: {torch.equal(checked, tr.shard(x, layout='zigzag', **where))}"


def gradcheck_case(w, *, world: int, strategy: str, layout: str, causal: bool) -> bool:
    """torch.autograd.gradcheck of the whole sharded computation in float64.

    Every rank checks the same global function q, k, v -> unshard(attention(shard(.)));
    the perturbations happen in lockstep on all ranks. Fast mode (random projections
    of the Jacobian) keeps it to seconds: test_attention checks every gradient
    element against the float64 reference anyway.
    """
    group = w.group(world)
    q, k, v, _ = make_inputs(7, 1, 4 * world, (4, 2), 4, torch.float64)

    def f(q, k, v):
        parts = [tr.shard(t, layout=layout, group=group) for t in (q, k, v)]
        out = tr.attention(*parts, strategy=strategy, causal=causal, layout=layout, group=group)
        return tr.unshard(out, layout=layout, group=group)

    inputs = tuple(t.requires_grad_() for t in (q, k, v))
    return torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


def determinism_case(w, *, world: int, strategy: str, layout: str, causal: bool) -> bool:
    """Forward and backward twice with deterministic=True: bitwise the same."""
    group = w.group(world)
    q, k, v, do = make_inputs(3, 2, 8 * world, (4, 2), 32, torch.float32)
    runs = []
    for _ in range(2):
        parts = [tr.shard(t, layout=layout, group=group).requires_grad_() for t in (q, k, v)]
        out = tr.attention(
            *parts, strategy=strategy, causal=causal, layout=layout, group=group, deterministic=True
        )
        grads = torch.autograd.grad(out, parts, tr.shard(do, layout=layout, group=group))
        runs.append((out, *grads))
    return all(torch.equal(a, b) for a, b in zip(*runs))


def traffic_case(w, *, world, strategy, layout, causal, heads, dtype, batch, seq, head_dim):
    """Bytes this rank sent, per (pass, slot kind), in one forward and backward."""
    from tokenring.execution.timeline import Recorder

    group = w.group(world)
    q, k, v, do = make_inputs(5, batch, seq, heads, head_dim, DTYPES[dtype])
    parts = [tr.shard(t, layout=layout, group=group).requires_grad_() for t in (q, k, v)]
    recorder = Recorder(w.rank, q.device)
    out = tr.attention(
        *parts, strategy=strategy, causal=causal, layout=layout, group=group, recorder=recorder
    )
    torch.autograd.grad(out, parts, tr.shard(do, layout=layout, group=group))
    return {f"{phase}/{kind}": n for (phase, kind), n in recorder.sent_bytes.items()}


def timeline_case(w, *, world: int, strategy: str, heads: tuple[int, int]) -> list[dict]:
    """One forward+backward recorded step by step; the spans as dicts."""
    from tokenring.execution.timeline import Recorder

    group = w.group(world)
    q, k, v, do = make_inputs(9, 1, 8 * world, heads, 16, torch.float32)
    parts = [tr.shard(t, layout="zigzag", group=group).requires_grad_() for t in (q, k, v)]
    recorder = Recorder(w.rank, q.device)
    out = tr.attention(
        *parts, strategy=strategy, causal=True, layout="zigzag", group=group, recorder=recorder
    )
    torch.autograd.grad(out, parts, tr.shard(do, layout="zigzag", group=group))
    return [s.as_dict() for s in recorder.spans()]


def runtime_summary_case(w, *, world: int) -> dict:
    """Many distinct forward calls on this rank's group of ``world``: every 1-D strategy
    and ``auto``, both layouts, lengths that divide and that do not. Then what
    ``str(tr.runtime())`` and ``repr`` print, and whether ``why()`` holds the planner's
    explanation of every decision ``auto`` kept."""
    group = w.group(world)
    for seq in range(world, 13 * world):
        q, k, v, _ = make_inputs(seq, 1, seq, (4, 2), 8, torch.float32)
        for layout in ("contiguous", "zigzag"):
            parts = [tr.shard(t, layout=layout, group=group) for t in (q, k, v)]
            for strategy in ("tokenring", "ring", "ulysses", "allgather", "auto"):
                tr.attention(*parts, strategy=strategy, layout=layout, causal=seq % 2 == 0,
                             group=group, seq_len=seq)  # fmt: skip
    rt = tr.runtime()
    why = rt.why()
    return {
        "str": str(rt),
        "repr": repr(rt),
        "why": all(c.report is None or c.report.explain() in why for c in rt.auto.values()),
    }


def merge_flags_case(w, *, world: int, fused: bool) -> list[bool]:
    """The ``fused`` flag of every merge of one TokenRing forward, with the runtime's
    ``fused_merge`` set to ``fused`` (restored afterwards)."""
    import tokenring.execution.merge as merging

    group = w.group(world)
    previous, real = tr.runtime().settings.fused_merge, merging.merge_into
    flags: list[bool] = []

    def spy(*args, fused, **rest):
        flags.append(fused)
        real(*args, fused=fused, **rest)

    merging.merge_into = spy
    try:
        tr.configure(fused_merge=fused)
        q = torch.randn(1, 8, 2, 8)
        tr.attention(q, q, q, strategy="tokenring", group=group)
    finally:
        merging.merge_into = real
        tr.configure(fused_merge=previous)
    return flags


def check_sinks(
    w, *, world: int, strategy: str, layout: str, causal: bool, heads: tuple[int, int],
    seq: int, window=None, documents=None, seed: int = 0,
) -> dict[str, float]:  # fmt: skip
    """``sinks=`` through ``tr.attention``, with a loss that reads the output and the LSE:
    out, lse and the gradients of q, k, v and of the sinks (each rank's share, summed
    over the group) against float64."""
    group = w.group(world)
    q, k, v, do = make_inputs(seed, 2, seq, heads, 8, torch.float32)
    g = torch.Generator().manual_seed(seed + 1)
    sinks = torch.randn(heads[0], generator=g)
    dlse = torch.randn(2, heads[0], seq, generator=g)
    allowed = allowed_pairs(seq, causal, window, documents)
    ref = [t.double().requires_grad_() for t in (q, k, v, sinks)]
    ref_out, ref_lse = attention_reference(*ref[:3], causal=causal, allowed=allowed, sinks=ref[3])
    loss = (ref_out * do.double()).sum() + (ref_lse * dlse.double()).sum()
    ref_grads = torch.autograd.grad(loss, ref)

    def local(x, dim=1):
        return tr.shard(x, layout=layout, group=group, dim=dim, cu_seqlens=documents)

    parts = [local(t).requires_grad_() for t in (q, k, v)]
    mine = sinks.clone().requires_grad_()
    out, lse = tr.attention(
        *parts, strategy=strategy, causal=causal, layout=layout, group=group, return_lse=True,
        seq_len=seq, window_size=window, cu_seqlens=documents, sinks=mine,
    )  # fmt: skip
    loss = (out * local(do)).sum() + (lse * local(dlse, dim=2)).sum()
    grads = torch.autograd.grad(loss, [*parts, mine])
    dsinks = grads[3].clone()
    if world > 1:
        torch.distributed.all_reduce(dsinks, group=group)
    errs = {
        "out": rel_err(out, local(ref_out.detach())),
        "lse": rel_err(lse, local(ref_lse.detach(), dim=2)),
        "dsinks": rel_err(dsinks, ref_grads[3]),
        "dsinks_dtype_ok": float(grads[3].dtype == sinks.dtype),
    }
    for name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads):
        errs[name] = rel_err(got, local(want), grad_floor(local(want), ref_grads[:3]))
    return errs


def workspace_reuse_case(w, *, world: int, strategy: str, keep: int) -> dict:
    """Three calls of one plan with different inputs (forward and backward), the runtime's
    ``workspace_bytes`` set to ``keep``: each call's out and gradients against float64,
    whether the first call's results were left untouched by the later calls (nothing a
    caller holds lies in a kept workspace), and the bytes the plan's geometries keep."""
    group = w.group(world)
    previous = tr.runtime().settings.workspace_bytes
    errors, kept = [], []
    try:
        tr.configure(workspace_bytes=keep)
        for seed in range(3):
            q, k, v, do = make_inputs(seed, 2, 8 * world, (4, 2), 8, torch.float32)
            out, _, grads = run_sharded(
                q, k, v, do, strategy=strategy, causal=True, layout="zigzag", group=group
            )
            qr, kr, vr = (t.double().requires_grad_() for t in (q, k, v))
            ro, _ = attention_reference(qr, kr, vr, causal=True)
            ref = [ro, *torch.autograd.grad(ro, (qr, kr, vr), do.double())]
            shard = [tr.shard(x, layout="zigzag", group=group) for x in ref]
            found = [out, *grads]
            errors.append(max(rel_err(a, b) for a, b in zip(found, shard)))
            kept.append([t.detach().clone() for t in found] + [t.detach() for t in found])
        first = kept[0]
        untouched = all(torch.equal(a, b) for a, b in zip(first[:4], first[4:]))
        plans = list(tr.runtime().group(group).plans.values())
        held = sum(p.forward_geometry.workspace_bytes + p.backward_geometry.workspace_bytes
                   for p in plans)  # fmt: skip
    finally:
        tr.configure(workspace_bytes=previous)
    return {"errors": errors, "untouched": untouched, "held": held}
