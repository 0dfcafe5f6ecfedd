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

from collections.abc import Mapping
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

__all__ = [
    "ComputeStep",
    "MergeStep",
    "Place",
    "SlotGeometry",
    "SlotStore",
    "TransferStep",
    "from_rowmajor",
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
    """A run of result cells written alike (all fresh, or all accumulated): where, and
    which tokens of the block's result go there."""

    place: Place
    fresh: bool
    start: int
    stop: int


@dataclass(frozen=True)
class ComputeStep:
    """A ``Compute`` resolved once per plan: where its inputs are, where each run of its
    results goes, its kernel's mask, and whether it has tokens at all."""

    q: Place
    kv: Place
    q_runs: tuple[Run, ...]
    kv_runs: tuple[Run, ...]
    causal: bool
    empty: bool
    ragged: int | None = None
    """The ragged key/value piece the block's keys are (``Geometry.ragged``), whose valid
    length per batch row the call supplies; None for every other block."""


@dataclass(frozen=True)
class MergeStep:
    """One ``Merge``, resolved: the partial at ``src`` folds into the result at ``dst``."""

    src: Place
    dst: Place


@dataclass(frozen=True)
class TransferStep:
    """One transfer of a ``Post``, resolved: where its rows are, which components move."""

    place: Place
    components: tuple[str, ...]
    kind: SlotKind


def to_rowmajor(x: torch.Tensor) -> torch.Tensor:
    """``[B, L, ...] -> [L, B, ...]`` contiguous; a view when B == 1 and ``x`` is contiguous."""
    return x.transpose(0, 1).contiguous()


def from_rowmajor(phys: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Row-major ``[T, B, H, D]`` (or group-major ``[G, T, B, H/G, D]``) storage to a fresh
    contiguous ``[B, T, H, D]`` in ``dtype``."""
    if phys.dim() == 5:
        g, t, b, h, d = phys.shape
        return phys.permute(2, 1, 0, 3, 4).reshape(b, t, g * h, d).to(dtype)
    return phys.transpose(0, 1).to(dtype, memory_format=torch.contiguous_format)


def _grouped(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Row-major ``[T, B, H, ...]`` as group-major ``[G, T, B, H/G, ...]`` (a copy)."""
    if groups == 1:
        return x
    t, b, h, *rest = x.shape
    return x.reshape(t, b, groups, h // groups, *rest).movedim(2, 0).contiguous()


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
                shape, dtype = self._shape(comp, spec, self.tokens[name])
                self.allocations.append((name, comp, shape, dtype, spec.zeroed))
        self.own_q = schedule.geometry.q.tokens(schedule.pieces)
        self.own_kv = schedule.geometry.kv.tokens(schedule.pieces)
        self._index: dict[tuple[Rows, str], tuple] = {}
        self._runs: dict[tuple[Rows, tuple[bool, ...]], list] = {}
        self._spans: dict[Rows, tuple[int, int]] = {}
        self._masks: dict[Compute, BlockMask] = {}
        self._places: dict[Rows, Place] = {}

    def place(self, rows: Rows) -> Place:
        """Where ``rows`` live (made once per rows)."""
        found = self._places.get(rows)
        if found is None:
            spec = self.schedule.slots[rows.slot]
            component = COMPONENTS[(self.pass_, spec.kind)][0]
            heads = self.heads(component, spec)
            found = self._places[rows] = Place(rows.slot, self.index(rows, component, heads))
        return found

    def runs(self, rows: Rows, fresh: tuple[bool, ...]) -> tuple[Run, ...]:
        return tuple(Run(self.place(sub), f, a, b) for sub, f, a, b in self.sub_runs(rows, fresh))

    @cached_property
    def steps(self) -> tuple:
        """Every operation of the schedule resolved for this call's storage (a
        ``ComputeStep``, ``MergeStep`` or the ``TransferStep`` s of a point-to-point
        ``Post``; None for what needs nothing: waits and collectives), so a call only
        indexes tensors."""
        steps: list = []
        for op in self.schedule.ops:
            match op:
                case Compute():
                    (q0, q1), (k0, k1) = self.span(op.q), self.span(op.kv)
                    kv_runs = self.runs(op.kv_out, op.fresh_kv) if op.kv_out is not None else ()
                    steps.append(ComputeStep(
                        self.place(op.q), self.place(op.kv), self.runs(op.q_out, op.fresh_q),
                        kv_runs, op.kind is BlockKind.DIAG, q0 == q1 or k0 == k1,
                        self._ragged(op),
                    ))  # fmt: skip
                case Merge():
                    steps.append(MergeStep(self.place(op.src), self.place(op.dst)))
                case Post(moves=moves) if op.collective is None:
                    steps.append(tuple(
                        TransferStep(
                            self.place(t.rows),
                            COMPONENTS[(self.pass_, self.schedule.slots[t.rows.slot].kind)],
                            self.schedule.slots[t.rows.slot].kind,
                        )
                        for t in moves
                    ))  # fmt: skip
                case _:
                    steps.append(None)
        return tuple(steps)

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

    def _shape(
        self, component: str, spec: SlotSpec, tokens: int
    ) -> tuple[tuple[int, ...], torch.dtype]:
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
    """Tensors behind a schedule's slots for one call."""

    def __init__(
        self,
        geometry: SlotGeometry,
        local: dict[str, dict[str, torch.Tensor]],
        device: torch.device,
        key_lengths: Mapping[int, torch.Tensor] | None = None,
    ):
        self.geometry = geometry
        self.key_lengths = key_lengths or {}
        """Per ragged key/value piece, its valid tokens per batch row (``[batch]``)."""
        self.schedule = geometry.schedule
        self.pass_ = geometry.pass_
        self.call = geometry.call
        self.device = device
        self.tensors: dict[str, dict[str, torch.Tensor]] = {}
        self._views: dict[tuple[int, str], tuple[Place, torch.Tensor]] = {}
        slots = self.schedule.slots
        for name, comps in local.items():
            if name in slots:
                groups = slots[name].groups
                self.tensors[name] = {c: _grouped(t, groups) for c, t in comps.items()}
        for name, comp, shape, dtype, zeroed in geometry.allocations:
            if not zeroed:
                tensor = torch.empty(shape, dtype=dtype, device=device)
            elif comp == "lse":  # the merge's identity: no keys seen yet
                tensor = torch.full(shape, float("-inf"), dtype=dtype, device=device)
            else:
                tensor = torch.zeros(shape, dtype=dtype, device=device)
            self.tensors.setdefault(name, {})[comp] = tensor

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

    def view(self, rows: Rows, component: str) -> torch.Tensor:
        """Kernel-facing view of ``rows``: ``[B, L, H, D]`` or ``[B, H, L]``."""
        phys = self.phys(rows, component)
        return phys.permute(1, 0, 2, 3) if phys.dim() == 4 else phys.permute(1, 2, 0)

    def at(self, place: Place, component: str) -> torch.Tensor:
        """The storage at ``place`` (row-major)."""
        return self.tensors[place.slot][component][place.index]

    def kernel_view(self, place: Place, component: str) -> torch.Tensor:
        """Kernel-facing view at ``place``: ``[B, L, H, D]`` or ``[B, H, L]`` (made once per
        call: a schedule views the same rows for several blocks and merges, and every
        slicing and permute is a dispatch of host time)."""
        key = (id(place), component)  # the entry holds ``place``: its id cannot be reused
        found = self._views.get(key)
        if found is None:
            phys = self.tensors[place.slot][component][place.index]
            view = phys.permute(1, 0, 2, 3) if phys.dim() == 4 else phys.permute(1, 2, 0)
            found = self._views[key] = (place, view)
        return found[1]

    def has(self, rows: Rows, component: str) -> bool:
        return component in self.tensors[rows.slot]

    def sub_runs(self, rows: Rows, fresh: tuple[bool, ...]) -> list[tuple[Rows, bool, int, int]]:
        return self.geometry.sub_runs(rows, fresh)

    def own(self, slot: str, component: str) -> torch.Tensor:
        """A result slot's storage for this rank's own tokens (row-major; a slot that also
        held other ranks' longer pieces on the way is longer)."""
        full = self.tensors[slot][component]
        n = self.geometry.own_tokens(slot)
        if full.dim() == 5:  # group-major
            return full if full.shape[1] == n else full[:, :n]
        return full if full.shape[0] == n else full[:n]

    def result(self, slot: str, component: str) -> torch.Tensor:
        """A result slot's component as ``[B, L, H, D]`` in the input dtype."""
        return from_rowmajor(self.own(slot, component), self.call.dtype)
