"""Case functions for tests/test_reliability.py; every rank of the worker pool runs them.

Each function takes the pool's ``Worker`` and keyword arguments that are plain data, and
returns plain data (numbers, booleans, strings) for the test process to judge: the
asserts live in the test, next to the property they state.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import time
from collections.abc import Callable
from typing import Any

import psutil
import torch
import torch.distributed as dist
import torch.nn.functional as F

import tokenring as tr
from dist_cases import make_inputs
from reference import attention_reference, rel_err
from tokenring.comm import get_lanes
from tokenring.layouts import chunk_ids

MakeFn = Callable[[int, int], tuple[Any, Any, Any, dict]]


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


def q_not_a_tensor(rank: int, world: int):
    q, k, v = _qkv()
    return q.tolist(), k, v, {}


def v_not_a_tensor(rank: int, world: int):
    q, k, _ = _qkv()
    return q, k, None, {}


def integer_dtype(rank: int, world: int):
    q, k, v = _qkv()
    return (q * 10).long(), (k * 10).long(), (v * 10).long(), {}


def three_dim_q(rank: int, world: int):
    q, k, v = _qkv()
    return q[0], k, v, {}


def head_dim_mismatch_q_v(rank: int, world: int):
    q, k, _ = _qkv(dim=16)
    _, _, v = _qkv(dim=32)
    return q, k, v, {}


def batch_mismatch(rank: int, world: int):
    q, _, _ = _qkv(batch=2)
    _, k, v = _qkv(batch=1)
    return q, k, v, {}


def local_length_mismatch(rank: int, world: int):
    q, _, _ = _qkv(length=8)
    _, k, v = _qkv(length=6)
    return q, k, v, {}


def k_v_shapes_differ(rank: int, world: int):
    q, k, _ = _qkv(heads=(4, 2))
    _, _, v = _qkv(heads=(4, 4))
    return q, k, v, {}


def head_dim_sliced(rank: int, world: int):
    """Every other element of head_dim: last stride 2, which no kernel can read."""
    q, k, v = _qkv(dim=32)
    return q[..., ::2], k[..., ::2], v[..., ::2], {}


def empty_batch(rank: int, world: int):
    return (*_qkv(batch=0), {})


def empty_local_sequence(rank: int, world: int):
    return (*_qkv(length=0), {})


def causal_not_bool(rank: int, world: int):
    return (*_qkv(), {"causal": 1})


def scale_inf(rank: int, world: int):
    return (*_qkv(), {"softmax_scale": float("inf")})


def scale_nan(rank: int, world: int):
    return (*_qkv(), {"softmax_scale": float("nan")})


def scale_string(rank: int, world: int):
    return (*_qkv(), {"softmax_scale": "0.1"})


def unknown_strategy(rank: int, world: int):
    return (*_qkv(), {"strategy": "spiral"})


def no_kernel_fits(rank: int, world: int):
    """Tensors on the meta device: no backend runs there, so "auto" finds nothing."""
    q, k, v = _qkv()
    return q.to("meta"), k.to("meta"), v.to("meta"), {}


def cpu_flash_head_dim_too_large(rank: int, world: int):
    return (*_qkv(dim=2048), {"kernel": "cpu_flash"})


def causal_differs_across_ranks(rank: int, world: int):
    return (*_qkv(), {"causal": rank == world - 1})


def scale_differs_across_ranks(rank: int, world: int):
    return (*_qkv(), {"softmax_scale": 0.5 if rank == world - 1 else 0.25})


def strategy_differs_across_ranks(rank: int, world: int):
    return (*_qkv(), {"strategy": "ring" if rank == world - 1 else "tokenring"})


def only_last_rank_sliced(rank: int, world: int):
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
    qr, kr, vr = (t.double().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = attention_reference(qr, kr, vr, causal=causal)
    ref_grads = torch.autograd.grad(ref_out, (qr, kr, vr), do.double())

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
        "out": rel_err(out, local(ref_out.detach())),
        "lse": rel_err(lse, local(ref_lse.detach(), dim=2)),
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


def _same_nan_and_close(actual: torch.Tensor, expected: torch.Tensor) -> dict[str, float]:
    """NaN exactly where ``expected`` has NaN; elsewhere the relative error."""
    actual, expected = actual.double(), expected.double()
    same_nan = torch.equal(torch.isnan(actual), torch.isnan(expected))
    finite = ~torch.isnan(expected)
    err = rel_err(actual[finite], expected[finite]) if finite.any() else 0.0
    return {"same_nan": float(same_nan), "nan_count": float(torch.isnan(actual).sum()), "err": err}


def nonfinite_case(
    w, *, world: int, strategy: str, layout: str, causal: bool, poison: str
) -> dict[str, dict[str, float]]:
    """One non-finite value in one rank's shard; compare the outcome with attention on the
    gathered sequence (float64, same poisoned inputs).

    ``poison``: ``q_nan`` (a NaN in one query of the last rank), ``k_inf`` (+inf in one
    element of one key of the last rank: rows whose score with it is +inf become NaN,
    rows whose score is -inf just ignore it), ``q_inf`` (+inf in one query element: that
    row's scores are +-inf, so NaN). Forward and backward.
    """
    group = w.group(world)
    seq = 8 * world
    q, k, v, do = make_inputs(13, 1, seq, (2, 2), 8, torch.float32)
    t = _token_of_rank(layout, world, world - 1, seq)
    if poison == "q_nan":
        q[0, t, 1, 0] = float("nan")
    elif poison == "q_inf":
        q[0, t, 0, 3] = float("inf")
    elif poison == "k_inf":
        k[0, t, 1, 2] = float("inf")
    else:
        raise ValueError(f"unknown poison {poison!r}")
    qr, kr, vr = (x.double().requires_grad_() for x in (q, k, v))
    ref_out, ref_lse = attention_reference(qr, kr, vr, causal=causal)
    ref_grads = torch.autograd.grad(ref_out, (qr, kr, vr), do.double())

    def local(x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        return tr.shard(x, layout=layout, group=group, dim=dim)

    parts = [local(x).requires_grad_() for x in (q, k, v)]
    out, lse = tr.attention(
        *parts, strategy=strategy, causal=causal, layout=layout, group=group, return_lse=True
    )
    grads = torch.autograd.grad(out, parts, local(do))
    result = {
        "out": _same_nan_and_close(out, local(ref_out.detach())),
        "lse": _same_nan_and_close(lse, local(ref_lse.detach(), dim=2)),
    }
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        result[name] = _same_nan_and_close(g, local(r))
    return result


def fully_masked_row_case(w, *, world: int, strategy: str, layout: str) -> dict[str, float]:
    """A causal row whose every allowed score is -inf.

    Key 0 gets -inf in element 0 and every query a positive element 0, so every score
    with key 0 is -inf. Row 0 sees only key 0: PyTorch's single-device attention returns
    0 for such a row (a softmax over no key; the naive float64 formula gives NaN); other
    rows just ignore key 0. Compared with ``F.scaled_dot_product_attention`` (math
    backend, float64) on the gathered sequence.
    """
    group = w.group(world)
    seq = 8 * world
    q, k, v, _ = make_inputs(17, 1, seq, (2, 2), 8, torch.float32)
    q[..., 0] = q[..., 0].abs() + 0.1
    k[0, 0, :, 0] = float("-inf")
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        expected = F.scaled_dot_product_attention(
            *(x.double().transpose(1, 2) for x in (q, k, v)), is_causal=True
        ).transpose(1, 2)
    parts = [tr.shard(x, layout=layout, group=group) for x in (q, k, v)]
    out, lse = tr.attention(
        *parts, strategy=strategy, causal=True, layout=layout, group=group, return_lse=True
    )
    full_out = tr.unshard(out, layout=layout, group=group)
    full_lse = tr.unshard(lse, layout=layout, group=group, dim=2)
    return {
        "row0_zero": float(bool((full_out[0, 0] == 0).all())),
        "row0_lse_neg_inf": float(bool((full_lse[0, :, 0] == float("-inf")).all())),
        "expected_row0_zero": float(bool((expected[0, 0] == 0).all())),
        "rest_err": rel_err(full_out[0, 1:], expected[0, 1:]),
        "any_nan": float(bool(torch.isnan(full_out).any())),
    }


# ---------------------------------------------------------------------------
# Soak
# ---------------------------------------------------------------------------


def _trim_heap() -> None:
    """Give freed heap pages back to the OS (glibc), so RSS tracks live memory."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _footprint() -> dict[str, float]:
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


def soak_case(
    w, *, world: int, strategy: str, calls: int, warmup: int, layout: str = "zigzag"
) -> dict[str, Any]:
    """``calls`` forward+backward calls on tiny shards (B=1, S=16, 2 heads, head_dim 8).

    Measures the footprint after ``warmup`` calls and at the end; also checks that the
    last call still computes the right thing (bitwise equal to the first, close to
    float64 attention), so a soak that silently degrades fails too.
    """
    group = w.group(world)
    q, k, v, do = make_inputs(23, 1, 16, (2, 2), 8, torch.float32)
    qr, kr, vr = (x.double().requires_grad_() for x in (q, k, v))
    ref_out, _ = attention_reference(qr, kr, vr, causal=True)
    ref_grads = torch.autograd.grad(ref_out, (qr, kr, vr), do.double())

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
    before = _footprint()
    start = time.perf_counter()
    last = first
    for _ in range(calls - warmup):
        last = one_call()
    elapsed = time.perf_counter() - start
    after = _footprint()
    errors = [rel_err(last[0], local(ref_out.detach()))]
    errors += [rel_err(g, local(r)) for g, r in zip(last[1:], ref_grads)]
    return {
        "before": before,
        "after": after,
        "seconds": elapsed,
        "measured_calls": calls - warmup,
        "same_as_first": all(torch.equal(a, b) for a, b in zip(first, last)),
        "max_err": max(errors),
    }


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


def _fixed_problem(w, world: int, strategy: str) -> tuple[torch.Tensor, float]:
    """One zigzag causal GQA call on ``world`` ranks: its output and error."""
    group = w.group(world)
    q, k, v, _ = make_inputs(31, 1, 8 * world, (2, 1), 8, torch.float32)
    parts = [tr.shard(x, layout="zigzag", group=group) for x in (q, k, v)]
    out = tr.attention(*parts, strategy=strategy, causal=True, layout="zigzag", group=group)
    ref, _ = attention_reference(q, k, v, causal=True)
    return out, rel_err(out, tr.shard(ref, layout="zigzag", group=group))


def lanes_recycle_case(w, *, world: int, cycles: int = 2) -> dict[str, Any]:
    """Destroy every lane, recreate them, ``cycles`` times; after each cycle every group
    must compute the same outputs as before, and the old lane groups must be gone.

    Runs on the whole pool (``world`` = 4) so that every rank destroys and recreates in
    the same order: the lanes of the groups of sizes 1, 2, 3 and 4, as the pool did at
    start-up (see tests/pool.py). That order matters for groups created with local
    synchronisation (tokenring.comm's docstring).
    """
    sizes = sorted(w.groups)
    strategies = ("tokenring", "ring")
    before = {(s, st): _fixed_problem(w, s, st) for s in sizes if s > 1 for st in strategies}
    old_lanes = {s: get_lanes(w.groups[s]) for s in sizes}
    fp_before = _footprint()
    same = True
    old_gone = True
    errs = [err for _, err in before.values()]
    for _ in range(cycles):
        tr.destroy_lanes()
        for s in sizes:
            tr.setup_lanes(w.groups[s])
        for key, (out, _) in before.items():
            again, err = _fixed_problem(w, *key)
            same &= bool(torch.equal(out, again))
            errs.append(err)
    for s, lanes in old_lanes.items():
        new = get_lanes(w.groups[s])
        old_gone &= all(pg not in new.groups for pg in lanes.groups)
        for pg in lanes.groups:
            try:
                dist.get_world_size(pg)
                old_gone = False
            except (ValueError, RuntimeError, KeyError):
                pass
    dist.barrier()
    return {
        "same": same,
        "old_gone": old_gone,
        "max_err": max(errs),
        "fds_before": fp_before["fds"],
        "fds_after": _footprint()["fds"],
        "threads_before": fp_before["threads"],
        "threads_after": _footprint()["threads"],
        "pid": os.getpid(),
    }
