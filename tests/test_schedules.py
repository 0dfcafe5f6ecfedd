"""Schedules checked as data, without running attention."""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from tokenring.layouts import chunk_ids
from tokenring.options import Layout, Pass, Strategy
from tokenring.schedules import build_schedule
from tokenring.schedules.blocks import Block, Rel, cover, pair_relation, relations
from tokenring.schedules.ir import Compute, SlotKind, Wait
from tokenring.schedules.simulate import (
    ScheduleError,
    check_stream_order,
    expected_coverage,
    simulate,
)

ALL = list(itertools.product(Strategy, Layout, (False, True), Pass))


def _schedules(strategy, layout, causal, pass_, world):
    return [build_schedule(strategy, layout, world, r, causal, pass_) for r in range(world)]


@pytest.mark.parametrize(
    "strategy,layout,causal,pass_", ALL, ids=lambda x: str(getattr(x, "value", x))
)
@pytest.mark.parametrize("world", list(range(1, 9)))
def test_every_allowed_pair_is_computed_exactly_once(strategy, layout, causal, pass_, world):
    scheds = _schedules(strategy, layout, causal, pass_, world)
    check_stream_order(scheds)  # no deadlock when each lane runs its groups in order (NCCL)
    sim = simulate(scheds, layout)
    for rank in range(world):
        for sub, cell in enumerate(sim.query_results[rank]):
            assert cell.row == (rank, sub), "query result rows hold another shard"
            chunk = chunk_ids(layout, world, rank)[sub]
            assert cell.contrib == expected_coverage(world, causal, chunk)
        if pass_ is Pass.BACKWARD:
            for sub, cell in enumerate(sim.kv_results[rank]):
                assert cell.row == (rank, sub)
                chunk = chunk_ids(layout, world, rank)[sub]
                assert cell.contrib == expected_coverage(world, causal, chunk, kv_side=True)


@pytest.mark.parametrize(
    "layout,causal,pass_", list(itertools.product(Layout, (False, True), Pass))
)
@pytest.mark.parametrize("world", list(range(2, 9)))
def test_tokenring_never_moves_keys_values_or_their_gradients(layout, causal, pass_, world):
    sim = simulate(_schedules(Strategy.TOKENRING, layout, causal, pass_, world), layout)
    kinds = {kind for sends in sim.sends for _, _, kind in sends}
    assert kinds <= {SlotKind.QUERY, SlotKind.QUERY_RESULT}


@pytest.mark.parametrize("world", list(range(2, 9)))
def test_zigzag_tokenring_forwards_only_the_needed_half(world):
    """Q_j travels whole to ranks j-1..0 and only its second half to the others:
    sum_j j = P(P-1)/2 whole hops and as many half hops, 3/4 of a full rotation."""
    scheds = _schedules(Strategy.TOKENRING, Layout.ZIGZAG, True, Pass.FORWARD, world)
    sim = simulate(scheds, Layout.ZIGZAG)
    sizes = [
        (t.rows.start, t.rows.stop)
        for sends in sim.sends
        for _, t, kind in sends
        if kind is SlotKind.QUERY
    ]
    assert sizes.count((0, 2)) == world * (world - 1) // 2
    assert sizes.count((1, 2)) == world * (world - 1) // 2
    assert len(sizes) == world * (world - 1)


def test_simulator_catches_a_missing_wait():
    """The checker can fail: drop one Wait and the read-before-receive is reported."""
    scheds = _schedules(Strategy.TOKENRING, Layout.ZIGZAG, True, Pass.FORWARD, 3)
    broken = scheds[0]
    ops = list(broken.ops)
    first_wait = next(i for i, op in enumerate(ops) if isinstance(op, Wait))
    del ops[first_wait]
    scheds[0] = dataclasses.replace(broken, ops=tuple(ops))
    with pytest.raises(ScheduleError):
        simulate(scheds, Layout.ZIGZAG)


def test_simulator_catches_a_double_count():
    """The coverage check can fail: run one block twice and the count is off."""
    scheds = _schedules(Strategy.RING, Layout.CONTIGUOUS, False, Pass.FORWARD, 2)
    block = next(op for op in scheds[1].ops if isinstance(op, Compute))
    again = dataclasses.replace(block, fresh_q=(False,) * len(block.fresh_q))
    scheds[1] = dataclasses.replace(scheds[1], ops=(*scheds[1].ops, again))
    sim = simulate(scheds, Layout.CONTIGUOUS)
    chunks = chunk_ids(Layout.CONTIGUOUS, 2, 1)
    assert any(
        cell.contrib != expected_coverage(2, False, chunks[i])
        for i, cell in enumerate(sim.query_results[1])
    )


@pytest.mark.parametrize(
    "q,k,causal,rel",
    [
        (3, 1, True, Rel.FULL),
        (1, 1, True, Rel.DIAG),
        (1, 3, True, Rel.NONE),
        (1, 3, False, Rel.FULL),
        (2, 2, False, Rel.FULL),
    ],
)
def test_pair_relation(q, k, causal, rel):
    assert pair_relation(q, k, causal) is rel


@pytest.mark.parametrize(
    "layout,world,rank,chunks",
    [
        (Layout.ZIGZAG, 2, 0, (0, 3)),
        (Layout.ZIGZAG, 2, 1, (1, 2)),
        (Layout.ZIGZAG, 4, 1, (1, 6)),
        (Layout.CONTIGUOUS, 4, 1, (2, 3)),
        (Layout.CONTIGUOUS, 1, 0, (0, 1)),
    ],
)
def test_chunk_ids(layout, world, rank, chunks):
    assert chunk_ids(layout, world, rank) == chunks


@pytest.mark.parametrize(
    "world,q_owner,kv_owner,blocks",
    [
        # zigzag, causal: r < j -> all of Q_j against the first key chunk
        (4, 3, 1, [Block(0, 2, 0, 1, False)]),
        # r > j -> the second half of Q_j against all keys
        (4, 1, 3, [Block(1, 2, 0, 2, False)]),
        # own block: one causal call over both chunks
        (4, 2, 2, [Block(0, 2, 0, 2, True)]),
    ],
)
def test_zigzag_blocks_are_half_squares(world, q_owner, kv_owner, blocks):
    assert cover(relations(Layout.ZIGZAG, world, q_owner, kv_owner, True)) == blocks


def test_causal_blocks_are_square():
    for strategy, layout, causal, pass_ in ALL:
        for world in range(1, 6):
            for sched in _schedules(strategy, layout, causal, pass_, world):
                for op in sched.ops:
                    if getattr(op, "causal", False):
                        assert (op.q.start, op.q.stop) == (op.kv.start, op.kv.stop)


def test_stream_order_check_catches_a_receive_queued_before_the_send_its_peer_needs():
    """Both ranks queue "receive" then "send" as separate groups on one lane: fine
    for gloo (simulate accepts it), a deadlock for NCCL. This is the hang seen on
    2 x H100 before the last-step pieces were posted as one group."""
    from tokenring.schedules.builder import ScheduleBuilder
    from tokenring.schedules.ir import Precision, Rows, SlotSpec, Transfer

    scheds = []
    for rank in range(2):
        slots = {
            "q": SlotSpec(SlotKind.QUERY, local=True),
            "kv": SlotSpec(SlotKind.KV, local=True),
            "acc": SlotSpec(SlotKind.QUERY_RESULT, Precision.ACCUM),
            "part_in0": SlotSpec(SlotKind.QUERY_RESULT),
        }
        b = ScheduleBuilder("test", rank, 2, slots)
        b.compute(
            [Block(0, 2, 0, 2, True)],
            q_slot="q",
            kv_slot="kv",
            q_out="acc",
            kv_out=None,
            step=0,
            q_owner=rank,
            kv_owner=rank,
        )
        recv = b.post("in", 0, [Transfer(Rows("part_in0"), 1 - rank, send=False, lane=1)])
        send = b.post("out", 0, [Transfer(Rows("acc"), 1 - rank, send=True, lane=1)])
        b.wait(recv, 1)
        b.wait(send, 1)
        scheds.append(b.build("acc", None))
    simulate(scheds, Layout.CONTIGUOUS)  # gloo semantics: runs
    with pytest.raises(ScheduleError, match="deadlock under NCCL stream order"):
        check_stream_order(scheds)
