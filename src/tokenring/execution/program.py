"""A plan's pass translated once into one straight-line Python function.

A schedule is data, and reading it op by op on every call (which handler, which
views, which runs, which lanes) costs host time that a hand-written loop does not
pay: on a two-rank gloo call that interpretation was about a quarter of the call
(benchmarks/RESULTS.md, 0l), and making the storage through a store object about as
much again (0m). So each plan's pass is translated, once per way of running it, into
one Python function that makes the call's storage (``storage.store_code``: every view
a local variable), lists the operations in order with everything the schedule fixes
written in (causal or not, the scale, the result runs and their slices, the peers,
lanes and batches of each transfer) and returns the results in the kernels' order. A
call runs that function. ``Program.source`` is the code, for reading. A result whose
first write is a kernel's whole output of its dtype is that output (``_elided``).

What each operation does:

- ``Compute``: one block-attention kernel call (no mask, causal, or an explicit
  mask made from the block's positions, by the block's kind; a ragged block's
  valid key lengths); each run of its result is written (the run's first
  result) or LSE-merged into the result rows (forward), copied or added
  (backward).
- ``Merge``: LSE merge (forward) or sum (backward) of result rows.
- ``Post``: point-to-point transfers written out as one batch per lane (``_post``
  says which tensors go); a collective calls ``operations.start_collective``.
- ``Wait``: for point-to-point transfers, each work's wait written out (``_wait``);
  for a collective, ``operations.complete`` (which also unpacks it).

A schedule that leaves a move unwaited, or waits on one never posted, is refused
here, before any call.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..options import Pass
from ..schedules.ir import Compute, Merge, Post, Wait
from ..schedules.masks import BlockKind
from . import merge as merging
from . import operations
from .records import pack_records, stacks
from .slots import ComputeStep, MergeStep, SlotGeometry, SlotStore
from .storage import (
    StoreLayout,
    Strided,
    Workspace,
    spare_code,
    store_code,
    strided_code,
    ungroup,
    views_list,
)

__all__ = ["Program", "translate"]

_MERGE_FLAGS = "fused=fused, empty_rows=EMPTY_ROWS"
"""A merge's keywords: the runtime's setting, and whether the plan's rows may be empty."""


@dataclass(frozen=True)
class Program:
    """One pass of one plan as code: ``run(ex, inputs, given, device, key_lengths,
    workspace)`` makes the call's storage, performs every operation and returns the
    results (in the kernels' order, over this rank's own tokens) and the workspace it
    leaves for the next call (None where the plan keeps none)."""

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
        self.written: dict[int, list[tuple[int, str]]] = {}
        """View number -> each line that writes a kernel's whole output into it first, and
        that output's name (``_elided``)."""
        self.lanes: dict[str, str] = {}
        self.needs: set[str] = set()
        self.namespace: dict[str, object] = {
            "merging": merging,
            "pack_records": pack_records,
            "stack": torch.stack,
            "sendable": sendable,
            "complete": operations.complete,
            "transfer_failed": operations.transfer_failed,
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
        """The name the storage code gives view ``number``."""
        self.views.add(number)
        return f"v{number}"

    def line(self, text: str) -> None:
        self.body.append("    " + text)

    def write(self, target: int, value: str, whole: bool) -> None:
        """A kernel's output ``value`` written into view ``target`` (its first result)."""
        if whole:
            self.written.setdefault(target, []).append((len(self.body), value))
        self.line(f"{self.v(target)}.copy_({value})")

    def lanes_of(self, axis: str) -> str:
        if axis not in self.lanes:
            self.lanes[axis] = f"lanes{len(self.lanes)}"
        return self.lanes[axis]


def sendable(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a transfer sends it: one contiguous block (a KV cache's storage is
    batch-major, so its rows are not)."""
    return t if t.is_contiguous() else t.contiguous()


def _post(w: _Writer, n: int, op: Post, step) -> tuple[int, ...]:
    """A post; returns the lanes its works are kept by (``w{n}_{lane}``), none for a
    collective. Point to point: one batch per lane, in lane order. On gloo every message
    costs a round of latency, so a transfer of several components (k and v; out and lse;
    the query bundle) goes as one message of records (``records.py``): the slots such
    transfers fill are stored that way, so only a call's own rows are packed, when sent.
    NCCL runs a batch's messages as one group, so there they go as they are. A
    collective: ``operations.start_collective``."""
    if op.collective is not None:
        w.needs.add("store")
        w.line(f"p{n} = start_collective(store, OPS[{n}], ex)")
        return ()
    axis = op.moves[0].axis
    lanes = w.lanes_of(axis)
    pack = axis in w.gloo_axes
    stored = w.geometry.layout(bool(w.gloo_axes)).views
    by_lane: dict[int, list[str]] = {}
    for t in step:
        if pack and t.records is not None:
            if not t.send and stored[t.records] is None:
                raise AssertionError("a slot that receives records is stored jointly")
            if stored[t.records] is not None:  # the slot's records
                tensors = [w.v(t.records)]
            else:  # the call's own rows, packed as records when sent
                parts = ", ".join(w.v(i) for i in t.views)
                if _stacks(w.geometry, t.views):
                    tensors = [f"stack([{parts}], dim=1)"]
                else:
                    tensors = [f"pack_records([{parts}])"]
        elif t.send:
            tensors = [f"sendable({w.v(i)})" for i in t.views]
        else:
            tensors = [w.v(i) for i in t.views]
        by_lane.setdefault(t.lane, []).extend(
            f"{lanes}.p2p({x}, {t.peer}, {t.send}, {t.lane})" for x in tensors
        )
    for lane in sorted(by_lane):
        w.line(f"w{n}_{lane} = {lanes}.post_ops([{', '.join(by_lane[lane])}])")
    if w.recording:
        works = ", ".join(f"{lane}: w{n}_{lane}" for lane in sorted(by_lane))
        w.line(f"recorder.comm(OPS[{n}], sent_of(store, STEPS[{n}]), {{{works}}})")
    return tuple(sorted(by_lane))


def _stacks(geometry: SlotGeometry, views: tuple[int, ...]) -> bool:
    """Whether a local slot's rows ``views`` pack as records by ``torch.stack``."""
    specs = [geometry.views[i] for i in views]
    slot = geometry.schedule.slots[specs[0].slot]
    return stacks([geometry.shape_of(spec.component, slot, 1) for spec in specs])


def _wait(w: _Writer, n: int, lanes: tuple[int, ...]) -> None:
    """The wait for point-to-point post ``n`` (works kept by lane): on gloo bounded by
    the runtime's timeout (gloo's waits have none of their own); on NCCL ``wait()``
    only orders the compute stream after the work (NCCL's watchdog enforces the
    lanes' timeout). A failure names the rank, the step and the peers."""
    gloo = w.geometry.schedule.ops[n].moves[0].axis in w.gloo_axes
    w.line("try:")
    for lane in lanes:
        w.line(f"    for work in w{n}_{lane}:")
        w.line(f"        work.wait({'timeout' if gloo else ''})")
    w.line("except RuntimeError as err:")
    w.line(f"    raise transfer_failed(SCHEDULE, PASS, OPS[{n}], ex, err) from err")
    if w.recording:
        w.line(f"recorder.comm_waited(OPS[{n}].handle)")


def _kernel_args(w: _Writer, n: int, op: Compute, step: ComputeStep) -> str:
    """What a block's kernel call takes after its tensors: causal, scale and mask."""
    if op.kind is BlockKind.PARTIAL:
        return f"{step.causal}, SCALE, GEOMETRY.block_mask(OPS[{n}], device)"
    return f"{step.causal}, SCALE"


def _compute_forward(w: _Writer, n: int, op: Compute, step: ComputeStep) -> None:
    q, k, v = (w.v(i) for i in step.inputs)
    ragged = ""
    if step.ragged is not None:
        ragged = f", key_lengths=key_lengths[{step.ragged}]"
    args = _kernel_args(w, n, op, step)
    w.line(f"o, l = kernel.forward({q}, {k}, {v}, {args}{ragged})")
    for run in step.q_runs:
        out, lse = (w.v(i) for i in run.targets)
        a, b = run.start, run.stop
        part, part_lse = ("o", "l") if run.whole else (f"o[:, {a}:{b}]", f"l[:, :, {a}:{b}]")
        if run.fresh:  # the run's first result: written (cast as needed)
            w.write(run.targets[0], part, run.whole)
            w.write(run.targets[1], part_lse, run.whole)
        else:
            w.line(f"merging.merge_into({out}, {lse}, {part}, {part_lse}, {_MERGE_FLAGS})")


def _compute_backward(w: _Writer, n: int, op: Compute, step: ComputeStep) -> None:
    tensors = ", ".join(w.v(i) for i in step.inputs)
    w.line(f"dq, dk, dv = kernel.backward({tensors}, {_kernel_args(w, n, op, step)})")
    for runs, parts in ((step.q_runs, ("dq",)), (step.kv_runs, ("dk", "dv"))):
        for run in runs:
            for target, part in zip(run.targets, parts):
                value = part if run.whole else f"{part}[:, {run.start}:{run.stop}]"
                if run.fresh:
                    w.write(target, value, run.whole)
                else:
                    w.line(f"{w.v(target)}.add_({value})")


def _merge(w: _Writer, step: MergeStep) -> None:
    if w.geometry.pass_ is Pass.FORWARD:
        (out, lse), (part, part_lse) = (
            tuple(w.v(i) for i in step.dst), tuple(w.v(i) for i in step.src)
        )  # fmt: skip
        w.line(f"merging.merge_into({out}, {lse}, {part}, {part_lse}, {_MERGE_FLAGS})")
        return
    for dst, src in zip(step.dst, step.src):
        w.line(f"{w.v(dst)}.add_({w.v(src)})")


def translate(
    geometry: SlotGeometry,
    gloo_axes: frozenset[str],
    recording: bool,
    reuse: bool = False,
    keep: bool = False,
) -> Program:
    """The code of ``geometry``'s pass. ``gloo_axes``: the axes whose lanes run on gloo
    (their transfers of several components go as one message of records);
    ``recording``: the call has a ``Recorder`` (every compute is timed, every post's
    bytes counted); ``reuse``: the call takes its scratch from a kept ``Workspace``;
    ``keep``: the plan keeps a workspace for its next call (the CPU), so the function
    returns the one it used (otherwise None)."""
    w = _Writer(geometry, gloo_axes, recording)
    forward = geometry.pass_ is Pass.FORWARD
    pending: set[str] = set()
    handles: dict[str, tuple[int, tuple[int, ...]]] = {}  # handle -> post, its lanes
    for n, (op, step) in enumerate(zip(geometry.schedule.ops, geometry.steps)):
        match op:
            case Post():
                handles[op.handle] = (n, _post(w, n, op, step))
                pending.add(op.handle)
            case Wait():
                if op.handle not in pending:
                    raise AssertionError(f"schedule waits on {op.handle!r}, never posted")
                pending.discard(op.handle)
                posted, lanes = handles[op.handle]
                if lanes:
                    _wait(w, posted, lanes)
                else:
                    w.line(f"complete(SCHEDULE, PASS, p{posted}, ex)")
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
    return _function(w, reuse, keep)


def _view_of(geometry: SlotGeometry, views: set[int], key: tuple[str, str]) -> int | None:
    """The one view the code names of a result component, where it names one."""
    found = [n for n in views if (geometry.views[n].slot, geometry.views[n].component) == key]
    return found[0] if len(found) == 1 else None


def _elided(w: _Writer, layout: StoreLayout, owned: list) -> dict[int, tuple[int, str]]:
    """The result views that can be the kernel output first written into them, by view
    number: the line of that write and the output's name.

    Where a result component's only view in the code covers all of its storage, and its
    first write is a kernel's whole output of its dtype, the copy is elided: the output
    *is* the result from then on (merged into in place, returned as it is), so the call
    neither allocates the result nor copies into it (``storage.store_code``): on a
    two-rank ring call on the CPU, two allocations, two views and two copies (with the
    results returned in the kernels' order, ring's host work went from 1.36-1.39x to
    1.06-1.12x a hand-written loop's: benchmarks/RESULTS.md, 0m). Kernels return their
    outputs in the input dtype and the LSE in float32: a float32 call elides both. Not
    where a handler reads slots by rows (collectives, a recorder), nor for a slot in head
    groups or one a transfer reads."""
    geometry = w.geometry
    if w.recording or "store" in w.needs or geometry.call.dtype != torch.float32:
        return {}
    sent = {i for step in geometry.steps if isinstance(step, tuple) for t in step
            for i in (*t.views, t.records) if i is not None}  # fmt: skip
    found: dict[int, tuple[int, str]] = {}
    for slot, comp in owned:
        if geometry.schedule.slots[slot].groups > 1:
            continue
        view = _view_of(geometry, w.views, (slot, comp))
        writes = w.written.get(view, [])
        recipe = layout.views[view] if view is not None else None
        if view is None or len(writes) != 1 or view in sent or type(recipe) is not Strided:
            continue
        allocation, dtype = layout.sources[recipe.source]
        whole = layout.allocations[allocation]
        if (
            dtype is None and whole.fill is None and whole.dtype == torch.float32
            and recipe == layout.owned[(slot, comp)] and recipe.offset == 0
            and math.prod(recipe.size) == math.prod(whole.shape)
            and not any(geometry.views[n].slot == slot and geometry.views[n].component is None
                        for n in w.views)  # the slot's records
        ):  # fmt: skip
            found[view] = writes[0]
    return found


def _function(w: _Writer, reuse: bool, keep: bool) -> Program:
    """The whole function: the call's storage (``storage.store_code``), the operations
    written above, and what it returns."""
    geometry = w.geometry
    layout = geometry.layout(bool(w.gloo_axes))
    schedule = geometry.schedule
    if geometry.pass_ is Pass.FORWARD:
        owned = [(schedule.query_result, "out"), (schedule.query_result, "lse")]
    else:
        owned = [(schedule.query_result, "dq"), (schedule.kv_result, "dk"),
                 (schedule.kv_result, "dv")]  # fmt: skip
    elided = _elided(w, layout, owned)
    for n, (at, value) in elided.items():
        w.body[at] = f"    v{n} = {value}"
    head = ["def run(ex, inputs, given, device, key_lengths, workspace):"]
    head += store_code(layout, reuse, w.namespace, frozenset(elided))
    # a view no storage is made for: a component this call does not have (a backward's
    # ``out`` where kernels form delta from ``delta``)
    head += [f"    v{n} = None" for n in sorted(w.views) if layout.views[n] is None]
    if "store" in w.needs or w.recording:  # handlers that read slots by rows
        sources = ", ".join(f"s{n}" for n in range(len(layout.sources)))
        head.append(
            f"    store = SlotStore(GEOMETRY, LAYOUT, device, inputs, given, "
            f"([{sources}], {views_list(layout)}, rows))"
        )
    head += ["    kernel = ex.kernel", "    fused = ex.fused_merge"]
    if w.recording:
        head += ["    recorder = ex.recorder", "    recorder.phase = PASS.value"]
    if w.gloo_axes:
        head.append("    timeout = ex.timeout")
    head += [f"    {name} = lanes_of(ex, {axis!r})" for axis, name in w.lanes.items()]
    results = []
    for i, key in enumerate(owned):
        view = _view_of(geometry, w.views, key)
        if view in elided:
            results.append(f"v{view}")
            continue
        code = strided_code(layout.owned[key], f"OUT{i}", w.namespace)
        results.append(f"ungroup({code})" if schedule.slots[key[0]].groups > 1 else code)
    results = ", ".join(results)
    spare = spare_code(layout, reuse) if keep or reuse else "None"
    tail = [f"    return ({results}), {spare}", ""]
    w.namespace.update(GEOMETRY=geometry, LAYOUT=layout, SlotStore=SlotStore, Workspace=Workspace,
                       ungroup=ungroup)  # fmt: skip
    source = "\n".join([*head, *w.body, *tail])
    name = f"<tokenring {schedule.strategy} {geometry.pass_.value} rank {schedule.rank}>"
    exec(compile(source, name, "exec"), w.namespace)  # our own code, made above
    return Program(w.namespace["run"], source)
