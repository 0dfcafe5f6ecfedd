"""A block's mask, made once per plan from the positions of its query and key cells.

Plain masks (full, causal) need none: the block's kind says it all. Under
documents and windows a block is cut into the sub-calls that compute exactly the
allowed pairs (``schedules.blocks.sub_calls``): dense and causal calls wherever
documents are all there is, and an explicit mask only on the parts a window cuts.
The kernel contract runs and merges them (``kernels.base.BlockMask``). Kernels
with variable-length batches and windows read the block as their sequences instead
(``schedules.segments``).
"""

from __future__ import annotations

import torch

from ..schedules.blocks import sub_calls
from ..schedules.masks import BlockKind, Cell, Mask
from ..schedules.segments import varlen_block
from .kernels.base import BlockMask, SubBlock

__all__ = ["block_mask"]


def _positions(cells: tuple[Cell, ...]) -> torch.Tensor:
    runs = [torch.arange(a, b) for cell in cells for a, b in cell]
    return torch.cat(runs) if runs else torch.zeros(0, dtype=torch.long)


def block_mask(
    q_cells: tuple[Cell, ...], kv_cells: tuple[Cell, ...], mask: Mask, device: torch.device
) -> BlockMask:
    """The mask of a block whose queries and keys hold ``q_cells`` and ``kv_cells``:
    its sub-calls and its variable-length sequences, each made when a kernel asks."""

    def calls() -> tuple[SubBlock, ...]:
        found = []
        positions = None  # made only for a call that needs an explicit mask
        for q0, q1, k0, k1, kind in sub_calls(q_cells, kv_cells, mask):
            explicit = None
            if kind is BlockKind.PARTIAL:
                if positions is None:
                    positions = _positions(q_cells), _positions(kv_cells)
                q_pos, kv_pos = positions
                allowed = mask.allowed(q_pos[q0:q1], kv_pos[k0:k1])
                explicit = BlockMask(allowed.to(device))
            found.append(SubBlock(q0, q1, k0, k1, kind is BlockKind.DIAG, explicit))
        return tuple(found)

    rows = sum(b - a for cell in q_cells for a, b in cell)
    return BlockMask(None, calls, rows=rows, varlen=lambda: varlen_block(q_cells, kv_cells, mask))
