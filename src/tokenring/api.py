"""Public attention functions.

All take this rank's shard of the sequence in the flash-attention layout
and return this rank's shard of the output::

    q: [batch, seq_local, heads_q, head_dim]
    k, v: [batch, seq_local, heads_kv, head_dim]      heads_q % heads_kv == 0
    out: like q;  lse (return_lse=True): float32 [batch, heads_q, seq_local]

The shards must come from ``tokenring.shard`` with the same ``layout`` (and
``group`` or ``mesh``), or follow its contract (``tokenring.layouts``). With
``causal=True`` query token i sees key tokens j <= i in *global* positions;
the diagonal of each rank's own block is the global diagonal::

    zigzag, P=2, chunks c0..c3; rank 0 holds (c0, c3), rank 1 holds (c1, c2)

            k: c0  c1  c2  c3
    q: c0     \\
       c1     ##  \\
       c2     ##  ##  \\
       c3     ##  ##  ##  \\

Works without torch.distributed (a single rank), under any process group, and
inside ``torch.compile`` (``ops.py``). ``attention`` is the one definition;
``token_ring_attn``, ``ring_attn``, ``ulysses_attn`` and ``allgather_attn`` are
generated from it, one per strategy, with its signature less ``strategy``,
``mesh`` and ``ring_impl``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
import torch.distributed as dist

from .auto import AUTO, resolve_auto
from .comm import Lanes
from .executor import Execution
from .joint import Joint, JointComm
from .options import JointStrategy, Layout, RingImpl, Strategy
from .passes import Call, ShardedAttention, forward_pass
from .plan import Site, make_plan, site_of
from .runtime import GroupRuntime, Runtime, runtime
from .schedules import STRATEGIES
from .timeline import Recorder

__all__ = [
    "allgather_attn",
    "attention",
    "call_by_names",
    "prepared_call",
    "ring_attn",
    "token_ring_attn",
    "ulysses_attn",
]


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
    plan = make_plan(
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


def _site(rt: Runtime, strategy, group, mesh, ring_impl) -> tuple[Site, GroupRuntime]:
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
    site, state = _site(rt, options["strategy"], *where, options["ring_impl"])
    values = tuple(options[name] for name in OPTION_NAMES)
    return prepared_call(rt, site, state, q, k, v, joint, wants_grad, None, values)


def _traced(q, k, v, joint, *, strategy, ring_impl, causal, softmax_scale, layout, kernel,
            deterministic, joint_strategy, group, mesh, recorder):  # fmt: skip
    """Inside ``torch.compile``: plain values for the custom op (Dynamo reads group names)."""
    if recorder is not None:
        raise ValueError("recorder= records eager calls; it cannot run inside torch.compile")

    def name(value) -> str:
        return (
            value.value if isinstance(value, (Strategy, Layout, RingImpl, JointStrategy)) else value
        )

    group_name = ring_group = ulysses_group = ""
    if mesh is not None:
        ring_group = mesh.get_group("ring").group_name
        ulysses_group = mesh.get_group("ulysses").group_name
    elif dist.is_available() and dist.is_initialized():
        group_name = (group if group is not None else dist.group.WORLD).group_name
    tensors = (q, k, v, *(t for t in joint if t is not None))
    wants_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    return torch.ops.tokenring.attention(
        q, k, v, *joint, name(strategy), name(ring_impl), causal, softmax_scale, name(layout),
        kernel, deterministic, name(joint_strategy), wants_grad, group_name, ring_group,
        ulysses_group,
    )  # fmt: skip


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    strategy: str | Strategy = "tokenring",
    causal: bool = False,
    softmax_scale: float | None = None,
    layout: str | Layout = "contiguous",
    group: dist.ProcessGroup | None = None,
    mesh: object = None,
    ring_impl: str | RingImpl = "tokenring",
    return_lse: bool = False,
    kernel: str = "auto",
    deterministic: bool = False,
    joint_q: torch.Tensor | None = None,
    joint_k: torch.Tensor | None = None,
    joint_v: torch.Tensor | None = None,
    joint_strategy: str | JointStrategy = "none",
    recorder: Recorder | None = None,
):
    """Exact attention over a sequence sharded across the ranks of ``group`` (or ``mesh``).

    ``strategy``: ``"auto"`` (the planner's pick for this machine and shape, decided
    once per call shape: docs/scaling.md; over ``mesh``, TokenRing or ring across),
    ``"tokenring"`` (queries travel, K and V stay), ``"ring"`` (K and
    V travel), ``"ulysses"`` (all-to-all to head shards of the whole sequence),
    ``"allgather"`` (K and V gathered whole) or ``"usp"`` (Ulysses over ``mesh``'s
    ``"ulysses"`` dim x ``ring_impl``, TokenRing or ring, over its ``"ring"`` dim;
    ``tokenring.sp_mesh`` makes such a mesh); docs/algorithms.md says what each
    moves. ``causal``: the global causal mask. ``softmax_scale``: default
    ``1/sqrt(head_dim)``. ``layout``: how the sequence is sharded
    (``tokenring.shard``). ``group``: the process group the sequence is sharded
    over (default: the world); ``usp`` takes ``mesh`` instead. ``return_lse``: also
    return the float32 LSE ``[batch, heads_q, seq_local]``. ``kernel``: ``"auto"``
    or a backend name (``tokenring.kernel_names()``). ``deterministic`` refuses
    kernels whose backward is not bitwise reproducible. ``recorder`` (optional,
    eager only) collects a per-step timeline and byte counts of both passes.

    Joint tokens (MM-DiT text tokens), non-causal only: ``joint_k``, ``joint_v``
    ``[batch, joint_len, heads_kv, head_dim]`` and optionally ``joint_q``
    ``[batch, joint_len, heads_q, head_dim]``, the same full tensors on every rank
    (replicated, not sharded), with ``joint_strategy="front"`` or ``"rear"``
    (where they sit in the concatenated sequence ``cat([joint, image])`` or
    ``cat([image, joint])``). Image queries attend every image and joint key;
    joint queries attend every image and joint key. With ``joint_q`` the call
    returns ``(out, joint_out)`` (``joint_out`` ``[batch, joint_len, heads_q,
    head_dim]``, identical on every rank), each followed by its LSE with
    ``return_lse=True``. Gradients: q, k, v get their shard's; each rank's
    ``joint_*.grad`` is that rank's share, and summed over the group it equals
    the unsharded model's gradient when each rank's loss takes the ``joint_out``
    term divided by the group size.

    Raises ``ValueError`` with the same message on every rank for bad input,
    including a strategy that cannot run the call (with the reason, and what
    would work).
    """
    joint = (joint_q, joint_k, joint_v)
    if torch.compiler.is_compiling():
        out, lse, jo, jlse = _traced(
            q, k, v, joint, strategy=strategy, ring_impl=ring_impl, causal=causal,
            softmax_scale=softmax_scale, layout=layout, kernel=kernel,
            deterministic=deterministic, joint_strategy=joint_strategy, group=group, mesh=mesh,
            recorder=recorder,
        )  # fmt: skip
    else:
        rt = runtime()
        try:
            wants_grad = torch.is_grad_enabled() and (
                q.requires_grad or k.requires_grad or v.requires_grad
                or any(t is not None and t.requires_grad for t in joint)
            )  # fmt: skip
        except AttributeError:  # not tensors: the checks say so
            wants_grad = False
        if strategy == AUTO:
            choice = resolve_auto(rt, q, k, causal=causal, layout=layout, group=group,
                                  mesh=mesh, wants_grad=wants_grad)  # fmt: skip
            strategy, ring_impl = choice.strategy, choice.ring_impl
        site, state = _site(rt, strategy, group, mesh, ring_impl)
        options = (strategy, ring_impl, causal, softmax_scale, layout, kernel, deterministic,
                   joint_strategy)  # fmt: skip
        call = prepared_call(rt, site, state, q, k, v, joint, wants_grad, recorder, options)
        if wants_grad:
            out, lse, jo, jlse = ShardedAttention.apply(q, k, v, *joint, call)
        else:
            j = Joint(joint_q, joint_k, joint_v) if joint_k is not None else None
            out, lse, jo, jlse = forward_pass(call, q, k, v, j)
    if joint_q is None:
        return (out, lse) if return_lse else out
    return (out, lse, jo, jlse) if return_lse else (out, jo)


_HIDDEN = ("strategy", "mesh", "ring_impl", "recorder")
_PER_STRATEGY = inspect.signature(attention).replace(
    parameters=[
        p for p in inspect.signature(attention).parameters.values() if p.name not in _HIDDEN
    ]
)
_OPTIONS = frozenset(_PER_STRATEGY.parameters) - {"q", "k", "v"}


def _strategy_function(name: str, strategy: Strategy) -> Callable:
    """``attention`` with ``strategy`` fixed: same signature (less ``strategy``, ``mesh``
    and ``ring_impl``), its own summary."""

    def call(q, k, v, **options):
        unknown = options.keys() - _OPTIONS
        if unknown:
            raise TypeError(f"{name}() got unexpected keyword argument(s) {sorted(unknown)}")
        return attention(q, k, v, strategy=strategy, **options)

    call.__name__ = call.__qualname__ = name
    call.__module__ = __name__
    call.__signature__ = _PER_STRATEGY  # type: ignore[attr-defined]
    call.__doc__ = (
        f"{STRATEGIES[strategy].summary}\n\n"
        f"``tokenring.attention(q, k, v, strategy={strategy.value!r}, ...)``: see ``attention``\n"
        "for arguments and shapes, docs/algorithms.md for the schedule."
    )
    return call


token_ring_attn = _strategy_function("token_ring_attn", Strategy.TOKENRING)
ring_attn = _strategy_function("ring_attn", Strategy.RING)
ulysses_attn = _strategy_function("ulysses_attn", Strategy.ULYSSES)
allgather_attn = _strategy_function("allgather_attn", Strategy.ALLGATHER)
