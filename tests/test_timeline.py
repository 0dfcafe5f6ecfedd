"""The measured timeline: every compute block and transfer of both passes, in order."""

from __future__ import annotations

import pytest

from dist_cases import timeline_case
from tokenring.execution.timeline import Span
from tokenring.options import Layout, Pass, Strategy
from tokenring.schedules import ScheduleKey, build_schedule
from tokenring.schedules.ir import Compute, Post
from tokenring_bench.plots import plot_timelines


@pytest.mark.parametrize("strategy", [s.value for s in Strategy if s is not Strategy.USP])
def test_spans_cover_every_compute_and_transfer_of_the_schedule(pool, strategy, tmp_path):
    world, heads = 3, (6, 3)
    per_rank = pool.run(timeline_case, [dict(world=world, strategy=strategy, heads=heads)])[0]
    for rank, spans in enumerate(per_rank):
        for phase, pass_ in (("forward", Pass.FORWARD), ("backward", Pass.BACKWARD)):
            # the plan of these small shards returns TokenRing's last partial whole
            key = ScheduleKey.of_sequence(
                Strategy(strategy), Layout.ZIGZAG, world, rank, 8 * world, True, pass_,
                heads_q=heads[0], heads_kv=heads[1], stream_tail=False,
            )  # fmt: skip
            sched = build_schedule(key)
            mine = [s for s in spans if s["phase"] == phase]
            computes = [s for s in mine if s["track"] == "compute"]
            transfers = [s for s in mine if s["track"].startswith("lane")]
            assert len(computes) == sum(isinstance(op, Compute) for op in sched.ops)
            lanes = sum(len({m.lane for m in op.moves}) for op in sched.ops if isinstance(op, Post))
            assert len(transfers) == lanes
            assert all(0 <= s["start_ms"] <= s["end_ms"] for s in mine)
            starts = [s["start_ms"] for s in computes]
            assert starts == sorted(starts), "compute blocks run in schedule order"
    path = tmp_path / "t.png"
    plot_timelines({"test": [Span(**s) for s in per_rank[0]]}, str(path))
    assert path.stat().st_size > 1000
