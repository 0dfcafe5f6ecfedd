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

from ..call.checks import sink_problems
from ..call.description import Options, encode_values
from ..execution.joint import Joint
from ..execution.passes import ShardedAttention, forward_pass
from ..execution.timeline import Recorder
from ..options import JointStrategy, Layout, RingImpl, Strategy
from ..runtime import runtime
from ..schedules import STRATEGIES
from .calls import prepare
from .compiled import attention_op
from .sinks import with_sinks

__all__ = ["allgather_attn", "attention", "ring_attn", "run", "token_ring_attn", "ulysses_attn"]


def _group_names(group, mesh) -> tuple[str, str, str]:
    """The names a compiled call finds its groups by: (group, ring, ulysses)."""
    if mesh is not None:
        return "", mesh.get_group("ring").group_name, mesh.get_group("ulysses").group_name
    if dist.is_available() and dist.is_initialized():
        return (group if group is not None else dist.group.WORLD).group_name, "", ""
    return "", "", ""


def _traced(q, k, v, joint: tuple, options: tuple, group, mesh):
    """Inside ``torch.compile``: the options as one string and the groups by name for the
    custom op (Dynamo reads group names). Options are parsed at trace time, where every
    rank traces the same program; a wrong one raises the same error everywhere."""
    tensors = (q, k, v, *(t for t in joint if t is not None))
    wants_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    encoded = encode_values(options)
    return attention_op(q, k, v, *joint, encoded, wants_grad, *_group_names(group, mesh))


def hashable(value: object) -> object:
    """A list or tensor argument (``cu_seqlens``, ``window_size``) as a tuple of ints, so
    that a repeated call finds its prepared call by value; anything else as given, for the
    checks to judge. A tensor is read once (on a GPU, one host sync) and remembered by
    identity and version (``Runtime.read_ints``): every layer of a model passed the same
    ``cu_seqlens`` tensor costs one sync per step, not one per layer."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor) and value.dim() == 1 and not value.is_floating_point():
        if torch.compiler.is_compiling():
            return tuple(value.tolist())
        return runtime().read_ints(value)
    if isinstance(value, list):
        return tuple(value)
    return value


def run(
    q, k, v, joint: tuple, options: tuple | Options, *, group, mesh, recorder: Recorder | None,
    return_lse: bool, sinks: torch.Tensor | None = None, joint_mask: torch.Tensor | None = None,
):  # fmt: skip
    """The one path of every attention call (the functions, the layer, the integrations):
    ``options`` as raw values of ``OPTION_NAMES`` or ``Options`` parsed already."""
    if torch.compiler.is_compiling():
        if recorder is not None:
            raise ValueError("recorder= records eager calls; it cannot run inside torch.compile")
        if joint_mask is not None:
            raise ValueError("joint_mask runs eagerly for now, not inside torch.compile")
        problems = sink_problems(sinks, q, joint[1])  # at trace time, where they are
        if problems:
            raise ValueError("; ".join(problems))
        values = options.values() if isinstance(options, Options) else options
        out, lse, jo, jlse = _traced(q, k, v, joint, values, group, mesh)
        if joint[0] is None:
            jo = jlse = None
    else:
        jq, jk, jv = joint
        try:  # written out: this is every call's host time
            wants_grad = torch.is_grad_enabled() and (
                q.requires_grad or k.requires_grad or v.requires_grad
                or (jk is not None and (jk.requires_grad or jv.requires_grad))
                or (jq is not None and jq.requires_grad)
            )  # fmt: skip
        except AttributeError:  # not tensors: the checks say so
            wants_grad = False
        call = prepare(
            q, k, v, joint, options, group=group, mesh=mesh, wants_grad=wants_grad,
            recorder=recorder, sinks=sinks, joint_mask=joint_mask,
        )  # fmt: skip
        if wants_grad:
            out, lse, jo, jlse = ShardedAttention.apply(q, k, v, *joint, joint_mask, call)
        else:
            out, lse, jo, jlse = forward_pass(
                call,
                q,
                k,
                v,
                Joint(jq, jk, jv, joint_mask) if jk is not None else None,
                lse_wanted=return_lse or sinks is not None,
            )
    if sinks is not None:
        out, lse = with_sinks(out, lse, sinks)
    if joint[0] is None:
        return (out, lse) if return_lse else out
    return (out, lse, jo, jlse) if return_lse else (out, jo)


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
    joint_mask: torch.Tensor | None = None,
    seq_len: int | None = None,
    window_size: tuple[int, int] | None = None,
    cu_seqlens: object = None,
    sinks: torch.Tensor | None = None,
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
    (``tokenring.shard``): any length, ranks holding at most one token more than
    others (some may hold none). ``seq_len``: the global sequence length; needed
    when the shards are of unequal length (``None``: every rank holds the same
    number of tokens). ``group``: the process group the sequence is sharded
    over (default: the world); ``usp`` takes ``mesh`` instead. ``return_lse``: also
    return the float32 LSE ``[batch, heads_q, seq_local]``. ``kernel``: ``"auto"``
    or a backend name (``tokenring.kernel_names()``). ``deterministic`` refuses
    kernels whose backward is not bitwise reproducible. ``recorder`` (optional,
    eager only) collects a per-step timeline and byte counts of both passes.

    Masks beyond causal, in flash-attention's conventions, over global positions:
    ``window_size=(left, right)``: query ``i`` sees key ``j`` when ``i - left <= j <=
    i + right`` (``-1``: unbounded; with ``causal=True`` the right side must be 0 or
    -1). ``cu_seqlens``: the offsets ``[0, ..., S]`` of documents packed in the
    sequence (a list, tuple or 1-D integer tensor, the same on every rank; batch rows
    share it); no query attends across a document boundary, and the global length is
    ``cu_seqlens[-1]``. Shard with ``tokenring.shard(..., cu_seqlens=...)`` and the
    same ``layout``: ``zigzag`` is then cut per document (docs/algorithms.md, "Packed
    sequences"). Blocks the mask leaves empty are neither computed nor sent.
    ``sinks``: optional per-head logits ``[heads_q]`` (any float dtype, on q's device,
    the same on every rank) that join every row's softmax denominator once, with a
    value of zero (gpt-oss's ``s_aux``); the returned LSE is the log of the whole
    denominator, sink included. Its gradient, like a joint tensor's, is this rank's
    share: summed over the group it is the unsharded model's.

    The LSE is differentiable (a loss may read it) except with joint tokens.

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
    term divided by the group size. ``joint_mask``: bool ``[batch, joint_len]``, the
    same on every rank, True where a joint token is real: a text's padding (rows of
    a batch may differ) is no query's key, image or joint (eager calls; on CUDA the
    joint blocks then run on the memory-efficient kernel, which takes the mask).

    Raises ``ValueError`` with the same message on every rank for bad input,
    including a strategy that cannot run the call (with the reason, and what
    would work).
    """
    # in OPTION_NAMES order (the fields of ``Options``)
    options = (strategy, ring_impl, layout, causal, softmax_scale, kernel, deterministic,
               joint_strategy, seq_len, hashable(window_size), hashable(cu_seqlens))  # fmt: skip
    return run(
        q, k, v, (joint_q, joint_k, joint_v), options, group=group, mesh=mesh, recorder=recorder,
        return_lse=return_lse, sinks=sinks, joint_mask=joint_mask,
    )  # fmt: skip


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
