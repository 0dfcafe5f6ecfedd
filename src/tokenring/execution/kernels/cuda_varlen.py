"""Flash-attention's variable-length call with a sliding window, for masked blocks.

``aten._flash_attention_forward`` with ``cum_seq_q``/``cum_seq_k`` and
``window_size_left``/``right`` runs a batch of sequences of any lengths, each
under a window aligned to its bottom-right corner, and returns the LSE as
``[heads, total_q]``; ``aten._flash_attention_backward`` takes that LSE back (the
global one, so a partial block's gradients come out right). ``VarlenMasks``
turns a block under documents and a window into such batches
(``schedules.segments``): one launch per distinct window, where the sub-calls
of ``base.BlockMask.calls`` take one per document and a masked kernel at every
window edge. Blocks without a mask run as ``FlashAttention``'s plain calls.
"""

from __future__ import annotations

import torch

from .cuda_sdpa import FlashAttention, _scalar_seed
from .varlen import VarlenGroup, VarlenMasks

__all__ = ["FlashVarlen"]

aten = torch.ops.aten


class FlashVarlen(VarlenMasks, FlashAttention):
    """FlashAttention-2's variable-length call inside PyTorch, windows and all."""

    name = "flash-varlen"
    priority = 15

    def _varlen_forward(self, q, k, v, group: VarlenGroup, scale):
        out, lse, *_ = aten._flash_attention_forward(
            q, k, v, group.cu_q, group.cu_k, group.max_q, group.max_k, 0.0, group.causal,
            False, scale=scale, window_size_left=group.left, window_size_right=group.right,
        )  # fmt: skip
        if lse.dim() != 2:
            raise RuntimeError(
                f"flash's variable-length LSE came as {tuple(lse.shape)}, not [heads, "
                f"total] as in PyTorch 2.11 (checked): this PyTorch ({torch.__version__}) lays it "
                "out otherwise; pass kernel='efficient' to run masked blocks without it"
            )
        return out, lse

    def _varlen_backward(self, do, q, k, v, out, lse, group: VarlenGroup, scale):
        seed, offset = _scalar_seed(q.device)
        return aten._flash_attention_backward(
            do, q, k, v, out, lse, group.cu_q, group.cu_k, group.max_q, group.max_k, 0.0,
            group.causal, seed, offset, scale=scale, window_size_left=group.left,
            window_size_right=group.right,
        )  # fmt: skip
