"""Case functions for the KV cache tests (each rank of a pool group runs the same one)."""

from __future__ import annotations

import torch

import tokenring as tr
from dist_cases import DTYPES
from reference import attention_reference, rel_err


def _history_reference(q, keys, values, before: int, causal: bool):
    """Float64 attention of one row's ``n`` new queries ``[1, n, H, D]`` over ``keys``
    ``[1, before + n, Hkv, D]``: every cached key, and the new ones by the mask."""
    n = q.shape[1]
    i = torch.arange(n)[:, None]
    j = torch.arange(before + n)[None, :]
    allowed = (j < before) | ((j - before <= i) if causal else torch.ones_like(j, dtype=bool))
    return attention_reference(q, keys, values, causal=False, allowed=allowed)


def cache_steps(w, *, world, **case):
    """``run_steps`` on this rank's group of ``world`` ranks, on the CPU."""
    return run_steps(w.group(world), "cpu", **case)


def run_steps(group, device, *, seed, batch, heads, head_dim, capacity, steps, strategy="auto",
              causal=True, dtype="float64", capture=False):  # fmt: skip
    """Run ``steps`` (each ``(L, sharded, new_lengths or None)``) on one cache; per step the
    worst error against float64 attention over each row's whole history (real query rows;
    padded ones must be zero), and the replicated outputs (bitwise checks across ranks).
    ``capture``: one-token replicated steps run as a captured step (CUDA)."""
    dt = DTYPES[dtype]
    hq, hkv = heads
    cache = tr.KVCache(batch=batch, capacity=capacity, heads_kv=hkv, head_dim=head_dim,
                       dtype=dt, device=device, group=group)  # fmt: skip
    captured = None
    g = torch.Generator().manual_seed(seed)
    hist_k = [torch.zeros(1, 0, hkv, head_dim, dtype=torch.float64) for _ in range(batch)]
    hist_v = [h.clone() for h in hist_k]
    errors, replicated = [], []
    for length, sharded, new_lengths in steps:
        q, k, v = (torch.randn(batch, length, h, head_dim, generator=g, dtype=torch.float64)
                   for h in (hq, hkv, hkv))  # fmt: skip
        q, k, v = (t.to(dt) for t in (q, k, v))
        real = list(new_lengths) if new_lengths is not None else [length] * batch
        given = tuple(t.to(device) for t in (q, k, v))
        if sharded:
            given = tuple(tr.shard(t, layout="contiguous", group=group, dim=1) for t in given)
        if capture and length == 1 and not sharded and new_lengths is None:
            if captured is None:
                captured = cache.capture(*given, causal=causal, return_lse=True)
            out, lse = captured(*given)
        else:
            out, lse = cache.attend(
                *given, causal=causal, sharded=sharded, strategy=strategy, return_lse=True,
                new_lengths=None if new_lengths is None else torch.tensor(real),
            )  # fmt: skip
        out, lse = out.cpu(), lse.cpu()
        if sharded:
            out = tr.unshard(out, layout="contiguous", group=group, dim=1, seq_len=length)
            lse = tr.unshard(lse, layout="contiguous", group=group, dim=2, seq_len=length)
        else:
            replicated.append(out)
        worst = 0.0
        for b in range(batch):
            n, before = real[b], hist_k[b].shape[1]
            keys = torch.cat([hist_k[b], k[b : b + 1, :n].double()], dim=1)
            values = torch.cat([hist_v[b], v[b : b + 1, :n].double()], dim=1)
            ref_out, ref_lse = _history_reference(q[b : b + 1, :n], keys, values, before, causal)
            worst = max(worst, rel_err(out[b : b + 1, :n], ref_out),
                        rel_err(lse[b : b + 1, :, :n], ref_lse))  # fmt: skip
            if n < length and (
                out[b, n:].abs().max() > 0 or not torch.isneginf(lse[b, :, n:]).all()
            ):
                worst = float("inf")  # padded rows: nothing
            hist_k[b], hist_v[b] = keys, values
        errors.append(worst)
    return errors, cache.lengths.tolist(), replicated


def cache_error(w, *, world, steps, capacity=8, sharded=False, **given):
    """The ValueError a cache call raises (steps before it must pass)."""
    group = w.group(world)
    cache = tr.KVCache(batch=1, capacity=capacity, heads_kv=1, head_dim=4, group=group)
    try:
        for length in steps:
            x = torch.ones(1, length, 1, 4)
            if sharded:
                x = tr.shard(x, layout="contiguous", group=group, dim=1)
            cache.attend(x, x, x, sharded=sharded, **given)
    except ValueError as err:
        return str(err)
    return None
