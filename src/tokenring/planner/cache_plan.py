"""The planner's prices for a KV cache call: each strategy's schedule over the cache's
geometry (``schedules/cache.py``) run against a topology, as for any other call.

A cache piece is priced at its cell's length (the most any row holds on any rank,
rounded up to a power of two), so a cache that is not full is priced above what it
computes; the strategies pay alike for that. Replicated queries have one schedule;
sharded chunks are priced for TokenRing (the queries travel), ring (every cache
travels), all-gather (every cache is gathered) and Ulysses (resharded by heads, where
the heads divide).
"""

from __future__ import annotations

from dataclasses import replace

from ..call.description import CallDescription
from ..options import Layout, Pass, Strategy
from ..schedules import STRATEGIES
from ..schedules.cache import LOCAL, CacheKey, cache_schedule
from ..schedules.key import ScheduleKey
from .choose import ONE_D, Candidate, PlanReport
from .timing import simulate_timing
from .topology import Topology

__all__ = ["cache_refusal", "plan_cache_call"]


def cache_refusal(key: CacheKey) -> str:
    """Why ``key.strategy`` cannot run this sharded cache call (empty if it can)."""
    if key.strategy is Strategy.USP:
        return "strategy 'usp' runs over a mesh; a KVCache runs over a group"
    probe = ScheduleKey(
        key.strategy, Layout.CONTIGUOUS, key.world, key.rank, key.geometry, key.mask,
        Pass.FORWARD, key.heads_q, key.heads_kv,
    )  # fmt: skip
    reasons = STRATEGIES[key.strategy].not_supported_reasons(probe)
    return f"strategy {key.strategy.value!r} cannot run: {'; '.join(reasons)}" if reasons else ""


def plan_cache_call(topology: Topology, call: CallDescription, key: CacheKey) -> PlanReport:
    """Every strategy's predicted time for the sharded cache call ``key`` describes (its
    strategy and rank ignored), fastest first, on the first ``key.world`` devices; for
    replicated queries (decode) the one schedule they run, named ``local``."""
    topo = topology.first(key.world)
    priced: list[Candidate] = []
    if not key.sharded:  # replicated queries: one schedule, whatever is named
        scheds = [cache_schedule(replace(key, rank=r)) for r in range(key.world)]
        prediction = simulate_timing(scheds, Pass.FORWARD, call, topo)
        only = Candidate(LOCAL, Strategy.TOKENRING, passes=((Pass.FORWARD, prediction),))
        return PlanReport(topology.name, call, False, (only,))
    for strategy in ONE_D:
        probe = replace(key, strategy=strategy, rank=0)
        refused = cache_refusal(probe)
        if refused:
            priced.append(Candidate(strategy.value, strategy, refused=refused))
            continue
        scheds = [cache_schedule(replace(probe, rank=r)) for r in range(key.world)]
        prediction = simulate_timing(scheds, Pass.FORWARD, call.with_strategy(strategy), topo)
        priced.append(Candidate(strategy.value, strategy, passes=((Pass.FORWARD, prediction),)))
    order = sorted(priced, key=lambda c: (c.refused is not None, c.predicted_ms or 0.0))
    return PlanReport(topology.name, call, False, tuple(order))
