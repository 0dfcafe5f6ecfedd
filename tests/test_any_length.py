"""Any sequence length through the public API: shard/unshard round trips, every strategy
(and USP, joint tokens, ``auto``) against float64 attention on the gathered sequence
when the length does not divide, and ranks that hold no tokens at all.

The CI runs one length per case (``lengths_for``: 1, P - 1, 2P + 1, a prime); the
sweep over every length and head grouping is marked ``slow``.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import tokenring as tr
from dist_cases import assert_errors_within, check_attention
from tokenring.options import Layout
from tokenring.schedules.geometry import local_lengths
from usp_cases import joint_case, usp_case

HEADS = {"mha": (4, 4), "gqa": (8, 2), "mqa": (4, 1)}
ULYSSES_P3_HEADS = {"mha": (6, 6), "gqa": (12, 3), "mqa": (6, 1)}
STRATEGIES = ["tokenring", "ring", "ulysses", "allgather", "auto"]
FP32_TOL = 1e-5


def lengths_for(world: int) -> list[int]:
    """Lengths that do not divide evenly: one token, fewer than the ranks, one more than
    the 2P pieces, and a prime."""
    return sorted({1, max(world - 1, 1), 2 * world + 1, 13})


def roundtrip(w, *, world, layout, length, dim, give_length):
    group = w.group(world)
    g = torch.Generator().manual_seed(length)
    full = torch.randn(2, 3, length, 5, generator=g).movedim(2, dim)
    local = tr.shard(full, layout=layout, group=group, dim=dim)
    extra = {"seq_len": length} if give_length else {}
    back = tr.unshard(local, layout=layout, group=group, dim=dim, **extra)
    return bool(torch.equal(back, full)), local.shape[dim], local.is_contiguous()


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shard_unshard_roundtrip_at_any_length(pool, world):
    """``unshard(shard(x)) == x``, and the local lengths sum to S, follow the layout's rule
    (tensor_split: the first ranks hold one more) and differ by at most one."""
    cases = [
        dict(world=world, layout=layout, length=length, dim=dim, give_length=length % 2 == 0)
        for layout in ("contiguous", "zigzag")
        for length, dim in zip([*lengths_for(world), 4 * world + 3], itertools.cycle((1, -1)))
    ]
    for case, per_rank in zip(cases, pool.run(roundtrip, cases)):
        assert all(equal and contiguous for equal, _, contiguous in per_rank), case
        for start in range(0, len(per_rank), world):  # each group that ran the case
            lengths = [n for _, n, _ in per_rank[start : start + world]]
            assert sum(lengths) == case["length"], case
            assert tuple(lengths) == local_lengths(Layout(case["layout"]), case["length"], world)
            assert max(lengths) - min(lengths) <= 1, case


def _cases(world: int, strategy: str, every: bool) -> list[dict]:
    groupings = ULYSSES_P3_HEADS if strategy == "ulysses" and world == 3 else HEADS
    combos = list(itertools.product(("contiguous", "zigzag"), (False, True), lengths_for(world)))
    cases = []
    for i, (layout, causal, seq) in enumerate(combos):
        names = list(groupings) if every else [list(groupings)[i % len(groupings)]]
        if not every and i % 2:  # the CI sample: half the (layout, mask, length) combinations
            continue
        cases += [
            dict(world=world, strategy=strategy, layout=layout, causal=causal,
                 heads=groupings[name], dtype="float32", batch=2, head_dim=16, seq=seq,
                 seq_len=True)
            for name in names
        ]  # fmt: skip
    return cases


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_at_lengths_that_do_not_divide(pool, world, strategy):
    """Forward and backward against float64 attention on the gathered sequence, both
    layouts, causal or not, MHA/GQA/MQA in turn, with ``seq_len`` given."""
    cases = _cases(world, strategy, every=False)
    assert_errors_within(FP32_TOL, cases, pool.run(check_attention, cases))


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_at_every_length(pool, world, strategy):
    cases = _cases(world, strategy, every=True)
    assert_errors_within(FP32_TOL, cases, pool.run(check_attention, cases, timeout=600))


def test_tokenring_streams_its_last_partial_at_uneven_lengths(pool):
    """The streamed tail cuts the last step's result at the middle of the shard: with
    pieces of unequal (and no) tokens, still exact."""
    cases = [
        dict(world=world, strategy="tokenring", layout=layout, causal=True, heads=(4, 2),
             dtype="float32", batch=1, head_dim=16, seq=seq, stream_tail=True, seq_len=True)
        for world in (2, 3)
        for layout in ("contiguous", "zigzag")
        for seq in (world - 1, 2 * world + 1)
    ]  # fmt: skip
    assert_errors_within(FP32_TOL, cases, pool.run(check_attention, cases))


def test_usp_at_lengths_that_do_not_divide(pool):
    """A 2 x 2 mesh, both rings across, both layouts, causal or not."""
    cases = [
        dict(world=4, ulysses=2, ring=2, inner=True, ring_impl=ring_impl, layout=layout,
             causal=causal, heads=(4, 2), seq=seq)
        for ring_impl in ("tokenring", "ring")
        for layout, causal, seq in (("zigzag", True, 13), ("contiguous", False, 3),
                                    ("zigzag", False, 1), ("contiguous", True, 9))
    ]  # fmt: skip
    for case, per_rank in zip(cases, pool.run(usp_case, cases, timeout=240)):
        for errs in per_rank:
            assert errs["roundtrip"] == 1.0, case
            assert max(errs[k] for k in ("out", "lse", "dq", "dk", "dv")) <= FP32_TOL, case


def test_joint_tokens_at_lengths_that_do_not_divide(pool):
    """Joint tokens with image shards of unequal length (and none), every strategy."""
    cases = [
        dict(world=world, strategy=strategy, heads=(4, 2), joint_strategy=side, seq=seq,
             layout=layout)
        for strategy, world, seq, side, layout in (
            ("tokenring", 3, 7, "front", "zigzag"), ("ring", 4, 2, "rear", "contiguous"),
            ("ulysses", 2, 5, "front", "contiguous"), ("allgather", 4, 9, "rear", "zigzag"),
        )
    ]  # fmt: skip
    cases.append(dict(world=4, strategy="usp", ulysses=2, ring=2, heads=(4, 2),
                      joint_strategy="front", seq=11, layout="zigzag"))  # fmt: skip
    for case, per_rank in zip(cases, pool.run(joint_case, cases, timeout=240)):
        for errs in per_rank:
            worst = max(v for k, v in errs.items() if k != "joint_out_identical")
            assert worst <= FP32_TOL, (case, errs)
            assert errs["joint_out_identical"] == 1.0, case


def layer_case(w, *, world: int, seq: int) -> float:
    """The layer with ``seq_len`` on shards of unequal length: its largest difference from
    ``tr.attention`` on the same shards."""
    group = w.group(world)
    g = torch.Generator().manual_seed(seq)
    q, k, v = (torch.randn(1, seq, 4, 8, generator=g) for _ in range(3))
    parts = [tr.shard(t, layout="zigzag", group=group) for t in (q, k, v)]
    layer = tr.SequenceParallelAttention("ring", group=group, layout="zigzag")
    out = layer(*parts, causal=True, seq_len=seq)
    ref = tr.attention(*parts, strategy="ring", group=group, layout="zigzag", causal=True,
                       seq_len=seq)  # fmt: skip
    return (out - ref).abs().max().item()


def test_the_layer_takes_the_global_length(pool):
    (per_rank,) = pool.run(layer_case, [dict(world=3, seq=10)])
    assert max(per_rank) == 0.0
