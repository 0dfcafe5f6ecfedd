"""shard / unshard round trips, in every layout and world size."""

from __future__ import annotations

import pytest
import torch

import tokenring as tr


def roundtrip(w, *, world, layout, length, dim):
    group = w.group(world)
    g = torch.Generator().manual_seed(1)
    full = torch.randn(2, 3, length, 5, generator=g).movedim(2, dim)
    local = tr.shard(full, layout=layout, group=group, dim=dim)
    back = tr.unshard(local, layout=layout, group=group, dim=dim)
    return bool(torch.equal(back, full)), local.shape[dim], local.is_contiguous()


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shard_unshard_roundtrip(pool, world):
    cases = [
        dict(world=world, layout="zigzag", length=4 * world, dim=1),
        dict(world=world, layout="zigzag", length=2 * world, dim=2),
        dict(world=world, layout="contiguous", length=3 * world, dim=1),
        dict(world=world, layout="contiguous", length=world, dim=-1),
    ]
    for case, per_rank in zip(cases, pool.run(roundtrip, cases)):
        for equal, local_len, contiguous in per_rank:
            assert equal and contiguous
            assert local_len == case["length"] // world


def test_zigzag_shard_takes_chunks_r_and_2p_minus_1_minus_r():
    """With one rank the zigzag shard is the whole sequence, in order."""
    x = torch.arange(8).view(1, 8)
    assert torch.equal(tr.shard(x, layout="zigzag"), x)
