"""A rank's call, described and checked without raising.

``describe`` turns this rank's tensors and options into a ``CallDescription``
and the list of every problem it finds (shapes, dtypes, strides, a shard
that does not follow the layout, joint tensors, a strategy that cannot run
the call). Nothing is raised here: the ranks first agree
(``runtime.agreement``), so that every rank raises the same ``ValueError``;
raising on one rank alone would leave the others waiting in a transfer that
never comes. See docs/errors.md.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..options import JointStrategy, Layout, Pass, Strategy
from ..schedules import STRATEGIES
from ..schedules.geometry import local_lengths
from .description import AUTO, CallDescription, JointShape, Options

__all__ = ["describe", "refusals", "sink_problems", "strategy_problem", "strategy_refusals"]


def _tensor_problems(q, k, v) -> list[str]:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            return [f"{name} must be a torch.Tensor, got {type(t).__name__}"]
        if t.dim() != 4:
            return [
                f"{name} must be 4-D [batch, seq_local, heads, head_dim], got shape "
                f"{tuple(t.shape)}"
            ]
    problems = []
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not t.is_floating_point():
            problems.append(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.stride(-1) != 1 and t.numel():
            problems.append(
                f"{name} must have unit stride in head_dim (last dim), got strides {t.stride()}"
            )
    if k.dtype != q.dtype or v.dtype != q.dtype:
        problems.append(f"q, k, v dtypes differ: q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if k.device != q.device or v.device != q.device:
        problems.append(f"q, k, v devices differ: q {q.device}, k {k.device}, v {v.device}")
    if k.shape[:3] != v.shape[:3]:
        problems.append(f"k and v shapes differ: k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[0] != q.shape[0]:
        problems.append(f"batch sizes differ: q {q.shape[0]}, k {k.shape[0]}")
    if k.shape[1] != q.shape[1]:
        problems.append(f"local sequence lengths differ: q {q.shape[1]}, k {k.shape[1]}")
    if q.shape[3] != k.shape[3]:
        problems.append(f"head_dim mismatch: q has {q.shape[3]}, k has {k.shape[3]}")
    if v.shape[3] != q.shape[3]:
        problems.append(f"head_dim mismatch: q has {q.shape[3]}, v has {v.shape[3]}")
    if k.shape[2] == 0:
        problems.append(f"k must not be empty, got shape {tuple(k.shape)}")
    elif q.shape[2] % k.shape[2]:
        problems.append(f"heads_q ({q.shape[2]}) must be a multiple of heads_kv ({k.shape[2]})")
    if q.shape[0] == 0 or q.shape[2] == 0 or q.shape[3] == 0:
        problems.append(f"q must not be empty, got shape {tuple(q.shape)}")
    return problems


def _joint_mask_problems(joint_mask: object, jk: object) -> list[str]:
    """What is wrong with ``joint_mask`` for joint keys ``jk`` (``[B, J, H, D]``)."""
    if joint_mask is None:
        return []
    if not isinstance(jk, torch.Tensor) or jk.dim() != 4:
        return ["joint_mask is for joint tokens: give joint_k and joint_v with it"]
    want = (jk.shape[0], jk.shape[1])
    if not isinstance(joint_mask, torch.Tensor) or joint_mask.dtype != torch.bool:
        return [f"joint_mask must be a bool tensor [batch, joint_len] = {list(want)}, "
                f"got {type(joint_mask).__name__}"]  # fmt: skip
    problems = []
    if tuple(joint_mask.shape) != want:
        problems.append(f"joint_mask must be [batch, joint_len] = {list(want)}, "
                        f"got {tuple(joint_mask.shape)}")  # fmt: skip
    if joint_mask.device != jk.device:
        problems.append(f"joint_mask must be on joint_k's device ({jk.device}), got "
                        f"{joint_mask.device}")  # fmt: skip
    return problems


def _joint_problems(q, k, joint: tuple, options: Options) -> list[str]:
    """What is wrong with the joint tensors ``(joint_q, joint_k, joint_v)``."""
    jq, jk, jv = joint
    side = options.joint_strategy
    given = [n for n, t in zip(("joint_q", "joint_k", "joint_v"), joint) if t is not None]
    if not given:
        if side is not JointStrategy.NONE:
            return [f"joint_strategy={side.value!r} needs joint_k and joint_v (joint_q optional)"]
        return []
    if side is JointStrategy.NONE:
        return [
            f"{', '.join(given)} given with joint_strategy='none'; say where the joint "
            "tokens go: joint_strategy='front' or 'rear'"
        ]
    if options.causal:
        return ["joint tokens need causal=False (joint attention has no mask), got causal=True"]
    if not options.mask.plain:
        return ["joint tokens take no cu_seqlens or window_size (for now)"]
    if jk is None or jv is None:
        return ["joint_k and joint_v must be given together (joint_q is optional)"]
    problems = []
    for name, t in zip(("joint_q", "joint_k", "joint_v"), joint):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            return [f"{name} must be a 4-D tensor [batch, joint_len, heads, head_dim], got {shape}"]
        if t.dtype != q.dtype or t.device != q.device:
            problems.append(
                f"{name} must match q's dtype and device ({q.dtype}, {q.device}), "
                f"got {t.dtype}, {t.device}"
            )
        if t.stride(-1) != 1:
            problems.append(
                f"{name} must have unit stride in head_dim (last dim), got strides {t.stride()}"
            )
    if jk.shape != jv.shape:
        problems.append(f"joint_k and joint_v shapes differ: {tuple(jk.shape)}, {tuple(jv.shape)}")
    want_kv = (q.shape[0], jk.shape[1], k.shape[2], q.shape[3])
    if jk.shape[1] == 0 or tuple(jk.shape) != want_kv:
        problems.append(
            f"joint_k must be [batch, joint_len > 0, heads_kv, head_dim] = "
            f"[{q.shape[0]}, J, {k.shape[2]}, {q.shape[3]}], got {tuple(jk.shape)}"
        )
    if jq is not None and tuple(jq.shape) != (q.shape[0], jk.shape[1], q.shape[2], q.shape[3]):
        problems.append(
            f"joint_q must be [batch, joint_len, heads_q, head_dim] = "
            f"[{q.shape[0]}, {jk.shape[1]}, {q.shape[2]}, {q.shape[3]}], got {tuple(jq.shape)}"
        )
    return problems


def _where(description: CallDescription) -> str:
    if description.strategy is Strategy.USP:
        u = description.ulysses
        return f"a mesh of {description.world // u} x {u} (ring x ulysses)"
    return f"{description.world} ranks"


def refusals(call: CallDescription) -> list[str]:
    """What the call's strategy declares it cannot do with this call (its schedule key)."""
    return STRATEGIES[call.strategy].not_supported_reasons(call.schedule_key(0, Pass.FORWARD))


def strategy_problem(description: CallDescription) -> str:
    """Why the call's strategy cannot run it (every reason), or "" if it can."""
    reasons = refusals(description)
    if not reasons:
        return ""
    return (
        f"strategy {description.strategy.value!r} cannot run heads {description.heads_q}/"
        f"{description.heads_kv} over {_where(description)}: " + "; ".join(reasons)
    )


def strategy_refusals(
    strategy: Strategy, *, world: int, layout: Layout, causal: bool, heads_q: int,
    heads_kv: int, seq_len: int, ulysses: int = 1,
) -> list[str]:  # fmt: skip
    """Why ``strategy`` cannot run a call of these shapes (empty if it can): what a tool
    asks before running it (the demo, the benchmark)."""
    options = Options(strategy=strategy, layout=layout, causal=causal, seq_len=seq_len)
    return refusals(
        CallDescription(options, 1, heads_q, heads_kv, 1, torch.float32, "cpu", world, ulysses)
    )


def sink_problems(sinks: object, q: object, joint_k: object = None) -> list[str]:
    """What is wrong with ``sinks`` for queries ``q`` (``[B, L, heads_q, D]``), with joint
    keys ``joint_k`` or none."""
    if sinks is None:
        return []
    if joint_k is not None:
        return ["joint tokens take no sinks (for now)"]
    if not isinstance(sinks, torch.Tensor) or not sinks.is_floating_point():
        what = sinks.dtype if isinstance(sinks, torch.Tensor) else type(sinks).__name__
        return [f"sinks must be a floating-point tensor [heads_q], got {what}"]
    heads = q.shape[2] if isinstance(q, torch.Tensor) and q.dim() == 4 else None
    if sinks.dim() != 1 or (heads is not None and sinks.shape[0] != heads):
        return [f"sinks must be [heads_q] = [{heads}], got shape {tuple(sinks.shape)}"]
    if isinstance(q, torch.Tensor) and sinks.device != q.device:
        return [f"sinks must be on q's device ({q.device}), got {sinks.device}"]
    return []


def _length_problem(options: Options, length: int, world: int, rank: int) -> str:
    """Whether this rank's shard follows the layout of the global length."""
    if options.seq_len is None:
        if length:
            return ""
        return (
            "the local sequence is empty (seq_local == 0), and no seq_len says the whole one is not"
        )
    expected = local_lengths(options.layout, options.seq_len, world, options.cu_seqlens)
    if length == expected[rank]:
        return ""
    packed = " with these cu_seqlens" if options.cu_seqlens else ""
    return (
        f"q has {length} tokens, but the {options.layout.value} layout of seq_len="
        f"{options.seq_len} tokens{packed} over {world} ranks gives rank {rank} "
        f"{expected[rank]} (every rank: {', '.join(map(str, expected))}); shard with "
        "tokenring.shard" + (" and the same cu_seqlens" if options.cu_seqlens else "")
    )


def describe(
    q, k, v, joint: tuple, options: Options, option_problems: tuple[str, ...], *,
    world: int, rank: int, ulysses: int = 1, wants_grad: bool = False, sinks=None,
    joint_mask=None,
) -> tuple[CallDescription, tuple[str, ...]]:  # fmt: skip
    """This rank's call as a description, and every problem found (``option_problems``:
    what ``Options.parse`` found). ``rank``: this rank's place in the layout (logical
    rank ``r * ulysses + u`` on a mesh). Without ``options.seq_len`` every rank is taken
    to hold as many tokens as this one (the agreement then finds ranks that do not)."""
    problems = list(option_problems)
    tensor_problems = _tensor_problems(q, k, v)
    problems += tensor_problems
    shapes_ok = not tensor_problems or all(
        isinstance(t, torch.Tensor) and t.dim() == 4 for t in (q, k, v)
    )
    if shapes_ok:
        length = q.shape[1]
        problems += _joint_problems(q, k, joint, options)
        problems += _joint_mask_problems(joint_mask, joint[1])
        problems += sink_problems(sinks, q, joint[1])
        problems.append(_length_problem(options, length, world, rank))
        seq_len = options.seq_len if options.seq_len is not None else world * length
        jk, jq = joint[1], joint[0]
        joint_shape = None
        if isinstance(jk, torch.Tensor) and jk.dim() == 4:
            joint_shape = JointShape(
                options.joint_strategy, jk.shape[1], jq is not None, joint_mask is not None
            )
        description = CallDescription(
            options=replace(options, seq_len=seq_len),
            batch=q.shape[0],
            heads_q=q.shape[2],
            heads_kv=k.shape[2],
            head_dim=q.shape[3],
            dtype=q.dtype,
            device_type=q.device.type,
            world=world,
            ulysses=ulysses,
            joint=joint_shape,
            wants_grad=wants_grad,
            sinks=sinks is not None,
        )
    else:
        description = CallDescription(
            options, -1, -1, -1, -1, torch.float32, "?", world, ulysses, None, wants_grad
        )
    problems = [p for p in problems if p]
    if not problems and options.strategy != AUTO:
        problems = [p for p in (strategy_problem(description),) if p]
    return description, tuple(problems)
