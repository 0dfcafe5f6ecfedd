"""The block-attention contract every kernel backend implements.

Forward: ``(q, k, v, causal, scale, mask=None) -> (out, lse)`` with
``q`` ``[batch, len_q, heads_q, dim]``, ``k``/``v`` ``[batch, len_k, heads_kv, dim]``
(any strides with a unit last stride), ``out`` shaped like ``q`` in ``q.dtype``
and ``lse`` float32 ``[batch, heads_q, len_q]`` in natural log (float64 when
the inputs are float64: see ``accum_dtype``). ``causal`` is
only asked for square blocks (``len_q == len_k``), where top-left and
bottom-right alignment agree. ``mask`` (a ``BlockMask``, only for backends that
declare ``explicit_masks``) says which pairs of a block attend; a query row
with none gives a zero output and an LSE of -inf, never NaN.

Backward: ``(do, q, k, v, out, lse, delta, causal, scale, mask=None) -> (dq, dk, dv)``
where ``lse`` and ``delta = rowsum(do * out)`` (float32 ``[batch, heads_q, len_q]``)
belong to the *global* output, not this block's. ``out`` may be ``None``
when only ``delta`` travelled; adapters whose op wants ``out`` then pass
``delta_surrogate(do, delta)``, a tensor with the same row sums against ``do``
(see docs/algorithms.md, "What travels in the backward pass").

Each backend declares what it supports and explains every refusal in
``not_supported_reasons``; ``select_kernel`` walks them in priority order.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from itertools import pairwise

import torch

__all__ = [
    "BlockMask",
    "BlockSpec",
    "KernelBackend",
    "accum_dtype",
    "delta_surrogate",
    "empty_forward",
    "expand_heads",
    "fold_heads",
    "hides_nan_in",
    "restore_query_nan",
    "row_bias",
    "valid_keys",
]


@dataclass(frozen=True)
class BlockSpec:
    """What a strategy will ask of a kernel, known before any block runs."""

    device_type: str
    dtype: torch.dtype
    head_dim: int
    heads_q: int
    heads_kv: int
    causal: bool
    backward: bool = False
    deterministic: bool = False
    masked: bool = False
    """Some blocks need an explicit mask (``BlockMask``): a window."""
    documents: int = 0
    """The mean document length when blocks are cut at document boundaries (dense and
    causal sub-calls, or sequences of a variable-length call); 0: one document."""
    ragged: bool = False
    """Some blocks' keys hold a valid prefix per batch row, its length given when the
    block runs (a KV cache's part: ``key_lengths``), forward only."""
    row_masks: bool = False
    """Some blocks' keys are masked per batch row, forward and backward (joint tokens
    with padding: ``key_mask``)."""


@dataclass(frozen=True)
class SubBlock:
    """One kernel call inside a block: query tokens ``[q0, q1)`` against key tokens
    ``[k0, k1)`` of the block, causal (a square on the same positions) or under its own
    explicit ``mask``, or neither (every pair)."""

    q0: int
    q1: int
    k0: int
    k1: int
    causal: bool
    mask: BlockMask | None = None


class BlockMask:
    """Which (query, key) pairs of one block attend, made once per plan from the block's
    global positions (``execution/block_masks.py``). Either ``allowed``, boolean
    ``[len_q, len_k]`` (one masked kernel call), or ``calls``: the few dense, causal or
    masked calls on parts of the block that compute exactly the allowed pairs (what
    documents become), merged by the kernel contract itself, so that any kernel runs
    them and only the parts a window cuts need a kernel that takes masks. A mask made
    from positions also offers ``varlen`` (``schedules.segments.VarlenBlock``): the
    block as the sequences of variable-length calls, for kernels that take windows.
    ``calls`` and ``varlen`` are made when a kernel first asks (each kernel reads one).
    """

    def __init__(
        self,
        allowed: torch.Tensor | None,
        calls: tuple[SubBlock, ...] | Callable[[], tuple[SubBlock, ...]] | None = None,
        rows: int = 0,
        varlen: Callable[[], object] | None = None,
    ):
        self.allowed = allowed
        self.rows = rows  # the block's query tokens
        self._calls = calls
        self._varlen = varlen
        self.derived: dict = {}
        """What kernels make of this mask once (index tensors, the additive bias), by key."""
        if allowed is not None:
            self.empty_rows = ~allowed.any(dim=1)
            self.any_empty = bool(self.empty_rows.any())

    @property
    def calls(self) -> tuple[SubBlock, ...] | None:
        if callable(self._calls):
            self._calls = self._calls()
        return self._calls

    @cached_property
    def disjoint(self) -> bool:
        """Each query row in at most one call: results are written, not merged."""
        spans = sorted((c.q0, c.q1) for c in self.calls)
        return all(a[1] <= b[0] for a, b in pairwise(spans))

    @cached_property
    def every_row(self) -> bool:
        """``disjoint``, and every query row in a call."""
        return self.disjoint and sum(c.q1 - c.q0 for c in self.calls) == self.rows

    @cached_property
    def varlen(self):
        """The block as variable-length sequences (``schedules.segments.VarlenBlock``)."""
        if self._varlen is None:
            raise ValueError("this block mask was not made from positions")
        return self._varlen()

    def additive(self, dtype: torch.dtype, align: int = 1) -> torch.Tensor:
        """The mask as a bias to add to the scores: 0 where allowed, -inf elsewhere
        (``[len_q, len_k]``, made once per dtype); ``align``: rows stored ``align``
        elements apart (a padded view), for kernels that need aligned rows."""
        key = ("additive", dtype, align)
        found = self.derived.get(key)
        if found is None:
            rows, cols = self.allowed.shape
            width = -(-cols // align) * align
            storage = torch.zeros(rows, width, dtype=dtype, device=self.allowed.device)
            found = storage[:, :cols]
            found.masked_fill_(~self.allowed, float("-inf"))
            self.derived[key] = found
        return found


class KernelBackend(ABC):
    """One block-attention implementation and what it can do."""

    name: str = ""
    priority: int = 0  # higher first in "auto"
    device_types: frozenset[str] = frozenset()
    dtypes: frozenset[torch.dtype] = frozenset()
    max_head_dim: int = 256
    head_dim_multiple: int = 1
    native_gqa: bool = False
    deterministic_backward: bool = True
    explicit_masks: bool = False
    padded_keys: bool = False
    """Takes ``key_lengths`` (``_ragged_forward``)."""
    row_masks: bool = False
    """Takes ``key_mask`` both ways (``_rows_forward``, ``_rows_backward``)."""

    def hides_query_nan(self, dtype: torch.dtype) -> bool:
        """Whether this kernel gives a query row that holds a NaN a finite result for
        ``dtype`` (exact attention gives NaN); such a kernel restores the NaN itself in
        every block unless it is ``unguarded``."""
        return False

    def unguarded(self) -> KernelBackend:
        """This kernel without its per-block NaN restoration, for a caller that restores
        a call's NaN rows once (``restore_query_nan``, ``passes.forward_pass``): one
        reduction per call instead of one per block. Itself where it has none."""
        return self

    def available_reasons(self) -> list[str]:
        """Why this backend cannot run on this installation at all (empty if it can)."""
        return []

    def not_supported_reasons(self, spec: BlockSpec) -> list[str]:
        """Every reason this backend cannot run ``spec`` (empty if it can)."""
        reasons = list(self.available_reasons())
        if spec.device_type not in self.device_types:
            reasons.append(f"device {spec.device_type!r} not in {sorted(self.device_types)}")
        if spec.dtype not in self.dtypes:
            names = sorted(str(d).removeprefix("torch.") for d in self.dtypes)
            reasons.append(f"dtype {str(spec.dtype).removeprefix('torch.')} not in {names}")
        if spec.head_dim > self.max_head_dim:
            reasons.append(f"head_dim {spec.head_dim} > {self.max_head_dim}")
        if spec.head_dim % self.head_dim_multiple:
            reasons.append(
                f"head_dim {spec.head_dim} is not a multiple of {self.head_dim_multiple}"
            )
        if spec.backward and spec.deterministic and not self.deterministic_backward:
            reasons.append("backward is not deterministic (deterministic=True asked)")
        if spec.masked and not self.explicit_masks:
            reasons.append("takes no explicit block mask")
        if spec.ragged and not self.padded_keys:
            reasons.append("takes no per-row key lengths (a KV cache)")
        if spec.ragged and spec.backward:
            reasons.append("a KV cache's blocks have no backward")
        if spec.row_masks and not self.row_masks:
            reasons.append("takes no per-row key mask (joint tokens with padding)")
        return reasons

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        causal: bool,
        scale: float,
        mask: BlockMask | None = None,
        key_lengths: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Block attention; see the module docstring for shapes. ``key_lengths``: int
        ``[batch]`` on the block's device, row ``b`` attends only keys ``[0,
        key_lengths[b])``; ``key_mask``: bool ``[batch, len_k]``, row ``b`` attends the
        keys it marks (either never with ``causal`` or ``mask``)."""
        if q.shape[1] == 0 or k.shape[1] == 0:  # no queries, or no keys: an empty partial
            return empty_forward(q)
        if key_lengths is not None or key_mask is not None:
            if not self.native_gqa and k.shape[2] != q.shape[2]:
                k, v = expand_heads(k, q.shape[2]), expand_heads(v, q.shape[2])
            if key_lengths is not None:
                out, lse = self._ragged_forward(q, k, v, scale, key_lengths)
                none = key_lengths == 0  # rows with no valid key: the merge's identity
            else:
                out, lse = self._rows_forward(q, k, v, scale, key_mask[:, None, None, :])
                none = ~key_mask.any(dim=1)
            out = out.masked_fill(none[:, None, None, None], 0.0)
            return out, lse.masked_fill(none[:, None, None], float("-inf"))
        if mask is not None and mask.calls is not None:
            return self._forward_calls(q, k, v, scale, mask)
        if not self.native_gqa and k.shape[2] != q.shape[2]:
            k, v = expand_heads(k, q.shape[2]), expand_heads(v, q.shape[2])
        if mask is None:
            return self._forward(q, k, v, causal, scale)
        out, lse = self._masked_forward(q, k, v, mask, scale)
        if mask.any_empty:  # rows that attend nothing here: an empty partial
            out = out.masked_fill(mask.empty_rows[None, :, None, None], 0.0)
            lse = lse.masked_fill(mask.empty_rows[None, None, :], float("-inf"))
        return out, lse

    def backward(
        self,
        do: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor | None,
        lse: torch.Tensor,
        delta: torch.Tensor,
        causal: bool,
        scale: float,
        mask: BlockMask | None = None,
        key_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gradients of one block given the global lse and delta; see the module docstring
        (``key_mask`` as in ``forward``)."""
        heads_kv = k.shape[2]
        if q.shape[1] == 0 or k.shape[1] == 0:
            return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        if mask is not None and mask.calls is not None:
            return self._backward_calls(do, q, k, v, out, lse, delta, scale, mask.calls)
        if not (self.native_gqa or heads_kv == q.shape[2]):
            k, v = expand_heads(k, q.shape[2]), expand_heads(v, q.shape[2])
        if key_mask is not None:  # rows that see no key: any finite LSE (they are masked)
            lse = lse.masked_fill(torch.isneginf(lse), 0.0)
            dq, dk, dv = self._rows_backward(
                do, q, k, v, out, lse, delta, scale, key_mask[:, None, None, :]
            )
        elif mask is None:
            dq, dk, dv = self._backward(do, q, k, v, out, lse, delta, causal, scale)
        else:
            # a query that attends no key anywhere has an LSE of -inf; its row is masked
            # here too, so any finite stand-in gives it zero probability (no NaN)
            lse = lse.masked_fill(torch.isneginf(lse), 0.0)
            dq, dk, dv = self._masked_backward(do, q, k, v, out, lse, delta, mask, scale)
        if dk.shape[2] != heads_kv:
            dk, dv = fold_heads(dk, heads_kv), fold_heads(dv, heads_kv)
        return dq, dk, dv

    def _forward_calls(self, q, k, v, scale, mask: BlockMask):
        """A block as its sub-calls, each partial merged into the block's result (rows
        no call reaches: a zero partial with an LSE of -inf)."""
        calls = mask.calls
        wide = accum_dtype(q.dtype)
        lse_shape = (q.shape[0], q.shape[2], q.shape[1])
        if mask.disjoint:  # each row's result comes from one call: write it there
            out = torch.empty_like(q) if mask.every_row else torch.zeros_like(q)
            lse = torch.full(lse_shape, float("-inf"), dtype=wide, device=q.device)
            for c in calls:
                part, part_lse = self.forward(*_parts(c, q, k, v), c.causal, scale, c.mask)
                out[:, c.q0 : c.q1] = part
                lse[:, :, c.q0 : c.q1] = part_lse
            return out, lse
        out = torch.zeros(q.shape, dtype=wide, device=q.device)
        lse = torch.full(lse_shape, float("-inf"), dtype=wide, device=q.device)
        for c in calls:
            part, part_lse = self.forward(*_parts(c, q, k, v), c.causal, scale, c.mask)
            before = lse[:, :, c.q0 : c.q1]
            merged = torch.logaddexp(before, part_lse.to(wide))
            # rows with no key yet on either side stay (0, -inf): no -inf - -inf
            base = merged.masked_fill(torch.isneginf(merged), 0.0)
            keep = torch.exp(before - base).transpose(1, 2).unsqueeze(-1)
            take = torch.exp(part_lse.to(wide) - base).transpose(1, 2).unsqueeze(-1)
            rows = out[:, c.q0 : c.q1]
            rows.copy_(rows * keep + part.to(wide) * take)
            before.copy_(merged)
        return out.to(q.dtype), lse

    def _backward_calls(self, do, q, k, v, out, lse, delta, scale, calls: tuple[SubBlock, ...]):
        """A block's gradients as the sum of its sub-calls' (each takes the global LSE
        and delta of its rows, so they are independent)."""
        wide = accum_dtype(q.dtype)
        dq, dk, dv = (torch.zeros(t.shape, dtype=wide, device=t.device) for t in (q, k, v))
        for c in calls:
            qs, ks = slice(c.q0, c.q1), slice(c.k0, c.k1)
            gq, gk, gv = self.backward(
                _part(do, qs), *_parts(c, q, k, v), None if out is None else _part(out, qs),
                lse[:, :, qs], delta[:, :, qs], c.causal, scale, c.mask,
            )  # fmt: skip
            dq[:, qs] += gq
            dk[:, ks] += gk
            dv[:, ks] += gv
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)

    @abstractmethod
    def _forward(self, q, k, v, causal, scale):
        """``forward`` with as many key/value heads as query heads unless ``native_gqa``."""

    @abstractmethod
    def _backward(self, do, q, k, v, out, lse, delta, causal, scale):
        """``backward`` with as many key/value heads as query heads unless ``native_gqa``."""

    def _masked_forward(self, q, k, v, mask: BlockMask, scale):
        """``_forward`` under an explicit mask (backends with ``explicit_masks``)."""
        raise NotImplementedError(f"kernel {self.name} takes no explicit block mask")

    def _masked_backward(self, do, q, k, v, out, lse, delta, mask: BlockMask, scale):
        """``_backward`` under an explicit mask (backends with ``explicit_masks``)."""
        raise NotImplementedError(f"kernel {self.name} takes no explicit block mask")

    def _ragged_forward(self, q, k, v, scale, key_lengths: torch.Tensor):
        """``_forward`` where row ``b`` sees keys ``[0, key_lengths[b])`` (``padded_keys``
        backends; rows with none are cleared by ``forward``): by default as a row mask."""
        return self._rows_forward(q, k, v, scale, valid_keys(key_lengths, k.shape[1]))

    def _rows_forward(self, q, k, v, scale, allowed: torch.Tensor):
        """``_forward`` where row ``b`` sees the keys ``allowed[b, 0, 0]`` marks (boolean
        ``[batch, 1, 1, len_k]``; ``row_masks`` backends)."""
        raise NotImplementedError(f"kernel {self.name} takes no per-row key mask")

    def _rows_backward(self, do, q, k, v, out, lse, delta, scale, allowed: torch.Tensor):
        """``_backward`` under ``_rows_forward``'s mask (``row_masks`` backends)."""
        raise NotImplementedError(f"kernel {self.name} takes no per-row key mask")

    def __repr__(self) -> str:
        return f"<kernel {self.name}>"


def valid_keys(key_lengths: torch.Tensor, len_k: int) -> torch.Tensor:
    """Boolean ``[batch, 1, 1, len_k]``: which keys of each row are valid."""
    cols = torch.arange(len_k, device=key_lengths.device)
    return (cols < key_lengths[:, None])[:, None, None, :]


def row_bias(allowed: torch.Tensor, dtype: torch.dtype, align: int = 1) -> torch.Tensor:
    """A per-row key mask (boolean ``[batch, 1, 1, len_k]``) as a bias to add to the
    scores, 0 or -inf; ``align``: rows stored ``align`` elements apart, for kernels that
    need it."""
    batch, len_k = allowed.shape[0], allowed.shape[-1]
    width = -(-len_k // align) * align
    bias = torch.zeros(batch, 1, 1, width, dtype=dtype, device=allowed.device)[..., :len_k]
    return bias.masked_fill_(~allowed, float("-inf"))


def empty_forward(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A block with no keys (or no queries): zero output, LSE -inf (the merge's identity)."""
    lse = torch.full(
        (q.shape[0], q.shape[2], q.shape[1]), float("-inf"), dtype=accum_dtype(q.dtype),
        device=q.device,
    )  # fmt: skip
    return torch.zeros_like(q), lse


def _part(x: torch.Tensor, rows: slice) -> torch.Tensor:
    """Rows of a ``[B, L, H, D]`` tensor, contiguous: a slice of a batch of several rows is
    not dense, and cuDNN fixes the strides of ``out`` and ``do`` per plan from the first
    call (``cuda_sdpa``), so every part of a sub-call is handed over laid out alike. (The
    crash met on the way to this was cuDNN's 1 x 1 calls: ``split.SMALL``.)"""
    return x[:, rows].contiguous()


def _parts(c: SubBlock, q, k, v) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    keys = slice(c.k0, c.k1)
    return _part(q, slice(c.q0, c.q1)), _part(k, keys), _part(v, keys)


def hides_nan_in(kernel: KernelBackend, q: torch.Tensor) -> bool:
    """Whether ``kernel`` hides a NaN that ``q`` holds (then ``restore_query_nan``): one
    reduction, read as a Python float (a NaN anywhere makes the sum NaN), only where the
    kernel hides NaN for ``q``'s dtype."""
    return kernel.hides_query_nan(q.dtype) and math.isnan(q.sum().item())


def restore_query_nan(
    q: torch.Tensor, out: torch.Tensor, lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``out`` ``[B, L, H, D]`` and ``lse`` ``[B, H, L]`` with NaN in each row whose query
    (``q`` ``[B, L, H, D]``) holds a NaN, as exact attention gives, where the row saw a
    key (a row with none stays the merge's identity, 0 and -inf)."""
    bad = torch.isnan(q).any(-1) & (lse > float("-inf")).transpose(1, 2)  # [B, L, H]
    return (
        out.masked_fill(bad.unsqueeze(-1), float("nan")),
        lse.masked_fill(bad.transpose(1, 2), float("nan")),
    )


def delta_surrogate(do: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """A tensor ``o`` shaped like ``do`` with ``rowsum(do * o) == delta`` per (batch, row, head).

    Kernels read the output only to form ``delta``; rebuilding a stand-in from
    ``do`` (which travels anyway) and ``delta`` (one float per row and head)
    saves sending the output itself. ``do`` is scaled by its row maximum first
    so tiny gradients do not underflow.
    """
    d = do.to(accum_dtype(do.dtype))
    peak = d.abs().amax(dim=-1, keepdim=True)
    unit = d / torch.where(peak > 0, peak, torch.ones_like(peak))
    norm = (unit * unit).sum(dim=-1, keepdim=True) * peak
    coeff = delta.permute(0, 2, 1).unsqueeze(-1) / torch.where(
        norm > 0, norm, torch.ones_like(norm)
    )
    return torch.empty_like(do).copy_(unit * coeff)  # keeps do's memory layout


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """Precision of LSE, delta and accumulators: float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def expand_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, L, Hkv, D] -> [B, L, heads, D]``: query head h uses key/value head h // (heads/Hkv)."""
    return x.repeat_interleave(heads // x.shape[2], dim=2)


def fold_heads(x: torch.Tensor, heads_kv: int) -> torch.Tensor:
    """Inverse of ``expand_heads`` for gradients: sum the query heads sharing a key/value head."""
    b, n, h, d = x.shape
    return x.view(b, n, heads_kv, h // heads_kv, d).sum(dim=3)
