"""tokenring inside diffusers transformers (Flux, SD3, Wan, LTX-Video, CogVideoX,
Qwen-Image, HunyuanVideo): sequence parallel inside the model's forward, undoable.

    handle = enable(transformer, mesh=tr.sp_mesh(ulysses=2, ring=2))   # every rank
    out = transformer(**inputs).sample      # the usual full inputs and full output, every rank
    handle.disable()

Every model follows a context-parallel plan (``context_plans.py``): its own ``_cp_plan``
less the entries that would split the text (Flux, Wan, LTX-Video, Qwen-Image), or the
project's in the same form (SD3, CogVideoX, HunyuanVideo). Image or video tokens and their rotary
tables are split (the contiguous layout, any count) where the plan says and gathered
from the output projection; text stays whole on every rank. Attention processors are replaced per
processor class (``diffusers_attention.py``): self-attention over the sharded tokens
through tokenring, MM-DiT joint attention with the text as joint tokens (xDiT's
semantics; every strategy's joint path: docs/algorithms.md, "Joint tokens"), and
cross-attention to the text left to the model's own processor. Everything goes
through public hooks (``register_forward_pre_hook`` / ``register_forward_hook``, and
``set_attn_processor``); ``disable()`` removes the hooks and puts the previous
processors back.

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
from .context_plans import CallState, Gather, Split, apply_plan, without_text
from .diffusers_attention import ADAPTERS, Context

__all__ = ["SUPPORTED_MODELS", "DiffusersHandle", "enable"]

SD3_PLAN = {
    "pos_embed": {0: Split(split_dim=1, expected_dims=3, split_output=True)},
    "proj_out": Gather(gather_dim=1, expected_dims=3),
}
"""SD3 has no plan of its own: its image tokens split as they leave the patch embedding
(which also adds their positions), gathered from the output projection."""

COGVIDEOX_PLAN = {
    "transformer_blocks.0": {"hidden_states": Split(split_dim=1, expected_dims=3)},
    "transformer_blocks.*": {"image_rotary_emb": Split(split_dim=0, expected_dims=2)},
    "proj_out": Gather(gather_dim=1, expected_dims=3),
}
"""CogVideoX has no plan of its own, and splits its patch embedding's ``[text; video]``
inside its forward: its video tokens split as they enter the first block, the rotary
tables (handed to every block) split at each, the output projection gathered."""


HUNYUAN_VIDEO_PLAN = {
    "x_embedder": {0: Split(split_dim=1, expected_dims=3, split_output=True)},
    "rope": {i: Split(split_dim=0, expected_dims=2, split_output=True) for i in (0, 1)},
    "proj_out": Gather(gather_dim=1, expected_dims=3),
}
"""HunyuanVideo has no plan of its own: its video tokens split as they leave the patch
embedding, its rotary tables (cosine, sine) as they leave the rope, the output
projection gathered. Its attention mask, which it builds from the (then local) latent
length, keeps the text's padding right: the adapter reads only its text columns."""


def _qwen_plan(model) -> dict:
    """Qwen-Image's own plan less its text entries, and less the split of its rotary
    embedding's second output (the text's table, which stays whole with the text)."""
    plan = without_text(model._cp_plan)
    plan["pos_embed"] = {i: e for i, e in plan["pos_embed"].items() if i != 1}
    return plan


PLANS: dict[str, Callable[[Any], dict]] = {
    "FluxTransformer2DModel": lambda model: without_text(model._cp_plan),
    "SD3Transformer2DModel": lambda model: SD3_PLAN,
    "WanTransformer3DModel": lambda model: without_text(model._cp_plan),
    "LTXVideoTransformer3DModel": lambda model: without_text(model._cp_plan),
    "CogVideoXTransformer3DModel": lambda model: COGVIDEOX_PLAN,
    "QwenImageTransformer2DModel": _qwen_plan,
    "HunyuanVideoTransformer3DModel": lambda model: HUNYUAN_VIDEO_PLAN,
}
"""Model class name -> its context-parallel plan (``context_plans.py``): the model's own
``_cp_plan`` less the entries that would split text, or the project's in that form; the
attention processors are replaced per class (``diffusers_attention.py``)."""

SUPPORTED_MODELS = tuple(PLANS)

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


def enable(
    transformer,
    *,
    mesh: object = None,
    group: dist.ProcessGroup | None = None,
    strategy: str = "usp",
    ring_impl: str = "tokenring",
) -> DiffusersHandle:
    """Make ``transformer`` (one of ``SUPPORTED_MODELS``) sequence-parallel inside its
    forward, over ``mesh`` (``strategy="usp"``, ``tokenring.sp_mesh``) or ``group`` (any
    other strategy); returns a handle whose ``disable()`` undoes it."""
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
        if mesh is not None:
            raise ValueError(f"mesh= is for strategy='usp'; strategy {strategy!r} takes group=")
        where = {"group": group, "mesh": None}
        options = Options.checked(strategy=strategy, layout=LAYOUT)
    world = sharded_over(group, mesh)
    version = _diffusers()[0].__version__
    if not version.startswith(TESTED_DIFFUSERS):
        warnings.warn(
            f"tokenring: diffusers {version} is not one the {kind} path was tested with "
            f"({', '.join(v + 'x' for v in TESTED_DIFFUSERS)}); it reads the model's "
            "context-parallel plan and its attention processors' arguments "
            "(docs/architecture.md)",
            stacklevel=2,
        )
    return _enable_planned(transformer, PLANS[kind](transformer), options, where, world,
                           apply_rotary)  # fmt: skip


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


def _enable_planned(transformer, plan: dict, options: Options, where: dict, world: int,
                    apply_rotary) -> DiffusersHandle:  # fmt: skip
    """Sequence parallelism from a context-parallel plan: the plan's splits and gathers
    as hooks, and each attention processor whose class has an adapter replaced on the
    modules the adapter takes."""
    state = CallState()
    signature = inspect.signature(transformer.forward)

    def split(x: torch.Tensor, dim: int) -> torch.Tensor:
        state.seq_len = x.shape[dim]
        return shard(_Share.apply(x, world), layout=LAYOUT, dim=dim, **where)

    def gather(x: torch.Tensor, dim: int) -> torch.Tensor:
        return unshard(x, layout=LAYOUT, dim=dim, seq_len=state.seq_len, **where)

    def attend(q, k, v, joint=(None, None, None), side: str = "none", joint_mask=None):
        chosen = replace(options, seq_len=state.seq_len, joint_strategy=side)
        return run(q, k, v, joint, chosen.values(), recorder=None, return_lse=False,
                   joint_mask=joint_mask, **where)  # fmt: skip

    def begin(module, args, kwargs):  # first: a fresh forward, nothing split yet
        given = signature.bind_partial(*args, **kwargs).arguments
        _refuse_extras(given)
        text = given.get("encoder_hidden_states")
        state.seq_len, state.text_len = None, text.shape[1] if text is not None else 0

    handles = [transformer.register_forward_pre_hook(begin, with_kwargs=True)]
    handles += apply_plan(transformer, plan, split=split, gather=gather)
    previous = dict(transformer.attn_processors)
    modules = dict(transformer.named_modules())
    context = Context(attend, state, apply_rotary)
    replaced = {}
    for name, processor in previous.items():
        make, applies = ADAPTERS.get(type(processor).__name__, (None, None))
        module_name = name.removesuffix(".processor")
        takes = make is not None and applies(module_name, modules[module_name])
        replaced[name] = make(context) if takes else processor
    transformer.set_attn_processor(replaced)
    return DiffusersHandle(transformer, previous, handles)
