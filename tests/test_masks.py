"""Documents and windows as masks over positions, and packed layouts (pure, no processes).

The packed zigzag rule (``schedules.geometry.packed_zigzag``), ``classify`` against
the mask's definition token by token, and every strategy's schedules simulated
symbolically under random packings and windows: every allowed token pair computed
exactly once, nothing else, and blocks the mask leaves empty neither computed nor
sent. The reference masks here are written from the definition, not from
``tokenring.schedules.masks``.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenring.options import Layout, Pass, Strategy
from tokenring.schedules import build_schedule
from tokenring.schedules.geometry import Geometry, chunk_ids, local_lengths, piece_table
from tokenring.schedules.ir import Compute, Post
from tokenring.schedules.key import ScheduleKey
from tokenring.schedules.masks import BlockKind, Mask, classify
from tokenring.schedules.simulate import check_coverage, check_stream_order, simulate
from tokenring.schedules.usp import mesh_axes


def reference(causal: bool, window: tuple[int, int], documents: tuple[int, ...]):
    """``allowed(i, j)`` from the definition: causal, window, same document."""
    left, right = window

    def doc(x: int) -> int:
        return sum(1 for b in documents[1:-1] if b <= x)

    def allowed(i: int, j: int) -> bool:
        if causal and j > i:
            return False
        if left >= 0 and j < i - left:
            return False
        if right >= 0 and j > i + right:
            return False
        return doc(i) == doc(j)

    return allowed


def random_packing(rng: random.Random, seq: int, world: int) -> tuple[int, ...]:
    """Document offsets of ``seq`` tokens: lengths of 1, shorter than a chunk, ``1 mod
    2P`` and the rest at random."""
    bounds, at = [0], 0
    while at < seq:
        n = rng.choice([1, 2, 2 * world + 1, rng.randint(1, max(seq // 2, 1))])
        at = min(seq, at + n)
        bounds.append(at)
    return tuple(bounds)


def random_window(rng: random.Random, causal: bool) -> tuple[int, int]:
    left = rng.choice([-1, 0, 1, 3, 7])
    right = 0 if causal else rng.choice([-1, 0, 2, 5])
    return left, right


@dataclass(frozen=True)
class RandomBlock:
    """A block between ranks' pieces under a random mask (``random_block``)."""

    mask: Mask
    allowed: object  # allowed(i, j) from the definition (``reference``)
    plain: bool  # no window beyond causality
    own: bool  # the keys are the queries' own pieces
    q_cells: tuple
    kv_cells: tuple
    q_pos: list[int]
    kv_pos: list[int]


def random_block(rng: random.Random, max_world: int = 4, max_seq: int = 40) -> RandomBlock:
    """Any layout, a random packing (documents of 1 token, shorter than a chunk, ``1 mod
    2P``) or none, a random window or none, causal or not; the queries of one rank
    against its own keys or every key."""
    world = rng.randint(1, max_world)
    seq = rng.randint(1, max_seq)
    causal = rng.random() < 0.6
    window = random_window(rng, causal) if rng.random() < 0.5 else (-1, -1)
    documents = random_packing(rng, seq, world) if rng.random() < 0.8 else ()
    layout = rng.choice(list(Layout))
    table = piece_table(layout, seq, world, documents)
    q_pieces = chunk_ids(layout, world, rng.randrange(world))
    kv_pieces = rng.choice([q_pieces, tuple(range(2 * world))])
    return RandomBlock(
        Mask(causal, window, documents), reference(causal, window, documents),
        window == (-1, 0 if causal else -1), kv_pieces == q_pieces,
        table.cells(q_pieces), table.cells(kv_pieces),
        [x for p in q_pieces for x in table.positions_of(p)],
        [x for p in kv_pieces for x in table.positions_of(p)],
    )  # fmt: skip


# -- the packed zigzag rule ---------------------------------------------------


@given(
    lengths=st.lists(st.integers(1, 40), min_size=1, max_size=12),
    world=st.integers(1, 6),
)
@settings(max_examples=60, deadline=None)
def test_packed_zigzag_balances_every_packing(lengths, world):
    """Every token once; each document cut in 2P chunks in order, chunk c on the rank
    that holds piece c; per-rank totals within one token; one document: the zigzag."""
    documents = tuple(itertools.accumulate([0, *lengths]))
    seq = documents[-1]
    table = piece_table(Layout.ZIGZAG, seq, world, documents)
    counts = local_lengths(Layout.ZIGZAG, seq, world, documents)
    assert sum(counts) == seq and max(counts) - min(counts) <= 1
    positions = sorted(x for p in range(table.count) for x in table.positions_of(p))
    assert positions == list(range(seq))
    if world > 1:
        for d, (a, b) in enumerate(itertools.pairwise(documents)):
            chunks = [[r for r in table.cell(p) if a <= r[0] < b] for p in range(2 * world)]
            sizes = [sum(y - x for x, y in c) for c in chunks]
            assert max(sizes) - min(sizes) <= 1, (d, sizes)
            starts = [c[0][0] for c in chunks if c]  # chunks follow the document in order
            assert starts == sorted(starts)
    one = piece_table(Layout.ZIGZAG, seq, world, (0, seq))
    assert one == piece_table(Layout.ZIGZAG, seq, world)


def test_packed_zigzag_drawing():
    """The example drawn in docs/algorithms.md ("Packed sequences"): documents of 5, 1
    and 11 tokens over 2 ranks."""
    table = piece_table(Layout.ZIGZAG, 17, 2, (0, 5, 6, 17))
    assert [table.cell(p) for p in range(4)] == [
        ((0, 2), (6, 9)),
        ((2, 3), (5, 6), (9, 11)),
        ((3, 4), (11, 14)),
        ((4, 5), (14, 17)),
    ]
    assert local_lengths(Layout.ZIGZAG, 17, 2, (0, 5, 6, 17)) == (9, 8)
    assert chunk_ids(Layout.ZIGZAG, 2, 0) == (0, 3)


# -- classify against the definition ----------------------------------------


def _cells(rng: random.Random, seq: int) -> tuple[tuple[int, int], ...]:
    cuts = sorted(rng.sample(range(seq + 1), rng.choice([2, 2, 4])))
    return tuple((a, b) for a, b in zip(cuts[::2], cuts[1::2]))


def test_classify_agrees_with_the_definition_token_by_token():
    rng = random.Random(0)
    seen = set()
    for _ in range(3000):
        seq = rng.randint(4, 24)
        causal = rng.random() < 0.5
        window = random_window(rng, causal)
        documents = random_packing(rng, seq, 2) if rng.random() < 0.7 else ()
        q, k = _cells(rng, seq), _cells(rng, seq)
        allowed = reference(causal, window, documents)
        pairs = [
            allowed(i, j) for a, b in q for i in range(a, b) for c, d in k for j in range(c, d)
        ]
        kind = classify(Mask(causal, window, documents), q, k)
        seen.add(kind)
        if kind is BlockKind.EMPTY:
            assert not any(pairs)
        elif kind is BlockKind.FULL:
            assert all(pairs)
        elif kind is BlockKind.DIAG:
            assert q == k and len(q) == 1
            n = q[0][1] - q[0][0]
            assert pairs == [y <= x for x in range(n) for y in range(n)]
        else:
            assert any(pairs) and not all(pairs)
    assert seen == set(BlockKind)


def test_mask_allowed_matches_the_definition():
    import torch

    rng = random.Random(1)
    for _ in range(50):
        seq = rng.randint(1, 30)
        causal = rng.random() < 0.5
        window = random_window(rng, causal)
        documents = random_packing(rng, seq, 3)
        allowed = reference(causal, window, documents)
        pos = torch.arange(seq)
        got = Mask(causal, window, documents).allowed(pos, pos)
        assert got.tolist() == [[allowed(i, j) for j in range(seq)] for i in range(seq)]


# -- every strategy's schedules, simulated ----------------------------------

ONE_D = [s for s in Strategy if s is not Strategy.USP]


def _heads(strategy: Strategy, world: int) -> tuple[int, int]:
    return (2 * world, world) if strategy is Strategy.ULYSSES else (4, 2)


def masked_schedules(strategy, layout, world, seq, mask, pass_, heads, ulysses=1,
                     ring_impl=Strategy.TOKENRING):  # fmt: skip
    table = piece_table(layout, seq, world, mask.documents)
    return [
        build_schedule(
            ScheduleKey(
                strategy, layout, world, r, Geometry.self_attention(table), mask, pass_,
                heads[0], heads[1], ulysses, ring_impl,
            )
        )
        for r in range(world)
    ]  # fmt: skip


def _masks(seed: int, world: int, count: int):
    rng = random.Random(seed)
    for _ in range(count):
        seq = rng.choice([1, world - 1 or 1, 2 * world + 1, 23, 37])
        causal = rng.random() < 0.5
        window = random_window(rng, causal) if rng.random() < 0.6 else (-1, -1)
        documents = random_packing(rng, seq, world) if rng.random() < 0.7 else ()
        yield seq, Mask(causal, window, documents), reference(causal, window, documents)


@pytest.mark.parametrize("strategy", ONE_D, ids=lambda s: s.value)
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_every_allowed_pair_once_under_documents_and_windows(strategy, world):
    """Random packings (documents of 1 token, shorter than a chunk, 1 mod 2P) and windows,
    causal or not, both layouts and passes: the symbolic simulator runs every rank and
    checks each result against the definition."""
    heads = _heads(strategy, world)
    cases = _masks(world * 7 + len(strategy.value), world, 6)
    for (seq, mask, allowed), layout, pass_ in zip(
        cases, itertools.cycle(Layout), itertools.cycle([Pass.FORWARD, Pass.FORWARD, Pass.BACKWARD])
    ):
        scheds = masked_schedules(strategy, layout, world, seq, mask, pass_, heads)
        check_stream_order(scheds)
        check_coverage(simulate(scheds, *heads), scheds, allowed, *heads)


@pytest.mark.parametrize("ring,ulysses", [(2, 2), (3, 2), (2, 3)])
@pytest.mark.parametrize("ring_impl", [Strategy.TOKENRING, Strategy.RING], ids=lambda s: s.value)
def test_usp_every_allowed_pair_once_under_documents_and_windows(ring, ulysses, ring_impl):
    world = ring * ulysses
    heads = (2 * ulysses, ulysses)
    axes = mesh_axes(ring, ulysses)
    for (seq, mask, allowed), layout, pass_ in zip(
        _masks(ring * 10 + ulysses, world, 4), itertools.cycle(Layout), itertools.cycle(Pass)
    ):
        scheds = masked_schedules(
            Strategy.USP, layout, world, seq, mask, pass_, heads, ulysses, ring_impl
        )
        check_stream_order(scheds, axes)
        check_coverage(simulate(scheds, *heads, axes), scheds, allowed, *heads)


def _sends(scheds, kind: str | None = None) -> int:
    """Tokens every rank sends point to point, together (of slots of ``kind`` only, if
    given: "query", "query_result", "kv", "kv_result")."""
    return sum(
        s.tokens(t.rows) for s in scheds for op in s.ops
        if isinstance(op, Post) and op.collective is None
        for t in op.moves
        if t.send and (kind is None or s.slots[t.rows.slot].kind.value == kind)
    )  # fmt: skip


@pytest.mark.parametrize("strategy", [Strategy.TOKENRING, Strategy.RING], ids=lambda s: s.value)
def test_documents_on_one_rank_need_no_transfer(strategy):
    """Contiguous layout, every document inside one rank's shard: nothing is computed
    across ranks and nothing is sent."""
    world, seq = 4, 32
    documents = (0, 3, 8, 16, 20, 24, 32)  # boundaries at multiples of 8 (shard edges)
    mask = Mask(True, (-1, -1), documents)
    for pass_ in Pass:
        scheds = masked_schedules(strategy, Layout.CONTIGUOUS, world, seq, mask, pass_, (4, 2))
        assert _sends(scheds) == 0
        assert all(
            op.kind is not BlockKind.EMPTY
            for s in scheds
            for op in s.ops
            if isinstance(op, Compute)
        )
        check_coverage(simulate(scheds, 4, 2), scheds, reference(True, (-1, -1), documents), 4, 2)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_a_short_window_talks_only_to_neighbours(world):
    """docs/algorithms.md, "Traffic": contiguous layout, shards of L tokens, a causal
    window of at most L/2 keys. Only the first half of each shard's queries needs keys
    of another rank, the rank before it, and only the last half of its keys: per pass,
    TokenRing sends (P-1) L/2 query rows one hop and as many partial rows back; ring
    sends (P-1) L/2 key/value rows, and in the backward its dk, dv accumulators still
    make the full turn (P^2 L rows), as they do whenever a rank computes on another's
    keys."""
    L = 16
    seq, half = world * L, (world - 1) * L // 2
    mask = Mask(True, (L // 2, 0))
    for pass_ in Pass:
        tokenring = masked_schedules(Strategy.TOKENRING, Layout.CONTIGUOUS, world, seq, mask,
                                     pass_, (4, 2))  # fmt: skip
        ring = masked_schedules(Strategy.RING, Layout.CONTIGUOUS, world, seq, mask, pass_, (4, 2))
        assert _sends(tokenring, "query") == half
        assert _sends(tokenring, "query_result") == half
        assert _sends(tokenring) == 2 * half
        assert _sends(ring, "kv") == half
        assert _sends(ring, "kv_result") == (world * world * L if pass_ is Pass.BACKWARD else 0)
        for scheds in (tokenring, ring):
            check_coverage(simulate(scheds, 4, 2), scheds, reference(True, (L // 2, 0), ()), 4, 2)


# -- a block cut into the kernel calls that compute it ------------------------


def test_sub_calls_compute_every_allowed_pair_once_and_documents_need_no_mask():
    """``sub_calls`` of blocks between two ranks' pieces (every layout, random packings
    and windows): each allowed pair in exactly one call, by the call's kind (every pair,
    the causal triangle by local index, or the mask), nothing else; without a window no
    call needs a mask."""
    from collections import Counter

    from tokenring.schedules.blocks import sub_calls

    rng = random.Random(7)
    for _ in range(300):
        b = random_block(rng)
        got: Counter = Counter()
        calls = sub_calls(b.q_cells, b.kv_cells, b.mask)
        for q0, q1, k0, k1, kind in calls:
            for a in range(q0, q1):
                for c in range(k0, k1):
                    x, y = b.q_pos[a], b.kv_pos[c]
                    if kind is BlockKind.DIAG:
                        assert q1 - q0 == k1 - k0 and b.q_pos[q0:q1] == b.kv_pos[k0:k1]
                        keep = c - k0 <= a - q0
                    elif kind is BlockKind.PARTIAL:
                        keep = b.allowed(x, y)
                    else:
                        keep = True
                    if keep:
                        got[(x, y)] += 1
        want = Counter((x, y) for x in b.q_pos for y in b.kv_pos if b.allowed(x, y))
        assert got == want
        if b.plain:
            assert all(kind is not BlockKind.PARTIAL for *_, kind in calls)


def test_varlen_segments_compute_every_allowed_pair_once_under_bottom_right_windows():
    """``varlen_block``: each segment read as flash-attention reads a sequence (query
    ``i`` of ``sq`` sees key ``j`` of ``sk`` when ``i + sk - sq - left <= j <= i + sk -
    sq + right``, -1 unbounded) computes every allowed pair exactly once and nothing
    else; no query row of a segment sees nothing; ``pairs`` counts them; rows are
    distinct within a group;
    ``disjoint`` and ``every_row`` say the truth; causal documents (no window) in
    either layout are written, never merged."""
    from collections import Counter

    from tokenring.schedules.segments import varlen_block

    rng = random.Random(11)
    for _ in range(400):
        b = random_block(rng)
        q_pos, kv_pos, allowed = b.q_pos, b.kv_pos, b.allowed
        block = varlen_block(b.q_cells, b.kv_cells, b.mask)
        got: Counter = Counter()
        rows_seen: Counter = Counter()
        for group in block.groups:
            assert len({(s.left, s.right) for s in group}) == 1
            rows = [r for s in group for r in range(s.q0, s.q1)]
            assert len(rows) == len(set(rows))
            for s in group:
                pairs = 0
                keys = [c for a0, a1 in s.keys for c in range(a0, a1)]
                sq, sk = s.q1 - s.q0, len(keys)
                assert sq > 0 and sk > 0 and s.left >= -1 and s.right >= -1
                for i in range(sq):
                    lo = i + sk - sq - s.left if s.left >= 0 else 0
                    hi = i + sk - sq + s.right if s.right >= 0 else sk - 1
                    seen = [keys[j] for j in range(max(lo, 0), min(hi, sk - 1) + 1)]
                    assert seen, "a query row with no key"
                    pairs += len(seen)
                    rows_seen[s.q0 + i] += 1
                    for c in seen:
                        got[(q_pos[s.q0 + i], kv_pos[c])] += 1
                assert s.pairs == pairs
        want = Counter((x, y) for x in q_pos for y in kv_pos if allowed(x, y))
        assert got == want
        assert block.disjoint == all(n == 1 for n in rows_seen.values())
        assert block.every_row == (block.disjoint and len(rows_seen) == len(q_pos))
        if b.plain and b.own:
            assert block.disjoint
