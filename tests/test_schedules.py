"""Schedules checked as data, without running attention."""

from __future__ import annotations

import dataclasses
import itertools
import random

import pytest

from tokenring.options import Layout, Pass, Strategy
from tokenring.schedules import ScheduleKey, build_schedule
from tokenring.schedules.allgather import head_groups
from tokenring.schedules.blocks import VECTOR_PAIRS, Block, cover, relations
from tokenring.schedules.geometry import (
    Geometry,
    PieceTable,
    chunk_ids,
    local_lengths,
    piece_table,
)
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
from tokenring.schedules.masks import BlockKind, Mask, classify
from tokenring.schedules.simulate import (
    ScheduleError,
    check_coverage,
    check_stream_order,
    simulate,
)
from tokenring.schedules.usp import mesh_axes

ONE_D = [s for s in Strategy if s is not Strategy.USP]
STRATEGY_CASES = list(itertools.product(ONE_D, Layout, (False, True), Pass))
FULL, DIAG, PARTIAL, EMPTY = BlockKind.FULL, BlockKind.DIAG, BlockKind.PARTIAL, BlockKind.EMPTY


def lengths_to_check(world: int) -> list[int]:
    """Sequence lengths that stress a layout over ``world`` ranks: one token, fewer tokens
    than ranks, one more than the 2P pieces, a prime, and an even split."""
    return sorted({1, max(world - 1, 1), 2 * world + 1, 23, 4 * world})


def sampled_length(world: int, *salt) -> int:
    """One of ``lengths_to_check``, chosen per case: the CI sample (the sweep is slow)."""
    choices = lengths_to_check(world)
    return choices[sum(map(len, map(str, salt))) % len(choices)]


def reference_mask(causal: bool):
    """The mask written from its definition (independent of ``tokenring.schedules.masks``)."""
    return (lambda i, j: j <= i) if causal else (lambda i, j: True)


def head_configs(strategy: Strategy, world: int) -> list[tuple[int, int]]:
    """Head counts to simulate: each kind of head split a strategy makes."""
    if strategy is Strategy.ULYSSES:  # divisible, replicated single head, replicated pairs
        return [(2 * world, 2 * world), (2 * world, 1)] + (
            [(2 * world, 2)] if world % 2 == 0 else []
        )
    if strategy is Strategy.ALLGATHER:  # 4, 2, 1 and 3 head groups
        return [(4, 4), (8, 2), (2, 1), (6, 3)]
    return [(2, 1)]  # TokenRing and ring move every head together


def schedules(strategy, layout, causal, pass_, world, heads=(2, 1), stream_tail=True, seq=None,
              ulysses=1, ring_impl=Strategy.TOKENRING):  # fmt: skip
    """Every rank's schedule for a sequence of ``seq`` tokens (default: 4 per rank)."""
    seq = 4 * world if seq is None else seq
    return [
        build_schedule(
            ScheduleKey.of_sequence(
                strategy, layout, world, r, seq, causal, pass_, heads_q=heads[0],
                heads_kv=heads[1], stream_tail=stream_tail, ulysses=ulysses, ring_impl=ring_impl,
            )
        )
        for r in range(world)
    ]  # fmt: skip


def assert_every_pair_once(strategy, layout, causal, pass_, world, seq) -> None:
    """Simulate every rank (NCCL's stream order and gloo's progress) and check the token
    pairs each result holds against the mask's definition, for each head split."""
    streams = (True, False) if strategy is Strategy.TOKENRING else (True,)
    for heads in head_configs(strategy, world):
        for stream in streams:  # TokenRing's last partial in halves, or whole
            scheds = schedules(strategy, layout, causal, pass_, world, heads, stream, seq)
            check_stream_order(scheds)  # no deadlock when each lane runs its groups in order
            sim = simulate(scheds, *heads)
            check_coverage(sim, scheds, reference_mask(causal), *heads)


@pytest.mark.parametrize(
    "strategy,layout,causal,pass_", STRATEGY_CASES, ids=lambda x: str(getattr(x, "value", x))
)
@pytest.mark.parametrize("world", list(range(1, 9)))
def test_every_allowed_token_pair_is_computed_exactly_once(strategy, layout, causal, pass_, world):
    """One sequence length per case from ``lengths_to_check`` (odd ones included)."""
    seq = sampled_length(world, strategy.value, layout.value, causal, pass_.value)
    assert_every_pair_once(strategy, layout, causal, pass_, world, seq)


@pytest.mark.slow
@pytest.mark.parametrize(
    "strategy,layout,causal,pass_", STRATEGY_CASES, ids=lambda x: str(getattr(x, "value", x))
)
@pytest.mark.parametrize("world", list(range(1, 9)))
def test_every_allowed_token_pair_at_every_length(strategy, layout, causal, pass_, world):
    for seq in lengths_to_check(world):
        assert_every_pair_once(strategy, layout, causal, pass_, world, seq)


MESHES = [(1, 1), (2, 1), (1, 2), (2, 2), (3, 2), (2, 3), (4, 2), (2, 4), (8, 1), (1, 8)]


def assert_usp_pairs_once(ring, ulysses, ring_impl, seqs) -> None:
    world = ring * ulysses
    axes = mesh_axes(ring, ulysses)
    for (layout, causal, pass_), seq in zip(
        itertools.product(Layout, (False, True), Pass), itertools.cycle(seqs)
    ):
        for heads in ((2 * ulysses, 2 * ulysses), (2 * ulysses, 1)):
            scheds = schedules(Strategy.USP, layout, causal, pass_, world, heads, seq=seq,
                               ulysses=ulysses, ring_impl=ring_impl)  # fmt: skip
            check_stream_order(scheds, axes)
            sim = simulate(scheds, *heads, axes)
            check_coverage(sim, scheds, reference_mask(causal), *heads)


@pytest.mark.parametrize("ring,ulysses", MESHES, ids=lambda x: str(x))
@pytest.mark.parametrize("ring_impl", [Strategy.TOKENRING, Strategy.RING], ids=lambda s: s.value)
def test_usp_computes_every_allowed_pair_exactly_once_on_every_mesh(ring, ulysses, ring_impl):
    """USP up to 8 ranks, both rings, both layouts, causal or not, both passes, lengths
    even and odd; heads split evenly and (one key/value head) replicated over the
    Ulysses axis."""
    world = ring * ulysses
    assert_usp_pairs_once(ring, ulysses, ring_impl, [4 * world, 2 * world + 1])


@pytest.mark.slow
@pytest.mark.parametrize("ring,ulysses", MESHES, ids=lambda x: str(x))
@pytest.mark.parametrize("ring_impl", [Strategy.TOKENRING, Strategy.RING], ids=lambda s: s.value)
def test_usp_pairs_at_every_length(ring, ulysses, ring_impl):
    for seq in lengths_to_check(ring * ulysses):
        assert_usp_pairs_once(ring, ulysses, ring_impl, [seq])


@pytest.mark.parametrize("ring,ulysses", [(2, 2), (4, 2)], ids=lambda x: str(x))
def test_usp_tokenring_never_moves_keys_values_across_the_ring(ring, ulysses):
    """Across the ring axis only queries and partials travel; K, V move only in the
    all-to-all inside a Ulysses group."""
    world = ring * ulysses
    for layout, causal, pass_ in itertools.product(Layout, (False, True), Pass):
        scheds = schedules(Strategy.USP, layout, causal, pass_, world, (4, 4), ulysses=ulysses)
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
    with pytest.raises(ScheduleError, match="extra or repeated"):
        check_coverage(sim, scheds, reference_mask(False))


def test_simulator_catches_a_causal_block_run_without_its_mask():
    """A diagonal block run as FULL computes pairs the mask forbids."""
    scheds = schedules(Strategy.TOKENRING, Layout.ZIGZAG, True, Pass.FORWARD, 2, seq=9)
    ops = tuple(
        dataclasses.replace(op, kind=FULL) if isinstance(op, Compute) and op.kind is DIAG else op
        for op in scheds[0].ops
    )
    scheds[0] = dataclasses.replace(scheds[0], ops=ops)
    sim = simulate(scheds)
    with pytest.raises(ScheduleError, match="extra or repeated"):
        check_coverage(sim, scheds, reference_mask(True))


def test_simulator_catches_rows_that_name_the_wrong_pieces():
    """Every token range the executor uses comes from ``Rows.content``: a receive that
    says it holds another rank's pieces is caught."""
    scheds = schedules(Strategy.RING, Layout.ZIGZAG, False, Pass.FORWARD, 3, seq=11)

    def wrong(op):
        if not isinstance(op, Post):
            return op
        moves = tuple(
            dataclasses.replace(m, rows=dataclasses.replace(m.rows, content=(5, 0)))
            if isinstance(m, Transfer) and not m.send
            else m
            for m in op.moves
        )
        return dataclasses.replace(op, moves=moves)

    scheds[1] = dataclasses.replace(scheds[1], ops=tuple(wrong(op) for op in scheds[1].ops))
    with pytest.raises(ScheduleError, match="receives"):
        simulate(scheds)


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
    "q,k,causal,kind",
    [
        ((6, 8), (0, 3), True, FULL),  # every key before every query
        ((6, 8), (0, 7), True, FULL),  # the last key at the first query: still all allowed
        ((3, 5), (3, 5), True, DIAG),  # the same range: a causal square
        ((0, 3), (4, 6), True, EMPTY),  # every key after every query
        ((0, 3), (3, 6), True, EMPTY),
        ((3, 6), (0, 5), True, PARTIAL),  # overlapping ranges (a KV cache, other geometry)
        ((4, 5), (0, 6), True, PARTIAL),
        ((0, 3), (4, 6), False, FULL),
        ((2, 2), (0, 6), False, EMPTY),  # a piece with no tokens
        ((0, 3), (1, 1), True, EMPTY),
    ],
)
def test_classify(q, k, causal, kind):
    assert classify(Mask(causal), (q,), (k,)) is kind


def test_classify_agrees_with_the_mask_token_by_token():
    """EMPTY: no pair allowed; FULL: every pair; DIAG: the causal triangle; PARTIAL: some."""
    mask = Mask(causal=True)
    for qa, qb, ka, kb in itertools.product(range(6), repeat=4):
        if qa > qb or ka > kb:
            continue
        allowed = [mask.allows(i, j) for i in range(qa, qb) for j in range(ka, kb)]
        kind = classify(mask, ((qa, qb),), ((ka, kb),))
        if kind is EMPTY:
            assert not any(allowed)
        elif kind is FULL:
            assert all(allowed)
        elif kind is DIAG:
            assert (qa, qb) == (ka, kb)
        else:
            assert any(allowed) and not all(allowed)


@pytest.mark.parametrize("seed", range(4))
def test_relations_of_many_cells_classify_each_pair_as_classify_does(seed):
    """From ``VECTOR_PAIRS`` pairs ``relations`` classifies them as tensors: the same
    elements, in the same order, as ``classify`` pair by pair, under causality and
    windows, with empty cells, equal cells (diagonals) and overlapping ones."""
    rng = random.Random(seed)
    for _ in range(25):

        def cells(n: int) -> tuple:
            starts = (rng.randint(0, 400) for _ in range(n))
            return tuple(((a, a + rng.choice([0, 1, 3, 17, 40])),) for a in starts)

        q = cells(rng.randint(16, 40))
        k = q if rng.random() < 0.3 else cells(rng.randint(16, 40))
        window = rng.choice([(-1, -1), (20, -1), (5, 5), (-1, 10), (0, 0)])
        mask = Mask(rng.random() < 0.5, window)
        assert len(q) * len(k) >= VECTOR_PAIRS
        expected = tuple(
            (i, j, kind)
            for i, a in enumerate(q)
            for j, b in enumerate(k)
            if (kind := classify(mask, a, b)) is not EMPTY
        )
        assert relations(q, k, mask) == expected


@pytest.mark.parametrize(
    "layout,seq,world,lengths",
    [
        (Layout.CONTIGUOUS, 10, 4, (3, 3, 2, 2)),  # tensor_split: the first S mod P hold one more
        (Layout.CONTIGUOUS, 3, 4, (1, 1, 1, 0)),  # a rank may hold nothing
        (Layout.ZIGZAG, 9, 2, (5, 4)),  # chunks 3 2 2 2: rank 0 holds chunks 0 and 3
        (Layout.ZIGZAG, 13, 3, (5, 4, 4)),  # chunks 3 2 2 2 2 2
        (Layout.ZIGZAG, 11, 3, (3, 4, 4)),  # chunks 2 2 2 2 2 1: rank 0 holds chunk 5
        (Layout.ZIGZAG, 2, 4, (1, 1, 0, 0)),
        (Layout.ZIGZAG, 16, 4, (4, 4, 4, 4)),
    ],
)
def test_local_lengths(layout, seq, world, lengths):
    assert local_lengths(layout, seq, world) == lengths


@pytest.mark.parametrize("layout", list(Layout))
@pytest.mark.parametrize("world", [1, 2, 3, 4, 5, 8])
def test_layouts_cover_the_sequence_and_balance_it(layout, world):
    """Every token is held by exactly one rank, and local lengths differ by at most one."""
    for seq in range(0, 6 * world + 2):
        table = piece_table(layout, seq, world)
        held = sorted(
            t
            for r in range(world)
            for piece in chunk_ids(layout, world, r)
            for t in range(*table.span(piece))
        )
        assert held == list(range(seq))
        lengths = local_lengths(layout, seq, world)
        assert max(lengths) - min(lengths) <= 1, (seq, lengths)


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


def _spans(layout, world, pieces):
    """The cells (position ranges) of ``pieces`` when every piece holds 4 tokens."""
    return piece_table(layout, 8 * world, world).cells(pieces)


def _zigzag(world, rank):
    return _spans(Layout.ZIGZAG, world, chunk_ids(Layout.ZIGZAG, world, rank))


def _all(world):
    return _spans(Layout.ZIGZAG, world, tuple(range(2 * world)))


@pytest.mark.parametrize(
    "q_cells,kv_cells,blocks",
    [
        # zigzag, causal, P=4: r < j -> all of Q_j against the first key chunk
        (_zigzag(4, 3), _zigzag(4, 1), [Block(0, 2, 0, 1, FULL)]),
        # r > j -> the second half of Q_j against all keys
        (_zigzag(4, 1), _zigzag(4, 3), [Block(1, 2, 0, 2, FULL)]),
        # own block: one causal call over both chunks
        (_zigzag(4, 2), _zigzag(4, 2), [Block(0, 2, 0, 2, DIAG)]),
        # a gathered sequence against itself (Ulysses): one causal call
        (_all(4), _all(4), [Block(0, 8, 0, 8, DIAG)]),
        # all-gather, contiguous rank 1 of 4 (pieces 2, 3): one full call, one causal square
        (_all(4)[2:4], _all(4), [Block(0, 2, 0, 2, FULL), Block(0, 2, 2, 4, DIAG)]),
        # all-gather, zigzag rank 3 of 4 (pieces 3, 4): adjacent, so the same two calls
        (_zigzag(4, 3), _all(4), [Block(0, 2, 0, 3, FULL), Block(0, 2, 3, 5, DIAG)]),
        # all-gather, zigzag rank 0 of 4 (pieces 0, 7): two diagonals apart, three calls
        (
            _zigzag(4, 0),
            _all(4),
            [Block(0, 1, 0, 1, DIAG), Block(1, 2, 0, 7, FULL), Block(1, 2, 7, 8, DIAG)],
        ),
        # queries with their own geometry: a chunk of new tokens against a longer cache
        ((((8, 12),),), (((0, 6),), ((6, 12),)), [Block(0, 1, 0, 2, PARTIAL)]),
        (
            (((8, 12),),),
            (((0, 8),), ((8, 12),)),
            [Block(0, 1, 0, 1, FULL), Block(0, 1, 1, 2, DIAG)],
        ),
    ],
)
def test_cover_makes_few_calls(q_cells, kv_cells, blocks):
    assert list(cover(relations(tuple(q_cells), tuple(kv_cells), Mask(causal=True)))) == blocks


def test_causal_blocks_are_square():
    """Causal calls only on squares (where top-left and bottom-right alignment agree);
    that both sides hold the same positions is checked by the simulator."""
    for strategy, layout, causal, pass_ in STRATEGY_CASES:
        for world in range(1, 6):
            heads = head_configs(strategy, world)[0]
            for seq in (4 * world, 2 * world + 1):
                for sched in schedules(strategy, layout, causal, pass_, world, heads, seq=seq):
                    for op in sched.ops:
                        if isinstance(op, Compute) and op.kind is DIAG:
                            assert sched.tokens(op.q) == sched.tokens(op.kv)


def _cross_schedules(strategy, world, q_table, kv_table, causal, pass_):
    """Schedules of queries and keys/values with tables of their own (the same pieces per
    rank): what a KV cache or cross-attention will be, run through today's strategies."""
    geometry = Geometry(q_table, kv_table)
    return [
        build_schedule(
            ScheduleKey(strategy, Layout.CONTIGUOUS, world, r, geometry, Mask(causal), pass_, 2, 1)
        )
        for r in range(world)
    ]


@pytest.mark.parametrize("strategy", [Strategy.TOKENRING, Strategy.RING])
@pytest.mark.parametrize("pass_", list(Pass))
def test_queries_and_keys_with_their_own_pieces(strategy, pass_):
    """Queries at positions 12-19 (in 2 x 3 pieces) against keys at 0-19 (2 x 3 pieces,
    some only partly before the queries), causal by position: PARTIAL blocks appear, and
    every allowed pair is computed once, queries with no key included."""
    world = 3
    q_table = PieceTable((12, 13, 14, 16, 17, 19, 20))
    kv_table = PieceTable((0, 3, 7, 10, 13, 16, 20))
    for causal in (False, True):
        scheds = _cross_schedules(strategy, world, q_table, kv_table, causal, pass_)
        kinds = {op.kind for s in scheds for op in s.ops if isinstance(op, Compute)}
        assert (PARTIAL in kinds) is causal
        check_stream_order(scheds)
        sim = simulate(scheds)
        check_coverage(sim, scheds, reference_mask(causal))


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
        mine = chunk_ids(Layout.ZIGZAG, 2, rank)
        geometry = Geometry.self_attention(piece_table(Layout.ZIGZAG, 8, 2))
        b = ScheduleBuilder("test", rank, 2, mine, slots, geometry, Mask(causal=True))
        b.own_block(q_out="acc", kv_out=None)
        theirs = chunk_ids(Layout.ZIGZAG, 2, 1 - rank)
        recv = b.post(
            "in", 0, [Transfer(Rows.whole("part_in0", theirs), 1 - rank, send=False, lane=1)]
        )
        send = b.post("out", 0, [Transfer(Rows.whole("acc", mine), 1 - rank, send=True, lane=1)])
        b.wait(recv, 1)
        b.wait(send, 1)
        scheds.append(b.build("acc", None))
    simulate(scheds)  # gloo semantics: runs
    with pytest.raises(ScheduleError, match="deadlock under NCCL stream order"):
        check_stream_order(scheds)
