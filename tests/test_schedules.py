"""Schedules checked as data, without running attention."""

from __future__ import annotations

import dataclasses
import itertools
from functools import partial

import pytest

from tokenring.options import Layout, Pass, Strategy
from tokenring.schedules import ScheduleKey, build_schedule
from tokenring.schedules.allgather import head_groups
from tokenring.schedules.blocks import Block, Rel, cover, pair_relation, relations
from tokenring.schedules.geometry import chunk_ids, mesh_pieces
from tokenring.schedules.ir import (
    AllGather,
    AllToAll,
    Compute,
    Post,
    Precision,
    Rows,
    SlotKind,
    SlotSpec,
    Transfer,
    Wait,
)
from tokenring.schedules.simulate import (
    ScheduleError,
    check_stream_order,
    expected_coverage,
    simulate,
)
from tokenring.schedules.usp import mesh_axes

ONE_D = [s for s in Strategy if s is not Strategy.USP]
STRATEGY_CASES = list(itertools.product(ONE_D, Layout, (False, True), Pass))


def head_configs(strategy: Strategy, world: int) -> list[tuple[int, int]]:
    """Head counts to simulate: each kind of head split a strategy makes."""
    if strategy is Strategy.ULYSSES:  # divisible, replicated single head, replicated pairs
        return [(2 * world, 2 * world), (2 * world, 1)] + (
            [(2 * world, 2)] if world % 2 == 0 else []
        )
    if strategy is Strategy.ALLGATHER:  # 4, 2, 1 and 3 head groups
        return [(4, 4), (8, 2), (2, 1), (6, 3)]
    return [(2, 1)]  # TokenRing and ring move every head together


def schedules(strategy, layout, causal, pass_, world, heads=(2, 1), stream_tail=True):
    return [
        build_schedule(
            ScheduleKey(strategy, layout, world, r, causal, pass_, *heads, stream_tail=stream_tail)
        )
        for r in range(world)
    ]


def assert_full_coverage(sim, layout, causal, pass_, world, heads, pieces_of=None) -> None:
    """Every (query piece, key piece) pair the mask allows, once per head, on both sides;
    ``pieces_of(rank)``: the pieces each rank holds (default: the 1-D layout)."""
    hq, hkv = heads
    pieces_of = pieces_of or (lambda rank: chunk_ids(layout, world, rank))
    for rank in range(world):
        sides = [(sim.query_results[rank], False)]
        if pass_ is Pass.BACKWARD:
            sides.append((sim.kv_results[rank], True))
        for cells, kv_side in sides:
            for i, row in enumerate(cells):
                piece = pieces_of(rank)[i]
                for head, cell in enumerate(row):
                    assert cell.label == (piece, head), "result rows hold another piece or head"
                    expected = expected_coverage(
                        2 * world, causal, piece, head, hq, hkv, kv_side=kv_side
                    )
                    assert cell.contrib == expected, (rank, i, head, kv_side)


@pytest.mark.parametrize(
    "strategy,layout,causal,pass_", STRATEGY_CASES, ids=lambda x: str(getattr(x, "value", x))
)
@pytest.mark.parametrize("world", list(range(1, 9)))
def test_every_allowed_pair_is_computed_exactly_once(strategy, layout, causal, pass_, world):
    streams = (True, False) if strategy is Strategy.TOKENRING else (True,)
    for heads in head_configs(strategy, world):
        for stream in streams:  # TokenRing's last partial in halves, or whole
            scheds = schedules(strategy, layout, causal, pass_, world, heads, stream)
            check_stream_order(scheds)  # no deadlock when each lane runs its groups in order
            sim = simulate(scheds, *heads)
            assert_full_coverage(sim, layout, causal, pass_, world, heads)


MESHES = [(1, 1), (2, 1), (1, 2), (2, 2), (3, 2), (2, 3), (4, 2), (2, 4), (8, 1), (1, 8)]


@pytest.mark.parametrize("ring,ulysses", MESHES, ids=lambda x: str(x))
@pytest.mark.parametrize("ring_impl", [Strategy.TOKENRING, Strategy.RING], ids=lambda s: s.value)
def test_usp_computes_every_allowed_pair_exactly_once_on_every_mesh(ring, ulysses, ring_impl):
    """USP up to 8 ranks, both rings, both layouts, causal or not, both passes; heads
    split evenly and (one key/value head) replicated over the Ulysses axis."""
    world = ring * ulysses
    axes = mesh_axes(ring, ulysses)
    for layout, causal, pass_ in itertools.product(Layout, (False, True), Pass):
        for heads in ((2 * ulysses, 2 * ulysses), (2 * ulysses, 1)):
            scheds = [
                build_schedule(
                    ScheduleKey(
                        Strategy.USP, layout, world, g, causal, pass_, *heads, ulysses, ring_impl
                    )
                )
                for g in range(world)
            ]
            check_stream_order(scheds, axes)
            sim = simulate(scheds, *heads, axes)

            pieces = partial(
                lambda lay, g: mesh_pieces(lay, ring, ulysses, *divmod(g, ulysses)), layout
            )
            assert_full_coverage(sim, layout, causal, pass_, world, heads, pieces)


@pytest.mark.parametrize("ring,ulysses", [(2, 2), (4, 2)], ids=lambda x: str(x))
def test_usp_tokenring_never_moves_keys_values_across_the_ring(ring, ulysses):
    """Across the ring axis only queries and partials travel; K, V move only in the
    all-to-all inside a Ulysses group."""
    world = ring * ulysses
    for layout, causal, pass_ in itertools.product(Layout, (False, True), Pass):
        scheds = [
            build_schedule(
                ScheduleKey(Strategy.USP, layout, world, g, causal, pass_, 4, 4, ulysses)
            )
            for g in range(world)
        ]
        sim = simulate(scheds, 4, 4, mesh_axes(ring, ulysses))
        across = {kind for sends in sim.sends for _, m, kind in sends if m.axis == "ring"}
        assert across <= {SlotKind.QUERY, SlotKind.QUERY_RESULT}, across


@pytest.mark.parametrize(
    "layout,causal,pass_", list(itertools.product(Layout, (False, True), Pass))
)
@pytest.mark.parametrize("world", list(range(2, 9)))
def test_tokenring_never_moves_keys_values_or_their_gradients(layout, causal, pass_, world):
    sim = simulate(schedules(Strategy.TOKENRING, layout, causal, pass_, world))
    kinds = {kind for sends in sim.sends for _, _, kind in sends}
    assert kinds <= {SlotKind.QUERY, SlotKind.QUERY_RESULT}


@pytest.mark.parametrize("world", list(range(2, 9)))
def test_zigzag_tokenring_forwards_only_the_needed_half(world):
    """Q_j travels whole to ranks j-1..0 and only its second half to the others:
    sum_j j = P(P-1)/2 whole hops and as many half hops, 3/4 of a full rotation."""
    sim = simulate(schedules(Strategy.TOKENRING, Layout.ZIGZAG, True, Pass.FORWARD, world))
    sizes = [
        (t.rows.start, t.rows.stop)
        for sends in sim.sends
        for _, t, kind in sends
        if kind is SlotKind.QUERY
    ]
    assert sizes.count((0, 2)) == world * (world - 1) // 2
    assert sizes.count((1, 2)) == world * (world - 1) // 2
    assert len(sizes) == world * (world - 1)


@pytest.mark.parametrize("pass_", list(Pass))
@pytest.mark.parametrize("heads", [(8, 8), (8, 2), (8, 1)])
def test_ulysses_replicates_only_the_key_value_heads_each_rank_needs(pass_, heads):
    """With fewer key/value heads than ranks each rank receives exactly one of them,
    and query heads are split evenly."""
    world = 4
    scheds = schedules(Strategy.ULYSSES, Layout.ZIGZAG, True, pass_, world, heads)
    kv_moves = [
        m
        for op in scheds[0].ops
        if isinstance(op, Post)
        for m in op.moves
        if isinstance(m, AllToAll) and m.src.slot == "kv"
    ]
    (move,) = kv_moves
    _, hkv = heads
    held = hkv // scheds[0].slots["kv_heads"].head_parts
    assert held == max(1, hkv // world)
    assert move.parts == tuple(d * min(hkv, world) // world for d in range(world))


def test_allgather_overlaps_the_gather_of_the_next_head_group_with_compute():
    """Group g+1's gather is posted before group g computes, on one lane."""
    scheds = schedules(Strategy.ALLGATHER, Layout.ZIGZAG, True, Pass.FORWARD, 4, (8, 8))
    ops = scheds[0].ops
    groups = head_groups(4, 8)
    gathers = [i for i, op in enumerate(ops) if isinstance(op, Post)]
    computes = [i for i, op in enumerate(ops) if isinstance(op, Compute)]
    assert len(gathers) == groups
    assert gathers[1] < computes[0], "the second gather must be in flight during the first compute"


@pytest.mark.parametrize(
    "strategy,forward_lanes,backward_lanes",
    [
        (Strategy.TOKENRING, {0, 1}, {0, 1}),  # queries one way, partials the other
        (Strategy.RING, {0}, {0, 1}),  # K, V; then dK, dV one hop behind
        (Strategy.ULYSSES, {0}, {0}),
        (Strategy.ALLGATHER, {0}, {0, 1}),  # gathers; reduce-scatters beside them
    ],
)
def test_schedules_declare_the_lanes_they_use(strategy, forward_lanes, backward_lanes):
    for pass_, lanes in ((Pass.FORWARD, forward_lanes), (Pass.BACKWARD, backward_lanes)):
        sched = schedules(strategy, Layout.ZIGZAG, True, pass_, 4, (8, 8))[0]
        assert {lane.index for lane in sched.lanes} == lanes, pass_


# -- the checker can fail ----------------------------------------------------


def _replace_collective(sched, change):
    ops = []
    for op in sched.ops:
        if isinstance(op, Post) and op.collective is not None:
            op = dataclasses.replace(op, moves=(change(op.collective),))
        ops.append(op)
    return dataclasses.replace(sched, ops=tuple(ops))


def test_simulator_catches_a_missing_wait():
    """Drop one Wait and the read-before-receive is reported."""
    scheds = schedules(Strategy.TOKENRING, Layout.ZIGZAG, True, Pass.FORWARD, 3)
    ops = list(scheds[0].ops)
    del ops[next(i for i, op in enumerate(ops) if isinstance(op, Wait))]
    scheds[0] = dataclasses.replace(scheds[0], ops=tuple(ops))
    with pytest.raises(ScheduleError):
        simulate(scheds)


def test_simulator_catches_a_double_count():
    """Run one block twice and the coverage is off."""
    scheds = schedules(Strategy.RING, Layout.CONTIGUOUS, False, Pass.FORWARD, 2)
    block = next(op for op in scheds[1].ops if isinstance(op, Compute))
    again = dataclasses.replace(block, fresh_q=(False,) * len(block.fresh_q))
    scheds[1] = dataclasses.replace(scheds[1], ops=(*scheds[1].ops, again))
    sim = simulate(scheds)
    with pytest.raises(AssertionError):
        assert_full_coverage(sim, Layout.CONTIGUOUS, False, Pass.FORWARD, 2, (2, 1))


def test_simulator_catches_a_query_head_meeting_the_wrong_key_value_head():
    """Send each rank another rank's key/value head in Ulysses: the GQA check fires."""
    scheds = schedules(Strategy.ULYSSES, Layout.ZIGZAG, True, Pass.FORWARD, 4, (8, 2))

    def reversed_kv(move):
        return dataclasses.replace(move, parts=move.parts[::-1]) if move.src.slot == "kv" else move

    with pytest.raises(ScheduleError, match="meets key/value head"):
        simulate([_replace_collective(s, reversed_kv) for s in scheds], 8, 2)


def test_simulator_catches_members_that_disagree_on_a_collective():
    scheds = schedules(Strategy.ALLGATHER, Layout.ZIGZAG, False, Pass.FORWARD, 2, (4, 4))
    scheds[1] = _replace_collective(
        scheds[1],
        lambda m: (
            dataclasses.replace(m, placement=m.placement[::-1]) if isinstance(m, AllGather) else m
        ),
    )
    with pytest.raises(ScheduleError, match="collective mismatch"):
        simulate(scheds, 4, 4)


def test_simulator_catches_a_collective_one_rank_never_posts():
    scheds = schedules(Strategy.ULYSSES, Layout.ZIGZAG, False, Pass.FORWARD, 2, (4, 4))
    first = next(op for op in scheds[1].ops if isinstance(op, Post))
    scheds[1] = dataclasses.replace(
        scheds[1],
        ops=tuple(op for op in scheds[1].ops if getattr(op, "handle", "") != first.handle),
    )
    with pytest.raises(ScheduleError):
        simulate(scheds, 4, 4)
    with pytest.raises(ScheduleError, match="posted by 1 members"):
        check_stream_order(scheds)


def test_simulator_catches_a_gradient_overwritten_while_it_is_reduce_scattered():
    """All-gather's backward reuses a gathered dk, dv buffer two head groups later; without
    waiting for the first reduce-scatter, the second group's compute overwrites it."""
    scheds = schedules(Strategy.ALLGATHER, Layout.ZIGZAG, True, Pass.BACKWARD, 2, (8, 8))
    broken = []
    for s in scheds:
        ops = [op for op in s.ops if not (isinstance(op, Wait) and op.handle == "dkv@0")]
        broken.append(dataclasses.replace(s, ops=(*ops, Wait("dkv@0", 99))))
    with pytest.raises(ScheduleError, match="while a send reads it"):
        simulate(broken, 8, 8)


def test_simulator_catches_a_gathered_gradient_that_is_not_zeroed():
    """Causal contiguous rank 0 meets only its own keys; the rest of its gathered dk, dv
    must be zeros when reduce-scattered."""
    scheds = schedules(Strategy.ALLGATHER, Layout.CONTIGUOUS, True, Pass.BACKWARD, 3, (4, 4))
    broken = [
        dataclasses.replace(
            s, slots={k: dataclasses.replace(v, zeroed=False) for k, v in s.slots.items()}
        )
        for s in scheds
    ]
    with pytest.raises(ScheduleError, match="never written"):
        simulate(broken, 4, 4)


# -- pure functions, table-driven -------------------------------------------


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


def _zigzag(world, rank):
    return chunk_ids(Layout.ZIGZAG, world, rank)


@pytest.mark.parametrize(
    "q_pieces,kv_pieces,blocks",
    [
        # zigzag, causal, P=4: r < j -> all of Q_j against the first key chunk
        (_zigzag(4, 3), _zigzag(4, 1), [Block(0, 2, 0, 1, False)]),
        # r > j -> the second half of Q_j against all keys
        (_zigzag(4, 1), _zigzag(4, 3), [Block(1, 2, 0, 2, False)]),
        # own block: one causal call over both chunks
        (_zigzag(4, 2), _zigzag(4, 2), [Block(0, 2, 0, 2, True)]),
        # a gathered sequence against itself (Ulysses): one causal call
        (tuple(range(8)), tuple(range(8)), [Block(0, 8, 0, 8, True)]),
        # all-gather, contiguous rank 1 of 4 (pieces 2, 3): one full call, one causal square
        ((2, 3), tuple(range(8)), [Block(0, 2, 0, 2, False), Block(0, 2, 2, 4, True)]),
        # all-gather, zigzag rank 3 of 4 (pieces 3, 4): adjacent, so the same two calls
        (_zigzag(4, 3), tuple(range(8)), [Block(0, 2, 0, 3, False), Block(0, 2, 3, 5, True)]),
        # all-gather, zigzag rank 0 of 4 (pieces 0, 7): two diagonals apart, four calls
        (
            _zigzag(4, 0),
            tuple(range(8)),
            [
                Block(0, 1, 0, 1, True),
                Block(1, 2, 0, 7, False),
                Block(1, 2, 7, 8, True),
            ],
        ),
    ],
)
def test_cover_makes_few_calls(q_pieces, kv_pieces, blocks):
    assert cover(relations(q_pieces, kv_pieces, True)) == blocks


def test_causal_blocks_are_square():
    """Causal calls only on squares (where top-left and bottom-right alignment agree);
    that both sides hold the same pieces is checked by the simulator."""
    for strategy, layout, causal, pass_ in STRATEGY_CASES:
        for world in range(1, 6):
            heads = head_configs(strategy, world)[0]
            for sched in schedules(strategy, layout, causal, pass_, world, heads):
                for op in sched.ops:
                    if getattr(op, "causal", False):
                        assert op.q.stop - op.q.start == op.kv.stop - op.kv.start


def test_stream_order_check_catches_a_receive_queued_before_the_send_its_peer_needs():
    """Both ranks queue "receive" then "send" as separate groups on one lane: fine
    for gloo (simulate accepts it), a deadlock for NCCL. This is the hang seen on
    2 x H100 before the last-step pieces were posted as one group."""
    from tokenring.schedules.builder import ScheduleBuilder

    scheds = []
    for rank in range(2):
        slots = {
            "q": SlotSpec(SlotKind.QUERY, local=True),
            "kv": SlotSpec(SlotKind.KV, local=True),
            "acc": SlotSpec(SlotKind.QUERY_RESULT, Precision.ACCUM),
            "part_in0": SlotSpec(SlotKind.QUERY_RESULT),
        }
        b = ScheduleBuilder("test", rank, 2, _zigzag(2, rank), slots)
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
    simulate(scheds)  # gloo semantics: runs
    with pytest.raises(ScheduleError, match="deadlock under NCCL stream order"):
        check_stream_order(scheds)
