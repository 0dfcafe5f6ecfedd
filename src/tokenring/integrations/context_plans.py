"""Where a diffusers transformer's tokens are split over the ranks and gathered back,
read from a *context-parallel plan*: diffusers' own ``_cp_plan`` format, as its
models declare it, or the project's plans in the same form.

A plan maps a module's name (``""``: the model itself; ``*`` matches one name in a
path, as in ``blocks.*``) to either

- inputs to split before the module runs: ``{name or index: entry}`` with entries that
  have ``split_dim``, ``expected_dims`` and ``split_output`` (diffusers'
  ``ContextParallelInput``): an argument by name (``split_output=False``) or an item of
  the module's output by index (``split_output=True``, e.g. a rotary table computed
  from the whole input);
- or outputs to gather after it: an entry with ``gather_dim`` and ``expected_dims``
  (``ContextParallelOutput``), or a list of them, one per output item.

A tensor whose dimension count differs from ``expected_dims`` is left alone (a
timestep that is per sample, not per token). Splitting is ``tokenring.shard`` in the
contiguous layout, so any token count works (the remainder rule: ranks hold at most one
token more than others), and gathering is ``tokenring.unshard`` with the global count
this forward split. The entries are read by their attributes, so the plan classes
themselves are never imported. Everything runs in forward hooks
(``register_forward_pre_hook``/``register_forward_hook``): public, and removed by the
handles ``apply_plan`` returns.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "TEXT_INPUTS",
    "CallState",
    "Gather",
    "Split",
    "apply_plan",
    "plan_modules",
    "without_text",
]


@dataclass
class CallState:
    """What one forward learns: the split tokens' global count (every split of a forward
    cuts the same tokens: image or video tokens and their rotary tables), and the text's
    length (what joint attention cuts from a ``[text; image]`` sequence)."""

    seq_len: int | None = None
    text_len: int = 0


@dataclass(frozen=True)
class Split:
    """The project's plans' input entry, in diffusers' ``ContextParallelInput`` form."""

    split_dim: int
    expected_dims: int | None = None
    split_output: bool = False


@dataclass(frozen=True)
class Gather:
    """The project's plans' output entry, in diffusers' ``ContextParallelOutput`` form."""

    gather_dim: int
    expected_dims: int | None = None


def plan_modules(model: torch.nn.Module, name: str) -> list[torch.nn.Module]:
    """The modules ``name`` denotes: the model for ``""``, else every submodule whose
    dotted name matches (``*`` for one name, never a dot: ``blocks.*`` is each block,
    not their parts; a plan entry for a missing module is an error, not silence)."""
    if name == "":
        return [model]
    pattern = re.compile(re.escape(name).replace(r"\*", r"[^.]+") + r"\Z")
    found = [m for n, m in model.named_modules() if n and pattern.match(n)]
    if not found:
        raise ValueError(f"context-parallel plan: {type(model).__name__} has no module {name!r}")
    return found


TEXT_INPUTS = frozenset(
    {"encoder_hidden_states", "encoder_attention_mask", "encoder_hidden_states_mask", "txt_ids"}
)
"""Arguments that carry text (its embeddings, padding mask, positions): a diffusers plan
may split them (Flux, Qwen-Image, LTX); tokenring keeps text whole on every rank."""


def without_text(plan: dict[str, Any]) -> dict[str, Any]:
    """``plan`` with every split of a text argument (``TEXT_INPUTS``) dropped: text stays
    whole on every rank, where joint and cross-attention take it."""
    kept = {}
    for name, entry in plan.items():
        if isinstance(entry, dict):
            entry = {k: v for k, v in entry.items() if k not in TEXT_INPUTS}
            if not entry:
                continue
        kept[name] = entry
    return kept


def _is_output_entry(entry: Any) -> bool:
    items = entry if isinstance(entry, (list, tuple)) else [entry]
    return all(hasattr(e, "gather_dim") for e in items)


def apply_plan(
    model: torch.nn.Module,
    plan: dict[str, Any],
    *,
    split: Callable[[torch.Tensor, int], torch.Tensor],
    gather: Callable[[torch.Tensor, int], torch.Tensor],
) -> list:
    """Install ``plan`` on ``model``: ``split(x, dim)`` gives this rank's part of ``x``,
    ``gather(x, dim)`` the whole again (the caller's, which record the global token
    count in a ``CallState`` and read it back). Returns the hooks' handles (``remove()``
    each to undo)."""
    handles: list = []
    for name, entry in plan.items():
        for module in plan_modules(model, name):
            if _is_output_entry(entry):
                handles.append(module.register_forward_hook(_gatherer(entry, gather)))
                continue
            by_name = {k: v for k, v in entry.items() if not getattr(v, "split_output", False)}
            by_index = {k: v for k, v in entry.items() if getattr(v, "split_output", False)}
            if by_name:
                hook = _input_splitter(module, by_name, split)
                handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
            if by_index:
                handles.append(module.register_forward_hook(_output_splitter(by_index, split)))
    return handles


def _fits(x: Any, entry: Any) -> bool:
    """Whether ``entry`` applies to ``x``: a tensor of the expected dimension count, or a
    tuple of them (a rotary table's cosine and sine), each split alike."""
    if isinstance(x, (tuple, list)):
        return bool(x) and all(_fits(item, entry) for item in x)
    expected = getattr(entry, "expected_dims", None)
    return isinstance(x, torch.Tensor) and (expected is None or x.dim() == expected)


def _each(split: Callable, x: Any, dim: int) -> Any:
    """``split`` of a tensor, or of every tensor of a tuple."""
    if isinstance(x, (tuple, list)):
        return type(x)(split(item, dim) for item in x)
    return split(x, dim)


def _input_splitter(module: torch.nn.Module, entries: dict, split: Callable) -> Callable:
    signature = inspect.signature(module.forward)

    def before(mod, args, kwargs):
        given = signature.bind_partial(*args, **kwargs)
        changed = False
        for name, entry in entries.items():
            x = given.arguments.get(name)
            if _fits(x, entry):
                given.arguments[name] = _each(split, x, entry.split_dim)
                changed = True
        return (given.args, given.kwargs) if changed else None

    return before


def _output_splitter(entries: dict, split: Callable) -> Callable:
    def after(mod, args, output):
        items = list(output) if isinstance(output, (tuple, list)) else [output]
        for index, entry in entries.items():
            if _fits(items[index], entry):
                items[index] = _each(split, items[index], entry.split_dim)
        return type(output)(items) if isinstance(output, (tuple, list)) else items[0]

    return after


def _gatherer(entry: Any, gather: Callable) -> Callable:
    entries = list(entry) if isinstance(entry, (list, tuple)) else [entry]

    def after(mod, args, output):
        single = not isinstance(output, (tuple, list))
        items = [output] if single else list(output)
        for index, e in enumerate(entries):
            if index < len(items) and _fits(items[index], e):
                items[index] = gather(items[index], e.gather_dim)
        return items[0] if single else type(output)(items)

    return after
