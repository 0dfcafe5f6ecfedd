"""A plan's operations as code (``execution/program.py``): every operation of the
schedule is in the code, in order, and a schedule that would leave a move
unwaited is refused when translated, before any call runs it. (That the code
computes exact attention is what every distributed test checks: each call runs it.)"""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from tokenring.call.description import CallDescription
from tokenring.execution.program import translate
from tokenring.execution.slots import SlotGeometry
from tokenring.options import Layout, Pass, Strategy
from tokenring.schedules import build_schedule
from tokenring.schedules.ir import Compute, Merge, Post, Wait

WORLD = 3


def _geometry(strategy: Strategy, pass_: Pass, rank: int = 1, **shape) -> SlotGeometry:
    options = dict(seq_len=7 * WORLD + 2, heads_q=4, heads_kv=2, head_dim=4, batch=2,
                   causal=True, layout=Layout.ZIGZAG)  # fmt: skip
    call = CallDescription.of_shape(
        world=WORLD, strategy=strategy, device_type="cpu", wants_grad=True, **(options | shape)
    )
    return SlotGeometry(build_schedule(call.schedule_key(rank, pass_)), pass_, call)


def _kind(line: str) -> tuple | None:
    """Which operation a line of the code performs, with the number of the post a move's
    lines belong to (None: a line that only serves one)."""
    found = re.match(r"^(?:w(\d+)_\d+ = lanes\d+\.post_ops|p(\d+) = start_collective)\(", line)
    if found:
        return ("post", int(found[1] or found[2]))
    found = re.match(r"^(?:for work in w(\d+)_\d+:|complete\(SCHEDULE, PASS, p(\d+), ex\))", line)
    if found:
        return ("wait", int(found[1] or found[2]))
    if re.match(r"^\w+(, \w+)* = kernel\.(forward|backward)\(", line):
        return ("compute",)
    if re.match(r"^merging\.merge_into\(v\d+, v\d+, v\d+, v\d+,", line):
        return ("merge",)  # a Merge op: every argument a view (a block's merge reads o, l)
    if re.match(r"^v\d+\.add_\(v\d+\)$", line):
        return ("merge",)  # one component of a backward Merge
    return None


def _operations(source: str) -> list[tuple]:
    """The operations the code performs, in order: a move's lines (one per lane) count
    once."""
    found: list[tuple] = []
    for line in source.splitlines():
        kind = _kind(line.strip())
        if kind is not None and not (kind[0] in ("post", "wait") and found and found[-1] == kind):
            found.append(kind)
    return found


def _expected(geometry: SlotGeometry) -> list[tuple]:
    found: list[tuple] = []
    posted: dict[str, int] = {}
    for n, (op, step) in enumerate(zip(geometry.schedule.ops, geometry.steps)):
        match op:
            case Post():
                found.append(("post", n))
                posted[op.handle] = n
            case Wait():
                found.append(("wait", posted[op.handle]))
            case Compute() if not step.empty:
                found.append(("compute",))
            case Merge():
                found += [("merge",)] * (1 if geometry.pass_ is Pass.FORWARD else len(step.dst))
    return found


@pytest.mark.parametrize("recording", (False, True))
@pytest.mark.parametrize("gloo", (False, True))
@pytest.mark.parametrize("pass_", (Pass.FORWARD, Pass.BACKWARD))
@pytest.mark.parametrize(
    "strategy", (Strategy.TOKENRING, Strategy.RING, Strategy.ULYSSES, Strategy.ALLGATHER)
)
def test_the_code_lists_every_operation_in_order(strategy, pass_, gloo, recording) -> None:
    """Each post, wait, kernel call of a block with tokens and merge of the schedule is in
    the code, in the schedule's order, and each wait waits on its own post;
    point-to-point posts and waits are written out (collectives are started and
    completed by their handlers); a recorded call times every kernel and counts the
    bytes of every point-to-point post, and notes when its wait returned."""
    geometry = _geometry(strategy, pass_)
    program = translate(geometry, frozenset({"group"}) if gloo else frozenset(), recording)
    assert _operations(program.source) == _expected(geometry)
    posts = [op for op in geometry.schedule.ops if isinstance(op, Post)]
    inline = sum(op.collective is None for op in posts)
    written = set(re.findall(r"^ *w(\d+)_\d+ = lanes\d+\.post_ops\(", program.source, re.M))
    assert len(written) == inline
    assert program.source.count("recorder.comm(") == (inline if recording else 0)
    assert program.source.count("recorder.comm_waited(") == (inline if recording else 0)
    computes = _expected(geometry).count(("compute",))
    assert program.source.count("recorder.compute_start(") == (computes if recording else 0)


@pytest.mark.parametrize(
    "strategy, dropped, refusal",
    [(Strategy.TOKENRING, Wait, "unwaited"), (Strategy.RING, Post, "never posted")],
)
def test_a_schedule_whose_moves_do_not_pair_is_refused(strategy, dropped, refusal) -> None:
    """Without its last wait a move stays unwaited; without its first post a wait waits on
    nothing: the translation says so, before any call runs the code."""
    geometry = _geometry(strategy, Pass.FORWARD)
    schedule = geometry.schedule
    found = [i for i, op in enumerate(schedule.ops) if isinstance(op, dropped)]
    at = found[-1] if dropped is Wait else found[0]
    broken = dataclasses.replace(schedule, ops=schedule.ops[:at] + schedule.ops[at + 1 :])
    with pytest.raises(AssertionError, match=refusal):
        translate(SlotGeometry(broken, Pass.FORWARD, geometry.call), frozenset(), False)


def _flat_geometry(strategy: Strategy, dtype: torch.dtype) -> SlotGeometry:
    """Rank 1 of a two-rank, non-causal, contiguous forward: each rank's first block is
    its own, whole."""
    call = CallDescription.of_shape(
        world=2, seq_len=16, heads_q=2, heads_kv=2, head_dim=4, dtype=dtype,
        layout=Layout.CONTIGUOUS, strategy=strategy, device_type="cpu",
    )  # fmt: skip
    return SlotGeometry(build_schedule(call.schedule_key(1, Pass.FORWARD)), Pass.FORWARD, call)


@pytest.mark.parametrize("reuse", (False, True))
def test_a_float32_result_first_written_whole_is_the_kernels_output(reuse) -> None:
    """Ring's two-rank forward in float32: the result is the first block's output, merged
    into in place and returned (not allocated, not copied into); in bfloat16 (an output
    of another dtype than the float32 accumulator), recorded, or over a collective, it is
    allocated and written as before."""
    geometry = _flat_geometry(Strategy.RING, torch.float32)
    source = translate(geometry, frozenset({"group"}), False, reuse).source
    kept = re.findall(r"^    (v\d+) = o$", source, re.M)
    assert len(kept) == 1 and f"{kept[0]}.copy_(" not in source
    assert re.search(rf"^    return \({kept[0]}, v\d+\),", source, re.M)
    assert "empty(" not in source if reuse else source.count("empty(") == 1  # scratch only
    for other in (
        translate(_flat_geometry(Strategy.RING, torch.bfloat16), frozenset({"group"}), False),
        translate(geometry, frozenset({"group"}), True),
        translate(_flat_geometry(Strategy.ULYSSES, torch.float32), frozenset({"group"}), False),
    ):
        assert not re.search(r"^    v\d+ = [ol]$", other.source, re.M), other.source


def test_the_code_hands_back_its_workspace_only_where_the_plan_keeps_one() -> None:
    """A call whose plan keeps a workspace (the CPU) returns the scratch it used, fresh or
    reused, for the next call; elsewhere (CUDA) it returns none, building nothing to
    return."""
    geometry, gloo = _flat_geometry(Strategy.RING, torch.float32), frozenset({"group"})
    fresh = translate(geometry, gloo, False, reuse=False, keep=True).source
    reused = translate(geometry, gloo, False, reuse=True, keep=True).source
    unkept = translate(geometry, gloo, False, reuse=False, keep=False).source
    assert re.search(r"^    return \(.*\), Workspace\(\[", fresh, re.M)
    assert re.search(r"^    return \(.*\), workspace$", reused, re.M)
    assert re.search(r"^    return \(.*\), None$", unkept, re.M)
