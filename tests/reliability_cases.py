"""Case functions for tests/test_reliability.py; every rank of the worker pool runs them.

Each function takes the pool's ``Worker`` and keyword arguments that are plain data, and
returns plain data (numbers, booleans, strings) for the test process to judge: the
asserts live in the test, next to the property they state.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import time
from typing import Any

import psutil
import torch
import torch.distributed as dist
import torch.nn.functional as F

import tokenring as tr
from dist_cases import make_inputs, run_sharded
from reference import attention_reference, reference_with_grads, rel_err
from tokenring.execution.kernels.cpu_flash import CpuFlash
from tokenring.schedules.geometry import chunk_ids

Made = tuple[Any, Any, Any, dict[str, Any]]
"""What a bad-input maker returns: local q, k, v (possibly not tensors) and extra kwargs."""


# ---------------------------------------------------------------------------
# Bad inputs: ``make(group_rank, world) -> (q, k, v, extra keyword arguments)``,
# called by dist_cases.expect_error on every rank.
# ---------------------------------------------------------------------------


def _qkv(
    length: int = 8,
    heads: tuple[int, int] = (4, 4),
    dim: int = 16,
    batch: int = 1,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Valid local q, k, v: the base every bad input below changes in one way."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, length, heads[0], dim, generator=g).to(dtype)
    k = torch.randn(batch, length, heads[1], dim, generator=g).to(dtype)
    v = torch.randn(batch, length, heads[1], dim, generator=g).to(dtype)
    return q, k, v


def q_not_a_tensor(rank: int, world: int) -> Made:
    q, k, v = _qkv()
    return q.tolist(), k, v, {}


def v_not_a_tensor(rank: int, world: int) -> Made:
    q, k, _ = _qkv()
    return q, k, None, {}


def integer_dtype(rank: int, world: int) -> Made:
    q, k, v = _qkv()
    return (q * 10).long(), (k * 10).long(), (v * 10).long(), {}


def three_dim_q(rank: int, world: int) -> Made:
    q, k, v = _qkv()
    return q[0], k, v, {}


def head_dim_mismatch_q_v(rank: int, world: int) -> Made:
    q, k, _ = _qkv(dim=16)
    _, _, v = _qkv(dim=32)
    return q, k, v, {}


def batch_mismatch(rank: int, world: int) -> Made:
    q, _, _ = _qkv(batch=2)
    _, k, v = _qkv(batch=1)
    return q, k, v, {}


def local_length_mismatch(rank: int, world: int) -> Made:
    q, _, _ = _qkv(length=8)
    _, k, v = _qkv(length=6)
    return q, k, v, {}


def k_v_shapes_differ(rank: int, world: int) -> Made:
    q, k, _ = _qkv(heads=(4, 2))
    _, _, v = _qkv(heads=(4, 4))
    return q, k, v, {}


def head_dim_sliced(rank: int, world: int) -> Made:
    """Every other element of head_dim: last stride 2, which no kernel can read."""
    q, k, v = _qkv(dim=32)
    return q[..., ::2], k[..., ::2], v[..., ::2], {}


def empty_batch(rank: int, world: int) -> Made:
    return (*_qkv(batch=0), {})


def empty_local_sequence(rank: int, world: int) -> Made:
    return (*_qkv(length=0), {})


def causal_not_bool(rank: int, world: int) -> Made:
    return (*_qkv(), {"causal": 1})


def scale_inf(rank: int, world: int) -> Made:
    return (*_qkv(), {"softmax_scale": float("inf")})


def scale_nan(rank: int, world: int) -> Made:
    return (*_qkv(), {"softmax_scale": float("nan")})


def scale_string(rank: int, world: int) -> Made:
    return (*_qkv(), {"softmax_scale": "0.1"})


def unknown_strategy(rank: int, world: int) -> Made:
    return (*_qkv(), {"strategy": "spiral"})


def no_kernel_fits(rank: int, world: int) -> Made:
    """Tensors on the meta device: no backend runs there, so "auto" finds nothing."""
    q, k, v = _qkv()
    return q.to("meta"), k.to("meta"), v.to("meta"), {}


def cpu_flash_head_dim_too_large(rank: int, world: int) -> Made:
    return (*_qkv(dim=2048), {"kernel": "cpu_flash"})


def causal_differs_across_ranks(rank: int, world: int) -> Made:
    return (*_qkv(), {"causal": rank == world - 1})


def scale_differs_across_ranks(rank: int, world: int) -> Made:
    return (*_qkv(), {"softmax_scale": 0.5 if rank == world - 1 else 0.25})


def strategy_differs_across_ranks(rank: int, world: int) -> Made:
    return (*_qkv(), {"strategy": "ring" if rank == world - 1 else "tokenring"})


def only_last_rank_sliced(rank: int, world: int) -> Made:
    q, k, v = _qkv(dim=32)
    q = q[..., ::2] if rank == world - 1 else q[..., :16]
    return q, k[..., :16], v[..., :16], {}


def not_a_member_case(w, *, world: int) -> str:
    """Call with a group this rank is not in: ``dist.GroupMember.NON_GROUP_MEMBER``, what
    ``new_group`` hands to non-members. Raised locally: the members do not wait for it."""
    q, k, v = _qkv()
    try:
        tr.token_ring_attn(q, k, v, group=dist.GroupMember.NON_GROUP_MEMBER)
    except ValueError as err:
        return str(err)
    return "<no error>"


# ---------------------------------------------------------------------------
# Accepted inputs that are not contiguous
# ---------------------------------------------------------------------------


def _as_noncontiguous(x: torch.Tensor, form: str) -> torch.Tensor:
    """The same values as ``x`` ([B, L, H, D]) in a non-contiguous, unit-last-stride layout.

    ``transposed``: a view of a [B, H, L, D] tensor (what a model that keeps heads
    before the sequence hands over). ``packed``: a slice of a [B, L, 2, H, D]
    tensor, as from a fused projection whose outputs are interleaved per token.
    """
    if form == "transposed":
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    if form == "packed":
        return torch.stack([x, torch.zeros_like(x)], dim=2)[:, :, 0]
    raise ValueError(f"unknown form {form!r}")


def noncontiguous_case(
    w,
    *,
    world: int,
    strategy: str,
    layout: str,
    causal: bool,
    form: str,
    heads: tuple[int, int] = (4, 2),
) -> dict[str, float]:
    """Forward and backward on non-contiguous shards; errors against float64 attention."""
    group = w.group(world)
    seq = 8 * world
    q, k, v, do = make_inputs(11, 2, seq, heads, 16, torch.float32)
    ref_out, ref_lse, ref_grads = reference_with_grads(q, k, v, do, causal=causal)

    def local(x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        return tr.shard(x, layout=layout, group=group, dim=dim)

    parts = [_as_noncontiguous(local(t), form).requires_grad_() for t in (q, k, v)]
    layouts_ok = all(not p.is_contiguous() and p.stride(-1) == 1 for p in parts)
    out, lse = tr.attention(
        *parts, strategy=strategy, causal=causal, layout=layout, group=group, return_lse=True
    )
    grads = torch.autograd.grad(out, parts, local(do))
    errs = {
        "noncontiguous_inputs": float(layouts_ok),
        "out": rel_err(out, local(ref_out)),
        "lse": rel_err(lse, local(ref_lse, dim=2)),
    }
    for name, g, r, p in zip(("dq", "dk", "dv"), grads, ref_grads, parts):
        errs[name] = rel_err(g, local(r)) if g.shape == p.shape else float("inf")
    return errs


# ---------------------------------------------------------------------------
# NaN and inf
# ---------------------------------------------------------------------------


def _token_of_rank(layout: str, world: int, rank: int, seq: int) -> int:
    """A global token held by ``rank``: the second token of its second chunk."""
    chunk = seq // (2 * world)
    _, second = chunk_ids(tr.Layout(layout), world, rank)
    return second * chunk + 1


def _compare_nonfinite(
    actual: torch.Tensor,
    expected: torch.Tensor,
    must_nan: torch.Tensor | None = None,
    may_be_nonfinite: torch.Tensor | None = None,
) -> dict[str, float]:
    """How ``actual`` (the library's) carries the non-finite values of ``expected``
    (float64 attention on the gathered sequence, same poisoned inputs).

    Always: the error where both are finite, and whether both are non-finite in exactly
    the same places. For gradients, where two correct implementations differ in their
    ``0 * NaN`` artifacts (the dense reference multiplies masked pairs by zero, a block
    kernel only the pairs inside a block), two weaker, implementation-free properties:
    ``not_hidden``, every entry in ``must_nan`` is NaN; ``contained``, no entry outside
    ``may_be_nonfinite`` is non-finite.
    """
    actual, expected = actual.double(), expected.double()
    bad, bad_ref = ~torch.isfinite(actual), ~torch.isfinite(expected)
    both_finite = ~bad & ~bad_ref
    err = rel_err(actual[both_finite], expected[both_finite]) if both_finite.any() else 0.0
    out = {"err": err, "same_nonfinite": float(torch.equal(bad, bad_ref)), "nonfinite": bad.sum()}
    if must_nan is not None:
        out["not_hidden"] = float(bool(torch.isnan(actual)[must_nan].all()))
        out["must_count"] = float(must_nan.sum())
        out["must_in_reference"] = float(bool(bad_ref[must_nan].all()))
    if may_be_nonfinite is not None:
        out["contained"] = float(not (bad & ~may_be_nonfinite).any())
    out["nonfinite"] = float(out["nonfinite"])
    return out


def _must_nan_grads(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    do: torch.Tensor,
    nan_rows: torch.Tensor,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradient entries that a NaN output row must make NaN: masks like q, k, v.

    ``nan_rows``: bool ``[B, S, Hq]``, the rows of the output that are NaN. Such a row's
    dq row is NaN, and at most the dk and dv of every key the row attends (all keys, or
    keys j <= i when causal) in its key/value head. Whether all of them are depends on
    how the softmax meets an infinite score: with a NaN row LSE (blocks merged, or the
    dense reference) every attended key gets a NaN weight; a single fused call gives
    ``lse = inf`` and ``exp(s - inf) = 0`` to the finite scores. So dk, dv must be NaN
    where the row attends *and* single-device attention (PyTorch's fused CPU kernel on
    the whole sequence) makes them NaN.
    """
    b, s, hq = nan_rows.shape
    heads_kv, head_dim = k.shape[2], k.shape[3]
    allowed = torch.ones(s, s, dtype=torch.float64)
    if causal:
        allowed = allowed.tril()
    per_kv = nan_rows.view(b, s, heads_kv, hq // heads_kv).any(-1).double()
    attended = torch.einsum("bih,ij->bjh", per_kv, allowed) > 0
    attended = attended.unsqueeze(-1).expand(b, s, heads_kv, head_dim)
    kernel, scale = CpuFlash(), q.shape[-1] ** -0.5
    out, lse = kernel.forward(q, k, v, causal, scale)
    delta = (do * out).sum(-1).transpose(1, 2)
    _, dk, dv = kernel.backward(do, q, k, v, out, lse, delta, causal, scale)
    must_dq = nan_rows.unsqueeze(-1).expand_as(q)
    return must_dq, attended & torch.isnan(dk), attended & torch.isnan(dv)


def nonfinite_case(
    w, *, world: int, strategy: str, layout: str, causal: bool, poison: str
) -> dict[str, dict[str, float]]:
    """One non-finite value in the shard of the last rank, batch entry 0; compare forward
    and backward with float64 attention on the gathered sequence with the same inputs.

    ``poison``: ``q_nan`` (NaN in one element of one query), ``q_inf`` (+inf in one
    query element: that row's scores are +-inf, so its softmax is NaN), ``k_inf`` (+inf
    in one key element: the rows whose score with it is +inf become NaN, the rows whose
    score is -inf give that key weight 0). Heads are (4 query, 2 key/value), so the
    poison may reach one key/value head and its two query heads of batch entry 0, and
    nothing else.
    """
    group = w.group(world)
    seq = 8 * world
    heads, head_dim = (4, 2), 8
    q, k, v, do = make_inputs(13, 2, seq, heads, head_dim, torch.float32)
    t = _token_of_rank(layout, world, world - 1, seq)
    if poison == "q_nan":
        q[0, t, 1, 0], kv_head = float("nan"), 0
    elif poison == "q_inf":
        q[0, t, 0, 3], kv_head = float("inf"), 0
    elif poison == "k_inf":
        k[0, t, 1, 2], kv_head = float("inf"), 1
    else:
        raise ValueError(f"unknown poison {poison!r}")
    reach_q = torch.zeros_like(q, dtype=torch.bool)
    reach_q[0, :, 2 * kv_head : 2 * kv_head + 2] = True
    reach_kv = torch.zeros_like(k, dtype=torch.bool)
    reach_kv[0, :, kv_head] = True

    ref_out, ref_lse, ref_grads = reference_with_grads(q, k, v, do, causal=causal)
    musts = _must_nan_grads(q, k, v, do, torch.isnan(ref_out).any(-1), causal)

    def local(x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        return tr.shard(x, layout=layout, group=group, dim=dim)

    out, lse, grads = run_sharded(
        q, k, v, do, strategy=strategy, causal=causal, layout=layout, group=group
    )
    result = {
        "out": _compare_nonfinite(out, local(ref_out)),
        "lse": _compare_nonfinite(lse, local(ref_lse, dim=2)),
    }
    for name, g, r, must, reach in zip(
        ("dq", "dk", "dv"),
        grads,
        ref_grads,
        musts,
        (reach_q, reach_kv, reach_kv),
    ):
        result[name] = _compare_nonfinite(g, local(r), local(must), local(reach))
    return result


def _sdpa_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """PyTorch's own single-device causal attention (math backend, float64), [B, S, H, D]."""
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        out = F.scaled_dot_product_attention(
            *(x.double().transpose(1, 2) for x in (q, k, v)), is_causal=True, enable_gqa=True
        )
    return out.transpose(1, 2)


def masked_keys_case(
    w, *, world: int, strategy: str, layout: str, keys: tuple[int, int]
) -> dict[str, Any]:
    """Keys ``keys[0]:keys[1]`` (global) get -inf in element 0 and every query a positive
    element 0, so every score with those keys is -inf: each row must give them weight 0,
    and a row left with no key at all gives 0, as PyTorch's single-device attention does.
    Compared with ``F.scaled_dot_product_attention`` (math backend, float64) on the
    gathered sequence (the naive formula would give NaN for a row with no key).
    """
    group = w.group(world)
    seq = 8 * world
    q, k, v, _ = make_inputs(17, 1, seq, (2, 1), 8, torch.float32)
    q[..., 0] = q[..., 0].abs() + 0.1
    k[0, keys[0] : keys[1], :, 0] = float("-inf")
    expected = _sdpa_math(q, k, v)
    parts = [tr.shard(x, layout=layout, group=group) for x in (q, k, v)]
    out = tr.attention(*parts, strategy=strategy, causal=True, layout=layout, group=group)
    full = tr.unshard(out, layout=layout, group=group).double()
    wrong = ((full - expected).abs() > 1e-5 * expected.abs().max()).any(-1).any(-1)[0]
    return {
        "err": rel_err(full, expected),
        "wrong_rows": wrong.nonzero().flatten().tolist(),
        "expected_finite": bool(torch.isfinite(expected).all()),
    }


# ---------------------------------------------------------------------------
# Soak
# ---------------------------------------------------------------------------


def _trim_heap() -> None:
    """Give freed heap pages back to the OS (glibc), so RSS tracks live memory."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def footprint() -> dict[str, float]:
    """Resident memory (MiB), gc-tracked Python objects, open file descriptors, threads."""
    gc.collect()
    _trim_heap()
    proc = psutil.Process()
    return {
        "rss_mib": proc.memory_info().rss / 2**20,
        "objects": float(len(gc.get_objects())),
        "fds": float(proc.num_fds()),
        "threads": float(proc.num_threads()),
    }


def soak_case(w, *, world: int, strategy: str, calls: int, warmup: int) -> dict[str, Any] | None:
    """``calls`` forward+backward calls (zigzag, causal, B=1, S=16, 2 heads, head_dim 8).

    Only the group holding global rank 0 runs it (the other pair returns None at once),
    which leaves both CPU cores of a CI machine to the two ranks being measured. Takes
    the footprint after ``warmup`` calls and at the end, and checks that the last call
    still computes the right thing (bitwise equal to the first, close to float64
    attention): a soak that degrades quietly fails too.
    """
    if 0 not in dist.get_process_group_ranks(w.group(world)):
        return None
    group = w.group(world)
    layout = "zigzag"
    q, k, v, do = make_inputs(23, 1, 16, (2, 2), 8, torch.float32)
    ref_out, _, ref_grads = reference_with_grads(q, k, v, do, causal=True)

    def local(x: torch.Tensor) -> torch.Tensor:
        return tr.shard(x, layout=layout, group=group)

    ql, kl, vl, dol = (local(x) for x in (q, k, v, do))

    def one_call() -> tuple[torch.Tensor, ...]:
        parts = [x.detach().requires_grad_() for x in (ql, kl, vl)]
        out = tr.attention(*parts, strategy=strategy, causal=True, layout=layout, group=group)
        grads = torch.autograd.grad(out, parts, dol)
        return (out.detach(), *grads)

    first = one_call()
    for _ in range(warmup - 1):
        one_call()
    before = footprint()
    start = time.perf_counter()
    last = first
    for _ in range(calls - warmup):
        last = one_call()
    seconds = time.perf_counter() - start
    after = footprint()
    errors = [rel_err(last[0], local(ref_out))]
    errors += [rel_err(g, local(r)) for g, r in zip(last[1:], ref_grads)]
    return {
        "before": before,
        "after": after,
        "seconds": seconds,
        "measured_calls": calls - warmup,
        "same_as_first": all(torch.equal(a, b) for a, b in zip(first, last)),
        "max_err": max(errors),
    }


# ---------------------------------------------------------------------------
# Property-based cases
# ---------------------------------------------------------------------------


def global_error_case(
    w,
    *,
    world: int,
    strategy: str,
    layout: str,
    causal: bool,
    heads: tuple[int, int],
    batch: int,
    head_dim: int,
    seq: int,
    seed: int,
) -> dict[str, Any]:
    """Forward and backward in float32 against float64 attention on the gathered sequence.

    Returns, per tensor, this rank's largest absolute error and the largest magnitude of
    the *whole* reference tensor, so the test can form the global relative error. (A
    per-shard relative error is meaningless when a shard of one token happens to hold a
    tiny value, which drawn cases produce.)
    """
    group = w.group(world)
    q, k, v, do = make_inputs(seed, batch, seq, heads, head_dim, torch.float32)
    ref_out, ref_lse, ref_grads = reference_with_grads(q, k, v, do, causal=causal)

    def local(x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        return tr.shard(x, layout=layout, group=group, dim=dim)

    out, lse, grads = run_sharded(
        q, k, v, do, strategy=strategy, causal=causal, layout=layout, group=group
    )
    pairs = {
        "out": (out, ref_out, 1),
        "lse": (lse, ref_lse, 2),
        **{n: (g, r, 1) for n, g, r in zip(("dq", "dk", "dv"), grads, ref_grads)},
    }
    result: dict[str, Any] = {
        "dtype_ok": out.dtype == torch.float32
        and lse.dtype == torch.float32
        and all(g.dtype == torch.float32 for g in grads)
    }
    for name, (got, ref, dim) in pairs.items():
        diff = (got.double() - local(ref, dim)).abs()
        result[name] = (
            float("inf") if torch.isnan(diff).any() else diff.max().item(),
            ref.abs().max().item(),
        )
    return result


# ---------------------------------------------------------------------------
# Determinism of the forward
# ---------------------------------------------------------------------------


def forward_repeat_case(
    w, *, world: int, strategy: str, layout: str, causal: bool, repeats: int = 3
) -> dict[str, float]:
    """The same call ``repeats`` times with the default deterministic=False: are the outputs
    and LSE bitwise identical? Also the error of the first against float64 attention, so
    that "identical" cannot mean "identically wrong"."""
    group = w.group(world)
    q, k, v, _ = make_inputs(29, 2, 8 * world, (4, 2), 32, torch.float32)
    parts = [tr.shard(x, layout=layout, group=group) for x in (q, k, v)]
    runs = [
        tr.attention(
            *parts, strategy=strategy, causal=causal, layout=layout, group=group, return_lse=True
        )
        for _ in range(repeats)
    ]
    identical = all(
        torch.equal(runs[0][0], o) and torch.equal(runs[0][1], lse) for o, lse in runs[1:]
    )
    ref_out, _ = attention_reference(q, k, v, causal=causal)
    ref_local = tr.shard(ref_out, layout=layout, group=group)
    return {"identical": float(identical), "err": rel_err(runs[0][0], ref_local)}


# ---------------------------------------------------------------------------
# Lanes: destroy and recreate
# ---------------------------------------------------------------------------


def _world_call(w, world: int, strategy: str) -> tuple[torch.Tensor, float]:
    """One zigzag causal GQA call on ``world`` ranks: this rank's output and its error."""
    group = w.group(world)
    q, k, v, _ = make_inputs(31, 1, 8 * world, (2, 1), 8, torch.float32)
    parts = [tr.shard(x, layout="zigzag", group=group) for x in (q, k, v)]
    out = tr.attention(*parts, strategy=strategy, causal=True, layout="zigzag", group=group)
    ref, _ = attention_reference(q, k, v, causal=True)
    return out, rel_err(out, tr.shard(ref, layout="zigzag", group=group))


def lanes_recycle_case(w, *, world: int, cycles: int) -> dict[str, Any]:
    """``tr.destroy_lanes()`` then recreate the lanes of the whole group, ``cycles`` times.

    After each cycle the lanes must be new process groups (the cache was really emptied),
    both strategies must compute bitwise the same output as before the first cycle, and
    the footprint (open file descriptors, threads) is taken so the test can check that
    destroyed lanes release their sockets and threads. Only the lanes of the group of
    all ranks are recreated; for sub-groups see docs/errors.md, "Known problems".
    """
    group = w.group(world)
    before = {s: _world_call(w, world, s) for s in ("tokenring", "ring")}
    errs = [err for _, err in before.values()]
    previous = tr.runtime().lanes(group).groups
    same, renewed = True, True
    per_cycle = []
    for _ in range(cycles):
        tr.destroy_lanes()
        tr.setup_lanes(group)
        current = tr.runtime().lanes(group).groups
        renewed &= all(all(pg is not old for old in previous) for pg in current)
        previous = current
        for s, (out, _) in before.items():
            again, err = _world_call(w, world, s)
            same &= bool(torch.equal(out, again))
            errs.append(err)
        per_cycle.append(footprint())
    return {
        "same": same,
        "renewed": renewed,
        "max_err": max(errs),
        "fds": [f["fds"] for f in per_cycle],
        "threads": [f["threads"] for f in per_cycle],
    }


def stall_worker(ctx, stall_s: float) -> str:
    """For ``run_local``: both ranks agree on a call, then the last rank stalls for
    ``stall_s`` seconds while rank 0 calls again and waits on a transfer from it."""
    q = torch.randn(1, 16, 2, 8)
    tr.token_ring_attn(q, q, q)  # plans agreed: the next call goes straight to transfers
    dist.barrier()
    if ctx.rank == ctx.world - 1:
        time.sleep(stall_s)
        return "stalled"
    tr.token_ring_attn(q, q, q)
    return "no error"
