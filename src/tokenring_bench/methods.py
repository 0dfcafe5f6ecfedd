"""What the benchmark runs: our strategies and the single-device ideal, behind one shape.

A method gets the *global* inputs (identical on every rank), prepares
whatever it needs once (shards, buffers), then is timed calling ``run``.
``local_results`` returns this rank's pieces of the output (and gradients)
together with the same pieces cut out of full-sequence tensors, so the
runner can check any method against the single-device result whatever its
sharding. Peers (other libraries) follow the same shape (``peers/``).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Protocol

import torch

from tokenring.api.attention import attention
from tokenring.api.meshes import sp_mesh
from tokenring.api.sharding import shard
from tokenring.call.checks import strategy_refusals
from tokenring.call.description import CallDescription
from tokenring.execution.block_masks import block_mask
from tokenring.execution.kernels import BlockMask, KernelBackend, select_kernel
from tokenring.execution.plan import block_spec
from tokenring.execution.timeline import Recorder
from tokenring.options import Layout
from tokenring.options import Strategy as TrStrategy

from .cases import Case
from .peers import Peer, PeerCase, PeerState

__all__ = [
    "GlobalInputs",
    "Method",
    "PeerMethod",
    "Prepared",
    "SingleDevice",
    "Strategy",
    "Usp",
    "usp_splits",
]


@dataclass
class GlobalInputs:
    """Input sets (q, k, v, do), each the whole sequence, rotated between timed calls."""

    sets: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]


class Prepared(Protocol):
    def session(self) -> AbstractContextManager:
        """Held around the timing loop (global switches a peer needs on)."""

    def run(self, index: int, backward: bool, recorder: Recorder | None = None) -> None:
        """One call on input set ``index`` (forward, or forward and backward)."""

    def local_results(
        self, backward: bool, full: dict[str, torch.Tensor]
    ) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        """``(name, ours, expected)`` for out (and dq, dk, dv): this rank's pieces of our
        result and of the full-sequence results in ``full``, on input set 0."""


class Method(Protocol):
    name: str

    def not_supported_reasons(self, case: Case, world: int, backward: bool) -> list[str]: ...

    def prepare(self, case: Case, inputs: GlobalInputs, backward: bool) -> Prepared: ...


@dataclass
class _Sharded:
    """One of our strategies on this rank's shards of every input set."""

    options: dict  # strategy, and for usp its mesh and ring_impl
    sharding: dict  # group/mesh keywords of tokenring.shard
    case: Case
    shards: list[tuple[torch.Tensor, ...]]
    last: dict[str, torch.Tensor] = field(default_factory=dict)

    def run(self, index: int, backward: bool, recorder: Recorder | None = None) -> None:
        q, k, v, do = self.shards[index % len(self.shards)]
        kwargs = dict(
            causal=self.case.causal, layout=self.case.layout, recorder=recorder, **self.options,
            **self.case.mask_options,
        )  # fmt: skip
        if not backward:
            with torch.no_grad():
                self.last = {"out": attention(q, k, v, **kwargs)}
            return
        out = attention(q, k, v, **kwargs)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)
        self.last = {"out": out.detach(), "dq": dq, "dk": dk, "dv": dv}

    def session(self) -> AbstractContextManager:
        return nullcontext()

    def local_results(self, backward, full):
        self.run(0, backward)
        return [
            (name, value, shard(full[name], layout=self.case.layout, **self.sharding,
                                **self.case.shard_options))
            for name, value in self.last.items()
        ]  # fmt: skip


def _shards(inputs: GlobalInputs, case: Case, sharding: dict) -> list[tuple[torch.Tensor, ...]]:
    shards = []
    keywords = dict(layout=case.layout, **sharding, **case.shard_options)
    for q, k, v, do in inputs.sets:
        parts = [shard(t, **keywords).requires_grad_() for t in (q, k, v)]
        shards.append((*parts, shard(do, **keywords)))
    return shards


def refusals(strategy: TrStrategy, case: Case, world: int, ulysses: int = 1) -> list[str]:
    """Why ``strategy`` cannot run ``case`` over ``world`` ranks (the library's own
    reasons, from the call's description)."""
    return strategy_refusals(
        strategy, world=world, ulysses=ulysses, layout=Layout(case.layout), causal=case.causal,
        heads_q=case.heads_q, heads_kv=case.heads_kv, seq_len=case.seq,
    )  # fmt: skip


@dataclass
class Strategy:
    """One of our 1-D strategies (a value of ``tokenring.Strategy``) over every rank."""

    name: str

    def not_supported_reasons(self, case: Case, world: int, backward: bool) -> list[str]:
        return refusals(TrStrategy(self.name), case, world)

    def prepare(self, case: Case, inputs: GlobalInputs, backward: bool) -> Prepared:
        options = {"strategy": self.name}
        return _Sharded(options, {}, case, _shards(inputs, case, {}))


@dataclass
class Auto:
    """``strategy="auto"``: the planner's pick among our 1-D strategies for this machine."""

    name: str = "auto"

    def not_supported_reasons(self, case: Case, world: int, backward: bool) -> list[str]:
        return []  # auto picks among what can run; if nothing can, the call says why

    def prepare(self, case: Case, inputs: GlobalInputs, backward: bool) -> Prepared:
        return _Sharded({"strategy": "auto"}, {}, case, _shards(inputs, case, {}))


@dataclass
class Usp:
    """The hybrid on a ``ulysses`` x ``ring`` mesh of every rank (named ``usp-UxR``)."""

    ulysses: int
    ring: int
    ring_impl: str = "tokenring"
    _mesh: object = None

    @property
    def name(self) -> str:
        suffix = "" if self.ring_impl == "tokenring" else "-ring"
        return f"usp-{self.ulysses}x{self.ring}{suffix}"

    def not_supported_reasons(self, case: Case, world: int, backward: bool) -> list[str]:
        if world != self.ulysses * self.ring:
            return [f"needs {self.ulysses * self.ring} ranks, the run has {world}"]
        return refusals(TrStrategy.USP, case, world, self.ulysses)

    def prepare(self, case: Case, inputs: GlobalInputs, backward: bool) -> Prepared:
        if self._mesh is None:  # collective: every rank prepares the same method
            self._mesh = sp_mesh(ulysses=self.ulysses, ring=self.ring)
        options = {"strategy": "usp", "mesh": self._mesh, "ring_impl": self.ring_impl}
        sharding = {"mesh": self._mesh}
        return _Sharded(options, sharding, case, _shards(inputs, case, sharding))


def usp_splits(world: int) -> list[Usp]:
    """Every true hybrid split of ``world`` ranks (both axes larger than one)."""
    return [Usp(u, world // u) for u in range(2, world // 2 + 1) if world % u == 0]


@dataclass
class _Single:
    kernel: KernelBackend
    case: Case
    sets: list[tuple[torch.Tensor, ...]]
    scale: float
    mask: BlockMask | None = None

    def call(self, index: int, backward: bool) -> dict[str, torch.Tensor]:
        q, k, v, do = self.sets[index % len(self.sets)]
        causal = self.case.causal
        mask = self._mask(q.device)
        if mask is not None:
            causal = False  # the block's mask says it all
        out, lse = self.kernel.forward(q, k, v, causal, self.scale, mask)
        if not backward:
            return {"out": out}
        delta = (do.float() * out.float()).sum(-1).transpose(1, 2)
        dq, dk, dv = self.kernel.backward(do, q, k, v, out, lse, delta, causal, self.scale, mask)
        return {"out": out, "dq": dq, "dk": dk, "dv": dv}

    def run(self, index: int, backward: bool, recorder: Recorder | None = None) -> None:
        self.call(index, backward)

    def _mask(self, device: torch.device) -> BlockMask | None:
        """The whole sequence's mask as one block (what one rank runs), made once."""
        if not self.case.mask_options:
            return None
        if self.mask is None:
            cells = (((0, self.case.seq),),)
            self.mask = block_mask(cells, cells, self.case.mask, device)
        return self.mask

    def session(self) -> AbstractContextManager:
        return nullcontext()

    def local_results(self, backward, full):
        return [(n, t, full[n]) for n, t in self.call(0, backward).items()]


@dataclass
class SingleDevice:
    """The whole sequence on one device with the best local kernel: T1 of the efficiency."""

    name: str = "single-device"

    def not_supported_reasons(self, case: Case, world: int, backward: bool) -> list[str]:
        return []

    def kernel_for(self, case: Case, device: torch.device) -> KernelBackend:
        """What ``auto`` runs the whole sequence with on one device (the library's own
        question of a call: ``execution.plan.block_spec``)."""
        call = CallDescription.of_shape(
            world=1, seq_len=case.seq, heads_q=case.heads_q, heads_kv=case.heads_kv,
            head_dim=case.head_dim, batch=case.batch, dtype=getattr(torch, case.dtype),
            layout=Layout(case.layout), causal=case.causal, device_type=device.type,
            window_size=case.window, cu_seqlens=case.documents,
        )  # fmt: skip
        return select_kernel("auto", block_spec(call, backward=True))

    def prepare(self, case: Case, inputs: GlobalInputs, backward: bool = True) -> _Single:
        device = inputs.sets[0][0].device
        return _Single(self.kernel_for(case, device), case, inputs.sets, case.head_dim**-0.5)


@dataclass
class _PeerRun:
    peer: Peer
    states: list[PeerState]
    backward: bool

    def run(self, index: int, backward: bool, recorder: Recorder | None = None) -> None:
        state = self.states[index % len(self.states)]
        with self.peer.session(state):
            if backward:
                self.peer.forward_backward(state)
            else:
                self.peer.forward(state)

    def session(self):
        """Keep the peer's global switches on across the timing loop (not per call)."""
        return self.peer.session(self.states[0])

    def local_results(self, backward, full):
        state = self.states[0]
        if backward:
            out, grads = self.peer.forward_backward(state)
            mine = {"out": out, **dict(zip(("dq", "dk", "dv"), grads))}
        else:
            mine = {"out": self.peer.forward(state)}
        return [(n, self.peer.unshard(state, t.detach()), full[n]) for n, t in mine.items()]


@dataclass
class PeerMethod:
    """A peer (another library, ``tokenring_bench.peers``) in the benchmark's shape."""

    peer: Peer

    @property
    def name(self) -> str:
        return self.peer.name

    def not_supported_reasons(self, case: Case, world: int, backward: bool) -> list[str]:
        if case.mask_options:
            return ["not run under documents or windows (the bench's adapter passes neither)"]
        return self.peer.not_supported_reasons(
            PeerCase(
                world=world,
                seq_len=case.seq,
                heads_q=case.heads_q,
                heads_kv=case.heads_kv,
                head_dim=case.head_dim,
                dtype=getattr(torch, case.dtype),
                causal=case.causal,
                backward=backward,
                device_type="cuda" if torch.cuda.is_available() else "cpu",
                batch=case.batch,
            )
        )

    def prepare(self, case: Case, inputs: GlobalInputs, backward: bool = True) -> _PeerRun:
        states = [
            # grad_out asks the peer for its backward too: only where this row times one
            self.peer.prepare(q, k, v, causal=case.causal, grad_out=do if backward else None)
            for q, k, v, do in inputs.sets
        ]
        return _PeerRun(self.peer, states, backward)
