"""The contract every benchmark peer implements, and the plumbing they share.

A *peer* runs the same attention problem as ``tokenring`` with another
implementation (PyTorch's context parallel, yunchang, para-attn), so that
``tokenring bench`` can time them side by side and check every answer
against the single-device result. See docs/peers.md.

Calling convention (every rank calls every method, in the same order)::

    case = PeerCase.from_tensors(q, k, v, causal=True, backward=True, world=P)
    reasons = peer.not_supported_reasons(case)        # [] if it can run; no collectives
    state = peer.prepare(q, k, v, causal=True, grad_out=do)   # untimed: shards, builds
    with peer.session(state):                          # optional: hold global switches on
        out_local = peer.forward(state)                # timed
        out_local, grads_local = peer.forward_backward(state)  # timed
    out = peer.unshard(state, out_local)               # untimed: global order, every rank

``q``, ``k``, ``v`` (and ``grad_out``) are the *global* tensors
``[batch, seq, heads, head_dim]``, identical on every rank. Each peer shards
them its own way (its *layout*: which global tokens each rank holds, in which
order); ``forward`` returns this rank's output shard ``[batch, seq/P, heads_q,
head_dim]`` in that order, and ``unshard`` puts any such shard (outputs and
gradients alike) back into global order on every rank.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from tokenring.execution.comm import group_world
from tokenring.options import Layout
from tokenring.schedules.geometry import chunk_ids

__all__ = ["Peer", "PeerCase", "PeerState", "Runner", "layout_positions"]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class PeerCase:
    """One benchmark problem as a peer sees it: global sizes, known on every rank."""

    world: int
    """Ranks taking part (the size of the process group)."""
    seq_len: int
    """Global sequence length S (all ranks together)."""
    heads_q: int
    heads_kv: int
    head_dim: int
    dtype: torch.dtype
    causal: bool
    backward: bool
    """Whether forward+backward is asked (else forward only)."""
    device_type: str
    """``"cuda"`` or ``"cpu"``."""
    batch: int = 1

    @property
    def gqa(self) -> bool:
        """Fewer key/value heads than query heads (GQA or MQA)."""
        return self.heads_kv != self.heads_q

    def describe(self) -> str:
        """A one-line description used in error messages and tables."""
        passes = "forward+backward" if self.backward else "forward"
        return (
            f"S={self.seq_len}, batch {self.batch}, heads {self.heads_q}/{self.heads_kv}, "
            f"head_dim {self.head_dim}, {_dtype_name(self.dtype)}, causal={self.causal}, "
            f"{passes} on {self.world} {self.device_type} rank(s)"
        )

    @classmethod
    def from_tensors(
        cls,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        causal: bool,
        backward: bool,
        world: int,
    ) -> PeerCase:
        """The case of global ``[batch, seq, heads, head_dim]`` tensors; ValueError if malformed."""
        for name, t in (("q", q), ("k", k), ("v", v)):
            if t.dim() != 4:
                raise ValueError(
                    f"{name}: expected a 4-D [batch, seq, heads, head_dim] tensor, "
                    f"got shape {tuple(t.shape)}"
                )
        if k.shape != v.shape:
            raise ValueError(
                f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}"
            )
        b, s, hq, d = q.shape
        if (k.shape[0], k.shape[1], k.shape[3]) != (b, s, d):
            raise ValueError(
                f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch, seq and head_dim"
            )
        hkv = k.shape[2]
        if hkv == 0 or hq % hkv:
            raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
        if not (q.dtype == k.dtype == v.dtype):
            raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
        if not (q.device == k.device == v.device):
            raise ValueError(
                f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}"
            )
        return cls(
            world=world,
            seq_len=s,
            heads_q=hq,
            heads_kv=hkv,
            head_dim=d,
            dtype=q.dtype,
            causal=causal,
            backward=backward,
            device_type=q.device.type,
            batch=b,
        )


def layout_positions(layout: Layout, world: int, rank: int, seq_len: int) -> torch.Tensor:
    """Global token indices held by ``rank``, in local order (int64, ``seq_len // world`` long).

    ``contiguous``: tokens ``[r*S/P, (r+1)*S/P)``. ``zigzag``: chunks ``r`` and
    ``2P-1-r`` of ``2P`` equal chunks (see ``tokenring.api.sharding``). The caller
    checks divisibility (``not_supported_reasons``).
    """
    if layout is Layout.CONTIGUOUS:
        shard = seq_len // world
        return torch.arange(rank * shard, (rank + 1) * shard)
    chunk = seq_len // (2 * world)
    first, second = chunk_ids(Layout.ZIGZAG, world, rank)
    return torch.cat(
        [
            torch.arange(first * chunk, (first + 1) * chunk),
            torch.arange(second * chunk, (second + 1) * chunk),
        ]
    )


def divisibility_reasons(layout: Layout, case: PeerCase) -> list[str]:
    """Why ``case.seq_len`` cannot be cut into this layout's shards (empty if it can)."""
    parts = 2 * case.world if layout is Layout.ZIGZAG else case.world
    if case.seq_len % parts:
        return [
            f"its {layout.value} layout over {case.world} ranks needs a sequence length "
            f"divisible by {parts}, got {case.seq_len}"
        ]
    return []


@dataclass
class Runner:
    """What a peer built in ``prepare``: the call to time and the switches it needs.

    ``run(q, k, v)`` takes this rank's shards ``[batch, seq/P, heads, head_dim]``
    and returns this rank's output shard. ``scope()`` is a context manager that
    must be active around ``run`` and around the backward of its result (global
    switches such as PyTorch context parallel's dispatcher); ``nullcontext`` if
    the peer has none.
    """

    run: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    scope: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    scope_key: Hashable = None
    """Runners whose scopes have equal keys set the same switches and share a session."""


@dataclass
class PeerState:
    """Everything ``prepare`` made: this rank's shards and the peer's runner."""

    case: PeerCase
    layout: Layout
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    grad_out: torch.Tensor | None
    order: torch.Tensor
    """Global token index of each row of the rank-ordered concatenation of all shards."""
    group: dist.ProcessGroup | None
    rank: int
    runner: Runner

    @property
    def positions(self) -> torch.Tensor:
        """Global token indices of this rank's shard, in local order (on the device)."""
        length = self.case.seq_len // self.case.world
        return self.order[self.rank * length : (self.rank + 1) * length]


def ulysses_reasons(case: PeerCase) -> list[str]:
    """Why a Ulysses (all-to-all over heads) peer cannot split this case's heads."""
    return [
        f"Ulysses needs {what} heads ({heads}) divisible by the world size ({case.world})"
        for what, heads in (("query", case.heads_q), ("key/value", case.heads_kv))
        if heads % case.world
    ]


def require_distributed(name: str) -> None:
    """Raise a ValueError unless torch.distributed is initialized (peers are collective)."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            f"{name} needs torch.distributed to be initialized (one process per device, "
            "for example through tokenring_bench.launch.run_local)"
        )


class Peer(ABC):
    """One other implementation of sharded exact attention, behind one calling convention.

    Subclasses declare what they support (``not_supported_reasons``), where
    their shards come from (``layout``) and how to run (``build``); this base
    class shards the inputs, times nothing itself and gathers results back.
    """

    name: str = ""
    """Short unique label for tables, e.g. ``"torch-cp-allgather"``."""

    @abstractmethod
    def not_supported_reasons(self, case: PeerCase) -> list[str]:
        """Every reason this peer cannot run ``case`` here (empty if it can).

        Pure and identical on every rank (no collectives), so a bench can call
        it before ``prepare`` and list a peer that cannot run with its reasons.
        """

    @abstractmethod
    def layout(self, case: PeerCase) -> Layout:
        """Which global tokens each rank holds for ``case`` (see ``layout_positions``)."""

    @abstractmethod
    def build(self, case: PeerCase, group: dist.ProcessGroup | None, rank: int) -> Runner:
        """Make the runner for ``case``; may run collectives (every rank calls it)."""

    def describe(self) -> str:
        """One line for tables: the library, its version and how it is called."""
        return self.name

    def local_positions(self, case: PeerCase, rank: int) -> torch.Tensor:
        """Global token indices held by ``rank``, in this peer's local order."""
        return layout_positions(self.layout(case), case.world, rank, case.seq_len)

    def prepare(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        causal: bool,
        grad_out: torch.Tensor | None = None,
        group: dist.ProcessGroup | None = None,
    ) -> PeerState:
        """Shard the global inputs this peer's way and build its runner (untimed setup).

        ``grad_out`` (global, shaped like ``q``) asks for forward+backward: the
        local ``q``, ``k``, ``v`` then require grad. Raises NotImplementedError
        listing every reason if the peer cannot run this case, and ValueError for
        malformed inputs; the same on every rank.
        """
        world, rank = group_world(group)
        case = PeerCase.from_tensors(
            q, k, v, causal=causal, backward=grad_out is not None, world=world
        )
        if grad_out is not None and grad_out.shape != q.shape:
            raise ValueError(
                f"grad_out must be shaped like q {tuple(q.shape)}, got {tuple(grad_out.shape)}"
            )
        reasons = self.not_supported_reasons(case)
        if reasons:
            raise NotImplementedError(
                f"{self.name} cannot run {case.describe()}: " + "; ".join(reasons)
            )
        positions = [self.local_positions(case, r) for r in range(world)]
        mine = positions[rank].to(q.device)

        def local(x: torch.Tensor) -> torch.Tensor:
            return x.detach().index_select(1, mine).contiguous()

        q_l, k_l, v_l = local(q), local(k), local(v)
        do_l = None
        if grad_out is not None:
            q_l, k_l, v_l = (t.requires_grad_() for t in (q_l, k_l, v_l))
            do_l = local(grad_out)
        runner = self.build(case, group, rank)
        return PeerState(
            case=case,
            layout=self.layout(case),
            q=q_l,
            k=k_l,
            v=v_l,
            grad_out=do_l,
            order=torch.cat(positions).to(q.device),
            group=group,
            rank=rank,
            runner=runner,
        )

    _session: tuple[Hashable, int] | None = None
    """(scope key, depth) of the session open on this peer, if any."""

    @property
    def in_session(self) -> bool:
        """Whether a ``session`` is open on this peer (its global switches are on)."""
        return self._session is not None

    @contextlib.contextmanager
    def session(self, state: PeerState) -> Iterator[None]:
        """Keep the peer's global switches on across many calls (re-entrant).

        Without it each ``forward``/``forward_backward`` switches them on and off
        itself, which is then inside the timed region (for PyTorch context
        parallel about 0.1 ms per call on a slow CPU). One session serves every
        state of the same case (input sets rotated in a timing loop). Nothing
        else may run attention in this process while a session is open (see
        docs/peers.md).
        """
        key = state.runner.scope_key
        if self._session is not None:
            open_key, depth = self._session
            if open_key != key:
                raise RuntimeError(
                    f"{self.name}: a session with other settings ({open_key}) is open; "
                    f"close it before running {key}"
                )
            self._session = (key, depth + 1)
            try:
                yield
            finally:
                self._session = (key, depth)
            return
        with state.runner.scope():
            self._session = (key, 1)
            try:
                yield
            finally:
                self._session = None

    def forward(self, state: PeerState) -> torch.Tensor:
        """This rank's output shard (no autograd graph): the timed forward call."""
        with torch.no_grad(), self.session(state):
            return state.runner.run(state.q, state.k, state.v)

    def forward_backward(
        self, state: PeerState
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Forward then backward with ``prepare``'s ``grad_out``: the timed training call.

        Returns this rank's output shard and the gradients of its local
        ``q``, ``k``, ``v`` shards (in this peer's local order).
        """
        if state.grad_out is None:
            raise ValueError("forward_backward needs prepare(..., grad_out=...) first")
        with torch.enable_grad(), self.session(state):
            out = state.runner.run(state.q, state.k, state.v)
            dq, dk, dv = torch.autograd.grad(out, (state.q, state.k, state.v), state.grad_out)
        return out.detach(), (dq, dk, dv)

    def unshard(self, state: PeerState, x_local: torch.Tensor) -> torch.Tensor:
        """Gather shards of every rank into global token order along dim 1 (a collective).

        Works for outputs and for gradients of q, k, v alike; returns the full
        tensor on every rank.
        """
        world = state.case.world
        local = x_local.detach().contiguous()
        if world == 1:
            return local.index_select(1, torch.argsort(state.order))
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local, group=state.group)
        stacked = torch.cat(parts, dim=1)
        full = torch.empty_like(stacked)
        full.index_copy_(1, state.order, stacked)
        return full

    def __repr__(self) -> str:
        return f"<peer {self.name}>"
