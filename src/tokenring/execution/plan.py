"""A call's plan: where it runs (``Site``), and everything it decided before running
(``Plan``): schedules, slot geometry, kernels.

A plan is made once per distinct call description and site, after the checks and
the cross-rank agreement (``tokenring.api.calls``); later calls with the same
description reuse it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.distributed as dist

from ..call.description import CallDescription
from ..options import Pass
from ..schedules import Schedule, build_schedule
from .block_masks import block_mask
from .kernels import BlockMask, BlockSpec, KernelBackend, select_kernel
from .slots import SlotGeometry

__all__ = ["Plan", "Site", "block_spec", "choose_kernel"]


@dataclass(frozen=True)
class Site:
    """Where a call runs: the sequence-parallel group (checks, plans, joint tokens), this
    rank's place in it, and the process group of each axis a schedule moves data on."""

    world: int
    rank: int
    ulysses: int
    group: dist.ProcessGroup | None
    axes: dict[str, dist.ProcessGroup | None]

    @cached_property
    def key(self) -> tuple:
        """What distinguishes two sites of one group (two meshes over the same ranks)."""
        names = tuple(
            (axis, getattr(g, "group_name", None)) for axis, g in sorted(self.axes.items())
        )
        return (self.world, self.rank, self.ulysses, names)


def block_spec(call: CallDescription, *, backward: bool = False) -> BlockSpec:
    """What a call asks of a kernel (the kernels' own query, derived from the call)."""
    return BlockSpec(
        call.device_type, call.dtype, call.head_dim, call.heads_q, call.heads_kv, call.causal,
        backward=backward, deterministic=backward and call.options.deterministic,
        masked=call.mask.windowed, documents=call.mask.mean_document,
        row_masks=call.joint is not None and call.joint.masked,
    )  # fmt: skip


def choose_kernel(call: CallDescription) -> tuple[KernelBackend | None, str]:
    """The forward kernel for ``call``, or None and why not. With ``deterministic`` and
    gradients, the backward's refusal is found now rather than in the backward."""
    try:
        kernel = select_kernel(call.options.kernel, block_spec(call))
        if call.wants_grad and call.options.deterministic:
            select_kernel(call.options.kernel, block_spec(call, backward=True))
    except ValueError as err:
        return None, str(err)
    return kernel, ""


@dataclass(frozen=True)
class Plan:
    """Everything a call decided before running: shared by its forward and backward."""

    description: CallDescription
    site: Site
    forward_kernel: KernelBackend
    stream_tail: bool

    @property
    def seq_len(self) -> int:
        return self.description.seq_len

    def _schedule(self, pass_: Pass) -> Schedule:
        key = self.description.schedule_key(self.site.rank, pass_, self.stream_tail)
        return build_schedule(key)

    @cached_property
    def forward(self) -> Schedule:
        return self._schedule(Pass.FORWARD)

    @cached_property
    def backward(self) -> Schedule:
        return self._schedule(Pass.BACKWARD)

    @cached_property
    def forward_geometry(self) -> SlotGeometry:
        return SlotGeometry(self.forward, Pass.FORWARD, self.description)

    @cached_property
    def backward_geometry(self) -> SlotGeometry:
        return SlotGeometry(self.backward, Pass.BACKWARD, self.description)

    @property
    def workspace_bytes(self) -> int:
        """Bytes of scratch this plan keeps for its next call (``storage.py``), over the
        passes it has run."""
        made = (self.__dict__.get(name) for name in ("forward_geometry", "backward_geometry"))
        return sum(geometry.workspace_bytes for geometry in made if geometry is not None)

    @cached_property
    def plain(self) -> bool:
        """Whether the call's mask is full or causal alone (no window, one document)."""
        return self.description.mask.plain

    @cached_property
    def _whole_masks(self) -> dict[torch.device, BlockMask]:
        return {}

    def whole_mask(self, device: torch.device) -> BlockMask | None:
        """One rank's mask over its whole shard (queries and keys alike), made once per
        device; None when the mask is plain (a causal or full kernel call)."""
        if self.plain:
            return None
        call = self.description
        found = self._whole_masks.get(device)
        if found is None:
            cells = call.table.cells(tuple(range(call.table.count)))
            found = self._whole_masks[device] = block_mask(cells, cells, call.mask, device)
        return found

    @cached_property
    def backward_kernel(self) -> KernelBackend:
        call = self.description
        return select_kernel(call.options.kernel, block_spec(call, backward=True))
