"""LSE merge: exact, and NaN-free for rows that saw no key."""

from __future__ import annotations

import torch

from reference import attention_reference
from tokenring.execution.merge import merge_into, write_into

NEG_INF = float("-inf")


def _split_attention(q, k, v, cut):
    out_a, lse_a = attention_reference(q, k[:, :cut], v[:, :cut], causal=False)
    out_b, lse_b = attention_reference(q, k[:, cut:], v[:, cut:], causal=False)
    return out_a, lse_a, out_b, lse_b


def test_merging_two_key_halves_gives_full_attention():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 5, 3, 8), torch.randn(2, 9, 3, 8), torch.randn(2, 9, 3, 8)
    out_a, lse_a, out_b, lse_b = _split_attention(q, k, v, 4)
    out = torch.empty(2, 5, 3, 8)
    lse = torch.empty(2, 3, 5)
    write_into(out, lse, out_a, lse_a)
    merge_into(out, lse, out_b, lse_b)
    ref, ref_lse = attention_reference(q, k, v, causal=False)
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-6, atol=1e-6)
    # without the guard for rows empty on both sides (none is here): the same numbers
    unguarded, unguarded_lse = torch.empty(2, 5, 3, 8), torch.empty(2, 3, 5)
    write_into(unguarded, unguarded_lse, out_a, lse_a)
    merge_into(unguarded, unguarded_lse, out_b, lse_b, empty_rows=False)
    torch.testing.assert_close(unguarded, out, rtol=0, atol=0)
    torch.testing.assert_close(unguarded_lse, lse, rtol=0, atol=0)


def test_empty_rows_merge_without_nan():
    out = torch.zeros(1, 3, 1, 2)
    lse = torch.tensor([[[NEG_INF, NEG_INF, 0.5]]])
    part = torch.ones(1, 3, 1, 2)
    part_lse = torch.tensor([[[NEG_INF, 1.0, NEG_INF]]])
    merge_into(out, lse, part, part_lse)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    # row 0: both empty -> stays 0 / -inf; row 1: takes the partial; row 2: keeps its own
    assert out[0, 0].eq(0).all() and lse[0, 0, 0] == NEG_INF
    assert out[0, 1].eq(1).all() and lse[0, 0, 1] == 1.0
    assert out[0, 2].eq(0).all() and lse[0, 0, 2] == 0.5


def test_nan_propagates():
    out = torch.zeros(1, 1, 1, 2)
    lse = torch.zeros(1, 1, 1)
    merge_into(out, lse, torch.full((1, 1, 1, 2), float("nan")), torch.zeros(1, 1, 1))
    assert torch.isnan(out).all()
