"""tokenring inside diffusers transformers (Flux, SD3, Wan, LTX-Video): sequence parallel
inside the model's forward, undoable.

    handle = enable(transformer, mesh=tr.sp_mesh(ulysses=2, ring=2))   # every rank
    out = transformer(**inputs).sample      # the usual full inputs and full output, every rank
    handle.disable()

Wan and LTX-Video follow their own context-parallel plans (``_cp_plan``,
``context_plans.py``; entries that would split the text dropped): their video tokens
and rotary tables are split where the plan says, their self-attention runs through
tokenring (``diffusers_attention.py``), their cross-attention to the text, which every
rank holds whole, keeps the model's processor. For Flux and SD3:
image tokens are sharded (contiguous layout) right after they are embedded and
gathered right before the output projection's result is reshaped; text tokens
stay whole on every rank and attend as joint tokens (xDiT's semantics; every
strategy's joint path: docs/algorithms.md, "Joint tokens"). Everything goes
through public hooks: forward hooks on the transformer and its embedding and
output modules (``register_forward_pre_hook`` / ``register_forward_hook``) and
the attention processors (``set_attn_processor``); ``disable()`` removes the
hooks and puts the previous processors back.

Gradients (fine-tuning): with the same loss on the full output on every rank,
each rank's parameter gradients are its share; summed over the group
(``all_reduce``) they are the unsharded model's. To rounding: where a layer on the
replicated text tokens computes in float32 inside (diffusers' RMSNorm takes its
variance in float32), the shares are rounded separately, so in float64 Flux's
text-stream gradients agree to about 1e-7 rather than 1e-15.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.distributed as dist

from ..api.attention import run
from ..api.sharding import shard, unshard
from ..call.description import Options
from .common import sharded_over
from .context_plans import CallState, apply_plan, without_text
from .diffusers_attention import ADAPTERS

__all__ = ["SUPPORTED_MODELS", "DiffusersHandle", "enable"]

PLANNED_MODELS: dict[str, Callable[[Any], dict]] = {
    "WanTransformer3DModel": lambda model: without_text(model._cp_plan),
    "LTXVideoTransformer3DModel": lambda model: without_text(model._cp_plan),
}
"""Models made sequence-parallel from a context-parallel plan (``context_plans.py``):
model class name -> the plan (the model's own ``_cp_plan``, or the project's in its
form), their attention processors replaced per class (``diffusers_attention.py``)."""

SUPPORTED_MODELS = ("FluxTransformer2DModel", "SD3Transformer2DModel", *PLANNED_MODELS)

TESTED_DIFFUSERS = ("0.42.",)
"""diffusers versions whose plans and processors the tests checked
(``tests/test_integrations.py::test_what_the_wan_adapter_relies_on_in_diffusers``)."""
LAYOUT = "contiguous"


def _diffusers():
    try:
        import diffusers
        from diffusers.models.embeddings import apply_rotary_emb
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError(
            "tokenring.integrations.diffusers needs diffusers: "
            "pip install 'tokenring-attention[diffusers]'"
        ) from None
    return diffusers, apply_rotary_emb


@dataclass
class _Call:
    """What the hooks learn about the forward call in progress: the text tokens' length,
    and the image tokens' (global, before sharding: what shards of unequal length need)."""

    text_len: int = 0
    image_len: int | None = None


@dataclass
class DiffusersHandle:
    """What ``enable`` did to one transformer; ``disable()`` undoes it."""

    transformer: Any
    previous: dict
    hooks: list = field(default_factory=list)
    active: bool = True

    def disable(self) -> None:
        """Remove the hooks and give the transformer back its attention processors."""
        if self.active:
            for hook in self.hooks:
                hook.remove()
            self.transformer.set_attn_processor(self.previous)
            self.active = False


class _Share(torch.autograd.Function):
    """Identity forward; backward divides by the group size. Put where replicated
    tensors are sharded: ``shard``'s backward hands every rank the whole gradient, and
    the parameters before that point (SD3's patch embedding) would count it once per
    rank; divided, every rank's gradients are shares that sum to the model's."""

    @staticmethod
    def forward(ctx, x, world):
        ctx.world = world
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad / ctx.world, None


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    return x.unflatten(-1, (-1, head_dim))  # [B, L, H * D] -> [B, L, H, D]


class _JointProcessor:
    """An attention processor for Flux and SD3 attention modules: their projections and
    norms (and Flux's rotary embedding), then tokenring with the text tokens joint."""

    def __init__(self, options: Options, where: dict, call: _Call, text_first: bool,
                 apply_rotary):  # fmt: skip
        self.options, self.where, self.call, self.text_first = options, where, call, text_first
        self.apply_rotary = apply_rotary

    def _attend(self, q, k, v, joint=(None, None, None), side: str = "none"):
        """tokenring over the image tokens of this forward, the text ones joint."""
        options = replace(self.options, joint_strategy=side, seq_len=self.call.image_len)
        return run(q, k, v, joint, options.values(), recorder=None, return_lse=False,
                   **self.where)  # fmt: skip

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
        if encoder_hidden_states is not None:  # a dual-stream block: text projections
            projections = (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
            text = [_heads(f(encoder_hidden_states), d) for f in projections]
            if attn.norm_added_q is not None:
                text[0], text[1] = attn.norm_added_q(text[0]), attn.norm_added_k(text[1])
            text_len = encoder_hidden_states.shape[1]
        elif self.text_first and self.call.text_len:  # Flux single-stream: [text; image] in
            n = self.call.text_len
            text, (q, k, v) = [t[:, :n] for t in (q, k, v)], [t[:, n:] for t in (q, k, v)]
            text_len = n
        if image_rotary_emb is not None:  # Flux: positions of [text; local image tokens]
            whole = [q, k, v] if not text else [torch.cat(p, dim=1) for p in zip(text, (q, k, v))]
            whole[0] = self.apply_rotary(whole[0], image_rotary_emb, sequence_dim=1)
            whole[1] = self.apply_rotary(whole[1], image_rotary_emb, sequence_dim=1)
            if text:
                text = [w[:, :text_len] for w in whole]
                q, k, v = (w[:, text_len:] for w in whole)
            else:
                q, k, v = whole
        if text is None:
            out = self._attend(q, k, v).flatten(2, 3).to(q.dtype)
            return self._image_out(attn, out)
        wants_text = encoder_hidden_states is None or not getattr(attn, "context_pre_only", False)
        joint = (text[0] if wants_text else None, text[1], text[2])
        result = self._attend(q, k, v, joint, "front" if self.text_first else "rear")
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


def enable(
    transformer,
    *,
    mesh: object = None,
    group: dist.ProcessGroup | None = None,
    strategy: str = "usp",
    ring_impl: str = "tokenring",
) -> DiffusersHandle:
    """Make ``transformer`` (a Flux or SD3 MM-DiT) sequence-parallel inside its forward,
    over ``mesh`` (``strategy="usp"``, ``tokenring.sp_mesh``) or ``group`` (any other
    strategy); returns a handle whose ``disable()`` undoes it."""
    _, apply_rotary = _diffusers()
    kind = type(transformer).__name__
    if kind not in SUPPORTED_MODELS:
        raise ValueError(
            f"tokenring's diffusers integration supports {', '.join(SUPPORTED_MODELS)}; got {kind}"
        )
    if strategy == "usp":
        if mesh is None:
            raise ValueError(
                "strategy='usp' needs mesh= (tokenring.sp_mesh(ulysses=..., ring=...))"
            )
        where = {"mesh": mesh, "group": None}
        options = Options.checked(strategy="usp", ring_impl=ring_impl, layout=LAYOUT)
    else:
        where = {"group": group, "mesh": None}
        options = Options.checked(strategy=strategy, layout=LAYOUT)
    world = sharded_over(group, mesh)
    if kind in PLANNED_MODELS:
        version = _diffusers()[0].__version__
        if not version.startswith(TESTED_DIFFUSERS):
            warnings.warn(
                f"tokenring: diffusers {version} is not one the {kind} path was tested with "
                f"({', '.join(v + 'x' for v in TESTED_DIFFUSERS)}); it reads the model's "
                "_cp_plan and its attention processor's arguments (docs/architecture.md)",
                stacklevel=2,
            )
        return _enable_planned(transformer, PLANNED_MODELS[kind](transformer), options, where,
                               world)  # fmt: skip
    call = _Call()
    flux = kind == "FluxTransformer2DModel"
    processor = _JointProcessor(options, where, call, text_first=flux, apply_rotary=apply_rotary)
    previous = dict(transformer.attn_processors)
    transformer.set_attn_processor(processor)

    def mine(x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        return shard(_Share.apply(x, world), layout=LAYOUT, dim=dim, **where)

    def image(x: torch.Tensor) -> torch.Tensor:
        """The image tokens, sharded: their global length is this forward's."""
        call.image_len = x.shape[1]
        return mine(x)

    def whole(x: torch.Tensor) -> torch.Tensor:
        return unshard(x, layout=LAYOUT, dim=1, seq_len=call.image_len, **where)

    hooks = []
    if flux:
        signature = inspect.signature(transformer.forward)

        def before(module, args, kwargs):
            given = signature.bind(*args, **kwargs).arguments
            _refuse_extras(given)
            call.text_len = given["encoder_hidden_states"].shape[1]
            given["hidden_states"] = image(given["hidden_states"])
            img_ids = given["img_ids"]
            given["img_ids"] = mine(img_ids, dim=img_ids.dim() - 2)
            return (), given

        def after(module, args, kwargs, output):
            if isinstance(output, tuple):
                return (whole(output[0]), *output[1:])
            output.sample = whole(output.sample)
            return output

        hooks.append(transformer.register_forward_pre_hook(before, with_kwargs=True))
        hooks.append(transformer.register_forward_hook(after, with_kwargs=True))
    else:

        def check(module, args, kwargs):
            _refuse_extras(kwargs)

        hooks.append(transformer.register_forward_pre_hook(check, with_kwargs=True))
        hooks.append(transformer.pos_embed.register_forward_hook(lambda m, a, out: image(out)))
        hooks.append(transformer.proj_out.register_forward_hook(lambda m, a, out: whole(out)))
    return DiffusersHandle(transformer, previous, hooks)


def _refuse_extras(kwargs: dict) -> None:
    """What a sequence-parallel forward cannot honour yet: ControlNet residuals, extra
    attention arguments (IP-Adapter, LoRA scale)."""
    for name in ("controlnet_block_samples", "controlnet_single_block_samples",
                 "block_controlnet_hidden_states"):  # fmt: skip
        if kwargs.get(name) is not None:
            raise ValueError(f"{name}: ControlNet residuals are not supported")
    for name in ("joint_attention_kwargs", "attention_kwargs"):
        extra = kwargs.get(name) or {}
        if extra:
            raise ValueError(f"{name} {sorted(extra)} are not supported")


def _enable_planned(transformer, plan: dict, options: Options, where: dict,
                    world: int) -> DiffusersHandle:  # fmt: skip
    """Sequence parallelism from a context-parallel plan: the plan's splits and gathers
    as hooks, and each attention processor whose class has an adapter replaced on the
    modules the adapter takes."""
    state = CallState()

    def split(x: torch.Tensor, dim: int) -> torch.Tensor:
        state.seq_len = x.shape[dim]
        return shard(_Share.apply(x, world), layout=LAYOUT, dim=dim, **where)

    def gather(x: torch.Tensor, dim: int) -> torch.Tensor:
        return unshard(x, layout=LAYOUT, dim=dim, seq_len=state.seq_len, **where)

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        chosen = replace(options, seq_len=state.seq_len)
        return run(q, k, v, (None, None, None), chosen.values(), recorder=None,
                   return_lse=False, **where)  # fmt: skip

    def begin(module, args, kwargs):  # first: a fresh forward, nothing split yet
        _refuse_extras(kwargs)
        state.seq_len = None

    handles = [transformer.register_forward_pre_hook(begin, with_kwargs=True)]
    handles += apply_plan(transformer, plan, split=split, gather=gather).handles
    previous = dict(transformer.attn_processors)
    modules = dict(transformer.named_modules())
    replaced = {}
    for name, processor in previous.items():
        adapter = ADAPTERS.get(type(processor).__name__)
        module_name = name.removesuffix(".processor")
        takes = adapter is not None and adapter.applies(module_name, modules[module_name])
        replaced[name] = adapter(attend) if takes else processor
    transformer.set_attn_processor(replaced)
    return DiffusersHandle(transformer, previous, handles)
