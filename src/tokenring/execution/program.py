"""A schedule's operations translated once into straight-line Python code.

A schedule is data, and reading it op by op on every call (which handler, which
views, which runs, which lanes) costs host time that a hand-written loop does not
pay: on a two-rank gloo call that interpretation was about a quarter of the call
(benchmarks/RESULTS.md, 0l). So each plan's operations are translated, once, into
one Python function whose body lists them in order with everything the schedule
fixes written in: the view numbers (as local variables), causal or not, the scale,
the result runs and their slices, the peers, lanes and batches of each transfer. A
call then runs that function. ``Program.source`` is the code, for reading.

What each operation does:

- ``Compute``: one block-attention kernel call (no mask, causal, or an explicit
  mask made from the block's positions, by the block's kind; a ragged block's
  valid key lengths); each run of its result is written (the run's first
  result) or LSE-merged into the result rows (forward), copied or added
  (backward).
- ``Merge``: LSE merge (forward) or sum (backward) of result rows.
- ``Post``: point-to-point transfers written out as one batch per lane (``_post``
  says which tensors go); a collective calls ``operations.start_collective``.
- ``Wait``: ``operations.complete``.

A schedule that leaves a move unwaited, or waits on one never posted, is refused
here, before any call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..options import Pass
from ..schedules.ir import Compute, Merge, Post, Wait
from ..schedules.masks import BlockKind
from . import merge as merging
from . import operations
from .records import pack_records
from .slots import ComputeStep, MergeStep, SlotGeometry

__all__ = ["Program", "translate"]

_MERGE_FLAGS = "fused=fused, empty_rows=EMPTY_ROWS"
"""A merge's keywords: the runtime's setting, and whether the plan's rows may be empty."""


@dataclass(frozen=True)
class Program:
    """One pass of one plan as code: ``run(store, ex)`` performs every operation."""

    run: Callable
    source: str


class _Writer:
    """The lines of the function being written, and the names its body refers to."""

    def __init__(self, geometry: SlotGeometry, gloo_axes: frozenset[str], recording: bool):
        self.geometry = geometry
        self.gloo_axes = gloo_axes
        self.recording = recording
        self.body: list[str] = []
        self.views: set[int] = set()
        self.lanes: dict[str, str] = {}
        self.needs: set[str] = set()
        self.namespace: dict[str, object] = {
            "merging": merging,
            "pack_records": pack_records,
            "sendable": sendable,
            "Pending": operations.Pending,
            "complete": operations.complete,
            "start_collective": operations.start_collective,
            "sent_of": operations.sent_of,
            "lanes_of": operations.lanes_of,
            "OPS": geometry.schedule.ops,
            "STEPS": geometry.steps,
            "SCHEDULE": geometry.schedule,
            "PASS": geometry.pass_,
            "SCALE": geometry.scale,
            "EMPTY_ROWS": geometry.rows_may_be_empty,
        }

    def v(self, number: int) -> str:
        self.views.add(number)
        return f"v{number}"

    def line(self, text: str) -> None:
        self.body.append("    " + text)

    def lanes_of(self, axis: str) -> str:
        if axis not in self.lanes:
            self.lanes[axis] = f"lanes{len(self.lanes)}"
        return self.lanes[axis]


def sendable(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a transfer sends it: one contiguous block (a KV cache's storage is
    batch-major, so its rows are not)."""
    return t if t.is_contiguous() else t.contiguous()


def _post(w: _Writer, n: int, op: Post, step) -> None:
    """A post. Point to point: one batch per lane, in lane order. On gloo every message
    costs a round of latency, so a transfer of several components (k and v; out and lse;
    the query bundle) goes as one message of records (``records.py``): the slots such
    transfers fill are stored that way, so only a call's own rows are packed, when sent.
    NCCL runs a batch's messages as one group, so there they go as they are. A
    collective: ``operations.start_collective``."""
    if op.collective is not None:
        w.line(f"p{n} = start_collective(store, OPS[{n}], ex)")
        return
    axis = op.moves[0].axis
    lanes = w.lanes_of(axis)
    pack = axis in w.gloo_axes
    stored = w.geometry.layout(bool(w.gloo_axes)).views
    by_lane: dict[int, list[str]] = {}
    for t in step:
        if pack and t.records is not None:
            records = w.v(t.records)
            if t.send:  # the slot's records, or the call's own rows packed as records
                parts = ", ".join(w.v(i) for i in t.views)
                tensors = [f"({records} if {records} is not None else pack_records([{parts}]))"]
            elif stored[t.records] is None:
                raise AssertionError("a slot that receives records is stored jointly")
            else:
                tensors = [records]
        elif t.send:
            tensors = [f"sendable({w.v(i)})" for i in t.views]
        else:
            tensors = [w.v(i) for i in t.views]
        by_lane.setdefault(t.lane, []).extend(
            f"{lanes}.p2p({x}, {t.peer}, {t.send}, {t.lane})" for x in tensors
        )
    batches = ", ".join(
        f"{lane}: {lanes}.post_ops([{', '.join(by_lane[lane])}])" for lane in sorted(by_lane)
    )
    w.line(f"p{n} = Pending(OPS[{n}], {{{batches}}})")
    if w.recording:
        w.line(f"recorder.comm(OPS[{n}], sent_of(store, STEPS[{n}]), p{n}.works)")


def _kernel_args(w: _Writer, n: int, op: Compute, step: ComputeStep) -> str:
    """What a block's kernel call takes after its tensors: causal, scale and mask."""
    if op.kind is BlockKind.PARTIAL:
        w.needs.add("mask")
        return f"{step.causal}, SCALE, geometry.block_mask(OPS[{n}], device)"
    return f"{step.causal}, SCALE"


def _compute_forward(w: _Writer, n: int, op: Compute, step: ComputeStep) -> None:
    q, k, v = (w.v(i) for i in step.inputs)
    ragged = ""
    if step.ragged is not None:
        w.needs.add("ragged")
        ragged = f", key_lengths=key_lengths[{step.ragged}]"
    args = _kernel_args(w, n, op, step)
    w.line(f"o, l = kernel.forward({q}, {k}, {v}, {args}{ragged})")
    for run in step.q_runs:
        out, lse = (w.v(i) for i in run.targets)
        a, b = run.start, run.stop
        part = "o, l" if run.whole else f"o[:, {a}:{b}], l[:, :, {a}:{b}]"
        if run.fresh:
            w.line(f"merging.write_into({out}, {lse}, {part})")
        else:
            w.line(f"merging.merge_into({out}, {lse}, {part}, {_MERGE_FLAGS})")


def _compute_backward(w: _Writer, n: int, op: Compute, step: ComputeStep) -> None:
    tensors = ", ".join(w.v(i) for i in step.inputs)
    w.line(f"dq, dk, dv = kernel.backward({tensors}, {_kernel_args(w, n, op, step)})")
    for runs, parts in ((step.q_runs, ("dq",)), (step.kv_runs, ("dk", "dv"))):
        for run in runs:
            for target, part in zip(run.targets, parts):
                value = part if run.whole else f"{part}[:, {run.start}:{run.stop}]"
                w.line(f"{w.v(target)}.{'copy_' if run.fresh else 'add_'}({value})")


def _merge(w: _Writer, step: MergeStep) -> None:
    if w.geometry.pass_ is Pass.FORWARD:
        (out, lse), (part, part_lse) = (
            tuple(w.v(i) for i in step.dst), tuple(w.v(i) for i in step.src)
        )  # fmt: skip
        w.line(f"merging.merge_into({out}, {lse}, {part}, {part_lse}, {_MERGE_FLAGS})")
        return
    for dst, src in zip(step.dst, step.src):
        w.line(f"{w.v(dst)}.add_({w.v(src)})")


def translate(geometry: SlotGeometry, gloo_axes: frozenset[str], recording: bool) -> Program:
    """The code of ``geometry``'s pass. ``gloo_axes``: the axes whose lanes run on gloo
    (their transfers of several components go as one message of records);
    ``recording``: the call has a ``Recorder`` (every compute is timed, every post's
    bytes counted)."""
    w = _Writer(geometry, gloo_axes, recording)
    forward = geometry.pass_ is Pass.FORWARD
    pending: set[str] = set()
    handles: dict[str, int] = {}
    for n, (op, step) in enumerate(zip(geometry.schedule.ops, geometry.steps)):
        match op:
            case Post():
                _post(w, n, op, step)
                pending.add(op.handle)
                handles[op.handle] = n
            case Wait():
                if op.handle not in pending:
                    raise AssertionError(f"schedule waits on {op.handle!r}, never posted")
                pending.discard(op.handle)
                w.line(f"complete(SCHEDULE, PASS, p{handles[op.handle]}, ex)")
            case Compute():
                if step.empty:
                    continue  # a cell of no tokens
                if recording:
                    w.line(f"token = recorder.compute_start(OPS[{n}])")
                if forward:
                    _compute_forward(w, n, op, step)
                else:
                    _compute_backward(w, n, op, step)
                if recording:
                    w.line("recorder.compute_end(token)")
            case Merge():
                _merge(w, step)
    if pending:
        raise AssertionError(f"schedule left moves unwaited: {sorted(pending)}")
    head = ["def run(store, ex):", "    views = store.views", "    kernel = ex.kernel"]
    head.append("    fused = ex.fused_merge")
    if recording:
        head += ["    recorder = ex.recorder", "    recorder.phase = PASS.value"]
    if "mask" in w.needs:
        head.append("    geometry, device = store.geometry, store.device")
    if "ragged" in w.needs:
        head.append("    key_lengths = store.key_lengths")
    head += [f"    {name} = lanes_of(ex, {axis!r})" for axis, name in w.lanes.items()]
    if w.views:
        numbers = sorted(w.views)
        names = ", ".join(f"v{i}" for i in numbers)
        head.append(f"    {names}, = ({', '.join(f'views[{i}]' for i in numbers)},)")
    source = "\n".join([*head, *w.body, "    return None", ""])
    schedule = geometry.schedule
    name = f"<tokenring {schedule.strategy} {geometry.pass_.value} rank {schedule.rank}>"
    exec(compile(source, name, "exec"), w.namespace)  # our own code, made above
    return Program(w.namespace["run"], source)
