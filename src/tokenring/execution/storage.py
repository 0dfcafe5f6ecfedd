"""Where one call's slots lie in the memory it allocates, worked out once per plan.

A call binds its own inputs as given. The slots it returns (its results) and the
slots that start as the merge's identity get an allocation each, as before any
step; every other slot (queries, keys/values and partials in transit) lies in one
*scratch* buffer, each at an offset aligned to 256 bytes (what a separate
allocation would guarantee), so a call makes one allocation for all of them. The
results stay apart so that what a caller keeps holds no scratch.

Every view a step names is then, per call, one operation: a view that lies in an
allocation is one ``as_strided`` whose sizes, strides and offset were computed
here by indexing meta tensors exactly as a call would index real ones. A kernel
reads a call's own input as the caller gave it, ``[B, L, H, D]`` with any strides
(a KV cache's batch-major storage), indexed on the same tokens and heads; a
row-major copy of an input is made only where a transfer sends it. Views that only
serve to derive others are never made.

On the CPU every operation, transfers included, has completed when a call
returns, so the scratch buffer and its views can serve the next call of the same
plan as they are: a plan keeps one such *workspace* (``WorkspacePool``) when it is
at most ``tokenring.configure(workspace_bytes=...)`` large, and a call then
allocates only its results. On CUDA a call returns before its kernels run, so its
scratch is allocated per call (by the caching allocator, in stream order).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import torch

from .records import RecordLayout

if TYPE_CHECKING:  # slots.py imports this module
    from .slots import SlotGeometry

__all__ = [
    "ALIGN", "Allocation", "LocalView", "StoreLayout", "Strided", "Workspace", "WorkspacePool",
    "kernel_order", "store_layout", "translate_store",
]  # fmt: skip

ALIGN = 256
"""Bytes each slot's offset in the scratch buffer is a multiple of."""


@dataclass(frozen=True)
class Allocation:
    """One tensor a call allocates before its first step: shape, dtype and starting
    value (None: uninitialised)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    fill: float | None = None


@dataclass(frozen=True)
class Strided:
    """A view of source ``source`` (an allocation, or an allocation read as another
    dtype: ``StoreLayout.sources``) made with one ``as_strided``; the source itself
    where ``whole``."""

    source: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    whole: bool


@dataclass(frozen=True)
class LocalView:
    """A view of a call's own input ``component`` of ``slot``: indexed by ``index``
    (row-major) unless the input is ``whole`` tokens long (then it is the input), and
    with ``permute`` in the kernels' order. ``component`` None (a local slot's records)
    is never stored: the view is None. ``direct``: a kernel-facing view is the caller's
    ``[B, L, ...]`` tensor indexed by ``batch_index`` (the same tokens and heads), where
    the call gave it so (``SlotStore``): no row-major copy or permutation."""

    slot: str
    component: str | None
    index: tuple
    whole: int | None
    permute: bool
    direct: bool = False
    batch_index: tuple = ()


Recipe = Strided | LocalView


@dataclass(frozen=True)
class StoreLayout:
    """What a call allocates and how it makes each view (see the module docstring)."""

    allocations: tuple[Allocation, ...]
    sources: tuple[tuple[int, torch.dtype | None], ...]
    """Per source: the allocation and the dtype to read it as (None: its own)."""
    fills: tuple[tuple[Strided, float], ...]
    """Views filled after allocation (a jointly stored slot's LSE starts at -inf)."""
    components: dict[tuple[str, str], Recipe]
    """The whole storage of each (slot, component), made on demand (collectives,
    results)."""
    views: tuple[Recipe | None, ...]
    """By view number (``SlotGeometry.views``); None for one no step reads."""
    nbytes: tuple[int, ...]
    """Bytes of each view, by view number (what a transfer of it sends)."""
    scratch: int | None
    """The allocation that is the scratch buffer (None: every slot is a result, a slot
    that starts as the merge's identity, or a call's own input)."""

    @cached_property
    def scratch_bytes(self) -> int:
        return 0 if self.scratch is None else self.allocations[self.scratch].shape[0]

    @cached_property
    def scratch_sources(self) -> frozenset[int]:
        """The sources that read the scratch buffer."""
        return frozenset(i for i, (a, _) in enumerate(self.sources) if a == self.scratch)

    @cached_property
    def make_fresh(self) -> Callable:
        """``make(store, device, workspace)`` -> ``(sources, views)`` for a call that
        allocates everything (``translate_store``)."""
        return translate_store(self, reuse=False)

    @cached_property
    def make_reusing(self) -> Callable:
        """The same for a call that takes its scratch and its views from ``workspace``."""
        return translate_store(self, reuse=True)

    @cached_property
    def per_call(self) -> tuple[int, ...]:
        """The view numbers a call makes even with a workspace: of its inputs, results and
        slots that start as the merge's identity."""
        return tuple(
            n for n, r in enumerate(self.views)
            if r is not None and not (type(r) is Strided and r.source in self.scratch_sources)
        )  # fmt: skip


@dataclass
class Workspace:
    """A call's scratch buffer as the sources that read it and the views steps read of it
    (by source and view number; None elsewhere), for a later call of the same plan."""

    sources: list[torch.Tensor | None]
    views: list[torch.Tensor | None]


class WorkspacePool:
    """The spare workspace of one layout: taken by a call, given back when it completes.
    A call that finds none (the first, or one running beside another on another thread)
    allocates its own; at most one is kept."""

    def __init__(self, nbytes: int) -> None:
        self.bytes = nbytes
        """The size of the layout's scratch buffer."""
        self._spare: list[Workspace] = []

    def take(self) -> Workspace | None:
        try:
            return self._spare.pop()  # atomic: two threads never take the same one
        except IndexError:
            return None

    def give(self, workspace: Workspace) -> None:
        if not self._spare:
            self._spare.append(workspace)

    @property
    def held(self) -> int:
        """Workspaces kept (0 or 1)."""
        return len(self._spare)


def kernel_order(t: torch.Tensor) -> torch.Tensor:
    """Row-major ``[T, B, H, D]`` / ``[T, B, H]`` in the kernels' ``[B, T, H, D]`` /
    ``[B, H, T]``."""
    return t.permute(1, 0, 2, 3) if t.dim() == 4 else t.permute(1, 2, 0)


class _Builder:
    """Lays the non-local slots of a geometry out in meta tensors and reads each view's
    geometry back."""

    def __init__(self, geometry: SlotGeometry, joint: bool):
        self.geometry = geometry
        schedule = geometry.schedule
        results = {schedule.query_result, schedule.kv_result}
        together = geometry.moved_together if joint else frozenset()
        self.allocations: list[Allocation] = []
        self.sources: list[tuple[int, torch.dtype | None]] = []
        self.fills: list[tuple[torch.Tensor, int, float]] = []
        self.scratch: int | None = None
        self.meta: dict[tuple[str, str | None], tuple[torch.Tensor, int]] = {}
        """(slot, component or None for records) -> (meta tensor, allocation)."""
        units: dict[str, list] = {}
        for name, comp, shape, dtype, zeroed in geometry.allocations:
            units.setdefault(name, []).append((comp, shape, dtype, zeroed))
        scratch: list[tuple[str, list]] = []
        for name, comps in units.items():
            own = name in results or comps[0][3]
            if not own:
                scratch.append((name, comps))
            elif name in together:
                shape, layout = self._records_shape(name, comps)
                storage = self._allocate_tensor(shape, layout.unit, 0.0 if comps[0][3] else None)
                self._place_records(name, comps, storage)
            else:
                for comp, shape, dtype, zeroed in comps:
                    fill = None if not zeroed else float("-inf") if comp == "lse" else 0.0
                    self.meta[(name, comp)] = self._allocate_tensor(shape, dtype, fill)
        if scratch:
            self._place_scratch(scratch, together)

    def _records_shape(self, name: str, comps: list) -> tuple[tuple[int, ...], RecordLayout]:
        lead = 2 if self.geometry.schedule.slots[name].groups > 1 else 1  # [T] or [G, T]
        parts = [(shape[lead:], dtype) for _, shape, dtype, _ in comps]
        layout = RecordLayout.of(parts)
        return (*comps[0][1][:lead], layout.size), layout

    def _allocate_tensor(self, shape, dtype, fill) -> tuple[torch.Tensor, int]:
        index = len(self.allocations)
        self.allocations.append(Allocation(shape, dtype, fill))
        return torch.empty(shape, dtype=dtype, device="meta"), index

    def _place_records(self, name: str, comps: list, storage: tuple[torch.Tensor, int]) -> None:
        meta, index = storage
        lead = meta.dim() - 1
        parts = [(shape[lead:], dtype) for _, shape, dtype, _ in comps]
        self.meta[(name, None)] = storage
        for (comp, *_), view in zip(comps, RecordLayout.of(parts).views(meta, parts)):
            self.meta[(name, comp)] = (view, index)
            if comps[0][3] and comp == "lse":  # zeroed: the merge's identity
                self.fills.append((view, index, float("-inf")))

    def _place_scratch(self, scratch: list, together: frozenset[str]) -> None:
        """Every scratch slot (its components, or its records) at an aligned offset of
        one byte buffer."""
        placed, at = [], 0
        for name, comps in scratch:
            if name in together:
                shape, layout = self._records_shape(name, comps)
                pieces = [(None, shape, layout.unit)]
            else:
                pieces = [(comp, shape, dtype) for comp, shape, dtype, _ in comps]
            for comp, shape, dtype in pieces:
                placed.append((name, comps, comp, shape, dtype, at))
                at += -(-math.prod(shape) * dtype.itemsize // ALIGN) * ALIGN
        buffer, index = self._allocate_tensor((at,), torch.uint8, None)
        self.scratch = index
        for name, comps, comp, shape, dtype, offset in placed:
            size = math.prod(shape) * dtype.itemsize
            tensor = buffer[offset : offset + size].view(dtype).view(shape)
            if comp is None:
                self._place_records(name, comps, (tensor, index))
            else:
                self.meta[(name, comp)] = (tensor, index)

    def source(self, allocation: int, dtype: torch.dtype) -> int:
        """The number of the source that reads ``allocation`` as ``dtype``."""
        own = self.allocations[allocation].dtype
        key = (allocation, None if dtype == own else dtype)
        if key not in self.sources:
            self.sources.append(key)
        return self.sources.index(key)

    def strided(self, view: torch.Tensor, allocation: int) -> Strided:
        source = self.source(allocation, view.dtype)
        base = self.allocations[allocation]
        whole = (
            view.dtype == base.dtype
            and tuple(view.shape) == base.shape
            and view.stride() == _contiguous(base.shape)
            and view.storage_offset() == 0
        )
        return Strided(source, tuple(view.shape), view.stride(), view.storage_offset(), whole)


def _contiguous(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))


def _needed(geometry: SlotGeometry, joint: bool) -> set[int]:
    """The views steps read: a transfer of a slot stored jointly reads only its records
    (a local slot's are packed from its components when sent)."""
    found: set[int] = set()
    together = geometry.moved_together if joint else frozenset()
    for step in geometry.steps:
        if step is None:
            continue
        if isinstance(step, tuple):  # a Post's transfers
            for t in step:
                if t.records is not None and geometry.views[t.records].slot in together:
                    found.add(t.records)
                else:
                    found.update(t.views)
            continue
        if hasattr(step, "inputs"):
            found.update(step.inputs)
            for run in (*step.q_runs, *step.kv_runs):
                found.update(run.targets)
        else:
            found.update(step.src)
            found.update(step.dst)
    return found


def store_layout(geometry: SlotGeometry, joint: bool) -> StoreLayout:
    """The layout of ``geometry`` 's slots for a call (``joint``: slots that move as
    several components are stored as records, ``records.py``)."""
    build = _Builder(geometry, joint)
    slots = geometry.schedule.slots
    specs = geometry.views
    needed = _needed(geometry, joint)
    meta_views: list[torch.Tensor | None] = []
    recipes: list[Recipe | None] = []
    nbytes: list[int] = []
    for number, spec in enumerate(specs):
        base = specs[spec.base] if spec.base is not None else spec
        local = base.slot in slots and slots[base.slot].local
        if spec.base is not None:
            meta = meta_views[spec.base]
            meta = None if meta is None else kernel_order(meta)
        else:
            found = build.meta.get((spec.slot, spec.component))
            meta = None if found is None else found[0]
            if meta is not None and meta.shape[0] != spec.whole:
                meta = meta[spec.index]
        meta_views.append(meta)
        nbytes.append(0 if meta is None else meta.numel() * meta.element_size())
        if number not in needed:
            recipes.append(None)
        elif local:
            permute = spec.base is not None
            direct = permute and slots[base.slot].groups == 1
            index = base.index  # row-major; the caller's [B, L, ...] swaps the first two
            batch = (slice(None), *index) if len(index) == 1 else (index[1], index[0], *index[2:])
            view = LocalView(base.slot, base.component, index, base.whole, permute, direct, batch)
            recipes.append(view)
        elif meta is None:
            recipes.append(None)  # records of a slot not stored jointly
        else:
            recipes.append(build.strided(meta, build.meta[(base.slot, base.component)][1]))
    components = {
        key: build.strided(tensor, allocation)
        for key, (tensor, allocation) in build.meta.items()
        if key[1] is not None
    }
    fills = []
    for view, allocation, value in build.fills:
        fills.append((build.strided(view, allocation), value))
    return StoreLayout(
        tuple(build.allocations), tuple(build.sources), tuple(fills), components,
        tuple(recipes), tuple(nbytes), build.scratch,
    )  # fmt: skip


def _strided(recipe: Strided, name: str, namespace: dict) -> str:
    """The code of one ``Strided`` view (its sizes and strides as ``SIZE{name}`` and
    ``STRIDE{name}`` in ``namespace``)."""
    if recipe.whole:
        return f"s{recipe.source}"
    namespace[f"SIZE{name}"], namespace[f"STRIDE{name}"] = recipe.size, recipe.stride
    return f"s{recipe.source}.as_strided(SIZE{name}, STRIDE{name}, {recipe.offset})"


def translate_store(layout: StoreLayout, reuse: bool) -> Callable:
    """What a call does to make its storage, as straight-line code made once per layout
    (as ``program.py`` does for the operations): its allocations, the sources that
    read them, the fills, and each view a step reads, with every shape, stride and
    offset written in. ``reuse``: the scratch buffer and the views in it come from a
    kept workspace, so only the other views are made. A view of the caller's own input
    is read from ``store.inputs`` where the kernels take it as given, and otherwise
    made by ``SlotStore``'s own method (row-major copies, made once per call)."""
    namespace: dict[str, object] = {"empty": torch.empty, "full": torch.full}
    lines = ["def make(store, device, workspace):"]
    for i, a in enumerate(layout.allocations):
        if reuse and i == layout.scratch:
            continue
        namespace[f"SHAPE{i}"], namespace[f"DTYPE{i}"] = a.shape, a.dtype
        if a.fill is None:
            lines.append(f"    a{i} = empty(SHAPE{i}, dtype=DTYPE{i}, device=device)")
        else:
            namespace[f"FILL{i}"] = a.fill
            lines.append(f"    a{i} = full(SHAPE{i}, FILL{i}, dtype=DTYPE{i}, device=device)")
    for n, (i, dtype) in enumerate(layout.sources):
        if reuse and i == layout.scratch:
            lines.append(f"    s{n} = workspace.sources[{n}]")
        elif dtype is None:
            lines.append(f"    s{n} = a{i}")
        else:
            namespace[f"AS{n}"] = dtype
            lines.append(f"    s{n} = a{i}.view(AS{n})")
    for j, (recipe, value) in enumerate(layout.fills):
        namespace[f"VALUE{j}"] = value
        lines.append(f"    {_strided(recipe, f'F{j}', namespace)}.fill_(VALUE{j})")
    made = layout.per_call if reuse else range(len(layout.views))
    start = "list(workspace.views)" if reuse else f"[None] * {len(layout.views)}"
    lines.append(f"    views = {start}")
    lines += ["    inputs = store.inputs", "    local = store._make"]
    given: dict[tuple[str, str], str] = {}
    for n in made:
        recipe = layout.views[n]
        if recipe is None:
            continue
        if type(recipe) is Strided:
            lines.append(f"    views[{n}] = {_strided(recipe, str(n), namespace)}")
            continue
        namespace[f"R{n}"] = recipe
        if not (recipe.direct and recipe.component is not None):
            lines.append(f"    views[{n}] = local(R{n})")
            continue
        key = (recipe.slot, recipe.component)
        if key not in given:
            given[key] = name = f"x{len(given)}"
            slot, component = key
            lines.append(f"    {name} = inputs.get({slot!r}, {{}}).get({component!r})")
        x = given[key]
        namespace[f"BATCH{n}"] = recipe.batch_index
        view = f"{x}[BATCH{n}]"
        if recipe.whole is not None:
            view = f"{x} if {x}.shape[1] == {recipe.whole} else {view}"
        lines.append(f"    views[{n}] = local(R{n}) if {x} is None else {view}")
    sources = ", ".join(f"s{n}" for n in range(len(layout.sources)))
    lines.append(f"    return [{sources}], views")
    exec(compile("\n".join(lines) + "\n", "<tokenring storage>", "exec"), namespace)
    return namespace["make"]
