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

import gc
import multiprocessing
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import lru_cache, partial
from typing import Any

import torch

from ..call.checks import refusals
from ..call.description import CallDescription
from ..options import Layout, Pass, RingImpl, Strategy
from ..schedules import build_schedule
from ..schedules.usp import mesh_axes
from .symmetry import usp_symmetry
from .timing import Prediction, lower_bound_ms, simulate_timing
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
    at_least_ms: float | None = None
    """Not simulated: what one of its ranks alone takes (``timing.lower_bound_ms``) is
    already longer than the fastest candidate's whole call."""

    @property
    def predicted_ms(self) -> float | None:
        if self.refused or self.at_least_ms is not None:
            return None
        return sum(p.ms for _, p in self.passes)

    @property
    def priced(self) -> bool:
        """Simulated: it has a prediction (neither refused nor bounded)."""
        return self.refused is None and self.at_least_ms is None

    def term_ms(self, term: str) -> float:
        """Total compute, exposed communication or host time over the passes."""
        return sum(getattr(p, f"{term}_ms") for _, p in self.passes)

    @property
    def dominant(self) -> str | None:
        """The term that decides the time over the passes: ``host`` (where the host
        cannot keep ahead of the device), ``compute`` or ``communication``."""
        if not self.priced:
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
        priced = self.priced
        return {
            "strategy": self.name,
            "predicted_ms": self.predicted_ms,
            "at_least_ms": self.at_least_ms,
            "steps": steps,
            "refused": self.refused,
            "dominant": self.dominant,
            "compute_ms": self.term_ms("compute") if priced else None,
            "exposed_comm_ms": self.term_ms("comm") if priced else None,
            "host_ms": self.term_ms("host") if priced else None,
            "slowest_rank": [p.slowest_rank for _, p in self.passes] or None,
        }


@dataclass(frozen=True)
class PlanReport:
    """Every candidate: the simulated ones fastest first, then those not simulated because
    a lower bound already exceeds the fastest (by that bound), the refused ones last;
    ``choice`` is the fastest."""

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
        return [c for c in self.candidates if c.priced]

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
        lines += [
            f"not simulated {c.name}: at least {c.at_least_ms:.3f} ms (one of its ranks alone), "
            f"slower than {best.name}"
            for c in self.candidates
            if c.at_least_ms is not None
        ]
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
def _schedules(
    call: CallDescription,
    pass_: Pass,
    stream_tail: bool = True,
    ranks: tuple[int, ...] | None = None,
) -> tuple:
    """Every rank's schedule, as the executor builds them (``Plan``); with ``ranks``,
    those ranks' only (None for the others)."""
    wanted = range(call.world) if ranks is None else set(ranks)
    return tuple(
        build_schedule(call.schedule_key(r, pass_, stream_tail)) if r in wanted else None
        for r in range(call.world)
    )


def _refusal(call: CallDescription) -> str | None:
    reasons = refusals(call)
    return "; ".join(reasons) if reasons else None


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off while the planner runs: building and
    simulating schedules makes hundreds of thousands of small objects (few in cycles),
    and the collector's passes over them took half of a 64-GPU plan's time. Back on as
    it was, whatever happens."""
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()


def plan_call(
    topology: Topology,
    call: CallDescription,
    *,
    backward: bool = False,
    with_usp: bool = True,
    mesh_ulysses: int | None = None,
    stream_tail_min: int = 1 << 20,
    workers: int = 1,
    exhaustive: bool = False,
    progress: Callable[[Candidate], None] | None = None,
) -> PlanReport:
    """Price every candidate strategy for ``call`` (whatever strategy it names) on the
    first ``call.world`` devices of ``topology``. ``stream_tail_min``: the runtime
    setting that decides whether TokenRing streams its last partial
    (``Settings.stream_tail_min``). ``workers``: processes to simulate candidates in
    (forked, where the platform forks; never from inside a distributed job).

    A candidate whose simulation is large (more than ``BOUND_ABOVE_STEPS`` rank-steps) is
    first bounded from one rank's schedule; where that bound exceeds the fastest
    simulated candidate it is not simulated (``Candidate.at_least_ms``): the choice is the
    one simulating everything gives. ``exhaustive``: simulate every candidate.
    ``progress``: told of each candidate once it is priced, bounded or refused."""
    world = call.world
    if world < 1:
        raise ValueError(f"world must be at least 1, got {world}")
    topo = topology.first(world)
    stream_tail = call.streams_tail(stream_tail_min)
    passes = (Pass.FORWARD, Pass.BACKWARD) if backward else (Pass.FORWARD,)
    candidates = _candidates(world, with_usp, mesh_ulysses)
    with _collector_paused():
        job = (call, topo, passes, stream_tail)
        priced = _price_all(job, candidates, workers, exhaustive, progress)
    order = sorted(
        priced,
        key=lambda c: (
            c.refused is not None,
            c.at_least_ms is not None,
            c.predicted_ms or c.at_least_ms or 0.0,
        ),
    )
    return PlanReport(topology.name, call, backward, tuple(order))


def _price_all(
    job: tuple,
    candidates: list[Candidate],
    workers: int,
    exhaustive: bool,
    progress: Callable[[Candidate], None] | None,
) -> list[Candidate]:
    """Every candidate priced, refused or bounded: the small ones simulated first; each
    large one bounded, and simulated only where its bound does not exceed the fastest."""
    call, topo = job[0], job[1]
    small, large = [], []
    for c in candidates:
        big = not exhaustive and _simulated_steps(call, topo, c) > BOUND_ABOVE_STEPS
        (large if big else small).append(c)
    priced = _map(_price_one, job, small, workers, progress)
    fastest = min((c.predicted_ms for c in priced if c.priced), default=None)
    worth = []
    for c in _map(_bound_one, job, large, workers):
        if c.refused is None and (fastest is None or c.at_least_ms <= fastest):
            worth.append(_unbounded(c))
        else:  # refused, or slower than the fastest whatever its simulation says
            priced.append(c)
            if progress is not None:
                progress(c)
    return priced + _map(_price_one, job, worth, workers, progress)


BOUND_ABOVE_STEPS = 64 * 64
"""Candidates that simulate more rank-steps than this (ranks simulated times ring
length: 64 GPUs' 1-D rings) are bounded before they are simulated."""


def _unbounded(c: Candidate) -> Candidate:
    return Candidate(c.name, c.strategy, c.ulysses, c.ring_impl)


def _map(
    work: Callable[..., Candidate],
    job: tuple,
    candidates: list[Candidate],
    workers: int,
    progress: Callable[[Candidate], None] | None = None,
) -> list[Candidate]:
    """``work(*job, c)`` for each candidate; in ``workers`` forked processes where there
    are several (the largest simulations handed out first). ``progress`` is told of
    each result as it comes."""
    jobs = [(*job, c) for c in candidates]
    tell = progress or (lambda c: None)
    if workers <= 1 or len(jobs) < 2 or not _may_fork():
        found = []
        for j in jobs:
            found.append(work(*j))
            tell(found[-1])
        return found
    call, topo = job[0], job[1]
    by_size = sorted(range(len(jobs)), key=lambda i: -_simulated_steps(call, topo, candidates[i]))
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(
        min(workers, len(jobs)), mp_context=context, initializer=_one_thread
    ) as pool:
        futures = {i: pool.submit(work, *jobs[i]) for i in by_size}
        for done in as_completed(futures.values()):
            tell(done.result())
        return [futures[i].result() for i in range(len(jobs))]


def _one_thread() -> None:
    """A forked worker's first act: torch on one thread, as DataLoader's workers do (the
    parent's OpenMP threads are not in the child: an op that waited on them would hang)."""
    torch.set_num_threads(1)


def _may_fork() -> bool:
    """Whether forking workers is safe here: the platform forks, and no other Python
    thread runs (one could hold a lock the children would wait on forever: seen under
    pytest's worker pool). Otherwise the candidates are priced one after another."""
    return "fork" in multiprocessing.get_all_start_methods() and threading.active_count() == 1


def _simulated_steps(call: CallDescription, topo: Topology, c: Candidate) -> int:
    """About how much work simulating ``c`` is: ranks simulated times ring length (one
    rank of each kind for USP, ``symmetry.py``), or the P^2 flows of a collective."""
    world = call.world
    if c.strategy is not Strategy.USP:  # rings of P steps, or collectives of P^2 flows
        return world * world
    symmetry = usp_symmetry(_candidate_call(call, c), topo.links)
    ranks = world if symmetry is None else world // symmetry.order
    return ranks * (world // c.ulysses)


def _axes(world: int, c: Candidate) -> dict | None:
    """The mesh axes of a USP candidate (None: the whole group, one axis)."""
    return mesh_axes(world // c.ulysses, c.ulysses) if c.strategy is Strategy.USP else None


def _bound_one(
    call: CallDescription,
    topo: Topology,
    passes: tuple[Pass, ...],
    stream_tail: bool,
    c: Candidate,
) -> Candidate:
    """One candidate refused with its reasons, or with a time its simulation cannot beat
    (``timing.lower_bound_ms`` of rank 0, summed over the passes) as ``at_least_ms``."""
    candidate = _candidate_call(call, c)
    refused = _refusal(candidate)
    if refused:
        return Candidate(c.name, c.strategy, c.ulysses, c.ring_impl, refused)
    axes = _axes(call.world, c)
    bound = 0.0
    for pass_ in passes:
        schedule = _schedules(candidate, pass_, stream_tail, (0,))[0]
        bound += lower_bound_ms(schedule, pass_, candidate, topo, axes)
    return Candidate(c.name, c.strategy, c.ulysses, c.ring_impl, at_least_ms=bound)


def _price_one(
    call: CallDescription,
    topo: Topology,
    passes: tuple[Pass, ...],
    stream_tail: bool,
    c: Candidate,
) -> Candidate:
    """One candidate refused with its reasons, or its prediction per pass (the numbers;
    ``spans`` simulates again when asked)."""
    candidate = _candidate_call(call, c)
    refused = _refusal(candidate)
    if refused:
        return Candidate(c.name, c.strategy, c.ulysses, c.ring_impl, refused)
    axes = _axes(call.world, c)
    symmetry = usp_symmetry(candidate, topo.links)
    ranks = symmetry.representatives if symmetry is not None else None
    results = []
    for pass_ in passes:
        scheds = list(_schedules(candidate, pass_, stream_tail, ranks))
        found = simulate_timing(
            scheds, pass_, candidate, topo, axes, keep_timeline=False, symmetry=symmetry
        )
        replay = partial(_replay, candidate, pass_, stream_tail, topo, axes)
        results.append((pass_, replace(found, replay=replay)))
    return Candidate(c.name, c.strategy, c.ulysses, c.ring_impl, None, tuple(results))


def _replay(
    call: CallDescription, pass_: Pass, stream_tail: bool, topo: Topology, axes
) -> Prediction:
    """The simulation of one candidate's pass again, with its timeline."""
    return simulate_timing(list(_schedules(call, pass_, stream_tail)), pass_, call, topo, axes)
