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
from typing import Any

import torch

from .context_plans import CallState

__all__ = [
    "ADAPTERS",
    "Adapter",
    "CogVideoXJointAttention",
    "Context",
    "HunyuanVideoJointAttention",
    "JointAttention",
    "LTXSelfAttention",
    "QwenJointAttention",
    "WanSelfAttention",
]  # fmt: skip


@dataclass
class Context:
    """What an adapter needs from ``enable``: ``attend(q, k, v, joint, side,
    joint_mask=None)`` runs tokenring over this forward's sharded tokens (``[B, L, H, D]``
    each; ``joint``: text ``(q or None, k, v)`` every rank holds whole, ``side``
    ``"front"``/``"rear"``: where it sits, or ``"none"``; ``joint_mask``: the text's
    padding), returning ``out`` (and the text's, when its queries were given);
    ``state``: what this forward split; ``apply_rotary``: diffusers' rotary embedding
    (Flux's tables)."""

    attend: Callable[..., Any]
    state: CallState
    apply_rotary: Callable[..., torch.Tensor]


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

    context: Context

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
        out = self.context.attend(q, k, v).flatten(2, 3).type_as(q)
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

    context: Context

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
        out = self.context.attend(q, k, v).flatten(2, 3).to(q.dtype)
        return attn.to_out[1](attn.to_out[0](out))


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    return x.unflatten(-1, (-1, head_dim))  # [B, L, H * D] -> [B, L, H, D]


@dataclass
class JointAttention:
    """MM-DiT attention (Flux's ``FluxAttnProcessor``, SD3's ``JointAttnProcessor2_0``):
    image projections and norms, the text's own (dual-stream blocks) or the text cut
    from the front of the sequence (Flux's single-stream blocks), Flux's rotary
    embedding over ``[text; local image tokens]``, then tokenring with the text joint
    (front for Flux, rear for SD3), and the output projections."""

    context: Context
    text_first: bool

    @staticmethod
    def applies(name: str, module: torch.nn.Module) -> bool:
        return True

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None, **kwargs):  # fmt: skip
        if attention_mask is not None:
            raise ValueError("tokenring's diffusers integration takes no attention mask")
        if getattr(attn, "fused_projections", False):
            raise ValueError("fused QKV projections: call unfuse_qkv_projections() first")
        q, k, v = (f(hidden_states) for f in (attn.to_q, attn.to_k, attn.to_v))
        d = getattr(attn, "head_dim", None) or k.shape[-1] // attn.heads
        q, k, v = (_heads(x, d) for x in (q, k, v))
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        text = None
        text_len = self.context.state.text_len
        if encoder_hidden_states is not None:  # a dual-stream block: text projections
            projections = (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
            text = [_heads(f(encoder_hidden_states), d) for f in projections]
            if attn.norm_added_q is not None:
                text[0], text[1] = attn.norm_added_q(text[0]), attn.norm_added_k(text[1])
            text_len = encoder_hidden_states.shape[1]
        elif self.text_first and text_len:  # Flux single-stream: [text; image] in
            text, (q, k, v) = (
                [t[:, :text_len] for t in (q, k, v)],
                [t[:, text_len:] for t in (q, k, v)],
            )
        if image_rotary_emb is not None:  # Flux: positions of [text; local image tokens]
            whole = [q, k, v] if not text else [torch.cat(p, dim=1) for p in zip(text, (q, k, v))]
            rotate = self.context.apply_rotary
            whole[0] = rotate(whole[0], image_rotary_emb, sequence_dim=1)
            whole[1] = rotate(whole[1], image_rotary_emb, sequence_dim=1)
            if text:
                text = [w[:, :text_len] for w in whole]
                q, k, v = (w[:, text_len:] for w in whole)
            else:
                q, k, v = whole
        if text is None:
            out = self.context.attend(q, k, v).flatten(2, 3).to(q.dtype)
            return self._image_out(attn, out)
        wants_text = encoder_hidden_states is None or not getattr(attn, "context_pre_only", False)
        joint = (text[0] if wants_text else None, text[1], text[2])
        result = self.context.attend(q, k, v, joint, "front" if self.text_first else "rear")
        out, text_out = result if wants_text else (result, None)
        out = out.flatten(2, 3).to(q.dtype)
        if encoder_hidden_states is None:  # Flux single-stream: hand back [text; image]
            return torch.cat([text_out.flatten(2, 3).to(q.dtype), out], dim=1)
        out = self._image_out(attn, out)
        if text_out is None:
            return out, None
        text_out = text_out.flatten(2, 3).to(q.dtype)
        if getattr(attn, "to_add_out", None) is not None:
            text_out = attn.to_add_out(text_out)
        return out, text_out

    @staticmethod
    def _image_out(attn, out: torch.Tensor) -> torch.Tensor:
        if getattr(attn, "to_out", None) is None:  # Flux single-stream: no output projection
            return out
        return attn.to_out[1](attn.to_out[0](out))


@dataclass
class CogVideoXJointAttention:
    """CogVideoX's attention (``CogVideoXAttnProcessor2_0``): text and video projected
    together as ``[text; video]``, norms per head, the rotary embedding on the video part
    (keys too unless cross-attention), then tokenring with the text as joint tokens in
    front (its queries attend everything, as every video query does), the output
    projection over ``[text; video]``, handed back as (video, text)."""

    context: Context

    @staticmethod
    def applies(name: str, module: torch.nn.Module) -> bool:
        return True

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None,
                 image_rotary_emb=None, **kwargs):  # fmt: skip
        if attention_mask is not None or kwargs:
            raise ValueError("tokenring's CogVideoX attention takes no attention mask or "
                             f"other arguments (got {sorted(kwargs)})")  # fmt: skip
        text_len = encoder_hidden_states.shape[1]
        both = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        head_dim = attn.to_k.out_features // attn.heads
        q, k, v = (_heads(f(both), head_dim) for f in (attn.to_q, attn.to_k, attn.to_v))
        # the norms and the rotary embedding take [B, H, L, D]
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if image_rotary_emb is not None:
            rotate = self.context.apply_rotary
            q = torch.cat([q[:, :, :text_len], rotate(q[:, :, text_len:], image_rotary_emb)], 2)
            if not attn.is_cross_attention:
                k = torch.cat([k[:, :, :text_len], rotate(k[:, :, text_len:], image_rotary_emb)],
                              2)  # fmt: skip
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
        text = [t[:, :text_len] for t in (q, k, v)]
        out, text_out = self.context.attend(
            q[:, text_len:], k[:, text_len:], v[:, text_len:], tuple(text), "front"
        )
        joined = torch.cat([text_out, out], dim=1).flatten(2, 3).to(q.dtype)
        joined = attn.to_out[1](attn.to_out[0](joined))
        return joined[:, text_len:], joined[:, :text_len]


@dataclass
class QwenJointAttention:
    """Qwen-Image's double-stream attention (``QwenDoubleStreamAttnProcessor2_0``):
    image and text projected apart, norms per head, each stream's rotary table (the
    image's split with its tokens, the text's whole), then tokenring with the text as
    joint tokens in front under its padding mask (``encoder_hidden_states_mask``, any
    pattern), and each stream's output projection."""

    context: Context

    @staticmethod
    def applies(name: str, module: torch.nn.Module) -> bool:
        return True

    def __call__(self, attn, hidden_states, encoder_hidden_states=None,
                 encoder_hidden_states_mask=None, attention_mask=None, image_rotary_emb=None,
                 **kwargs):  # fmt: skip
        if encoder_hidden_states is None or attention_mask is not None or kwargs:
            raise ValueError(
                "tokenring's Qwen-Image attention takes the text stream and its mask, no "
                f"attention mask or other arguments (got {sorted(kwargs)})"
            )
        from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

        head_dim = attn.inner_dim // attn.heads
        image = [_heads(f(hidden_states), head_dim) for f in (attn.to_q, attn.to_k, attn.to_v)]
        projections = (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
        text = [_heads(f(encoder_hidden_states), head_dim) for f in projections]
        norms = (attn.norm_q, attn.norm_k, attn.norm_added_q, attn.norm_added_k)
        for stream, i, norm in ((image, 0, norms[0]), (image, 1, norms[1]), (text, 0, norms[2]),
                                (text, 1, norms[3])):  # fmt: skip
            if norm is not None:
                stream[i] = norm(stream[i])
        if image_rotary_emb is not None:
            image_freqs, text_freqs = image_rotary_emb
            for stream, freqs in ((image, image_freqs), (text, text_freqs)):
                stream[0] = apply_rotary_emb_qwen(stream[0], freqs, use_real=False)
                stream[1] = apply_rotary_emb_qwen(stream[1], freqs, use_real=False)
        mask = None if encoder_hidden_states_mask is None else encoder_hidden_states_mask.bool()
        out, text_out = self.context.attend(*image, tuple(text), "front", joint_mask=mask)
        out = out.flatten(2, 3).to(image[0].dtype)
        text_out = text_out.flatten(2, 3).to(image[0].dtype)
        out = attn.to_out[0](out.contiguous())
        if len(attn.to_out) > 1:
            out = attn.to_out[1](out)
        return out, attn.to_add_out(text_out.contiguous())


@dataclass
class HunyuanVideoJointAttention:
    """HunyuanVideo's attention (``HunyuanVideoAttnProcessor2_0`` in its dual- and
    single-stream blocks): video and text projected apart (dual) or together (single),
    norms per head, the rotary embedding on the video tokens, then tokenring with the
    text as joint tokens at the rear under its padding (the model's mask, built from the
    latent length: only its text columns are read), and the output projections."""

    context: Context

    @staticmethod
    def applies(name: str, module: torch.nn.Module) -> bool:
        return name.startswith(("transformer_blocks.", "single_transformer_blocks."))

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None, **kwargs):  # fmt: skip
        if encoder_hidden_states is None or kwargs:
            raise ValueError("tokenring's HunyuanVideo attention takes the text stream, and "
                             f"no other arguments (got {sorted(kwargs)})")  # fmt: skip
        text_len = encoder_hidden_states.shape[1]
        single = attn.add_q_proj is None
        both = torch.cat([hidden_states, encoder_hidden_states], 1) if single else hidden_states
        q, k, v = (
            f(both).unflatten(2, (attn.heads, -1)) for f in (attn.to_q, attn.to_k, attn.to_v)
        )
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        text = None
        if single:  # [video; text] projected alike: cut the text off the end
            text = [t[:, -text_len:] for t in (q, k, v)]
            q, k, v = (t[:, :-text_len] for t in (q, k, v))
        if image_rotary_emb is not None:
            rotate = self.context.apply_rotary
            q, k = (rotate(x, image_rotary_emb, sequence_dim=1) for x in (q, k))
        if not single:
            projections = (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
            text = [f(encoder_hidden_states).unflatten(2, (attn.heads, -1)) for f in projections]
            if attn.norm_added_q is not None:
                text[0] = attn.norm_added_q(text[0])
            if attn.norm_added_k is not None:
                text[1] = attn.norm_added_k(text[1])
        mask = None if attention_mask is None else attention_mask[:, 0, 0, -text_len:].bool()
        out, text_out = self.context.attend(q, k, v, tuple(text), "rear", joint_mask=mask)
        out = out.flatten(2, 3).to(q.dtype)
        text_out = text_out.flatten(2, 3).to(q.dtype)
        if getattr(attn, "to_out", None) is not None:
            out = attn.to_out[1](attn.to_out[0](out))
        if getattr(attn, "to_add_out", None) is not None:
            text_out = attn.to_add_out(text_out)
        return out, text_out


Adapter = Callable[[Context], Any]
"""Makes the processor that replaces the model's on the modules its ``applies`` takes."""

ADAPTERS: dict[str, tuple[Adapter, Callable[[str, torch.nn.Module], bool]]] = {
    "WanAttnProcessor": (WanSelfAttention, WanSelfAttention.applies),
    "LTXVideoAttnProcessor": (LTXSelfAttention, LTXSelfAttention.applies),
    "FluxAttnProcessor": (lambda c: JointAttention(c, text_first=True), JointAttention.applies),
    "JointAttnProcessor2_0": (
        lambda c: JointAttention(c, text_first=False),
        JointAttention.applies,
    ),
    "CogVideoXAttnProcessor2_0": (CogVideoXJointAttention, CogVideoXJointAttention.applies),
    "QwenDoubleStreamAttnProcessor2_0": (QwenJointAttention, QwenJointAttention.applies),
    "HunyuanVideoAttnProcessor2_0": (
        HunyuanVideoJointAttention,
        HunyuanVideoJointAttention.applies,
    ),
}
"""Processor class name -> (the adapter that replaces it, which modules it takes)."""
