"""A float64 math kernel: slow, simple, any device and dtype.

Used by tests as a cross-check of the fast adapters and as the backend of
last resort (``kernel="math"``); ``auto`` picks it only when no fast backend
fits.
"""

from __future__ import annotations

import torch

from .base import KernelBackend, accum_dtype, expand_heads, fold_heads

__all__ = ["MathKernel"]


def _probabilities(q, k, lse, causal, scale, allowed=None):
    """Float64 scores ``[B, H, Lq, Lk]`` (masked to -inf), their LSE and exp(scores - lse)
    (0 where masked, also in rows where every key is). ``allowed``: an explicit mask."""
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), expand_heads(k, q.shape[2]).double()) * scale
    if causal:
        lq, lk = s.shape[-2:]
        allowed = torch.ones(lq, lk, dtype=torch.bool, device=s.device).tril()
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, dim=-1) if lse is None else lse.double()
    p = torch.exp(s - lse.unsqueeze(-1))
    if allowed is not None:
        p = p.masked_fill(~allowed, 0.0)
    return p, lse


class MathKernel(KernelBackend):
    name = "math"
    priority = 0
    device_types = frozenset({"cpu", "cuda"})
    dtypes = frozenset({torch.float32, torch.bfloat16, torch.float16, torch.float64})
    max_head_dim = 1 << 16
    native_gqa = True
    explicit_masks = True
    padded_keys = True
    row_masks = True

    def _forward(self, q, k, v, causal, scale, allowed=None):
        p, lse = _probabilities(q, k, None, causal, scale, allowed)
        out = torch.einsum("bhqk,bkhd->bqhd", p, expand_heads(v, q.shape[2]).double())
        return out.to(q.dtype), lse.to(accum_dtype(q.dtype))

    def _masked_forward(self, q, k, v, mask, scale):
        return self._forward(q, k, v, False, scale, mask.allowed)

    def _masked_backward(self, do, q, k, v, out, lse, delta, mask, scale):
        return self._backward(do, q, k, v, out, lse, delta, False, scale, mask.allowed)

    def _rows_forward(self, q, k, v, scale, allowed):
        return self._forward(q, k, v, False, scale, allowed)

    def _rows_backward(self, do, q, k, v, out, lse, delta, scale, allowed):
        return self._backward(do, q, k, v, out, lse, delta, False, scale, allowed)

    def _backward(self, do, q, k, v, out, lse, delta, causal, scale, allowed=None):
        heads, heads_kv = q.shape[2], k.shape[2]
        p, _ = _probabilities(q, k, lse, causal, scale, allowed)
        dod = do.double()
        dp = torch.einsum("bqhd,bkhd->bhqk", dod, expand_heads(v, heads).double())
        ds = p * (dp - delta.double().unsqueeze(-1))
        dq = torch.einsum("bhqk,bkhd->bqhd", ds, expand_heads(k, heads).double()) * scale
        dk = torch.einsum("bhqk,bqhd->bkhd", ds, q.double()) * scale
        dv = torch.einsum("bhqk,bqhd->bkhd", p, dod)
        return (
            dq.to(q.dtype),
            fold_heads(dk, heads_kv).to(k.dtype),
            fold_heads(dv, heads_kv).to(v.dtype),
        )
