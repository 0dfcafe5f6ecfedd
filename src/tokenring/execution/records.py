"""Several components of the same rows as one record per token, for one message.

Where every message costs a round of latency (gloo), a transfer of several
components (k and v; out and lse; a backward's query bundle) goes as one
message. A slot that such transfers fill is stored *jointly*: each token's
components lie side by side in one record, so any run of tokens is one
contiguous piece of memory that is sent, or received into, as it is, with no
copy on either side. Rows kept in separate tensors (a call's own inputs) are
copied into records once, when they are sent.

A record holds the components in the slot's order: in their dtype when they
share one (k and v are then exactly ``torch.stack([k, v], dim=1)``), else as
bytes with each component at an offset aligned to 8 bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["RecordLayout", "joint_storage", "pack_records", "stacks"]

ALIGN = 8
"""Bytes a component's offset in a mixed-dtype record is a multiple of (any dtype's size)."""


@dataclass(frozen=True)
class RecordLayout:
    """Where each component lies in a record: ``unit`` is the storage dtype, ``offsets``
    and ``size`` count ``unit`` elements."""

    unit: torch.dtype
    offsets: tuple[int, ...]
    size: int

    @staticmethod
    def of(parts: list[tuple[tuple[int, ...], torch.dtype]]) -> RecordLayout:
        """The layout of components of per-token shapes and dtypes ``parts``."""
        dtypes = {dtype for _, dtype in parts}
        if len(dtypes) == 1:
            offsets, at = [], 0
            for shape, _ in parts:
                offsets.append(at)
                at += math.prod(shape)
            return RecordLayout(dtypes.pop(), tuple(offsets), at)
        offsets, at = [], 0
        for shape, dtype in parts:
            offsets.append(at)
            at += -(-math.prod(shape) * dtype.itemsize // ALIGN) * ALIGN
        return RecordLayout(torch.uint8, tuple(offsets), at)

    def views(
        self, storage: torch.Tensor, parts: list[tuple[tuple[int, ...], torch.dtype]]
    ) -> list[torch.Tensor]:
        """Each component of ``storage`` (``[*lead, size]`` of ``unit``, contiguous, at any
        offset of its memory) as a ``[*lead, *shape]`` tensor of its dtype."""
        lead = storage.shape[:-1]
        found = []
        for (shape, dtype), offset in zip(parts, self.offsets):
            base, ratio = storage, 1
            if dtype != self.unit:
                base, ratio = storage.view(dtype), dtype.itemsize
            step = self.size // ratio
            lead_strides = [step * math.prod(lead[i + 1 :]) for i in range(len(lead))]
            start = base.storage_offset() + offset // ratio  # storage may lie inside a buffer
            found.append(
                base.as_strided(
                    (*lead, *shape), (*lead_strides, *_contiguous_strides(shape)), start
                )
            )
        return found


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))


def joint_storage(
    lead: tuple[int, ...], parts: list[tuple[tuple[int, ...], torch.dtype]], device: torch.device
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Uninitialised storage for ``lead`` tokens (``[T]``, or ``[G, T]`` group-major) of
    records of ``parts``, and each component's view of it."""
    layout = RecordLayout.of(parts)
    storage = torch.empty((*lead, layout.size), dtype=layout.unit, device=device)
    return storage, layout.views(storage, parts)


def stacks(parts: list[tuple[tuple[int, ...], torch.dtype]]) -> bool:
    """Whether records of components of per-token shapes and dtypes ``parts`` are the
    components stacked (one dtype and shape): ``torch.stack(tensors, dim=1)`` packs them."""
    return all(part == parts[0] for part in parts)


def pack_records(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Rows kept in separate tensors (each ``[n, ...]``) as ``n`` records (a copy)."""
    first = tensors[0]
    if stacks([(t.shape, t.dtype) for t in tensors]):
        return torch.stack(tensors, dim=1)  # the records of one dtype and shape
    parts = [(tuple(t.shape[1:]), t.dtype) for t in tensors]
    storage, views = joint_storage((first.shape[0],), parts, first.device)
    for view, t in zip(views, tensors):
        view.copy_(t)
    return storage
