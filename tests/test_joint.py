"""Joint (text) tokens for every strategy: replicated, attended with the sharded image
tokens, against float64 attention over the concatenated sequence, gradients included
under the documented convention."""

from __future__ import annotations

import pytest
import torch

import tokenring as tr
from usp_cases import joint_case

FP32_TOL = 1e-5
ONE_D = ["tokenring", "ring", "ulysses", "allgather"]
KEYS = ("out", "lse", "joint_out", "joint_lse", "dq", "dk", "dv", "djq", "djk", "djv")


def _check(cases, results):
    failures = []
    for case, per_rank in zip(cases, results):
        for rank, errs in enumerate(per_rank):
            if errs.get("joint_out_identical", 1.0) != 1.0:
                failures.append(f"{case} rank {rank}: joint_out differs between ranks")
            for key in KEYS:
                if key in errs and not errs[key] <= FP32_TOL:
                    failures.append(f"{case} rank {rank}: {key} error {errs[key]:.3g}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("strategy", ONE_D)
def test_joint_tokens_match_attention_over_the_concatenated_sequence(pool, strategy):
    """Front and rear, world sizes 1-4 (Ulysses where its heads divide), MHA and GQA,
    both layouts; with and without joint queries."""
    cases = []
    for world in (1, 2, 3, 4):
        heads = [(6, 3), (6, 6)] if strategy == "ulysses" and world == 3 else [(4, 2), (4, 4)]
        for joint_strategy in ("front", "rear"):
            layout = "zigzag" if world % 2 else "contiguous"
            for h in heads:
                case = dict(world=world, strategy=strategy, heads=h, layout=layout)
                cases.append(dict(case, joint_strategy=joint_strategy))
        no_q = dict(world=world, strategy=strategy, heads=heads[0], joint_strategy="front")
        cases.append(dict(no_q, with_q=False))
    _check(cases, pool.run(joint_case, cases, timeout=300))


def test_joint_tokens_with_usp(pool):
    cases = [
        dict(world=4, strategy="usp", ulysses=u, ring=r, joint_strategy=js, heads=h, layout=lay)
        for u, r in ((2, 2), (4, 1), (1, 4))
        for js in ("front", "rear")
        for h in ((4, 2), (4, 4))
        for lay in ("zigzag", "contiguous")
    ]
    _check(cases, pool.run(joint_case, cases, timeout=300))


def test_joint_gradients_are_exact_in_float64_with_unequal_shares(pool):
    """In float64, with each rank taking a different share of the joint output's
    gradient (what the model integrations hand it): every gradient, the joint ones
    summed over the group, equals float64 attention over the concatenated sequence to
    rounding (the convention holds for any shares that sum to one)."""
    cases = [
        dict(world=w, strategy=s, heads=(4, 2), joint_strategy=js, dtype=torch.float64,
             unequal=True)
        for s in ONE_D
        for w in (2, 4)
        for js in ("front", "rear")
    ] + [
        dict(world=4, strategy="usp", ulysses=2, ring=2, heads=(4, 2), joint_strategy="front",
             dtype=torch.float64, unequal=True)
    ]  # fmt: skip
    for case, per_rank in zip(cases, pool.run(joint_case, cases, timeout=300)):
        for errs in per_rank:
            errs.pop("joint_out_identical")
            assert max(errs.values()) <= 1e-12, (case, errs)


@pytest.mark.parametrize("strategy", ["tokenring", "ring", "ulysses", "allgather", "usp"])
def test_padded_joint_tokens_are_no_querys_keys(pool, strategy):
    """``joint_mask``: a row whose last two text tokens are padding (the other row has
    none) against float64 attention over the concatenated sequence with those keys
    masked for every query: outputs, LSEs, the joint output and every gradient (the
    padded tokens' key and value gradients zero), front and rear, with and without joint
    queries, 1-4 ranks and USP 2 x 2."""
    if strategy == "usp":
        cases = [dict(world=4, strategy="usp", ulysses=2, ring=2, heads=(4, 2),
                      joint_strategy=js, padded=True) for js in ("front", "rear")]  # fmt: skip
    else:
        cases = [
            dict(
                world=w,
                strategy=strategy,
                heads=(4, 2),
                joint_strategy=js,
                padded=True,
                with_q=with_q,
            )
            for w in (1, 2, 3, 4)
            if not (strategy == "ulysses" and 4 % w)
            for js in ("front", "rear")
            for with_q in (True, False)
        ]
    _check(cases, pool.run(joint_case, cases, timeout=300))


def test_a_joint_mask_is_checked():
    q = torch.randn(2, 8, 4, 8)
    jk = torch.randn(2, 5, 4, 8)
    common = dict(joint_k=jk, joint_v=jk, joint_strategy="front")
    with pytest.raises(ValueError, match=r"joint_mask must be \[batch, joint_len\] = \[2, 5\]"):
        tr.attention(q, q, q, joint_mask=torch.ones(2, 4, dtype=torch.bool), **common)
    with pytest.raises(ValueError, match="joint_mask must be a bool tensor"):
        tr.attention(q, q, q, joint_mask=torch.ones(2, 5), **common)
    with pytest.raises(ValueError, match="joint_mask is for joint tokens"):
        tr.attention(q, q, q, joint_mask=torch.ones(2, 5, dtype=torch.bool))


def test_a_nan_query_gives_nan_in_its_rows_alone():
    """One NaN in an image query and one in a joint query (one rank, float32): exactly
    those rows of those heads come out NaN, in the output and the LSE, and the rest
    match float64 attention over the concatenated sequence (PyTorch's CPU kernel hides a
    query's NaN on some CPUs; a call restores such rows once, ``restore_query_nan``)."""
    from reference import attention_reference

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 6, 4, 8, generator=g) for _ in range(3))
    jq, jk, jv = (torch.randn(1, 3, 4, 8, generator=g) for _ in range(3))
    q[0, 2, 1, 5] = float("nan")
    jq[0, 0, 3, 2] = float("nan")
    out, lse, jo, jlse = tr.attention(
        q, k, v, joint_q=jq, joint_k=jk, joint_v=jv, joint_strategy="front", return_lse=True
    )
    whole = [torch.cat([a, b], dim=1).double() for a, b in ((jq, q), (jk, k), (jv, v))]
    ref_out, ref_lse = attention_reference(*whole, causal=False)
    assert int(torch.isnan(ref_out).any(-1).sum()) == 2  # one row of one head each
    for got, want in ((torch.cat([jo, out], 1), ref_out), (torch.cat([jlse, lse], 2), ref_lse)):
        assert torch.equal(torch.isnan(got), torch.isnan(want))
        keep = ~torch.isnan(want)
        torch.testing.assert_close(got.double()[keep], want[keep], rtol=1e-5, atol=1e-5)
    assert torch.isnan(out[0, 2, 1]).all() and torch.isnan(jo[0, 0, 3]).all()
