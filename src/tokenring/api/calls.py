"""Preparing a call: where it runs, its checks and cross-rank agreement, its plan.

Shared by eager calls (``attention.py``) and compiled ones (``compiled.py``): a call
is prepared once per distinct kind (shapes, dtypes, options, where) and the
prepared call is reused by later identical calls.
"""

from __future__ import annotations

from dataclasses import replace

from ..call.checks import check_local, with_problem
from ..execution.comm import Lanes, group_world
from ..execution.executor import Execution
from ..execution.joint import JointComm
from ..execution.kernels import BlockSpec, select_kernel
from ..execution.passes import Call
from ..execution.plan import Site, build_plan
from ..options import RingImpl, Strategy
from ..runtime import GroupRuntime, Runtime, runtime
from ..runtime.agreement import check_across_ranks
from ..schedules.ir import GROUP_AXIS
from ..schedules.usp import RING_AXIS, ULYSSES_AXIS
from .auto import AUTO, resolve_auto

__all__ = ["OPTION_NAMES", "call_by_names", "prepared_call", "site_of", "where_call_runs"]


def site_of(strategy: object, group, mesh, ring_impl: object, rt: Runtime) -> Site:
    """Resolve ``group`` (1-D strategies) or ``mesh`` (``usp``); refuses a wrong pairing on
    the calling rank, before any communication (like a group this rank is not in)."""
    usp = strategy in (Strategy.USP, Strategy.USP.value)
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
        raise ValueError("strategy='usp' runs over mesh=, not group=")
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


def _checked_plan(q, k, v, joint: tuple, *, site: Site, state: GroupRuntime, wants_grad: bool,
                  stream_tail_min: int, strategy, ring_impl, causal, softmax_scale, layout,
                  kernel, deterministic, joint_strategy):  # fmt: skip
    """Check the call on every rank (same error everywhere), then plan it. Collective over
    the group the first time a description is seen."""
    info = check_local(
        q, k, v, causal=causal, layout=layout, strategy=strategy, ring_impl=ring_impl,
        kernel=kernel, scale=softmax_scale, world=site.world, ulysses=site.ulysses,
        joint=joint, joint_strategy=joint_strategy,
    )  # fmt: skip
    chosen = None
    if not info.problem:
        spec = BlockSpec(q.device.type, q.dtype, q.shape[3], q.shape[2], k.shape[2], causal)
        try:
            chosen = select_kernel(kernel, spec)
            if wants_grad and deterministic:  # refuse now rather than in the backward
                select_kernel(kernel, replace(spec, backward=True, deterministic=True))
        except ValueError as err:
            info = with_problem(info, str(err))
    check_across_ranks(info, site.group, site.world, state.agreed)
    if chosen is None:
        raise AssertionError("check_across_ranks let a failed call through")
    return build_plan(
        q, k, site=site, seq_len=q.shape[1] * site.world, kernel=chosen,
        stream_tail_min=stream_tail_min, strategy=strategy, ring_impl=ring_impl, causal=causal,
        softmax_scale=softmax_scale, layout=layout, kernel_choice=str(kernel),
        deterministic=deterministic,
    )  # fmt: skip


OPTION_NAMES = (
    "strategy", "ring_impl", "causal", "softmax_scale", "layout", "kernel", "deterministic",
    "joint_strategy",
)  # fmt: skip


def _tensor_key(t) -> tuple | None:
    return None if t is None else (t.shape, t.dtype, t.device, t.stride(-1))


def _prepare(rt: Runtime, site: Site, state: GroupRuntime, q, k, v, joint: tuple,
             wants_grad: bool, recorder, **options) -> Call:  # fmt: skip
    """Plan this call (checks and cross-rank exchange) and say how it runs: the lanes of the
    axes its schedules use, its joint-token collectives, the runtime's settings."""
    plan = _checked_plan(
        q, k, v, joint, site=site, state=state, wants_grad=wants_grad,
        stream_tail_min=rt.settings.stream_tail_min, **options,
    )  # fmt: skip
    lanes: dict[str, Lanes] = {}
    if site.world > 1:
        used = {lane.axis for lane in (*plan.forward.lanes, *plan.backward.lanes)}
        lanes = {axis: rt.lanes(site.axes[axis]) for axis in sorted(used)}
    comm = None
    if joint[1] is not None:
        comm = JointComm(rt.lanes(site.group) if site.world > 1 else None)
    settings = rt.settings
    ex = Execution(plan.forward_kernel, lanes, settings.timeout, settings.fused_merge, recorder)
    return Call(plan, ex, comm)


def prepared_call(rt: Runtime, site: Site, state: GroupRuntime, q, k, v, joint: tuple,
                  wants_grad: bool, recorder, options: tuple) -> Call:  # fmt: skip
    """The call as prepared for the first call of its kind (shapes, dtypes, options,
    where), reused by later identical calls: the checks, the exchange and the planning
    run once. Kept per group in call order, so every member keeps the same entries.
    ``options``: the values of ``OPTION_NAMES``."""
    key = None
    if recorder is None:
        try:
            # typed: causal=1 must not reuse the plan of causal=True (1 == True)
            key = (
                site.key, options, type(options[2]), type(options[3]), type(options[6]),
                wants_grad, _tensor_key(q), _tensor_key(k), _tensor_key(v),
                joint[1] is not None and tuple(_tensor_key(t) for t in joint),
            )  # fmt: skip
            hash(key)
        except (AttributeError, TypeError):  # not tensors, or unhashable options: check anew
            key = None
    call = state.calls.get_fresh(key) if key is not None else None
    if call is None:
        named = dict(zip(OPTION_NAMES, options))
        call = _prepare(rt, site, state, q, k, v, joint, wants_grad, recorder, **named)
        if key is not None:
            state.calls.put(key, call)
    return call


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


def call_by_names(q, k, v, joint: tuple, *, group: str, ring_group: str, ulysses_group: str,
                  wants_grad: bool, **options) -> Call:  # fmt: skip
    """``prepared_call`` for a compiled call, whose groups come as names (``ops.py``)."""
    rt = runtime()
    if ring_group:  # usp, or auto over a mesh
        where = (None, rt.named_mesh(ring_group, ulysses_group))
    else:
        where = (rt.named_group(group), None)
    if options["strategy"] == AUTO:
        choice = resolve_auto(rt, q, k, causal=options["causal"], layout=options["layout"],
                              group=where[0], mesh=where[1], wants_grad=wants_grad)  # fmt: skip
        options = {**options, "strategy": choice.strategy.value,
                   "ring_impl": choice.ring_impl.value}  # fmt: skip
    site, state = where_call_runs(rt, options["strategy"], *where, options["ring_impl"])
    values = tuple(options[name] for name in OPTION_NAMES)
    return prepared_call(rt, site, state, q, k, v, joint, wants_grad, None, values)
