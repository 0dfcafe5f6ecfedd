"""The block-attention contract every kernel backend implements.

Forward: ``(q, k, v, causal, scale) -> (out, lse)`` with
``q`` ``[batch, len_q, heads_q, dim]``, ``k``/``v`` ``[batch, len_k, heads_kv, dim]``
(any strides with a unit last stride), ``out`` shaped like ``q`` in ``q.dtype``
and ``lse`` float32 ``[batch, heads_q, len_q]`` in natural log (float64 when
the inputs are float64: see ``accum_dtype``). ``causal`` is
only asked for square blocks (``len_q == len_k``), where top-left and
bottom-right alignment agree.

Backward: ``(do, q, k, v, out, lse, delta, causal, scale) -> (dq, dk, dv)``
where ``lse`` and ``delta = rowsum(do * out)`` (float32 ``[batch, heads_q, len_q]``)
belong to the *global* output, not this block's. ``out`` may be ``None``
when only ``delta`` travelled; adapters whose op wants ``out`` then pass
``delta_surrogate(do, delta)``, a tensor with the same row sums against ``do``
(see docs/algorithms.md, "What travels in the backward pass").

Each backend declares what it supports and explains every refusal in
``not_supported_reasons``; ``select_kernel`` walks them in priority order.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

__all__ = [
    "BlockSpec",
    "KernelBackend",
    "accum_dtype",
    "delta_surrogate",
    "expand_heads",
    "fold_heads",
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
        return reasons

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Block attention; see the module docstring for shapes."""
        if not self.native_gqa and k.shape[2] != q.shape[2]:
            k, v = expand_heads(k, q.shape[2]), expand_heads(v, q.shape[2])
        return self._forward(q, k, v, causal, scale)

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
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gradients of one block given the global lse and delta; see the module docstring."""
        heads_kv = k.shape[2]
        if self.native_gqa or heads_kv == q.shape[2]:
            return self._backward(do, q, k, v, out, lse, delta, causal, scale)
        k, v = expand_heads(k, q.shape[2]), expand_heads(v, q.shape[2])
        dq, dk, dv = self._backward(do, q, k, v, out, lse, delta, causal, scale)
        return dq, fold_heads(dk, heads_kv), fold_heads(dv, heads_kv)

    @abstractmethod
    def _forward(self, q, k, v, causal, scale):
        """``forward`` with as many key/value heads as query heads unless ``native_gqa``."""

    @abstractmethod
    def _backward(self, do, q, k, v, out, lse, delta, causal, scale):
        """``backward`` with as many key/value heads as query heads unless ``native_gqa``."""

    def __repr__(self) -> str:
        return f"<kernel {self.name}>"


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
