"""Input checks that fail the same way on every rank.

Each rank first checks its own inputs and records the first problem as a
message instead of raising. The ranks then exchange a small description of
their inputs (once per distinct description and group) and every rank
raises the same ``ValueError``: the first rank's own problem, or the first
difference between ranks. Raising on one rank only would leave the others
waiting in a transfer that never comes. See docs/errors.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from enum import Enum

import torch

from ..options import AUTO, JointStrategy, Layout, RingImpl, Strategy
from ..schedules import STRATEGIES, CallShape

__all__ = ["FIELDS", "CallInfo", "check_local", "strategy_problem", "with_problem"]


@dataclass(frozen=True)
class CallInfo:
    """What every rank must agree on for one call (plus this rank's own problem, if any)."""

    batch: int
    length: int
    heads_q: int
    heads_kv: int
    head_dim: int
    dtype: str
    device_type: str
    causal: bool
    layout: str
    strategy: str
    ring_impl: str
    kernel: str
    scale: float | None
    joint: str  # the joint tensors' shapes and where they go, or "none"
    problem: str = ""

    def agreement_key(self) -> tuple:
        return tuple(getattr(self, f) for f in FIELDS)


FIELDS = tuple(f.name for f in fields(CallInfo) if f.name != "problem")


def _shape_problem(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            return f"{name} must be a torch.Tensor, got {type(t).__name__}"
        if t.dim() != 4:
            return (
                f"{name} must be 4-D [batch, seq_local, heads, head_dim], "
                f"got shape {tuple(t.shape)}"
            )
        if not t.is_floating_point():
            return f"{name} must be a floating-point tensor, got {t.dtype}"
        if t.stride(-1) != 1:
            return f"{name} must have unit stride in head_dim (last dim), got strides {t.stride()}"
    if k.dtype != q.dtype or v.dtype != q.dtype:
        return f"q, k, v dtypes differ: q {q.dtype}, k {k.dtype}, v {v.dtype}"
    if k.device != q.device or v.device != q.device:
        return f"q, k, v devices differ: q {q.device}, k {k.device}, v {v.device}"
    if k.shape[:3] != v.shape[:3]:
        return f"k and v shapes differ: k {tuple(k.shape)}, v {tuple(v.shape)}"
    if k.shape[0] != q.shape[0]:
        return f"batch sizes differ: q {q.shape[0]}, k {k.shape[0]}"
    if k.shape[1] != q.shape[1]:
        return f"local sequence lengths differ: q {q.shape[1]}, k {k.shape[1]}"
    if q.shape[3] != k.shape[3]:
        return f"head_dim mismatch: q has {q.shape[3]}, k has {k.shape[3]}"
    if v.shape[3] != q.shape[3]:
        return f"head_dim mismatch: q has {q.shape[3]}, v has {v.shape[3]}"
    if k.shape[2] == 0:
        return f"k must not be empty, got shape {tuple(k.shape)}"
    if q.shape[2] % k.shape[2]:
        return f"heads_q ({q.shape[2]}) must be a multiple of heads_kv ({k.shape[2]})"
    if q.shape[0] == 0 or q.shape[2] == 0 or q.shape[3] == 0:
        return f"q must not be empty, got shape {tuple(q.shape)}"
    if q.shape[1] == 0:
        return "the local sequence is empty (seq_local == 0)"
    return ""


def _enum_problem(kind: type[Enum], value: object, argument: str, also: tuple = ()) -> str:
    if isinstance(value, kind) or value in [m.value for m in kind]:
        return ""
    valid = ", ".join([repr(m.value) for m in kind] + [repr(a) for a in also])
    return f"unknown {argument} {value!r}; valid values are {valid}"


def _name(value: object) -> str:
    return value.value if isinstance(value, Enum) else str(value)


def strategy_problem(strategy: Strategy, shape: CallShape) -> str:
    """Why ``strategy`` cannot run ``shape`` (every reason), or "" if it can."""
    reasons = STRATEGIES[strategy].not_supported_reasons(shape)
    if not reasons:
        return ""
    where = (
        f"a mesh of {shape.world // shape.ulysses} x {shape.ulysses} (ring x ulysses)"
        if strategy is Strategy.USP
        else f"{shape.world} ranks"
    )
    return (
        f"strategy {strategy.value!r} cannot run heads {shape.heads_q}/{shape.heads_kv} "
        f"over {where}: " + "; ".join(reasons)
    )


def _joint_problem(
    q: torch.Tensor, k: torch.Tensor, joint: tuple, joint_strategy: object, causal: object
) -> str:
    """The first thing wrong with the joint tensors ``(joint_q, joint_k, joint_v)``."""
    jq, jk, jv = joint
    strategy = _name(joint_strategy)
    given = [n for n, t in zip(("joint_q", "joint_k", "joint_v"), joint) if t is not None]
    if not given:
        if strategy != JointStrategy.NONE.value:
            return f"joint_strategy={strategy!r} needs joint_k and joint_v (joint_q optional)"
        return ""
    if strategy == JointStrategy.NONE.value:
        return (
            f"{', '.join(given)} given with joint_strategy='none'; say where the joint "
            "tokens go: joint_strategy='front' or 'rear'"
        )
    if causal is True:
        return "joint tokens need causal=False (joint attention has no mask), got causal=True"
    if jk is None or jv is None:
        return "joint_k and joint_v must be given together (joint_q is optional)"
    for name, t in zip(("joint_q", "joint_k", "joint_v"), joint):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            return f"{name} must be a 4-D tensor [batch, joint_len, heads, head_dim], got {shape}"
        if t.dtype != q.dtype or t.device != q.device:
            return (
                f"{name} must match q's dtype and device ({q.dtype}, {q.device}), "
                f"got {t.dtype}, {t.device}"
            )
        if t.stride(-1) != 1:
            return f"{name} must have unit stride in head_dim (last dim), got strides {t.stride()}"
    if jk.shape != jv.shape:
        return f"joint_k and joint_v shapes differ: {tuple(jk.shape)}, {tuple(jv.shape)}"
    want_kv = (q.shape[0], jk.shape[1], k.shape[2], q.shape[3])
    if jk.shape[1] == 0 or tuple(jk.shape) != want_kv:
        return (
            f"joint_k must be [batch, joint_len > 0, heads_kv, head_dim] = "
            f"[{q.shape[0]}, J, {k.shape[2]}, {q.shape[3]}], got {tuple(jk.shape)}"
        )
    if jq is not None and tuple(jq.shape) != (q.shape[0], jk.shape[1], q.shape[2], q.shape[3]):
        return (
            f"joint_q must be [batch, joint_len, heads_q, head_dim] = "
            f"[{q.shape[0]}, {jk.shape[1]}, {q.shape[2]}, {q.shape[3]}], got {tuple(jq.shape)}"
        )
    return ""


def _joint_description(joint: tuple, joint_strategy: object) -> str:
    shapes = [
        f"{name}{tuple(t.shape)}"
        for name, t in zip(("joint_q", "joint_k", "joint_v"), joint)
        if isinstance(t, torch.Tensor)
    ]
    return f"{_name(joint_strategy)}: " + ", ".join(shapes) if shapes else _name(joint_strategy)


def check_local(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: object,
    layout: object,
    strategy: object,
    ring_impl: object,
    kernel: object,
    scale: object,
    world: int,
    ulysses: int = 1,
    joint: tuple = (None, None, None),
    joint_strategy: object = "none",
) -> CallInfo:
    """Describe this rank's call; ``problem`` holds the first thing wrong with it, if any."""
    shape_problem = _shape_problem(q, k, v)
    shapes_ok = not shape_problem
    candidates = [
        shape_problem,
        "" if isinstance(causal, bool) else f"causal must be a bool, got {causal!r}",
        _enum_problem(Layout, layout, "layout"),
        _enum_problem(Strategy, strategy, "strategy", also=(AUTO,)),
        _enum_problem(RingImpl, ring_impl, "ring_impl"),
        _enum_problem(JointStrategy, joint_strategy, "joint_strategy"),
        ""
        if scale is None
        or (
            isinstance(scale, (int, float)) and not isinstance(scale, bool) and math.isfinite(scale)
        )
        else f"softmax_scale must be a finite number or None, got {scale!r}",
    ]
    if shapes_ok and _name(layout) == Layout.ZIGZAG.value and q.shape[1] % 2:
        candidates.append(
            "the zigzag layout needs an even local sequence length (two chunks per rank), "
            f"got seq_local={q.shape[1]}; shard a sequence divisible by 2 * world_size"
        )
    problem = next((p for p in candidates if p), "")
    if not problem:
        problem = _joint_problem(q, k, joint, joint_strategy, causal)
    if not problem:
        shape = CallShape(
            world, Layout(_name(layout)), causal, q.shape[2], k.shape[2], q.shape[1], ulysses
        )
        problem = strategy_problem(Strategy(_name(strategy)), shape)
    return CallInfo(
        batch=q.shape[0] if shapes_ok else -1,
        length=q.shape[1] if shapes_ok else -1,
        heads_q=q.shape[2] if shapes_ok else -1,
        heads_kv=k.shape[2] if shapes_ok else -1,
        head_dim=q.shape[3] if shapes_ok else -1,
        dtype=str(q.dtype).removeprefix("torch.") if shapes_ok else "?",
        device_type=q.device.type if shapes_ok else "?",
        causal=bool(causal) if isinstance(causal, bool) else False,
        layout=_name(layout),
        strategy=_name(strategy),
        ring_impl=_name(ring_impl),
        kernel=str(kernel),
        scale=float(scale) if isinstance(scale, (int, float)) else None,
        joint=_joint_description(joint, joint_strategy),
        problem=problem,
    )


def with_problem(info: CallInfo, problem: str) -> CallInfo:
    """``info`` with ``problem`` recorded, unless it already has one."""
    return info if info.problem else replace(info, problem=problem)
