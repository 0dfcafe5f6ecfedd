"""Attention processors for sequence-parallel diffusers transformers, keyed by the
processor class a model uses: where processors really differ (which side text is
concatenated on, extra image context, rotary tables passed per block), the difference
lives in one entry of ``ADAPTERS``, not in conditions spread over a processor.

An adapter computes what the model's own processor computes up to the attention
itself (projections, norms, rotary embeddings), hands the attention to tokenring over
the tokens sharded on this rank, and applies the output projection. Attention modules
that need no sequence parallelism (cross-attention to text every rank holds whole)
keep the model's own processor: ``applies(name, module)`` says which modules an adapter
takes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["ADAPTERS", "Adapter", "LTXSelfAttention", "WanSelfAttention"]

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""tokenring over this forward's sharded tokens: ``[B, L, H, D]`` each, output likewise."""


def _rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on interleaved pairs ``(x[2i], x[2i + 1])``: each pair turned by
    its angle, whose cosine and sine the tables hold at every position (the tables
    repeat each value for both members of a pair, so even columns are read)."""
    even, odd = x[..., 0::2], x[..., 1::2]
    c, s = cos[..., 0::2], sin[..., 1::2]
    return torch.stack((even * c - odd * s, even * s + odd * c), dim=-1).flatten(-2).type_as(x)


@dataclass
class WanSelfAttention:
    """Wan's self-attention (``WanAttnProcessor`` on a module that is not
    cross-attention): q, k, v projections (fused or not), RMS norms over all heads,
    rotary tables of this rank's tokens (the plan splits the model's ``rope`` output),
    attention over the sharded video tokens, output projection."""

    attend: Attend

    @staticmethod
    def applies(name: str, module: torch.nn.Module) -> bool:
        return not getattr(module, "is_cross_attention", True)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 rotary_emb=None, **kwargs):  # fmt: skip
        if encoder_hidden_states is not None or attention_mask is not None or kwargs:
            raise ValueError(
                "tokenring's Wan self-attention takes no encoder_hidden_states, attention "
                f"mask or other arguments (got {sorted(kwargs)})"
            )
        if getattr(attn, "fused_projections", False):
            q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        q, k = attn.norm_q(q), attn.norm_k(k)
        q, k, v = (x.unflatten(2, (attn.heads, -1)) for x in (q, k, v))
        if rotary_emb is not None:
            q, k = _rotate_pairs(q, *rotary_emb), _rotate_pairs(k, *rotary_emb)
        out = self.attend(q, k, v).flatten(2, 3).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))


def _rotate_pairs_flat(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """LTX's rotary embedding on ``[B, L, C]`` before the heads are split: each pair
    ``(x[2i], x[2i + 1])`` turned to ``(-x[2i + 1], x[2i])`` and mixed by the tables, in
    float32 as LTX computes it."""
    pairs = x.unflatten(-1, (-1, 2))
    turned = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    return (x.float() * cos + turned.float() * sin).to(x.dtype)


@dataclass
class LTXSelfAttention:
    """LTX-Video's self-attention (``LTXVideoAttnProcessor`` on each block's ``attn1``;
    ``attn2`` attends to the text, every rank's whole, under the text's padding mask,
    and keeps the model's processor): projections, RMS norms, rotary tables of this
    rank's tokens, attention over the sharded video tokens, output projection."""

    attend: Attend

    @staticmethod
    def applies(name: str, module: torch.nn.Module) -> bool:
        return name.rsplit(".", 1)[-1] == "attn1"

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None, **kwargs):  # fmt: skip
        if encoder_hidden_states is not None or attention_mask is not None or kwargs:
            raise ValueError(
                "tokenring's LTX self-attention takes no encoder_hidden_states, attention "
                f"mask or other arguments (got {sorted(kwargs)})"
            )
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        q, k = attn.norm_q(q), attn.norm_k(k)
        if image_rotary_emb is not None:
            q, k = (
                _rotate_pairs_flat(q, *image_rotary_emb),
                _rotate_pairs_flat(k, *image_rotary_emb),
            )
        q, k, v = (x.unflatten(2, (attn.heads, -1)) for x in (q, k, v))
        out = self.attend(q, k, v).flatten(2, 3).to(q.dtype)
        return attn.to_out[1](attn.to_out[0](out))


Adapter = type[WanSelfAttention] | type[LTXSelfAttention]

ADAPTERS: dict[str, Adapter] = {
    "WanAttnProcessor": WanSelfAttention,
    "LTXVideoAttnProcessor": LTXSelfAttention,
}
"""Processor class name -> the adapter that replaces it on the modules it ``applies`` to."""
