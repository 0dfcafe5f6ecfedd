"""``torch.compile``: every strategy compiled (fullgraph, no graph break inside the call)
gives what the eager call gives, forward and backward; a small model trains compiled."""

from __future__ import annotations

import pytest

from compile_cases import compiled_vs_eager_case, training_case

STRATEGIES = ["tokenring", "ring", "ulysses", "allgather", "usp"]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_compiled_calls_equal_eager_calls(pool, strategy):
    """Both layouts, causal or not, GQA; 1, 2 and 4 processes (USP: a 2 x 2 mesh), through
    Dynamo and AOT autograd with ``fullgraph=True``: one graph, no break, and the same
    outputs and gradients as eager, to fp32 rounding."""
    worlds = (4,) if strategy == "usp" else (1, 2, 4)
    cases = [
        dict(world=world, strategy=strategy, layout=layout, causal=causal, heads=(4, 2))
        for world in worlds
        for layout, causal in (("zigzag", True), ("contiguous", False))
    ]
    for case, per_rank in zip(cases, pool.run(compiled_vs_eager_case, cases, timeout=600)):
        for r in per_rank:
            assert r["diff"] <= 1e-5, (case, r)
            assert (r["graphs"], r["breaks"]) == (1.0, 0.0), (case, r)


def test_compiled_joint_tokens_and_a_graph_without_fullgraph(pool):
    cases = [
        dict(
            world=2,
            strategy="tokenring",
            layout="contiguous",
            causal=False,
            heads=(4, 4),
            joint=True,
        ),
        dict(world=2, strategy="ring", layout="zigzag", causal=True, heads=(4, 2), fullgraph=False),
    ]
    for case, per_rank in zip(cases, pool.run(compiled_vs_eager_case, cases, timeout=600)):
        for r in per_rank:
            assert r["diff"] <= 1e-5 and r["breaks"] == 0.0, (case, r)


def test_a_compiled_model_trains_like_the_eager_one(pool):
    """Inductor (the default backend), 2 processes, TokenRing: 3 SGD steps of a model with
    two attention layers and projections; losses and weights match eager."""
    (per_rank,) = pool.run(training_case, [dict(world=2, strategy="tokenring")], timeout=600)
    for r in per_rank:
        assert r["loss_moved"] > 0, "the model did not train"
        assert r["loss_diff"] <= 1e-5 and r["weight_diff"] <= 1e-5, r
