"""USP under packed documents and windows (every rank of the pool runs it)."""

from __future__ import annotations

import torch

import tokenring as tr
from dist_cases import make_inputs
from reference import allowed_pairs, attention_reference, grad_floor, rel_err
from usp_cases import mesh_of


def usp_masked_case(
    w, *, world: int, ring_impl: str, layout: str, causal: bool, seq: int, documents=None,
    window=None, ulysses: int = 2, ring: int = 2,
) -> dict[str, float]:  # fmt: skip
    """A ``ulysses`` x ``ring`` mesh (Ulysses inner; 2 x 2 unless said): out, lse and
    gradients against float64 under the mask written from its definition, and whether
    unshard inverts shard."""
    mesh = mesh_of(ulysses, ring, True)
    q, k, v, do = make_inputs(1, 2, seq, (4, 2), 8, torch.float32)
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    allowed = allowed_pairs(seq, causal, window, documents)
    ref_out, ref_lse = attention_reference(*ref, causal=causal, allowed=allowed)
    ref_grads = torch.autograd.grad(ref_out, ref, do.double())

    def local(x, dim=1):
        return tr.shard(x, layout=layout, mesh=mesh, dim=dim, cu_seqlens=documents)

    parts = [local(t).requires_grad_() for t in (q, k, v)]
    out, lse = tr.attention(
        *parts, strategy="usp", mesh=mesh, ring_impl=ring_impl, causal=causal, layout=layout,
        return_lse=True, seq_len=seq, cu_seqlens=documents, window_size=window,
    )  # fmt: skip
    grads = torch.autograd.grad(out, parts, local(do))
    errs = {"out": rel_err(out, local(ref_out.detach())),
            "lse": rel_err(lse, local(ref_lse.detach(), dim=2))}  # fmt: skip
    for name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads):
        errs[name] = rel_err(got, local(want), grad_floor(local(want), ref_grads))
    back = tr.unshard(local(q), layout=layout, mesh=mesh, cu_seqlens=documents)
    errs["roundtrip"] = float(torch.equal(back, q))
    return errs
