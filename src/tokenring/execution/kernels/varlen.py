"""Masked blocks as variable-length kernel calls: one launch per window.

A block under documents and a window is a batch of (query range, key range)
sequences, each under a window aligned to its bottom-right corner
(``schedules.segments``). Kernels that take such batches (flash-attention's
``cu_seqlens`` and ``window_size``) then run a whole masked block in one call
per distinct window, where cutting it into rectangles (``base.BlockMask.calls``)
costs a launch per document and a masked kernel at every window edge.

``VarlenMasks`` does the packing once for any such kernel: the query and key
rows of each group gathered into ``[total, heads, dim]`` (a view when a group
is the whole block in order), the results written back where each row belongs,
merged by LSE only where a row is in several groups, and the backward's
gradients added back row by row. A kernel supplies ``_varlen_forward`` and
``_varlen_backward`` over one group (its LSE ``[heads, total]``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import BlockMask, KernelBackend, accum_dtype, delta_surrogate, empty_forward

__all__ = ["VarlenGroup", "VarlenMasks"]


@dataclass(frozen=True)
class VarlenGroup:
    """One variable-length call over a batch of ``batch`` rows: the block's query rows
    and key rows it reads (``q_rows``, ``k_rows``; None: all, in order) and its
    sequences (``cu_q``, ``cu_k`` int32 offsets into the packed rows), all on the
    device; its window (``left``, ``right``; -1 unbounded)."""

    q_rows: torch.Tensor | None
    k_rows: torch.Tensor | None
    rows_q: int
    rows_k: int
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int
    left: int
    right: int

    @property
    def causal(self) -> bool:
        return self.left == -1 and self.right == 0


def _ranges(spans) -> list[int]:
    return [i for a, b in spans for i in range(a, b)]


def _groups(mask: BlockMask, len_q: int, len_k: int, batch: int, device) -> list[VarlenGroup]:
    """The device tensors of each group of ``mask.varlen``, for ``batch`` rows (made
    once per mask and batch size)."""
    key = ("varlen", batch)
    found = mask.derived.get(key)
    if found is not None:
        return found
    found = []
    for group in mask.varlen.groups:
        q_rows = _ranges((s.q0, s.q1) for s in group)
        k_rows = [i for s in group for i in _ranges(s.keys)]
        lens_q = [s.q1 - s.q0 for s in group] * batch
        lens_k = [s.len_k for s in group] * batch
        cu_q = torch.tensor([0, *lens_q], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        cu_k = torch.tensor([0, *lens_k], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        whole_q = batch == 1 and q_rows == list(range(len_q))
        whole_k = batch == 1 and k_rows == list(range(len_k))
        found.append(VarlenGroup(
            None if whole_q else torch.tensor(q_rows, device=device),
            None if whole_k else torch.tensor(k_rows, device=device),
            len(q_rows), len(k_rows), cu_q.to(device), cu_k.to(device),
            max(lens_q), max(lens_k), group[0].left, group[0].right,
        ))  # fmt: skip
    mask.derived[key] = found
    return found


def _pack(x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """``[B, L, H, D]`` rows -> ``[B * len(rows), H, D]`` (a view for all rows of one)."""
    if rows is None:
        return x[0]
    picked = x.index_select(1, rows)
    return picked.reshape(-1, *x.shape[2:])


class VarlenMasks(KernelBackend):
    """Runs blocks with a mask as variable-length calls (see the module); blocks
    without one as the kernel's plain calls. Mix in before a plain kernel class."""

    explicit_masks = True

    def forward(self, q, k, v, causal: bool, scale: float, mask: BlockMask | None = None):
        if mask is None:
            return super().forward(q, k, v, causal, scale)
        if q.shape[1] == 0 or k.shape[1] == 0:
            return empty_forward(q)
        batch, len_q, heads, dim = q.shape
        wide = accum_dtype(q.dtype)
        block = mask.varlen
        groups = _groups(mask, len_q, k.shape[1], batch, q.device)

        def call(g: VarlenGroup) -> tuple[torch.Tensor, torch.Tensor]:
            part, part_lse = self._varlen_forward(
                _pack(q, g.q_rows), _pack(k, g.k_rows), _pack(v, g.k_rows), g, scale
            )
            part_lse = part_lse.view(heads, batch, g.rows_q).transpose(0, 1).to(wide)
            return part.view(batch, g.rows_q, heads, dim), part_lse

        if len(groups) == 1 and groups[0].q_rows is None:  # the whole block in order
            return call(groups[0])
        lse = torch.full((batch, heads, len_q), float("-inf"), dtype=wide, device=q.device)
        if block.disjoint:  # every row from one call: written where it belongs
            out = torch.empty_like(q) if block.every_row else torch.zeros_like(q)
        else:
            out = torch.zeros(q.shape, dtype=wide, device=q.device)
        for g in groups:
            part, part_lse = call(g)
            if g.q_rows is None:  # every row, merged with another group's
                out, lse = _merged(out, lse, part, part_lse)
            elif block.disjoint:
                out.index_copy_(1, g.q_rows, part)
                lse.index_copy_(2, g.q_rows, part_lse)
            else:
                _merge_rows(out, lse, part, part_lse, g.q_rows)
        return out.to(q.dtype), lse

    def backward(self, do, q, k, v, out, lse, delta, causal: bool, scale: float,
                 mask: BlockMask | None = None):  # fmt: skip
        if mask is None:
            return super().backward(do, q, k, v, out, lse, delta, causal, scale)
        if q.shape[1] == 0 or k.shape[1] == 0:
            return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        batch, len_q, heads, dim = q.shape
        groups = _groups(mask, len_q, k.shape[1], batch, q.device)
        if len(groups) == 1 and groups[0].q_rows is None and groups[0].k_rows is None:
            # one call over the whole block in order: its gradients are the block's
            g = groups[0]
            rows_out = delta_surrogate(do, delta) if out is None else out
            whole_lse = lse[0].to(accum_dtype(q.dtype)).contiguous()
            gq, gk, gv = self._varlen_backward(
                do[0], q[0], k[0], v[0], rows_out[0], whole_lse, g, scale
            )
            return gq.unsqueeze(0), gk.unsqueeze(0), gv.unsqueeze(0)
        wide = accum_dtype(q.dtype)
        dq, dk, dv = (torch.zeros(t.shape, dtype=wide, device=t.device) for t in (q, k, v))
        for g in groups:
            rows_lse, rows_delta, rows_do = lse, delta, do
            if g.q_rows is not None:
                rows_lse, rows_delta = (
                    lse.index_select(2, g.q_rows),
                    delta.index_select(2, g.q_rows),
                )
                rows_do = do.index_select(1, g.q_rows)
            if out is None:
                rows_out = delta_surrogate(rows_do, rows_delta)
            else:
                rows_out = out if g.q_rows is None else out.index_select(1, g.q_rows)
            packed_lse = rows_lse.to(wide).transpose(0, 1).reshape(heads, -1).contiguous()
            gq, gk, gv = self._varlen_backward(
                _pack(rows_do, None) if g.q_rows is None else rows_do.reshape(-1, heads, dim),
                _pack(q, g.q_rows), _pack(k, g.k_rows), _pack(v, g.k_rows),
                _pack(rows_out, None) if g.q_rows is None else rows_out.reshape(-1, heads, dim),
                packed_lse, g, scale,
            )  # fmt: skip
            _add_rows(dq, gq.view(batch, g.rows_q, heads, dim), g.q_rows)
            kv_shape = (batch, g.rows_k, *k.shape[2:])
            _add_rows(dk, gk.view(kv_shape), g.k_rows)
            _add_rows(dv, gv.view(kv_shape), g.k_rows)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)

    def _varlen_forward(self, q, k, v, group: VarlenGroup, scale):
        """One group's call: packed ``[total, heads, dim]`` in, ``(out, lse [heads,
        total_q])`` out."""
        raise NotImplementedError(f"kernel {self.name} has no variable-length call")

    def _varlen_backward(self, do, q, k, v, out, lse, group: VarlenGroup, scale):
        """One group's gradients ``(dq, dk, dv)``, packed, given the global ``lse``
        ``[heads, total_q]`` and ``out`` (or a stand-in with its row sums against ``do``)."""
        raise NotImplementedError(f"kernel {self.name} has no variable-length call")


def _add_rows(target: torch.Tensor, value: torch.Tensor, rows: torch.Tensor | None) -> None:
    if rows is None:
        target.add_(value)
    else:
        target.index_add_(1, rows, value.to(target.dtype))


def _merged(before_out, before_lse, part, part_lse):
    """Two partials of the same rows as one (rows with no key on either side stay
    ``(0, -inf)``)."""
    merged = torch.logaddexp(before_lse, part_lse)
    base = merged.masked_fill(torch.isneginf(merged), 0.0)
    keep = torch.exp(before_lse - base).transpose(1, 2).unsqueeze(-1)
    take = torch.exp(part_lse - base).transpose(1, 2).unsqueeze(-1)
    return before_out * keep + part.to(before_out.dtype) * take, merged


def _merge_rows(out, lse, part, part_lse, rows: torch.Tensor) -> None:
    merged_out, merged_lse = _merged(out.index_select(1, rows), lse.index_select(2, rows),
                                     part, part_lse)  # fmt: skip
    out.index_copy_(1, rows, merged_out)
    lse.index_copy_(2, rows, merged_lse)
