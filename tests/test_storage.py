"""Where a call's slots lie (``execution/storage.py``): one scratch buffer of disjoint,
aligned slots, and views made in one step that are the views indexing would make."""

from __future__ import annotations

import itertools

import pytest
import torch

from tokenring.call.description import CallDescription
from tokenring.execution.slots import SlotGeometry, SlotStore
from tokenring.execution.storage import ALIGN, Strided, kernel_order
from tokenring.options import Layout, Pass, Strategy
from tokenring.schedules import build_schedule
from tokenring.schedules.ir import COMPONENTS

WORLD = 3
CASES = list(
    itertools.product(
        (Strategy.TOKENRING, Strategy.RING, Strategy.ULYSSES, Strategy.ALLGATHER),
        (Pass.FORWARD, Pass.BACKWARD),
        (True, False),  # joint records (gloo) or components apart (NCCL)
    )
)


def _geometries(strategy: Strategy, pass_: Pass) -> list[SlotGeometry]:
    """Every rank's geometry for an uneven causal zigzag call with GQA in bfloat16 (slots
    of several dtypes, head groups, pieces of unequal length)."""
    call = CallDescription.of_shape(
        world=WORLD, seq_len=7 * WORLD + 2, heads_q=6, heads_kv=3, head_dim=4, batch=2,
        causal=True, layout=Layout.ZIGZAG, strategy=strategy, device_type="cpu",
        wants_grad=True,
    )  # fmt: skip
    return [
        SlotGeometry(build_schedule(call.schedule_key(rank, pass_)), pass_, call)
        for rank in range(WORLD)
    ]


def _store(geometry: SlotGeometry, joint: bool) -> SlotStore:
    """A store of random inputs as a call binds them: q, k, v (and a backward's do, out)
    as the caller's ``[B, L, H, D]``, lse and delta row-major."""
    given, inputs = _locals(geometry), {}
    for slot, comps in given.items():
        for comp in [c for c, t in comps.items() if t.dim() == 4]:
            inputs.setdefault(slot, {})[comp] = comps.pop(comp).transpose(0, 1)
    return SlotStore.fresh(geometry, given, torch.device("cpu"), joint=joint, inputs=inputs)


def _locals(geometry: SlotGeometry) -> dict[str, dict[str, torch.Tensor]]:
    """Random row-major inputs of the shapes a call binds to its local slots."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    for name, spec in geometry.schedule.slots.items():
        if not spec.local:
            continue
        comps = COMPONENTS[(geometry.pass_, spec.kind)]
        if geometry.pass_ is Pass.BACKWARD and name == "q":
            comps = ("q", "do", "out", "lse", "delta")
        tokens = geometry.own_tokens(name)
        for comp in comps:
            shape, dtype = geometry.shape_of(comp, spec, tokens)
            if spec.groups > 1:  # the store groups a local input itself
                g, t, b, h, *rest = shape
                shape = (t, b, g * h, *rest)
            found.setdefault(name, {})[comp] = torch.randn(shape).to(dtype)
    return found


def _byte_span(t: torch.Tensor) -> tuple[int, int]:
    """Bytes ``t`` spans, from the start of its storage."""
    start = t.storage_offset() * t.element_size()
    extent = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    return start, start + extent * t.element_size()


@pytest.mark.parametrize("strategy, pass_, joint", CASES)
def test_slots_sharing_a_buffer_are_disjoint_and_aligned(strategy, pass_, joint) -> None:
    """Slots that share the scratch buffer never overlap, and each starts at a multiple
    of ``ALIGN`` bytes; results lie in allocations of their own."""
    for geometry in _geometries(strategy, pass_):
        store = _store(geometry, joint)
        schedule = geometry.schedule
        by_buffer: dict[int, dict[str, tuple[int, int]]] = {}
        for slot, comps in store.tensors.items():
            if schedule.slots[slot].local:
                continue
            for t in comps.values():
                spans = by_buffer.setdefault(t.untyped_storage().data_ptr(), {})
                a, b = _byte_span(t)
                old = spans.get(slot, (a, b))
                spans[slot] = (min(a, old[0]), max(b, old[1]))
        for spans in by_buffer.values():
            results = {schedule.query_result, schedule.kv_result}
            assert len(spans) == 1 or not results & spans.keys(), "a result shares its buffer"
            ordered = sorted(spans.values())
            assert all(b <= a for (a, _), (_, b) in zip(ordered[1:], ordered)), spans
            assert all(a % ALIGN == 0 for a, _ in ordered), spans


@pytest.mark.parametrize("strategy, pass_, joint", CASES)
def test_every_view_is_the_storage_indexing_would_name(strategy, pass_, joint) -> None:
    """Each view a step reads, made by one ``as_strided``, is the same memory, shape and
    strides as indexing its slot's whole storage; a view of the call's own input holds
    what indexing its row-major copy would."""
    for geometry in _geometries(strategy, pass_):
        store = _store(geometry, joint)
        specs = geometry.views
        for number, (spec, view) in enumerate(zip(specs, store.views)):
            recipe = store.layout.views[number]
            if recipe is None or (spec.component is None and view is None):
                continue  # not read by any step; or a local slot's records (packed when sent)
            base = specs[spec.base] if spec.base is not None else spec
            if base.component is None:  # records: the components' storage, side by side
                assert isinstance(recipe, Strided) and view.is_contiguous()
                continue
            whole = store.tensors[base.slot][base.component]
            expected = whole if whole.shape[0] == base.whole else whole[base.index]
            if spec.base is not None:
                expected = kernel_order(expected)
            if geometry.schedule.slots[base.slot].local:  # a caller's input, or a copy
                assert view.shape == expected.shape and torch.equal(view, expected)
                continue
            assert view.data_ptr() == expected.data_ptr(), (number, spec)
            assert view.shape == expected.shape and view.stride() == expected.stride()
            assert view.dtype == expected.dtype
