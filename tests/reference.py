"""The independent reference: float64 attention on the gathered sequence, with autograd."""

from __future__ import annotations

import torch


def allowed_pairs(seq: int, causal: bool, window=None, documents=None) -> torch.Tensor:
    """Boolean ``[seq, seq]``: query ``i`` sees key ``j`` (causal: ``j <= i``; window
    ``(left, right)``: ``i - left <= j <= i + right``, -1 unbounded; documents: the
    offsets ``[0, ..., seq]``, no pair across a boundary), from the definition."""
    i = torch.arange(seq)[:, None]
    j = torch.arange(seq)[None, :]
    ok = torch.ones(seq, seq, dtype=torch.bool)
    if causal:
        ok &= j <= i
    if window is not None:
        left, right = window
        if left >= 0:
            ok &= j >= i - left
        if right >= 0:
            ok &= j <= i + right
    if documents is not None:
        doc = torch.zeros(seq, dtype=torch.long)
        for boundary in documents[1:-1]:
            doc[boundary:] += 1
        ok &= doc[:, None] == doc[None, :]
    return ok


def attention_reference(
    q, k, v, *, causal: bool, scale: float | None = None, allowed=None, sinks=None
):
    """Float64 attention on full ``[B, S, H, D]`` tensors; returns ``(out, lse)``.

    Written from the definition (explicit mask, softmax, GQA by repeating key
    and value heads) and differentiable, so it also gives reference gradients.
    ``allowed`` (``allowed_pairs``) replaces the causal mask when given. ``sinks``
    (``[H]``): one more logit per head in every row's softmax, with a value of zero;
    the LSE then counts it.
    """
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[2] // k.shape[2]
    k = k.repeat_interleave(group, dim=2)
    v = v.repeat_interleave(group, dim=2)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if allowed is None and causal:
        s = q.shape[1]
        allowed = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
    if allowed is not None:  # [Sq, Sk], or per batch row [B, Sq, Sk]
        allowed = allowed.to(q.device)
        scores = scores.masked_fill(~(allowed[:, None] if allowed.dim() == 3 else allowed),
                                    float("-inf"))  # fmt: skip
    if sinks is not None:
        sink = sinks.double()[None, :, None, None].expand(*scores.shape[:3], 1)
        with_sink = torch.cat([scores, sink], dim=-1)
        probs = torch.softmax(with_sink, dim=-1)[..., :-1]
        return torch.einsum("bhqk,bkhd->bqhd", probs, v), torch.logsumexp(with_sink, dim=-1)
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(scores, dim=-1), v)
    return out, lse


def reference_with_grads(q, k, v, do, *, causal: bool):
    """Float64 ``(out, lse, (dq, dk, dv))`` on full tensors, the gradients of
    ``sum(out * do)``; everything detached."""
    qr, kr, vr = (t.double().requires_grad_() for t in (q, k, v))
    out, lse = attention_reference(qr, kr, vr, causal=causal)
    grads = torch.autograd.grad(out, (qr, kr, vr), do.double())
    return out.detach(), lse.detach(), grads


def rel_err(actual: torch.Tensor, expected: torch.Tensor, floor: float = 1e-30) -> float:
    """max |actual - expected| / max(max |expected|, floor) (NaN anywhere counts as
    infinite). ``floor``: the scale to judge by when ``expected`` is zero in exact
    arithmetic (``grad_floor``)."""
    actual, expected = actual.double(), expected.double()
    if torch.isnan(actual).any():
        return float("inf")
    scale = expected.abs().max().clamp_min(floor) if expected.numel() else torch.tensor(floor)
    return ((actual - expected).abs().max() / scale).item() if actual.numel() else 0.0


def grad_floor(local_ref: torch.Tensor, ref_grads) -> float:
    """The scale to judge a shard's gradient by when it is zero in exact arithmetic (a
    query with one key has dq = 0 and only rounding is left; a shard may hold only such
    rows, or none): the largest reference gradient of the whole sequence. Otherwise none
    (each shard on its own scale)."""
    largest = max(g.abs().max().item() for g in ref_grads)
    own = local_ref.abs().max().item() if local_ref.numel() else 0.0
    return largest if own < 1e-6 * largest else 1e-30
