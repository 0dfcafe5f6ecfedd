"""Context-parallel plans as hooks (``integrations/context_plans.py``), on plain modules:
which modules a name denotes, what is split and gathered where, what is left alone."""

from __future__ import annotations

import pytest
import torch

from tokenring.integrations.context_plans import (
    Gather,
    Split,
    apply_plan,
    plan_modules,
    without_text,
)


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = torch.nn.Identity()

    def forward(self, hidden_states, rotary=None):
        self.seen = (hidden_states.shape, None if rotary is None else [r.shape for r in rotary])
        return hidden_states


class _Model(torch.nn.Module):
    """Embeds, runs two blocks (each handed the same rotary tables), projects out."""

    def __init__(self):
        super().__init__()
        self.rope = torch.nn.Identity()
        self.blocks = torch.nn.ModuleList([_Block(), _Block()])
        self.proj_out = torch.nn.Identity()

    def forward(self, hidden_states, timestep):
        self.timestep = timestep.shape
        rotary = (torch.ones(hidden_states.shape[1], 4), torch.zeros(hidden_states.shape[1], 4))
        for block in self.blocks:
            hidden_states = block(hidden_states, rotary=rotary)
        return self.proj_out(hidden_states)


def _halves():
    """split: the first half of ``dim`` (rank 0 of 2, the larger half); gather: the
    tensor doubled back to its length, the missing half zero: enough to see what ran."""
    lengths = {}

    def split(x, dim):
        lengths[dim] = x.shape[dim]
        return x.narrow(dim, 0, (x.shape[dim] + 1) // 2)

    def gather(x, dim):
        rest = list(x.shape)
        rest[dim] = lengths[1] - x.shape[dim]
        return torch.cat([x, x.new_zeros(rest)], dim=dim)

    return split, gather


def test_a_plan_splits_where_it_says_and_gathers_back():
    model = _Model()
    plan = {
        "blocks.0": {"hidden_states": Split(1, expected_dims=3)},
        "blocks.*": {"rotary": Split(0, expected_dims=2)},
        "": {"timestep": Split(1, expected_dims=2)},
        "proj_out": Gather(1, expected_dims=3),
    }
    split, gather = _halves()
    handles = apply_plan(model, plan, split=split, gather=gather)
    x = torch.randn(2, 7, 3)
    out = model(x, torch.tensor([1.0, 2.0]))  # a timestep per sample: 1-D, left alone
    assert model.timestep == torch.Size([2])
    for block in model.blocks:  # every block gets its part of the tables (tuples split)
        assert block.seen == (torch.Size([2, 4, 3]), [torch.Size([4, 4])] * 2)
    assert torch.equal(out[:, :4], x[:, :4]) and out.shape == x.shape
    model(x, torch.ones(2, 7))  # a timestep per token: 2-D, split with the tokens
    assert model.timestep == torch.Size([2, 4])
    for handle in handles:
        handle.remove()
    assert torch.equal(model(x, torch.ones(2, 7)), x)  # the hooks are gone


def test_plan_names_match_one_module_name_per_star():
    model = _Model()
    assert plan_modules(model, "blocks.*") == list(model.blocks)  # not blocks.0.inner
    assert plan_modules(model, "") == [model]
    with pytest.raises(ValueError, match=r"has no module 'blockz\.0'"):
        plan_modules(model, "blockz.0")


def test_text_entries_are_dropped_and_nothing_else():
    plan = {
        "": {"hidden_states": Split(1), "encoder_hidden_states": Split(1), "txt_ids": Split(0)},
        "context": {"encoder_attention_mask": Split(1)},
        "proj_out": Gather(1),
    }
    assert without_text(plan) == {"": {"hidden_states": Split(1)}, "proj_out": Gather(1)}
