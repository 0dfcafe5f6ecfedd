"""Every strategy x layout x causal x head grouping (MHA, GQA 4:1, MQA) x dtype x batch
x head_dim, forward and backward, against float64 attention on the gathered sequence,
for world sizes 1 to 4."""

from __future__ import annotations

import itertools

import pytest

from dist_cases import DTYPES, check_attention, make_inputs, single_device_errors

HEADS = {"mha": (4, 4), "gqa": (8, 2), "mqa": (4, 1)}
# Ulysses splits heads over the ranks: at P=3 the same groupings with heads divisible by 3
ULYSSES_P3_HEADS = {"mha": (6, 6), "gqa": (12, 3), "mqa": (6, 1)}
STRATEGIES = ["tokenring", "ring", "ulysses", "allgather"]
FP32_TOL = 1e-5

# bf16 rule (after flash-attention's tests): our error may be at most twice the
# error of PyTorch's own single-device CPU kernel on the same bf16 inputs, plus
# one bf16 rounding (2**-8 relative) per step. Each step's block result (out or
# dq partial, and in ring's backward each dk/dv block) comes out of the kernel
# rounded to bf16 before an exact fp32 merge, so a sharded result carries up to
# `world` such roundings where the single-device kernel has one; the error must
# not grow in any other way.
BF16_STEP_ROUNDING = 2.0**-8


def _bf16_bounds(case: dict) -> dict[str, float]:
    q, k, v, do = make_inputs(
        case["seed"],
        case["batch"],
        case["seq"],
        case["heads"],
        case["head_dim"],
        DTYPES["bfloat16"],
    )
    base = single_device_errors(q, k, v, do, case["causal"])
    return {name: 2 * err + case["world"] * BF16_STEP_ROUNDING for name, err in base.items()}


def _cases(world: int, strategy: str, layout: str, causal: bool) -> list[dict]:
    cases = []
    groupings = ULYSSES_P3_HEADS if strategy == "ulysses" and world == 3 else HEADS
    for (hname, heads), dtype, batch, head_dim in itertools.product(
        groupings.items(), ("float32", "bfloat16"), (1, 3), (64, 80)
    ):
        cases.append(
            dict(
                world=world,
                strategy=strategy,
                layout=layout,
                causal=causal,
                heads=heads,
                dtype=dtype,
                batch=batch,
                head_dim=head_dim,
                seq=8 * world,
                seed=hash((hname, batch, head_dim)) % 1000,
            )
        )
    if layout == "contiguous":  # odd local length: the two local halves differ in size
        cases.append(
            dict(
                world=world,
                strategy=strategy,
                layout=layout,
                causal=causal,
                heads=(6, 3) if strategy == "ulysses" and world == 3 else (4, 2),
                dtype="float32",
                batch=2,
                head_dim=64,
                seq=5 * world,
            )
        )
    return cases


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_matches_float64_reference(pool, world, strategy, layout, causal):
    cases = _cases(world, strategy, layout, causal)
    results = pool.run(check_attention, cases)
    failures = []
    for case, per_rank in zip(cases, results):
        worst = {key: max(r[key] for r in per_rank) for key in per_rank[0]}
        if min(r["dtype_ok"] for r in per_rank) != 1.0:
            failures.append(f"{case}: wrong output dtype")
        if case["dtype"] == "float32":
            bounds = dict.fromkeys(("out", "lse", "dq", "dk", "dv"), FP32_TOL)
        else:
            bounds = _bf16_bounds(case)
        for key, bound in bounds.items():
            if not worst[key] <= bound:
                failures.append(f"{key} error {worst[key]:.3g} > {bound:.3g} in {case}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_tokenring_streaming_its_last_partial_matches_float64(pool, world):
    """The streamed last step (the hidden tail, used above ``stream_tail_min``) at small
    sizes: both layouts, causal or not, MHA and GQA, forward and backward."""
    cases = [
        dict(
            world=world,
            strategy="tokenring",
            layout=layout,
            causal=causal,
            heads=heads,
            dtype="float32",
            batch=2,
            head_dim=16,
            seq=8 * world,
            stream_tail=True,
        )
        for layout in ("contiguous", "zigzag")
        for causal in (False, True)
        for heads in HEADS.values()
    ]
    for case, per_rank in zip(cases, pool.run(check_attention, cases)):
        worst = max(r[key] for r in per_rank for key in ("out", "lse", "dq", "dk", "dv"))
        assert worst <= FP32_TOL, (case, worst)
