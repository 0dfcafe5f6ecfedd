"""The tensors behind a schedule's slots for one call, and views of them.

Storage is *row-major* (sequence outermost): ``[T, B, H, D]`` per component,
``[T, B, H]`` for per-row values (lse, delta), so any run of cells is one
contiguous piece of memory that can be moved as is. Cells are stored one after
the other, each as long as the piece it holds (``Schedule.token_range``); a slot
is as long as the most it ever holds. A slot declared with
``groups = G`` is stored group-major, ``[G, T, B, H/G, D]``, so each head
group is contiguous too. Kernels get ``[B, L, H, D]`` / ``[B, H, L]`` views.
Precision: ``ACCUM`` result slots are float32 (float64 for float64 inputs,
``kernels.accum_dtype``), ``WIRE`` ones the input dtype; lse and delta are
always the accumulation dtype. All buffers are allocated once per call,
before the first step; ``zeroed`` ones start as the merge's identity (zeros,
and an LSE of -inf).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from ..call.description import CallDescription
from ..options import Pass
from ..schedules.ir import (
    COMPONENTS,
    FAMILY,
    QUERY_SIDE,
    WHOLE,
    Compute,
    Merge,
    Post,
    Precision,
    Rows,
    Schedule,
    SlotKind,
    SlotSpec,
    Transfer,
)
from ..schedules.masks import BlockKind
from .block_masks import block_mask
from .kernels.base import BlockMask, accum_dtype
from .storage import (
    StoreLayout,
    Strided,
    WorkspacePool,
    rowmajor,
    store_layout,
    to_rowmajor,
)

__all__ = [
    "ComputeStep",
    "MergeStep",
    "Place",
    "SlotGeometry",
    "SlotStore",
    "TransferStep",
    "slot_tokens",
    "to_rowmajor",
]


@dataclass(frozen=True)
class Place:
    """Where rows live: a slot and how to index its storage (the same for each of the
    slot's components)."""

    slot: str
    index: tuple


@dataclass(frozen=True)
class Run:
    """A run of result cells written alike (all fresh, or all accumulated): the views it
    writes (numbers into ``SlotGeometry.views``: forward ``out`` and ``lse``, backward
    ``dq``, or ``dk`` and ``dv``), and which tokens of the block's result go there
    (``whole``: all of them, so no slicing)."""

    targets: tuple[int, ...]
    fresh: bool
    start: int
    stop: int
    whole: bool


@dataclass(frozen=True)
class ComputeStep:
    """A ``Compute`` resolved once per plan: the views its kernel reads, in the kernel's
    order (forward ``q, k, v``; backward ``do, q, k, v, out, lse, delta``), where each
    run of its results goes, whether it is causal, and whether it has tokens at all."""

    inputs: tuple[int, ...]
    q_runs: tuple[Run, ...]
    kv_runs: tuple[Run, ...]
    causal: bool
    empty: bool
    ragged: int | None = None
    """The ragged key/value piece the block's keys are (``Geometry.ragged``), whose valid
    length per batch row the call supplies; None for every other block."""


@dataclass(frozen=True)
class MergeStep:
    """One ``Merge``, resolved: the views of the partial at ``src`` and of the result it
    folds into at ``dst``, component by component (forward ``out, lse``)."""

    src: tuple[int, ...]
    dst: tuple[int, ...]


@dataclass(frozen=True)
class TransferStep:
    """One transfer of a ``Post``, resolved: the row-major views of the components that
    move, with whom, which way and on which lane; for several components, the view of
    their records (``records.py``) where the slot is stored jointly."""

    views: tuple[int, ...]
    kind: SlotKind
    peer: int
    send: bool
    lane: int
    records: int | None


@dataclass(frozen=True)
class ViewSpec:
    """One view a call makes of its slot storage, once, before the first step: of
    ``component`` of ``slot`` at ``index``, row-major (the tensor itself where ``whole``
    is its length), or of the slot's records (``component`` None: None where the slot is
    not stored jointly); or, with ``base``, the kernel-facing permutation (``[B, L, H,
    D]`` or ``[B, H, L]``) of view number ``base``."""

    slot: str
    component: str | None
    index: tuple
    base: int | None = None
    whole: int | None = None


def _rows_of(schedule: Schedule) -> list[Rows]:
    """Every ``Rows`` a schedule addresses, and its results (which hold this rank's pieces)."""
    found = [Rows.whole(schedule.query_result, schedule.pieces)]
    if schedule.kv_result is not None:
        found.append(Rows.whole(schedule.kv_result, schedule.pieces))
    for op in schedule.ops:
        match op:
            case Post(moves=moves):
                for m in moves:
                    found += [m.rows] if isinstance(m, Transfer) else [m.src, m.dst]
            case Compute():
                found += [r for r in (op.q, op.kv, op.q_out, op.kv_out) if r is not None]
            case Merge():
                found += [op.src, op.dst]
    return found


def slot_tokens(schedule: Schedule) -> dict[str, int]:
    """How many tokens each used slot must hold: the most any of its rows reach."""
    tokens: dict[str, int] = {}
    for rows in _rows_of(schedule):
        end = schedule.token_range(rows)[1]
        tokens[rows.slot] = max(tokens.get(rows.slot, 0), end)
    return tokens


class SlotGeometry:
    """What the buffers of one schedule look like for one call: worked out once per plan,
    so a call only allocates and indexes (no span arithmetic per operation)."""

    def __init__(self, schedule: Schedule, pass_: Pass, call: CallDescription):
        self.schedule = schedule
        self.pass_ = pass_
        self.call = call
        self.tokens = slot_tokens(schedule)
        self.allocations: list[tuple[str, str, tuple[int, ...], torch.dtype, bool]] = []
        for name, spec in schedule.slots.items():
            if name not in self.tokens or spec.local:
                continue
            for comp in COMPONENTS[(pass_, spec.kind)]:
                shape, dtype = self.shape_of(comp, spec, self.tokens[name])
                self.allocations.append((name, comp, shape, dtype, spec.zeroed))
        self.scale = call.scale
        """The softmax scale every block of the call uses."""
        self.own_q = schedule.geometry.q.tokens(schedule.pieces)
        self.own_kv = schedule.geometry.kv.tokens(schedule.pieces)
        self._index: dict[tuple[Rows, str], tuple] = {}
        self._runs: dict[tuple[Rows, tuple[bool, ...]], list] = {}
        self._spans: dict[Rows, tuple[int, int]] = {}
        self._masks: dict[Compute, BlockMask] = {}
        self._places: dict[Rows, Place] = {}
        self._view_list: list[ViewSpec] = []
        self._view_numbers: dict[tuple, int] = {}
        self._together: set[str] = set()
        self._layouts: dict[bool, StoreLayout] = {}
        self._pools: dict[bool, WorkspacePool] = {}
        self.programs: dict[tuple, object] = {}
        """The steps translated into code (``program.py``), by how a call runs them: kept
        by the executor, made on first use."""

    def layout(self, joint: bool) -> StoreLayout:
        """Where a call's slots lie and how it makes its views (``storage.py``), made once
        per plan for each way of storing (``joint``: as records)."""
        found = self._layouts.get(joint)
        if found is None:
            found = self._layouts[joint] = store_layout(self, joint)
        return found

    def pool(self, joint: bool, limit: int) -> WorkspacePool | None:
        """The spare workspace of the layout ``layout(joint)`` (``storage.py``); None where
        its scratch is larger than ``limit`` bytes (then every call allocates its own)."""
        found = self._pools.get(joint)
        if found is None:
            found = self._pools[joint] = WorkspacePool(self.layout(joint).scratch_bytes)
        return found if found.bytes <= limit else None

    @property
    def workspace_bytes(self) -> int:
        """Bytes of the workspaces this geometry keeps."""
        return sum(p.bytes * p.held for p in self._pools.values())

    def place(self, rows: Rows) -> Place:
        """Where ``rows`` live (made once per rows)."""
        found = self._places.get(rows)
        if found is None:
            spec = self.schedule.slots[rows.slot]
            component = COMPONENTS[(self.pass_, spec.kind)][0]
            heads = self.heads(component, spec)
            found = self._places[rows] = Place(rows.slot, self.index(rows, component, heads))
        return found

    def view(self, place: Place, component: str | None, kernel: bool = True) -> int:
        """The number of the view of ``component`` at ``place`` (kernel-facing, or
        row-major for a transfer), registered on first use."""
        key = (id(place), component, kernel)  # places live as long as the geometry
        found = self._view_numbers.get(key)
        if found is None:
            if kernel:
                spec = ViewSpec(place.slot, component, (), self.view(place, component, False))
            else:
                spec = ViewSpec(place.slot, component, place.index, None,
                                self._whole_length(place.index))  # fmt: skip
            found = self._view_numbers[key] = len(self._view_list)
            self._view_list.append(spec)
        return found

    @cached_property
    def views(self) -> tuple[ViewSpec, ...]:
        """Every view the steps name, in the order a call makes them (``SlotStore``)."""
        if self.steps is None:  # resolving the steps registers their views
            raise AssertionError("a geometry without steps")
        return tuple(self._view_list)

    @staticmethod
    def _whole_length(index: tuple) -> int | None:
        """``n`` where ``index`` takes tokens ``[0, n)`` and nothing else: all of a tensor
        of ``n`` tokens, which then needs no slicing."""
        if len(index) == 1 and index[0].start == 0 and index[0].step is None:
            return index[0].stop
        return None

    def _views(self, place: Place, components) -> tuple[int, ...]:
        return tuple(self.view(place, comp) for comp in components)

    def runs(self, rows: Rows, fresh: tuple[bool, ...], components) -> tuple[Run, ...]:
        length = self.span(rows)[1] - self.span(rows)[0]
        return tuple(
            Run(self._views(self.place(sub), components), f, a, b, a == 0 and b == length)
            for sub, f, a, b in self.sub_runs(rows, fresh)
        )

    @cached_property
    def steps(self) -> tuple:
        """Every operation of the schedule resolved for this call's storage (a
        ``ComputeStep``, ``MergeStep`` or the ``TransferStep`` s of a point-to-point
        ``Post``; None for what needs nothing: waits and collectives), so a call only
        makes its views and indexes a list."""
        forward = self.pass_ is Pass.FORWARD
        steps: list = []
        for op in self.schedule.ops:
            match op:
                case Compute():
                    steps.append(self._compute(op, forward))
                case Merge():
                    comps = COMPONENTS[(self.pass_, self.schedule.slots[op.src.slot].kind)]
                    if forward:
                        comps = ("out", "lse")
                    src, dst = self.place(op.src), self.place(op.dst)
                    steps.append(MergeStep(self._views(src, comps), self._views(dst, comps)))
                case Post(moves=moves) if op.collective is None:
                    steps.append(tuple(self._transfer(t) for t in moves))
                case _:
                    steps.append(None)
        return tuple(steps)

    def _compute(self, op: Compute, forward: bool) -> ComputeStep:
        (q0, q1), (k0, k1) = self.span(op.q), self.span(op.kv)
        q, kv = self.place(op.q), self.place(op.kv)
        if forward:
            inputs = (*self._views(q, ("q",)), *self._views(kv, ("k", "v")))
            q_parts, kv_parts = ("out", "lse"), ()
        else:
            inputs = (
                *self._views(q, ("do", "q")), *self._views(kv, ("k", "v")),
                *self._views(q, ("out", "lse", "delta")),
            )  # fmt: skip
            q_parts, kv_parts = ("dq",), ("dk", "dv")
        kv_runs = (
            self.runs(op.kv_out, op.fresh_kv, kv_parts) if op.kv_out is not None else ()
        )  # fmt: skip
        return ComputeStep(
            inputs, self.runs(op.q_out, op.fresh_q, q_parts), kv_runs,
            op.kind is BlockKind.DIAG, q0 == q1 or k0 == k1, self._ragged(op),
        )  # fmt: skip

    def _transfer(self, t: Transfer) -> TransferStep:
        kind = self.schedule.slots[t.rows.slot].kind
        comps = COMPONENTS[(self.pass_, kind)]
        place = self.place(t.rows)
        views = tuple(self.view(place, c, kernel=False) for c in comps)
        records = None
        if len(comps) > 1:
            records = self.view(place, None, kernel=False)
            if not self.schedule.slots[t.rows.slot].local:
                self._together.add(t.rows.slot)
        return TransferStep(views, kind, t.peer, t.send, t.lane, records)

    @cached_property
    def moved_together(self) -> frozenset[str]:
        """The slots that point-to-point transfers move as several components, which a
        store that packs messages keeps jointly (``SlotStore``)."""
        if self.steps is None:  # resolving the steps finds them
            raise AssertionError("a geometry without steps")
        return frozenset(self._together)

    @cached_property
    def rows_may_be_empty(self) -> bool:
        """Whether a partial or a result row can hold no key yet (LSE -inf) when it is
        merged: a slot that starts as the merge's identity, a masked block, a ragged
        key piece. Where none can, a merge skips its guard against two such rows."""
        if any(spec.zeroed for spec in self.schedule.slots.values()):
            return True
        return any(
            isinstance(op, Compute) and (op.kind is BlockKind.PARTIAL or self._ragged(op))
            for op in self.schedule.ops
        )

    def _ragged(self, op: Compute) -> int | None:
        ragged = self.schedule.geometry.ragged
        pieces = op.kv.pieces
        if not ragged or not any(p in ragged for p in pieces):
            return None
        if len(pieces) != 1:
            raise AssertionError(f"a ragged piece shares a kernel call: {op}")
        return pieces[0]

    def heads(self, component: str, spec: SlotSpec) -> int:
        """Heads a slot holds of ``component``'s family."""
        p = self.call
        family = p.heads_kv if FAMILY[component] == "kv" else p.heads_q
        return family // spec.head_parts

    def shape_of(
        self, component: str, spec: SlotSpec, tokens: int
    ) -> tuple[tuple[int, ...], torch.dtype]:
        """The row-major (group-major) shape and dtype of ``tokens`` tokens of
        ``component`` of a slot of ``spec``."""
        p = self.call
        heads = self.heads(component, spec)
        if FAMILY[component] == "row":
            shape: tuple[int, ...] = (tokens, p.batch, heads)
            dtype = accum_dtype(p.dtype)
        else:
            shape = (tokens, p.batch, heads, p.head_dim)
            dtype = accum_dtype(p.dtype) if spec.precision is Precision.ACCUM else p.dtype
        if spec.groups > 1:
            shape = (spec.groups, shape[0], shape[1], shape[2] // spec.groups, *shape[3:])
        return shape, dtype

    def span(self, rows: Rows) -> tuple[int, int]:
        """Token range of ``rows`` inside its slot."""
        found = self._spans.get(rows)
        if found is None:
            found = self._spans[rows] = self.schedule.token_range(rows)
        return found

    def positions(self, rows: Rows) -> torch.Tensor:
        """Global positions of the tokens of ``rows`` (1-D, on the CPU)."""
        table = self.schedule.table(rows)
        runs = [torch.arange(a, b) for p in rows.pieces for a, b in table.cell(p)]
        return torch.cat(runs) if runs else torch.zeros(0, dtype=torch.long)

    def block_mask(self, op: Compute, device: torch.device) -> BlockMask:
        """The mask of a masked block, from its rows' positions (made once)."""
        found = self._masks.get(op)
        if found is None:
            q_table, kv_table = self.schedule.table(op.q), self.schedule.table(op.kv)
            q_cells, kv_cells = q_table.cells(op.q.pieces), kv_table.cells(op.kv.pieces)
            found = self._masks[op] = block_mask(q_cells, kv_cells, op.mask, device)
        return found

    def own_tokens(self, slot: str) -> int:
        """Tokens of this rank's own pieces on ``slot``'s side (a result slot's length)."""
        return self.own_q if self.schedule.slots[slot].kind in QUERY_SIDE else self.own_kv

    def index(self, rows: Rows, component: str, heads: int) -> tuple:
        """How to index a slot's component storage for ``rows`` (``heads``: its size on
        dim 2, the heads of an ungrouped slot)."""
        key = (rows, component)
        found = self._index.get(key)
        if found is not None:
            return found
        spec = self.schedule.slots[rows.slot]
        a, b = self.span(rows)
        part = rows.part
        if spec.groups > 1:
            if part.count != spec.groups:
                raise AssertionError(f"{rows} addresses a slot stored in {spec.groups} groups")
            found = (part.index, slice(a, b))
        elif part == WHOLE:
            found = (slice(a, b),)
        else:
            size = heads // part.count
            found = (slice(a, b), slice(None), slice(part.index * size, (part.index + 1) * size))
        self._index[key] = found
        return found

    def sub_runs(self, rows: Rows, fresh: tuple[bool, ...]) -> list[tuple[Rows, bool, int, int]]:
        """Split ``rows`` into runs of equal freshness, with token offsets relative to ``rows``."""
        key = (rows, fresh)
        runs = self._runs.get(key)
        if runs is not None:
            return runs
        runs = []
        base = self.span(rows)[0]
        i = rows.start
        while i < rows.stop:
            j = i
            while j + 1 < rows.stop and fresh[j + 1 - rows.start] == fresh[i - rows.start]:
                j += 1
            sub = Rows(rows.slot, rows.content, i, j + 1, rows.part)
            a, b = self.span(sub)
            runs.append((sub, fresh[i - rows.start], a - base, b - base))
            i = j + 1
        self._runs[key] = runs
        return runs


class SlotStore:
    """Tensors behind a schedule's slots for one call, laid out by ``storage.py``, as the
    handlers that read slots by rows (collectives) and a ``Recorder`` see them. A call's
    own code makes its storage itself (``program.py``) and makes this object only where
    such a handler runs."""

    def __init__(
        self,
        geometry: SlotGeometry,
        layout: StoreLayout,
        device: torch.device,
        inputs: dict[str, dict[str, torch.Tensor]],
        given: dict[str, dict[str, torch.Tensor]],
        made: tuple[list[torch.Tensor], list[torch.Tensor | None], dict],
    ):
        """``inputs``: the call's own inputs as the caller gave them, ``[B, L, H, D]``, by
        slot and component; ``given``: others in row-major storage; ``made``: the sources,
        the views by number and the row-major copies made so far (``storage.store_code``)."""
        self.geometry = geometry
        self.schedule = geometry.schedule
        self.pass_ = geometry.pass_
        self.call = geometry.call
        self.device = device
        self.layout = layout
        self.inputs = inputs
        self._given = given
        self._sources, self.views, self._rows = made
        """Every view the steps read (``SlotGeometry.views``), by number; None for one no
        step reads, and for a component this call does not have (``out`` of a backward
        given the LSE's gradient)."""

    @classmethod
    def fresh(
        cls,
        geometry: SlotGeometry,
        given: dict[str, dict[str, torch.Tensor]],
        device: torch.device,
        *,
        joint: bool = False,
        inputs: dict[str, dict[str, torch.Tensor]] | None = None,
    ) -> SlotStore:
        """A store that allocates everything, made apart from any call (``joint``: slots
        that move as several components stored as records, ``records.py``)."""
        layout = geometry.layout(joint)
        inputs = inputs or {}
        return cls(
            geometry, layout, device, inputs, given, layout.make_fresh(inputs, given, device, None)
        )

    def _strided(self, recipe: Strided) -> torch.Tensor:
        """A view of the call's allocations (a slot's storage that is not an input)."""
        source = self._sources[recipe.source]
        if recipe.whole:
            return source
        return source.as_strided(recipe.size, recipe.stride, recipe.offset)

    def rowmajor(self, slot: str, component: str) -> torch.Tensor | None:
        """The call's own input ``component`` of ``slot`` in row-major (group-major)
        storage, made on first use from what the caller gave; None where it gave none."""
        groups = self.schedule.slots[slot].groups
        return rowmajor(slot, component, groups, self.inputs, self._given, self._rows)

    def component(self, slot: str, component: str) -> torch.Tensor:
        """The whole storage of ``component`` of ``slot`` (row-major)."""
        if self.schedule.slots[slot].local:
            return self.rowmajor(slot, component)
        return self._strided(self.layout.components[(slot, component)])

    @cached_property
    def tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        """Every slot's components (row-major), made on first use (collectives)."""
        found: dict[str, dict[str, torch.Tensor]] = {}
        for given in (self._given, self.inputs):
            for slot, comps in given.items():
                if slot in self.schedule.slots:
                    for comp in comps:
                        found.setdefault(slot, {})[comp] = self.rowmajor(slot, comp)
        for (slot, comp), recipe in self.layout.components.items():
            found.setdefault(slot, {})[comp] = self._strided(recipe)
        return found

    def kind(self, rows: Rows) -> SlotKind:
        return self.schedule.slots[rows.slot].kind

    def components(self, rows: Rows) -> tuple[str, ...]:
        """What ``rows`` hold by their slot's kind (a local query slot also keeps the
        real ``out`` for its own blocks' backward, which never moves)."""
        return COMPONENTS[(self.pass_, self.kind(rows))]

    def span(self, rows: Rows) -> tuple[int, int]:
        """Token range of ``rows`` inside its slot."""
        return self.geometry.span(rows)

    def phys(self, rows: Rows, component: str) -> torch.Tensor:
        """The storage of ``rows`` (row-major; contiguous unless a head part of an
        ungrouped slot is asked for)."""
        full = self.tensors[rows.slot][component]
        return full[self.geometry.index(rows, component, full.shape[2])]
