"""Preparing a call: where it runs, its description, the ranks' agreement, its plan.

Shared by eager calls (``attention.py``) and compiled ones (``compiled.py``). A
call is prepared once per kind: its options are parsed and its tensors described
(``tokenring.call``), ``auto`` is resolved, the ranks agree on the description
(``runtime.agreement``: the same error on every rank, or none), and the plan is
made or found by the description. The prepared call is then remembered under a
key of the raw arguments, so a repeated call costs a dictionary lookup.
"""

from __future__ import annotations

import torch.distributed as dist

from ..call.checks import describe, strategy_problem
from ..call.description import AUTO, OPTION_NAMES, CallDescription, Options
from ..execution.comm import Lanes, group_world
from ..execution.executor import Execution
from ..execution.joint import JointComm
from ..execution.passes import PreparedCall
from ..execution.plan import Plan, Site, choose_kernel
from ..execution.timeline import Recorder
from ..options import RingImpl, Strategy
from ..runtime import GroupRuntime, Runtime, runtime
from ..runtime.agreement import agree
from ..schedules.ir import GROUP_AXIS
from ..schedules.usp import RING_AXIS, ULYSSES_AXIS
from .auto import resolve_auto

__all__ = ["call_by_names", "prepare", "site_of", "where_call_runs"]

_CAUSAL, _SCALE, _DETERMINISTIC = (
    OPTION_NAMES.index(n) for n in ("causal", "softmax_scale", "deterministic")
)


def site_of(strategy: object, group, mesh, ring_impl: object, rt: Runtime) -> Site:
    """Resolve ``group`` (1-D strategies) or ``mesh`` (``usp``, and ``auto`` over a mesh);
    refuses a wrong pairing on the calling rank, before any communication (like a group
    this rank is not in)."""
    usp = strategy in (Strategy.USP, Strategy.USP.value) or (strategy == AUTO and mesh is not None)
    if not usp:
        if mesh is not None:
            raise ValueError(f"mesh= is for strategy='usp'; strategy {strategy!r} takes group=")
        if ring_impl not in (RingImpl.TOKENRING, RingImpl.TOKENRING.value):
            raise ValueError(f"ring_impl= is for strategy='usp', not strategy {strategy!r}")
        world, rank = group_world(group)
        if world > 1:
            rt.remember(group)
        return Site(world, rank, 1, group, {GROUP_AXIS: group})
    if group is not None:
        raise ValueError(f"strategy={strategy!r} over a mesh runs over mesh=, not group=")
    if mesh is None:
        raise ValueError(
            "strategy='usp' needs mesh=: a DeviceMesh with dims 'ring' and 'ulysses' "
            "(tokenring.sp_mesh makes one)"
        )
    sp = rt.sp_mesh(mesh)
    return Site(
        sp.size,
        sp.rank,
        sp.ulysses,
        rt.sp_group(sp.members),
        {RING_AXIS: sp.ring_group, ULYSSES_AXIS: sp.ulysses_group},
    )


def where_call_runs(rt: Runtime, strategy, group, mesh, ring_impl) -> tuple[Site, GroupRuntime]:
    """Where a call runs, and its group's state (read once per group or mesh). Meshes
    count by identity (``Runtime.meshes`` says why and keeps them alive)."""
    key = (strategy, group, None if mesh is None else id(mesh), ring_impl)
    try:
        found = rt.sites.get(key)
    except TypeError:  # unhashable: let site_of say what is wrong
        found, key = None, None
    if found is None:
        site = site_of(strategy, group, mesh, ring_impl, rt)
        found = (site, rt.group(site.group))
        if key is not None:
            rt.sites[key] = found
    return found


def _tensor_key(t) -> tuple | None:
    return None if t is None else (t.shape, t.dtype, t.device, t.stride(-1))


def _fast_key(site: Site, options, wants_grad: bool, q, k, v, joint: tuple,
              sinks, joint_mask) -> tuple | None:  # fmt: skip
    """The raw arguments as a cache key (None when they cannot be one: not tensors,
    unhashable options)."""
    try:
        # typed: causal=1 must not reuse the plan of causal=True (1 == True)
        typed = (
            (type(options[_CAUSAL]), type(options[_SCALE]), type(options[_DETERMINISTIC]))
            if type(options) is tuple
            else ()
        )
        key = (
            site.key, options, typed, wants_grad, _tensor_key(q), _tensor_key(k), _tensor_key(v),
            joint[1] is not None and (_tensor_key(joint[0]), _tensor_key(joint[1])),
            _tensor_key(sinks), _tensor_key(joint_mask),
        )  # fmt: skip
        hash(key)
    except (AttributeError, TypeError):
        return None
    return key


def _described(rt: Runtime, site: Site, q, k, v, joint: tuple, options: Options,
               option_problems: tuple[str, ...], wants_grad: bool, sinks,
               joint_mask) -> tuple:  # fmt: skip
    """This rank's description (``auto`` resolved) and every problem with it."""
    description, problems = describe(
        q, k, v, joint, options, option_problems, world=site.world, rank=site.rank,
        ulysses=site.ulysses, wants_grad=wants_grad, sinks=sinks, joint_mask=joint_mask,
    )  # fmt: skip
    if problems:
        return description, problems, None
    if options.strategy == AUTO:
        description = resolve_auto(rt, description, site).description
        problem = strategy_problem(description)
        if problem:
            return description, (problem,), None
    kernel, problem = choose_kernel(description)
    return description, ((problem,) if problem else ()), kernel


def _prepare(rt: Runtime, site: Site, state: GroupRuntime, q, k, v, joint: tuple, options,
             wants_grad: bool, recorder: Recorder | None, sinks,
             joint_mask) -> PreparedCall:  # fmt: skip
    """Describe, agree, plan; and say how the call runs: the lanes of the axes its
    schedules use, its joint-token collectives, the runtime's settings."""
    if isinstance(options, Options):
        parsed, option_problems = options, ()
    else:
        parsed, option_problems = Options.of_values(options)
    description, problems, kernel = _described(
        rt, site, q, k, v, joint, parsed, option_problems, wants_grad, sinks, joint_mask
    )
    settings = rt.settings
    group_lanes = rt.lanes(site.group) if site.world > 1 else None
    length = q.shape[1] if getattr(q, "dim", lambda: 0)() == 4 else -1
    agree(description, problems, length, group_lanes, state.agreed, settings.timeout)
    if kernel is None:
        raise AssertionError("the agreement let a call without a kernel through")
    plan = _plan(state, site, description, kernel, settings.stream_tail_min)
    lanes: dict[str, Lanes] = {}
    if site.world > 1:
        used = {lane.axis for lane in (*plan.forward.lanes, *plan.backward.lanes)}
        lanes = {axis: rt.lanes(site.axes[axis]) for axis in sorted(used)}
    comm = JointComm(group_lanes) if joint[1] is not None else None
    ex = Execution(  # NaN rows restored once per call (``passes.forward_pass``)
        plan.forward_kernel.unguarded(), lanes, settings.timeout, settings.fused_merge,
        recorder, settings.workspace_bytes,
    )  # fmt: skip
    return PreparedCall(plan, ex, comm)


def _plan(state: GroupRuntime, site: Site, description: CallDescription, kernel,
          stream_tail_min: int) -> Plan:  # fmt: skip
    """The group's plan for ``description`` at ``site``, made on first use."""
    key = (site.key, description)
    plan = state.plans.get_fresh(key)
    if plan is None:
        plan = Plan(description, site, kernel, description.streams_tail(stream_tail_min))
        state.plans.put(key, plan)
    return plan


def prepare(
    q, k, v, joint: tuple, options: tuple | Options, *, group: dist.ProcessGroup | None,
    mesh: object, wants_grad: bool, recorder: Recorder | None = None, sinks=None,
    joint_mask=None,
) -> PreparedCall:  # fmt: skip
    """The call as prepared for the first call of its kind, reused by later identical
    calls: the description, the agreement and the plan are made once. Kept per group in
    call order, so every member keeps the same entries. ``options``: the raw values of
    ``OPTION_NAMES``, or ``Options`` parsed already (the layer's, a compiled call's)."""
    rt = runtime()
    strategy, ring_impl = (
        (options.strategy, options.ring_impl) if isinstance(options, Options)
        else (options[0], options[1])
    )  # fmt: skip
    site, state = where_call_runs(rt, strategy, group, mesh, ring_impl)
    key = (
        _fast_key(site, options, wants_grad, q, k, v, joint, sinks, joint_mask)
        if recorder is None else None
    )  # fmt: skip
    call = state.calls.get_fresh(key) if key is not None else None
    if call is None:
        call = _prepare(rt, site, state, q, k, v, joint, options, wants_grad, recorder, sinks,
                        joint_mask)  # fmt: skip
        if key is not None:
            state.calls.put(key, call)
    return call


def call_by_names(q, k, v, joint: tuple, options: Options, *, group: str, ring_group: str,
                  ulysses_group: str, wants_grad: bool) -> PreparedCall:  # fmt: skip
    """``prepare`` for a compiled call, whose groups come as names (``compiled.py``)."""
    rt = runtime()
    if ring_group:  # usp, or auto over a mesh
        where = {"group": None, "mesh": rt.named_mesh(ring_group, ulysses_group)}
    else:
        where = {"group": rt.named_group(group), "mesh": None}
    return prepare(q, k, v, joint, options, wants_grad=wants_grad, **where)
