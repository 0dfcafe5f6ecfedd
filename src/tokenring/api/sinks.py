"""Attention sinks: per-head logits that join every row's softmax denominator once.

gpt-oss's ``s_aux``: for each query row the softmax runs over its keys and one
extra logit ``sink[h]`` whose value vector is zero. So with the attention over
the keys alone, ``out`` and its ``lse`` (merged over every rank already),

    lse' = logaddexp(lse, sink[h])            the whole denominator, sink included
    out' = out * exp(lse - lse')              the keys' share of the probability

per row, on the rank that owns the row: no extra communication, for every
strategy. Written in torch operations, autograd differentiates it: the gradient
reaches ``sinks`` (in their dtype) and, through ``lse``, the attention's backward
(whose ``delta`` takes the LSE's gradient, ``execution/passes.py``), and the
compiled call traces it like any other operation.
"""

from __future__ import annotations

import torch

__all__ = ["with_sinks"]


def with_sinks(
    out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out', lse')`` of the module docstring: ``out`` ``[B, L, H, D]``, ``lse`` float32
    ``[B, H, L]``, ``sinks`` ``[H]``."""
    sink = sinks.to(lse.dtype)[None, :, None]
    total = torch.logaddexp(lse, sink)
    share = torch.exp(lse - total).transpose(1, 2).unsqueeze(-1)
    return (out.to(lse.dtype) * share).to(out.dtype), total
