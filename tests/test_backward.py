"""Training-specific properties: gradcheck, determinism, and what each strategy sends."""

from __future__ import annotations

import itertools

import pytest

from dist_cases import determinism_case, gradcheck_case, traffic_case
from traffic_formulas import expected_traffic

STRATEGIES = ["tokenring", "ring", "ulysses", "allgather"]
GRADCHECK_CONFIGS = [("zigzag", True), ("contiguous", False), ("contiguous", True)]


def gradcheck_worlds(strategy: str) -> tuple[int, ...]:
    """World sizes to gradcheck: 2 and 3, or for Ulysses (4 query heads) 2 and 4."""
    return (2, 4) if strategy == "ulysses" else (2, 3)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_gradcheck_float64(pool, strategy):
    cases = [
        dict(world=world, strategy=strategy, layout=layout, causal=causal)
        for world, (layout, causal) in itertools.product(
            gradcheck_worlds(strategy), GRADCHECK_CONFIGS
        )
    ]
    for case, per_rank in zip(cases, pool.run(gradcheck_case, cases)):
        assert all(per_rank), case


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_deterministic_mode_is_bitwise_reproducible(pool, strategy):
    cases = [
        dict(world=world, strategy=strategy, layout=layout, causal=causal)
        for world in (2, 4)
        for layout, causal in [("zigzag", True), ("contiguous", False)]
    ]
    for case, per_rank in zip(cases, pool.run(determinism_case, cases)):
        assert all(per_rank), case


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_bytes_sent_match_the_documented_formulas(pool, strategy):
    cases = []
    for world, layout, causal in itertools.product(
        (2, 3, 4), ("zigzag", "contiguous"), (False, True)
    ):
        groupings = [(4, 4), (8, 2)]
        if strategy == "ulysses":  # divisible, and key/value heads replicated
            groupings = [(2 * world, 2 * world), (2 * world, 1)] + ([(8, 2)] if world == 4 else [])
        for heads in groupings:
            cases.append(
                dict(
                    world=world,
                    strategy=strategy,
                    layout=layout,
                    causal=causal,
                    heads=heads,
                    dtype="bfloat16",
                    batch=2,
                    seq=8 * world,
                    head_dim=16,
                )
            )
    for case, per_rank in zip(cases, pool.run(traffic_case, cases)):
        groups = 4 // case["world"]  # every group of `world` ranks in the pool ran the case
        total: dict[str, int] = {}
        for sent in per_rank:
            for key, n in sent.items():
                total[key] = total.get(key, 0) + n
        total = {k: n // groups for k, n in total.items() if n}
        expected = expected_traffic(
            strategy,
            case["layout"],
            case["causal"],
            case["world"],
            case["seq"] // case["world"],
            case["batch"],
            case["heads"],
            case["head_dim"],
            itemsize=2,
        )
        assert total == expected, case
        if strategy == "tokenring":
            assert not any(k.endswith(("/kv", "/kv_result")) for k in total), total
