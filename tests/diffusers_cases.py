"""Case functions for tests/test_integrations.py: tiny random diffusers MM-DiTs, sharded
on the pool against the same model on one process (float64)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from reference import grad_floor, rel_err
from usp_cases import mesh_of


def tiny_flux(seed: int = 0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=16, pooled_projection_dim=8,
        axes_dims_rope=(2, 2, 4),
    ).double()  # fmt: skip


def tiny_sd3(seed: int = 0):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=16, caption_projection_dim=32,
        pooled_projection_dim=8, out_channels=4, pos_embed_max_size=16,
    ).double()  # fmt: skip


def tiny_wan(seed: int = 0):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=12, in_channels=4,
        out_channels=4, text_dim=16, freq_dim=8, ffn_dim=32, num_layers=2, rope_max_seq_len=32,
    ).double()  # fmt: skip


def tiny_ltx(seed: int = 0):
    from diffusers import LTXVideoTransformer3DModel

    torch.manual_seed(seed)
    return LTXVideoTransformer3DModel(
        in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=4,
        attention_head_dim=8, cross_attention_dim=32, num_layers=2, caption_channels=16,
    ).double()  # fmt: skip


def tiny_cogvideox(seed: int = 0):
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    return CogVideoXTransformer3DModel(
        num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=4,
        text_embed_dim=16, num_layers=2, sample_width=8, sample_height=8, sample_frames=9,
        patch_size=2, temporal_compression_ratio=4, max_text_seq_length=6, time_embed_dim=8,
    ).double()  # fmt: skip


def tiny_qwen(seed: int = 0):
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    return QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
        num_attention_heads=4, joint_attention_dim=16, axes_dims_rope=(4, 6, 6),
    ).double()  # fmt: skip


def tiny_hunyuan(seed: int = 0):
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(seed)
    return HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=4, attention_head_dim=10,
        num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4),
    ).double()  # fmt: skip


MODELS = {"flux": tiny_flux, "sd3": tiny_sd3, "wan": tiny_wan, "ltx": tiny_ltx,
          "cogvideox": tiny_cogvideox, "qwen": tiny_qwen, "hunyuan": tiny_hunyuan}  # fmt: skip


def _hunyuan_inputs(rand, odd: bool) -> dict:
    """A latent of 2 frames of 4 x 4 (32 tokens) or, ``odd``, 3 frames of 3 x 5 (45);
    text of 6 tokens, the second row's last two padding (HunyuanVideo's mask)."""
    frames, h, w = (3, 3, 5) if odd else (2, 4, 4)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    return dict(hidden_states=rand(2, 4, frames, h, w), timestep=torch.tensor([300, 700]),
                encoder_hidden_states=rand(2, 6, 16), encoder_attention_mask=mask,
                pooled_projections=rand(2, 8),
                guidance=torch.tensor([3000.0, 3000.0], dtype=torch.float64))  # fmt: skip


def _qwen_inputs(rand, odd: bool) -> dict:
    """Packed latents of 4 x 8 (32 tokens) or, ``odd``, 3 x 5 (15); text of 6 tokens, the
    second row's 3rd and last padding (Qwen-Image's mask may have any pattern)."""
    h, w = (3, 5) if odd else (4, 8)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 2] = mask[1, 5] = False
    return dict(hidden_states=rand(2, h * w, 16), encoder_hidden_states=rand(2, 6, 16),
                encoder_hidden_states_mask=mask,
                timestep=torch.tensor([0.3, 0.7], dtype=torch.float64),
                img_shapes=[(1, h, w)] * 2)  # fmt: skip


def _cogvideox_inputs(rand, odd: bool) -> dict:
    """A latent of 2 frames of 8 x 8 (32 tokens in 2 x 2 patches) or, ``odd``, 3 frames
    of 6 x 10 (45); text of 6 tokens; rotary tables (cosine, sine) for the video tokens,
    as CogVideoX-5B's pipeline hands them in."""
    frames, h, w = (3, 6, 10) if odd else (2, 8, 8)
    tokens = frames * (h // 2) * (w // 2)
    return dict(hidden_states=rand(2, frames, 4, h, w), encoder_hidden_states=rand(2, 6, 16),
                timestep=torch.tensor([300, 700]),
                image_rotary_emb=(rand(tokens, 8), rand(tokens, 8)))  # fmt: skip


def _ltx_inputs(rand, odd: bool) -> dict:
    """A video of 2 frames of 4 x 4 tokens (32) or, ``odd``, 3 frames of 3 x 5 (45);
    text of 6 tokens, the second row's last two padding (its mask)."""
    frames, h, w = (3, 3, 5) if odd else (2, 4, 4)
    mask = torch.ones(2, 6, dtype=torch.float64)
    mask[1, 4:] = 0
    return dict(hidden_states=rand(2, frames * h * w, 4), encoder_hidden_states=rand(2, 6, 16),
                timestep=torch.tensor([300.0, 700.0], dtype=torch.float64),
                encoder_attention_mask=mask, num_frames=frames, height=h, width=w)  # fmt: skip


def _wan_inputs(rand, odd: bool, per_token: bool) -> dict:
    """A video latent of 2 frames of 8 x 8 (32 tokens in 1 x 2 x 2 patches) or, ``odd``,
    3 frames of 6 x 10 (45 tokens); text of 7 tokens; ``per_token``: a timestep per
    token (Wan 2.2's), which the model's plan splits with the tokens."""
    frames, h, w = (3, 6, 10) if odd else (2, 8, 8)
    tokens = frames * (h // 2) * (w // 2)
    timestep = torch.tensor([3.0, 7.0], dtype=torch.float64)
    if per_token:
        timestep = rand(2, tokens).abs() * 10
    return dict(hidden_states=rand(2, 4, frames, h, w), timestep=timestep,
                encoder_hidden_states=rand(2, 7, 16))  # fmt: skip


def _inputs(kind: str, odd: bool = False, per_token: bool = False) -> dict:
    """The model's inputs; ``odd``: an image whose token count divides by nothing (Flux
    3 x 5 = 15 tokens, SD3 a 6 x 10 latent in 2 x 2 patches = 15 tokens)."""
    g = torch.Generator().manual_seed(11)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    if kind == "wan":
        return _wan_inputs(rand, odd, per_token)
    if kind == "ltx":
        return _ltx_inputs(rand, odd)
    if kind == "cogvideox":
        return _cogvideox_inputs(rand, odd)
    if kind == "qwen":
        return _qwen_inputs(rand, odd)
    if kind == "hunyuan":
        return _hunyuan_inputs(rand, odd)
    if kind == "flux":
        h, w = (3, 5) if odd else (4, 8)  # 15 or 32 image tokens
        rows, cols = torch.meshgrid(torch.arange(float(h)), torch.arange(float(w)), indexing="ij")
        img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).double()
        return dict(
            hidden_states=rand(2, h * w, 4), encoder_hidden_states=rand(2, 5, 16),
            pooled_projections=rand(2, 8), timestep=torch.tensor([0.3, 0.7], dtype=torch.float64),
            img_ids=img_ids, txt_ids=torch.zeros(5, 3, dtype=torch.float64),
        )  # fmt: skip
    return dict(
        hidden_states=rand(2, 4, 6, 10) if odd else rand(2, 4, 8, 16),
        encoder_hidden_states=rand(2, 5, 16),
        pooled_projections=rand(2, 8), timestep=torch.tensor([3.0, 7.0], dtype=torch.float64),
    )  # fmt: skip


def dit_case(w, *, world: int, kind: str, strategy: str, odd: bool = False,
             per_token: bool = False) -> dict:  # fmt: skip
    """The full output and every parameter gradient (summed over the group) of the
    sharded transformer against the same model on one process (``odd``: image tokens
    that divide by nothing; ``per_token``: Wan's timestep per token)."""
    from tokenring.integrations.diffusers import enable

    make = MODELS[kind]
    inputs = _inputs(kind, odd, per_token)
    reference = make()
    ref = reference(**inputs).sample
    weights = torch.randn(ref.shape, generator=torch.Generator().manual_seed(5), dtype=ref.dtype)
    (ref * weights).sum().backward()

    model = make()
    where = (
        {"mesh": mesh_of(2, world // 2, True)} if strategy == "usp" else {"group": w.group(world)}
    )
    group = None if strategy == "usp" else where["group"]
    handle = enable(model, strategy=strategy, **where)
    out = model(**inputs).sample
    (out * weights).sum().backward()
    grad_err = 0.0
    used = [r.grad for r in reference.parameters() if r.grad is not None]
    for p, r in zip(model.parameters(), reference.parameters(), strict=True):
        if r.grad is None:  # unused by the model
            grad_err = max(grad_err, 0.0 if p.grad is None else float("inf"))
            continue
        # None where the reference's gradient is exactly zero: the last SD3 block's text
        # queries, whose outputs it discards, are not computed here at all
        grad = torch.zeros_like(r.grad) if p.grad is None else p.grad.clone()
        dist.all_reduce(grad, group=group)
        # a gradient zero in exact arithmetic (a key bias: softmax ignores a shift shared
        # by every key) is judged on the model's gradient scale, not its own rounding
        grad_err = max(grad_err, rel_err(grad, r.grad, grad_floor(r.grad, used)))
    handle.disable()
    again = model(**inputs).sample  # undone: the model alone again, on every rank
    return {"out": rel_err(out, ref), "grads": grad_err, "undone": rel_err(again, ref)}
