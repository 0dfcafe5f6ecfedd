"""The runtime: settings that are validated and reach the code that uses them, and
bounded per-group state."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
import torch

import tokenring as tr
from dist_cases import runtime_summary_case
from tokenring.runtime import Runtime, Settings


@pytest.mark.parametrize(
    "changes,message",
    [
        (
            {"timout": timedelta(seconds=1)},
            "unknown setting(s) timout; valid: fused_merge, max_agreed, max_plans, "
            "stream_tail_min, timeout",
        ),
        ({"timeout": 30}, "timeout must be a positive timedelta, got 30"),
        ({"timeout": timedelta(0)}, "timeout must be a positive timedelta"),
        ({"fused_merge": 1}, "fused_merge must be a bool, got 1"),
        ({"max_plans": 0}, "max_plans must be a positive int, got 0"),
        ({"max_agreed": True}, "max_agreed must be a positive int, got True"),
        ({"workspace_bytes": -1}, "workspace_bytes must be a non-negative int, got -1"),
    ],
)
def test_configure_rejects_unknown_and_invalid_settings(changes, message):
    runtime = Runtime(Settings())
    with pytest.raises(ValueError) as info:
        runtime.configure(**changes)
    assert str(info.value).startswith(message)
    assert runtime.settings == Settings(), "a refused change leaves the settings as they were"


def test_environment_is_read_when_a_runtime_is_made(monkeypatch):
    monkeypatch.setenv("TOKENRING_TIMEOUT_S", "12.5")
    monkeypatch.setenv("TOKENRING_FUSED_MERGE", "0")
    made = Runtime()
    assert made.settings.timeout == timedelta(seconds=12.5)
    assert made.settings.fused_merge is False
    monkeypatch.delenv("TOKENRING_TIMEOUT_S")
    monkeypatch.delenv("TOKENRING_FUSED_MERGE")
    assert made.settings.timeout == timedelta(seconds=12.5), "read once, when made"
    assert Runtime().settings == Settings()


def test_plans_are_kept_per_group_and_bounded():
    """Distinct calls beyond ``max_plans`` evict the least recently used plan."""
    runtime = tr.runtime()
    before = runtime.settings
    state = runtime.group(None)
    try:
        runtime.configure(max_plans=3)
        for length in (2, 4, 6, 8, 10):
            q = torch.randn(1, length, 2, 8)
            tr.attention(q, q, q)
        assert len(state.calls) == 3
        lengths = sorted(call.plan.seq_len for call in state.calls.values())
        assert lengths == [6, 8, 10], "the oldest plans went first"
    finally:
        runtime.configure(max_plans=before.max_plans)


def test_settings_reach_the_executor(monkeypatch):
    """What ``configure`` set is what the next call runs with."""
    import tokenring.api.attention as api

    seen = []
    real = api.forward_pass

    def spy(call, *args, **kwargs):
        seen.append((call.ex.timeout, call.ex.fused_merge))
        return real(call, *args, **kwargs)

    monkeypatch.setattr(api, "forward_pass", spy)
    previous = tr.runtime().settings
    q = torch.randn(1, 8, 2, 8)
    try:
        tr.configure(timeout=timedelta(seconds=7), fused_merge=False)
        tr.attention(q, q, q)
        tr.configure(timeout=timedelta(seconds=9), fused_merge=True)
        tr.attention(q, q, q)
    finally:
        tr.configure(timeout=previous.timeout, fused_merge=previous.fused_merge)
    assert seen == [(timedelta(seconds=7), False), (timedelta(seconds=9), True)]


def test_every_merge_gets_the_fused_merge_setting(pool):
    """On 2 ranks TokenRing merges partials: each merge is told the runtime's setting."""
    from dist_cases import merge_flags_case

    for fused in (False, True):
        (per_rank,) = pool.run(merge_flags_case, [dict(world=2, fused=fused)])
        for flags in per_rank:
            assert flags and set(flags) == {fused}, flags


def test_the_runtime_prints_a_short_summary_whatever_was_called(pool):
    """After many distinct calls of every 1-D strategy and ``auto`` on 2 gloo ranks (on top
    of whatever earlier tests called), ``str(tr.runtime())`` and its repr are at most 40
    lines of at most 120 characters, name every strategy used and count what does not
    fit; ``why()`` holds the planner's explanation of every decision."""
    (per_rank,) = pool.run(runtime_summary_case, [dict(world=2)], timeout=600)
    for found in per_rank:
        text = found["str"]
        lines = text.splitlines()
        assert found["repr"] == text and found["why"]
        assert len(lines) <= 40 and max(map(len, lines)) <= 120, text
        assert lines[0].startswith("tokenring runtime: ") and lines[2].startswith("settings: ")
        assert lines[1].startswith("plans by strategy, every group: (")
        for strategy in ("tokenring", "ring", "ulysses", "allgather"):
            assert re.search(rf"(?<![a-z]){strategy} \d+", text), (strategy, text)
        assert re.search(r"^auto: \d+ decision\(s\) \(", text, re.M), text
        assert re.search(r"^  \.\.\. and \d+ more$", text, re.M), text


def test_captured_call_needs_cuda_tensors():
    with pytest.raises(ValueError, match="CapturedCall needs CUDA tensors"):
        tr.CapturedCall(lambda q: q, torch.zeros(1))


@pytest.mark.parametrize("strategy", ["tokenring", "ring"])
def test_a_kept_workspace_serves_later_calls_exactly(pool, strategy):
    """On 2 gloo ranks a plan keeps its scratch for the next call (``storage.py``): calls
    that reuse it are as exact as the first, and what the first returned is untouched;
    with ``workspace_bytes=0`` nothing is kept."""
    from dist_cases import workspace_reuse_case

    cases = [dict(world=2, strategy=strategy, keep=keep) for keep in (1 << 20, 0)]
    kept, none = pool.run(workspace_reuse_case, cases)
    for found in kept:
        assert max(found["errors"]) < 1e-5 and found["untouched"], found
        assert found["held"] > 0, "the plan kept no workspace"
    for found in none:
        assert max(found["errors"]) < 1e-5 and found["held"] == 0, found
