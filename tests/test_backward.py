"""Training-specific properties: gradcheck, determinism, and what each strategy sends."""

from __future__ import annotations

import itertools
from math import gcd

import pytest

from dist_cases import determinism_case, gradcheck_case, traffic_case

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


def expected_traffic(strategy, layout, causal, world, local, batch, heads, head_dim, itemsize):
    """Total bytes all ranks send, per (pass, slot kind): the formulas of
    docs/algorithms.md, "Traffic"."""
    P, L = world, local
    hq, hkv = heads
    if P == 1:
        return {}
    full = P * (P - 1) * L  # every shard visits every other rank once, whole
    if strategy == "ulysses":
        hk = hkv // gcd(P, hkv)  # key/value heads each rank receives
        kv = P * (P - 1) * L * batch * 2 * hk * head_dim * itemsize
        return {
            "forward/query": (P - 1) * L * batch * hq * head_dim * itemsize,
            "forward/kv": kv,
            "forward/query_result": (P - 1) * L * batch * hq * (head_dim * itemsize + 4),
            "backward/query": (P - 1) * L * batch * hq * (2 * head_dim * itemsize + 8),
            "backward/kv": kv,
            "backward/query_result": (P - 1) * L * batch * hq * head_dim * itemsize,
            "backward/kv_result": kv,
        }
    if strategy == "allgather":
        gathered = P * (P - 1) * L * batch * 2 * hkv * head_dim
        return {
            "forward/kv": gathered * itemsize,
            "backward/kv": gathered * itemsize,
            "backward/kv_result": gathered * 4,
        }
    if strategy == "tokenring":
        if not causal:
            q_rows = part_rows = full
        elif layout == "zigzag":
            q_rows = part_rows = 3 * full // 4
        else:
            q_rows = part_rows = full // 2
        return {
            "forward/query": q_rows * batch * hq * head_dim * itemsize,
            "forward/query_result": part_rows * batch * hq * (head_dim * itemsize + 4),
            "backward/query": q_rows * batch * hq * (2 * head_dim * itemsize + 8),
            "backward/query_result": part_rows * batch * hq * head_dim * itemsize,
        }
    if not causal:
        kv_rows = full
    elif layout == "zigzag":
        kv_rows = (P - 1) * L // 2 + (P - 1) ** 2 * L
    else:
        kv_rows = full // 2
    kv_bytes = kv_rows * batch * hkv * 2 * head_dim * itemsize
    return {
        "forward/kv": kv_bytes,
        "backward/kv": kv_bytes,
        "backward/kv_result": P * P * L * batch * hkv * 2 * head_dim * 4,
    }


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
