"""Where one call's slots lie in the memory it allocates, worked out once per plan.

A call binds its own inputs as given. The slots it returns (its results) and the
slots that start as the merge's identity get an allocation each, as before any
step; every other slot (queries, keys/values and partials in transit) lies in one
*scratch* buffer, each at an offset aligned to 256 bytes (what a separate
allocation would guarantee), so a call makes one allocation for all of them. The
results stay apart so that what a caller keeps holds no scratch.

Every view a step names is then, per call, one operation, written into the plan's
code (``store_code``, ``program.py``): a view that lies in an allocation is one
``as_strided`` whose sizes, strides and offset were computed here by indexing meta
tensors exactly as a call would index real ones. A kernel reads a call's own input
as the caller gave it, ``[B, L, H, D]`` with any strides (a KV cache's batch-major
storage), indexed on the same tokens and heads; an input only transfers read is the
caller's tensor transposed, copied when sent. Views that only serve to derive others
are never made.

On the CPU every operation, transfers included, has completed when a call
returns, so the scratch buffer and its views can serve the next call of the same
plan as they are: a plan keeps one such *workspace* (``WorkspacePool``) when it is
at most ``tokenring.configure(workspace_bytes=...)`` large, and a call then
allocates only its results (none where they are kernel outputs: ``program.py``).
On CUDA a call returns before its kernels run, so its scratch is allocated per call
(by the caching allocator, in stream order).
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
    "kernel_order", "local_view", "rowmajor", "spare_code", "store_code", "store_layout",
    "strided_code", "to_rowmajor", "translate_store", "ungroup", "views_list",
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
    sent: bool = False
    """A row-major view only transfers read, of a slot of one group: made as the caller's
    tensor transposed, with no copy (a transfer packs it, or makes it contiguous, when
    it sends it)."""
    groups: int = 1
    """The slot's head groups (its row-major storage is group-major where more than 1)."""


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
    """The whole storage of each (slot, component), made on demand (collectives)."""
    views: tuple[Recipe | None, ...]
    """By view number (``SlotGeometry.views``); None for one no step reads."""
    nbytes: tuple[int, ...]
    """Bytes of each view, by view number (what a transfer of it sends)."""
    scratch: int | None
    """The allocation that is the scratch buffer (None: every slot is a result, a slot
    that starts as the merge's identity, or a call's own input)."""
    owned: dict[tuple[str, str], Strided]
    """Each result slot's components over this rank's own tokens, what a call returns (a
    result slot that also held other ranks' longer pieces is longer): in the kernels'
    order (``kernel_order``), or group-major where the slot is stored in head groups."""

    @cached_property
    def scratch_bytes(self) -> int:
        return 0 if self.scratch is None else self.allocations[self.scratch].shape[0]

    @cached_property
    def scratch_sources(self) -> frozenset[int]:
        """The sources that read the scratch buffer."""
        return frozenset(i for i, (a, _) in enumerate(self.sources) if a == self.scratch)

    @cached_property
    def make_fresh(self) -> Callable:
        """``make(inputs, given, device, workspace)`` -> ``(sources, views, rows)`` for a
        store that allocates everything (``translate_store``; a call's own code makes its
        storage itself: ``program.py``)."""
        return translate_store(self, reuse=False)


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


def _needed(geometry: SlotGeometry, joint: bool) -> tuple[set[int], set[int]]:
    """The views steps read, and of them those only transfers read: a transfer of a slot
    stored jointly reads only its records (a local slot's are packed from its components
    when sent)."""
    found: set[int] = set()
    computed: set[int] = set()
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
            computed.update(step.inputs)
            for run in (*step.q_runs, *step.kv_runs):
                computed.update(run.targets)
        else:
            computed.update(step.src)
            computed.update(step.dst)
    return found | computed, found - computed


def store_layout(geometry: SlotGeometry, joint: bool) -> StoreLayout:
    """The layout of ``geometry`` 's slots for a call (``joint``: slots that move as
    several components are stored as records, ``records.py``)."""
    build = _Builder(geometry, joint)
    slots = geometry.schedule.slots
    specs = geometry.views
    needed, sent_only = _needed(geometry, joint)
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
            sent = number in sent_only and not permute and slots[base.slot].groups == 1
            view = LocalView(
                base.slot, base.component, index, base.whole, permute, direct, batch, sent,
                slots[base.slot].groups,
            )  # fmt: skip
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
    owned = {}
    for slot in (geometry.schedule.query_result, geometry.schedule.kv_result):
        if slot is None:
            continue
        if slots[slot].local:
            raise AssertionError(f"result slot {slot!r} is a call's own input")
        n = geometry.own_tokens(slot)
        for (name, comp), (tensor, allocation) in build.meta.items():
            if name == slot and comp is not None:
                grouped = slots[slot].groups > 1  # group-major: [G, T, ...]
                mine = tensor[:, :n] if grouped else kernel_order(tensor[:n])
                owned[(slot, comp)] = build.strided(mine, allocation)
    return StoreLayout(
        tuple(build.allocations), tuple(build.sources), tuple(fills), components,
        tuple(recipes), tuple(nbytes), build.scratch, owned,
    )  # fmt: skip


def strided_code(recipe: Strided, name: str, namespace: dict) -> str:
    """The code of one ``Strided`` view (its sizes and strides as ``SIZE{name}`` and
    ``STRIDE{name}`` in ``namespace``)."""
    if recipe.whole:
        return f"s{recipe.source}"
    namespace[f"SIZE{name}"], namespace[f"STRIDE{name}"] = recipe.size, recipe.stride
    return f"s{recipe.source}.as_strided(SIZE{name}, STRIDE{name}, {recipe.offset})"


def to_rowmajor(x: torch.Tensor) -> torch.Tensor:
    """``[B, L, ...] -> [L, B, ...]`` contiguous; a view when B == 1 and ``x`` is contiguous."""
    return x.transpose(0, 1).contiguous()


def rowmajor(
    slot: str, component: str, groups: int, inputs: dict, given: dict, rows: dict
) -> torch.Tensor | None:
    """A call's own input in row-major (``groups`` > 1: group-major) storage: what
    ``given`` holds so, or a copy of what ``inputs`` holds as ``[B, L, ...]``, made once
    per call and kept in ``rows``; None where the call has no such input."""
    key = (slot, component)
    t = rows.get(key)
    if t is None:
        t = given.get(slot, {}).get(component)
        if t is None:
            x = inputs.get(slot, {}).get(component)
            if x is None:
                return None
            t = to_rowmajor(x)
        if groups > 1:  # [T, B, H, ...] as group-major [G, T, B, H/G, ...]
            n, b, h, *rest = t.shape
            t = t.reshape(n, b, groups, h // groups, *rest).movedim(2, 0).contiguous()
        rows[key] = t
    return t


def local_view(recipe: LocalView, inputs: dict, given: dict, rows: dict) -> torch.Tensor | None:
    """A view of a call's own input made from its row-major storage (``rowmajor``)."""
    t = rowmajor(recipe.slot, recipe.component, recipe.groups, inputs, given, rows)
    if t is None:
        return None
    if recipe.groups > 1 or t.shape[0] != recipe.whole:  # group-major: a group is indexed
        t = t[recipe.index]
    return kernel_order(t) if recipe.permute else t


def ungroup(t: torch.Tensor) -> torch.Tensor:
    """Group-major ``[G, T, B, H/G, D]`` storage as ``[B, T, H, D]`` (a copy)."""
    g, n, b, h, d = t.shape
    return t.permute(2, 1, 0, 3, 4).reshape(b, n, g * h, d)


def store_code(
    layout: StoreLayout, reuse: bool, namespace: dict, elided: frozenset[int] = frozenset()
) -> list[str]:
    """What a call does to make its storage, as lines of straight-line code (indented for
    a function body), made once per layout: its allocations, the sources that read them
    (``s{n}``), the fills, and each view a step reads as ``v{n}``, with every shape,
    stride and offset written in (in ``namespace``). The code reads ``inputs`` (the
    caller's ``[B, L, H, D]`` tensors, by slot and component), ``given`` (row-major ones),
    ``device`` and ``workspace``, and keeps row-major copies in ``rows``. ``reuse``: the
    scratch buffer and the views in it come from a kept ``workspace``, so only the other
    views are made. A view of the caller's own input is the input as given where the
    kernels take it so, or transposed where only transfers read it (``LocalView.sent``),
    and otherwise ``local_view``'s. ``elided``: views the call's code binds itself (a
    result that is a kernel's output: ``program.py``); an allocation only they read is
    not made."""
    namespace.update(empty=torch.empty, full=torch.full, local_view=local_view)
    kept = {layout.sources[r.source][0] for n, r in enumerate(layout.views)
            if type(r) is Strided and n not in elided}  # fmt: skip
    dropped = {layout.sources[layout.views[n].source][0] for n in elided} - kept
    made = [i for i in range(len(layout.allocations)) if i not in dropped]
    lines = ["rows = {}"]
    for i in made:
        a = layout.allocations[i]
        if reuse and i == layout.scratch:
            continue
        namespace[f"SHAPE{i}"], namespace[f"DTYPE{i}"] = a.shape, a.dtype
        if a.fill is None:
            lines.append(f"a{i} = empty(SHAPE{i}, dtype=DTYPE{i}, device=device)")
        else:
            namespace[f"FILL{i}"] = a.fill
            lines.append(f"a{i} = full(SHAPE{i}, FILL{i}, dtype=DTYPE{i}, device=device)")
    for n, (i, dtype) in enumerate(layout.sources):
        if i not in made:
            continue
        if reuse and i == layout.scratch:
            lines.append(f"s{n} = workspace.sources[{n}]")
        elif dtype is None:
            lines.append(f"s{n} = a{i}")
        else:
            namespace[f"AS{n}"] = dtype
            lines.append(f"s{n} = a{i}.view(AS{n})")
    for j, (recipe, value) in enumerate(layout.fills):
        namespace[f"VALUE{j}"] = value
        lines.append(f"{strided_code(recipe, f'F{j}', namespace)}.fill_(VALUE{j})")
    given_names: dict[tuple[str, str], str] = {}
    for n, recipe in enumerate(layout.views):
        if recipe is None or n in elided:
            continue
        if type(recipe) is Strided:
            if reuse and recipe.source in layout.scratch_sources:
                lines.append(f"v{n} = workspace.views[{n}]")
            else:
                lines.append(f"v{n} = {strided_code(recipe, str(n), namespace)}")
            continue
        if recipe.component is None:  # a local slot's records: packed when sent
            lines.append(f"v{n} = None")
            continue
        namespace[f"R{n}"] = recipe
        fallback = f"local_view(R{n}, inputs, given, rows)"
        if not (recipe.direct or recipe.sent):
            lines.append(f"v{n} = {fallback}")
            continue
        key = (recipe.slot, recipe.component)
        if key not in given_names:
            given_names[key] = x = f"x{len(given_names)}"
            lines.append(f"{x} = inputs.get({recipe.slot!r}, {{}}).get({recipe.component!r})")
        x = given_names[key]
        namespace[f"BATCH{n}"] = recipe.batch_index
        as_given = x if recipe.direct else f"{x}.transpose(0, 1)"
        view = f"{x}[BATCH{n}]" if recipe.direct else f"{x}[BATCH{n}].transpose(0, 1)"
        if recipe.whole is not None:
            view = f"{as_given} if {x}.shape[1] == {recipe.whole} else {view}"
        lines.append(f"v{n} = {fallback} if {x} is None else {view}")
    return ["    " + line for line in lines]


def views_list(layout: StoreLayout, inside: bool = False) -> str:
    """The code of a list of every view by number (None for one not made), or with
    ``inside`` of only those in the scratch buffer (a ``Workspace``'s)."""
    return "[" + ", ".join(
        f"v{n}" if r is not None and (not inside or (type(r) is Strided and r.source
                                                      in layout.scratch_sources))
        else "None"
        for n, r in enumerate(layout.views)
    ) + "]"  # fmt: skip


def spare_code(layout: StoreLayout, reuse: bool) -> str:
    """The code of the ``Workspace`` a call leaves for the next (None: no scratch)."""
    if layout.scratch is None:
        return "None"
    if reuse:
        return "workspace"
    inside = layout.scratch_sources
    sources = ", ".join(f"s{n}" if n in inside else "None" for n in range(len(layout.sources)))
    return f"Workspace([{sources}], {views_list(layout, inside=True)})"


def translate_store(layout: StoreLayout, reuse: bool) -> Callable:
    """``store_code`` as a function ``make(inputs, given, device, workspace)`` ->
    ``(sources, views, rows)``, for a store made apart from a call's code (tests)."""
    namespace: dict[str, object] = {}
    lines = ["def make(inputs, given, device, workspace):", *store_code(layout, reuse, namespace)]
    sources = ", ".join(f"s{n}" for n in range(len(layout.sources)))
    lines.append(f"    return [{sources}], {views_list(layout)}, rows")
    exec(compile("\n".join(lines) + "\n", "<tokenring storage>", "exec"), namespace)
    return namespace["make"]
