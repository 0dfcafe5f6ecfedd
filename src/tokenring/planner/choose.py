"""``plan``: price every strategy that can run a call, and pick the fastest.

Candidates are the 1-D strategies over the whole group (``tokenring``, ``ring``,
``ulysses``, ``allgather``) and, over a group without a fixed mesh, every USP
split ``usp-UxR`` (Ulysses degree ``U`` inside, a ring of ``R`` across; ``-ring``:
pass-KV ring across instead of TokenRing). Each is refused with the reasons its
``StrategyDef`` gives, or priced by simulating its schedules (``timing.py``) for
the pass(es) asked. Forward and backward are simulated separately and added (the
backward pass starts after the forward one has finished on every rank).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from ..call.checks import refusals
from ..call.description import CallDescription
from ..options import Layout, Pass, RingImpl, Strategy
from ..schedules import build_schedule
from ..schedules.usp import mesh_axes
from .timing import Prediction, simulate_timing
from .topology import Topology

__all__ = ["Candidate", "PlanReport", "plan_call"]

ONE_D = (Strategy.TOKENRING, Strategy.RING, Strategy.ULYSSES, Strategy.ALLGATHER)


@dataclass(frozen=True)
class Candidate:
    """One way to run the call: its name, and its prediction per pass or why it cannot."""

    name: str
    strategy: Strategy
    ulysses: int = 1
    ring_impl: Strategy = Strategy.TOKENRING
    refused: str | None = None
    passes: tuple[tuple[Pass, Prediction], ...] = ()

    @property
    def predicted_ms(self) -> float | None:
        return None if self.refused else sum(p.ms for _, p in self.passes)

    def term_ms(self, term: str) -> float:
        """Total compute, exposed communication or host time over the passes."""
        return sum(getattr(p, f"{term}_ms") for _, p in self.passes)

    @property
    def dominant(self) -> str | None:
        """The term that decides the time over the passes: ``host`` (where the host
        cannot keep ahead of the device), ``compute`` or ``communication``."""
        if self.refused:
            return None
        if all(not p.synchronous and p.dominant == "host" for _, p in self.passes):
            return "host"
        terms = {"compute": self.term_ms("compute"), "communication": self.term_ms("comm")}
        if any(p.synchronous for _, p in self.passes):
            terms["host"] = self.term_ms("host")
        return max(terms, key=terms.get)

    def to_dict(self) -> dict[str, Any]:
        """What ``tokenring plan --json`` prints per candidate; the keys name what the
        table's columns name (``exposed_comm_ms``: communication the compute does not hide)."""
        steps = [
            {
                "step": s.step,
                "ms": s.ms,
                "compute_ms": s.compute_ms,
                "exposed_comm_ms": s.comm_ms,
                "host_ms": s.host_ms,
                "pass": pass_.value,
            }
            for pass_, p in self.passes
            for s in p.steps
        ]
        return {
            "strategy": self.name,
            "predicted_ms": self.predicted_ms,
            "steps": steps,
            "refused": self.refused,
            "dominant": self.dominant,
            "compute_ms": None if self.refused else self.term_ms("compute"),
            "exposed_comm_ms": None if self.refused else self.term_ms("comm"),
            "host_ms": None if self.refused else self.term_ms("host"),
            "slowest_rank": [p.slowest_rank for _, p in self.passes] or None,
        }


@dataclass(frozen=True)
class PlanReport:
    """Every candidate, fastest first, the refused ones last; ``choice`` is the fastest."""

    topology: str
    call: CallDescription
    backward: bool
    candidates: tuple[Candidate, ...]
    layouts: tuple[tuple[Layout, str, float], ...] = ()
    """When the layout was left to the planner: each layout's best (name, ms)."""

    @property
    def world(self) -> int:
        return self.call.world

    @property
    def causal(self) -> bool:
        return self.call.causal

    @property
    def layout(self) -> Layout:
        return self.call.layout

    @property
    def priced(self) -> list[Candidate]:
        return [c for c in self.candidates if c.refused is None]

    @property
    def best(self) -> Candidate:
        if not self.priced:
            reasons = "; ".join(f"{c.name}: {c.refused}" for c in self.candidates)
            raise ValueError(f"no strategy can run this call: {reasons}")
        return self.priced[0]

    @property
    def choice(self) -> str:
        return self.best.name

    def explain(self) -> str:
        """Why the choice: its time and what dominates it, against the runner-up."""
        best = self.best
        what = (
            f"{self.call.seq_len} tokens over {self.world} ranks on {self.topology} "
            f"({'forward+backward' if self.backward else 'forward'}, "
            f"{'causal ' if self.causal else ''}{self.layout.value})"
        )
        lines = [
            f"{best.name}: {best.predicted_ms:.3f} ms predicted for {what}; "
            f"{best.dominant} dominates (compute {best.term_ms('compute'):.3f} ms, exposed "
            f"communication {best.term_ms('comm'):.3f} ms, host {best.term_ms('host'):.3f} ms)"
        ]
        if len(self.priced) > 1:
            second = self.priced[1]
            lines.append(
                f"runner-up {second.name}: {second.predicted_ms:.3f} ms "
                f"({second.predicted_ms / best.predicted_ms:.2f}x), {second.dominant} dominates"
            )
        if len(self.layouts) > 1:
            each = [f"{lay.value} {name} {ms:.3f} ms" for lay, name, ms in self.layouts]
            lines.append("layouts: " + ", ".join(each))
        lines += [f"refused {c.name}: {c.refused}" for c in self.candidates if c.refused]
        return "\n".join(lines)

    def headline(self) -> str:
        """``explain`` in one line: the choice, its predicted time and what dominates it,
        and the runner-up with how much slower it is predicted to be."""
        best = self.best
        line = f"{best.name}: {best.predicted_ms:.3g} ms predicted, {best.dominant} dominates"
        if len(self.priced) > 1:
            second = self.priced[1]
            line += f"; {second.name} {second.predicted_ms / best.predicted_ms:.2f}x"
        return line

    def to_dict(self) -> dict[str, Any]:
        return {
            "choice": self.choice if self.priced else None,
            "topology": self.topology,
            "world": self.world,
            "seq": self.call.seq_len,
            "layout": self.layout.value,
            "layouts": {lay.value: {"choice": name, "ms": ms} for lay, name, ms in self.layouts},
            "candidates": [c.to_dict() for c in self.candidates],
        }


def _divisors(n: int) -> list[int]:
    return [d for d in range(2, n) if n % d == 0]


def _candidates(world: int, with_usp: bool, mesh_ulysses: int | None) -> list[Candidate]:
    if mesh_ulysses is not None:  # a fixed mesh: only its split, either ring across
        r = world // mesh_ulysses
        return [
            Candidate(f"usp-{mesh_ulysses}x{r}", Strategy.USP, mesh_ulysses, Strategy.TOKENRING),
            Candidate(f"usp-{mesh_ulysses}x{r}-ring", Strategy.USP, mesh_ulysses, Strategy.RING),
        ]
    found = [Candidate(s.value, s) for s in ONE_D]
    if with_usp:
        for u in _divisors(world):
            r = world // u
            found.append(Candidate(f"usp-{u}x{r}", Strategy.USP, u, Strategy.TOKENRING))
            found.append(Candidate(f"usp-{u}x{r}-ring", Strategy.USP, u, Strategy.RING))
    return found


def _candidate_call(call: CallDescription, c: Candidate) -> CallDescription:
    return call.with_strategy(c.strategy, RingImpl(c.ring_impl.value), c.ulysses)


@lru_cache(maxsize=16)
def _schedules(call: CallDescription, pass_: Pass, stream_tail: bool = True) -> tuple:
    """Every rank's schedule, as the executor builds them (``Plan``)."""
    return tuple(
        build_schedule(call.schedule_key(r, pass_, stream_tail)) for r in range(call.world)
    )


def _refusal(call: CallDescription) -> str | None:
    reasons = refusals(call)
    return "; ".join(reasons) if reasons else None


def plan_call(
    topology: Topology,
    call: CallDescription,
    *,
    backward: bool = False,
    with_usp: bool = True,
    mesh_ulysses: int | None = None,
    stream_tail_min: int = 1 << 20,
) -> PlanReport:
    """Price every candidate strategy for ``call`` (whatever strategy it names) on the
    first ``call.world`` devices of ``topology``. ``stream_tail_min``: the runtime
    setting that decides whether TokenRing streams its last partial
    (``Settings.stream_tail_min``)."""
    world = call.world
    if world < 1:
        raise ValueError(f"world must be at least 1, got {world}")
    topo = topology.first(world)
    stream_tail = call.streams_tail(stream_tail_min)
    passes = (Pass.FORWARD, Pass.BACKWARD) if backward else (Pass.FORWARD,)
    priced: list[Candidate] = []
    for c in _candidates(world, with_usp, mesh_ulysses):
        candidate = _candidate_call(call, c)
        refused = _refusal(candidate)
        if refused:
            priced.append(Candidate(c.name, c.strategy, c.ulysses, c.ring_impl, refused))
            continue
        axes = mesh_axes(world // c.ulysses, c.ulysses) if c.strategy is Strategy.USP else None
        results = []
        for pass_ in passes:
            scheds = _schedules(candidate, pass_, stream_tail)
            results.append((pass_, simulate_timing(list(scheds), pass_, candidate, topo, axes)))
        priced.append(Candidate(c.name, c.strategy, c.ulysses, c.ring_impl, None, tuple(results)))
    order = sorted(priced, key=lambda c: (c.refused is not None, c.predicted_ms or 0.0))
    return PlanReport(topology.name, call, backward, tuple(order))
