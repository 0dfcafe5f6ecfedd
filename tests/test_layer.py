"""``SequenceParallelAttention``: configured once, checked at construction, the same
results as the function it wraps."""

from __future__ import annotations

import pytest
import torch

import tokenring as tr
from usp_cases import layer_case


def test_layer_options_are_checked_when_it_is_made():
    with pytest.raises(ValueError, match="unknown strategy 'spiral'"):
        tr.SequenceParallelAttention("spiral")
    with pytest.raises(ValueError, match="unknown layout 'diagonal'"):
        tr.SequenceParallelAttention("ring", layout="diagonal")
    with pytest.raises(ValueError, match="needs mesh="):
        tr.SequenceParallelAttention("usp")
    with pytest.raises(ValueError, match="ring_impl= is for strategy='usp'"):
        tr.SequenceParallelAttention("ulysses", ring_impl="ring")
    with pytest.raises(ValueError, match=r"mesh must be a torch\.distributed DeviceMesh"):
        tr.SequenceParallelAttention("usp", mesh="not a mesh")
    with pytest.raises(ValueError, match=r"mesh must be a torch\.distributed DeviceMesh"):
        tr.SequenceParallelAttention("auto", mesh="not a mesh")


def test_layer_has_no_parameters_and_says_how_it_runs():
    layer = tr.SequenceParallelAttention("allgather", layout="zigzag")
    assert list(layer.parameters()) == []
    assert "strategy=allgather, layout=zigzag" in repr(layer)


def test_layer_gives_what_the_function_gives(pool):
    """Bitwise, on 4 ranks: a 1-D strategy with joint tokens, USP 2 x 2, and auto over
    the same mesh."""
    (per_rank,) = pool.run(layer_case, [dict(world=4)])
    assert all(per_rank), per_rank


def test_layer_on_one_process_without_torch_distributed():
    q = torch.randn(1, 8, 2, 16)
    layer = tr.SequenceParallelAttention("tokenring")
    assert torch.equal(layer(q, q, q, causal=True), tr.attention(q, q, q, causal=True))
