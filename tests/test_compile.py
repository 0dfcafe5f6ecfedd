"""``torch.compile``: every strategy compiled (fullgraph, no graph break inside the call)
gives what the eager call gives, forward and backward; a small model trains compiled."""

from __future__ import annotations

import pytest

from compile_cases import compile_refusals_case, compiled_vs_eager_case, training_case

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


def test_compiled_calls_refuse_unknown_groups_and_recorders(pool):
    """A group or mesh made after start-up is unknown until ``setup_lanes`` (a clear
    RuntimeError, raised by every rank, no hang); a recorder is refused under compile."""
    (per_rank,) = pool.run(compile_refusals_case, [dict(world=4)], timeout=600)
    for said in per_rank:
        assert "does not know process group" in said["unknown_group"], said
        assert "setup_lanes" in said["unknown_group"], said
        assert float(said["known_after_setup"]) <= 1e-6, said
        assert "recorder= records eager calls" in said["recorder"], said
        assert "does not know this mesh" in said["unknown_mesh"], said
        assert float(said["mesh_known_after_setup"]) <= 1e-6, said


def test_options_are_constant_to_dynamo_without_importing_it_with_tokenring():
    """``encode_values`` is marked as torch's ``assume_constant_result`` marks a function
    (checked against torch's own decorator, so that a torch that marks otherwise fails
    here, loudly), and ``import tokenring`` does not import Dynamo (a second per
    process that never compiles)."""
    import subprocess
    import sys

    import torch

    from tokenring.call.description import encode_values

    def probe():
        return 0

    torch.compiler.assume_constant_result(probe)
    marks = {name for name in vars(probe) if name.startswith("_dynamo")}
    assert marks == {"_dynamo_marked_constant"}, marks
    assert encode_values._dynamo_marked_constant is True
    code = "import sys, tokenring; print('torch._dynamo' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stdout + done.stderr
