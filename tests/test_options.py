"""A call's options, parsed once at the edge: every problem collected, encoded for the
compiled op and back, and ``seq_len`` checked."""

from __future__ import annotations

import pytest
import torch

import tokenring as tr
from tokenring.call.description import OPTION_NAMES, CallDescription, Options
from tokenring.options import JointStrategy, Layout, RingImpl, Strategy


def test_every_problem_is_collected_not_only_the_first():
    options, problems = Options.parse(
        strategy="spiral", layout="diagonal", causal=1, softmax_scale=float("nan"), seq_len=0
    )
    assert [p.split(" ")[0] + " " + p.split(" ")[1] for p in problems] == [
        "unknown strategy", "unknown layout", "causal must", "softmax_scale must", "seq_len must",
    ]  # fmt: skip
    assert options == Options(), "the defaults stand in for the wrong values"


@pytest.mark.parametrize("value", [0, -3, 2.5, True, "8"])
def test_seq_len_must_be_a_positive_int(value):
    with pytest.raises(ValueError, match="seq_len must be a positive int"):
        Options.checked(seq_len=value)
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="seq_len must be a positive int"):
        tr.attention(q, q, q, seq_len=value)


def test_strings_and_enums_parse_to_the_same_options_and_survive_encoding():
    given = dict(strategy="usp", ring_impl="ring", layout="zigzag", causal=True,
                 softmax_scale=0.125, kernel="math", deterministic=True,
                 joint_strategy="rear", seq_len=37, window_size=[7, 0],
                 cu_seqlens=torch.tensor([0, 5, 37]))  # fmt: skip
    parsed = Options.checked(**given)
    assert parsed == Options(
        Strategy.USP, RingImpl.RING, Layout.ZIGZAG, True, 0.125, "math", True,
        JointStrategy.REAR, 37, (7, 0), (0, 5, 37),
    )  # fmt: skip
    assert Options.decode(parsed.encode()) == parsed
    assert Options.of_values(parsed.values()) == (parsed, ())
    assert OPTION_NAMES[0] == "strategy" and len(OPTION_NAMES) == len(given)


def test_auto_is_an_option_value_but_not_a_strategy():
    assert Options.checked(strategy="auto").strategy == "auto"
    call = CallDescription.of_shape(world=2, seq_len=9, heads_q=4, heads_kv=4, head_dim=8)
    assert call.strategy is Strategy.TOKENRING
    assert call.local_lengths == (5, 4)
