"""CUDA block kernels: PyTorch's cuDNN, flash and memory-efficient SDPA ops.

Each op has its own LSE shape and argument quirks; they are normalised here
so the rest of the library sees one contract (see ``base``):

- cuDNN returns LSE as ``(B, H, L, 1)`` and wants it back in that shape; its
  backward caches one execution plan per q/k/v shape *and strides* but bakes
  the strides of ``out`` and ``do`` from the first call into it, so both are
  always passed in q's memory layout here;
- flash returns ``(B, H, L)``;
- memory-efficient pads LSE to a multiple of 32 rows and needs a contiguous one back;
  it alone takes an additive bias, so it runs the blocks that need an explicit mask
  (documents, windows), the bias's rows stored 16 elements apart as it requires;
  its backward misreads ``out`` unless it is contiguous ``[B, L, H, D]``: with the
  row-major views the executor hands over (batch stride below sequence stride) dq
  came out 34% off and dk 16% with no error raised (H200, torch 2.11,
  ``benchmarks/efficient_layout_probe.py``), so ``out`` is made contiguous first.

The ops take ``[B, H, L, D]`` views; our ``[B, L, H, D]`` tensors are passed
as transposed views (unit last stride), which all three accept. Forward ops are
called through their ``torch._*`` bindings, which cost less host time per call
than ``torch.ops.aten`` (backward ops have only the latter).
"""

from __future__ import annotations

import torch

from .base import KernelBackend, delta_surrogate, row_bias
from .cache_flash import flash_key_lengths

__all__ = ["CudnnAttention", "EfficientAttention", "FlashAttention"]

aten = torch.ops.aten


def _t(x: torch.Tensor) -> torch.Tensor:
    """Swap the sequence and head dimensions (a view): ``[B, L, H, D] <-> [B, H, L, D]``."""
    return x.transpose(1, 2)


def _scalar_seed(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Philox seed/offset placeholders (dropout is always 0 here, so unused)."""
    zero = torch.zeros((), dtype=torch.int64, device=device)
    return zero, zero


def _layout_like(ref: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``x`` with exactly ``ref``'s strides (a copy only when they differ)."""
    if x.stride() == ref.stride():
        return x
    return torch.empty_like(ref).copy_(x)


class _CudaBackend(KernelBackend):
    device_types = frozenset({"cuda"})
    dtypes = frozenset({torch.float16, torch.bfloat16})
    min_capability: tuple[int, int] = (8, 0)

    def available_reasons(self) -> list[str]:
        if not torch.cuda.is_available():
            return ["CUDA is not available"]
        cap = torch.cuda.get_device_capability()
        if cap < self.min_capability:
            return [f"needs compute capability >= {self.min_capability}, device has {cap}"]
        return []


class CudnnAttention(_CudaBackend):
    """``aten._scaled_dot_product_cudnn_attention`` (the fastest on H100)."""

    name = "cudnn"
    priority = 30
    max_head_dim = 128
    head_dim_multiple = 8
    native_gqa = False
    deterministic_backward = False

    def available_reasons(self) -> list[str]:
        reasons = super().available_reasons()
        if not reasons and not torch.backends.cudnn.is_available():
            reasons.append("cuDNN is not available")
        return reasons

    def _forward(self, q, k, v, causal, scale):
        out, lse, *_ = torch._scaled_dot_product_cudnn_attention(
            _t(q), _t(k), _t(v), None, True, 0.0, causal, False, scale=scale
        )
        return _t(out), lse.reshape(lse.shape[0], lse.shape[1], lse.shape[2])

    def _backward(self, do, q, k, v, out, lse, delta, causal, scale):
        if out is None:
            out = delta_surrogate(do, delta)
        out, do = _layout_like(q, out), _layout_like(q, do)
        seed, offset = _scalar_seed(q.device)
        lq, lk = q.shape[1], k.shape[1]
        dq, dk, dv = aten._scaled_dot_product_cudnn_attention_backward(
            _t(do),
            _t(q),
            _t(k),
            _t(v),
            _t(out),
            lse.float().contiguous().unsqueeze(-1),
            seed,
            offset,
            None,
            None,
            None,
            lq,
            lk,
            0.0,
            causal,
            scale=scale,
        )
        return _t(dq), _t(dk), _t(dv)


class FlashAttention(_CudaBackend):
    """``aten._scaled_dot_product_flash_attention`` (FlashAttention-2 inside PyTorch)."""

    name = "flash"
    priority = 20
    max_head_dim = 256
    head_dim_multiple = 8
    native_gqa = True
    deterministic_backward = False
    padded_keys = True

    def _ragged_forward(self, q, k, v, scale, key_lengths):
        return flash_key_lengths(q, k, v, scale, key_lengths)

    def _forward(self, q, k, v, causal, scale):
        out, lse, *_ = torch._scaled_dot_product_flash_attention(
            _t(q), _t(k), _t(v), 0.0, causal, False, scale=scale
        )
        return _t(out), lse

    def _backward(self, do, q, k, v, out, lse, delta, causal, scale):
        if out is None:
            out = delta_surrogate(do, delta)
        seed, offset = _scalar_seed(q.device)
        lq, lk = q.shape[1], k.shape[1]
        dq, dk, dv = aten._scaled_dot_product_flash_attention_backward(
            _t(do),
            _t(q),
            _t(k),
            _t(v),
            _t(out),
            lse.float().contiguous(),
            None,
            None,
            lq,
            lk,
            0.0,
            causal,
            seed,
            offset,
            scale=scale,
        )
        return _t(dq), _t(dk), _t(dv)


class EfficientAttention(_CudaBackend):
    """``aten._scaled_dot_product_efficient_attention`` (xformers' cutlass kernel)."""

    name = "efficient"
    priority = 10
    dtypes = frozenset({torch.float16, torch.bfloat16, torch.float32})
    min_capability = (5, 0)
    max_head_dim = 512
    head_dim_multiple = 8
    native_gqa = False
    deterministic_backward = False
    explicit_masks = True
    padded_keys = True
    row_masks = True

    @staticmethod
    def _bias(mask, q, k):
        """The block's mask as the kernel's bias ``[B, H, Lq, Lk]`` (broadcast views)."""
        bias = mask.additive(q.dtype, align=16)
        return bias.expand(q.shape[0], q.shape[2], *bias.shape)

    def _forward(self, q, k, v, causal, scale, bias=None):
        out, lse, *_ = torch._scaled_dot_product_efficient_attention(
            _t(q), _t(k), _t(v), bias, True, 0.0, causal, scale=scale
        )
        return _t(out), lse[:, :, : q.shape[1]]

    def _masked_forward(self, q, k, v, mask, scale):
        return self._forward(q, k, v, False, scale, self._bias(mask, q, k))

    @staticmethod
    def _row_bias(allowed, q):
        """A per-row key mask as the kernel's bias ``[B, H, Lq, Lk]`` (broadcast views)."""
        bias = row_bias(allowed, q.dtype, align=16)
        return bias.expand(-1, q.shape[2], q.shape[1], -1)

    def _rows_forward(self, q, k, v, scale, allowed):
        return self._forward(q, k, v, False, scale, self._row_bias(allowed, q))

    def _rows_backward(self, do, q, k, v, out, lse, delta, scale, allowed):
        return self._backward(do, q, k, v, out, lse, delta, False, scale,
                              self._row_bias(allowed, q))  # fmt: skip

    def _masked_backward(self, do, q, k, v, out, lse, delta, mask, scale):
        return self._backward(do, q, k, v, out, lse, delta, False, scale, self._bias(mask, q, k))

    def _backward(self, do, q, k, v, out, lse, delta, causal, scale, bias=None):
        if out is None:
            out = delta_surrogate(do, delta)
        out = out.contiguous()  # see the module docstring
        seed, offset = _scalar_seed(q.device)
        pad = (-q.shape[1]) % 32
        lse_padded = torch.nn.functional.pad(lse.float(), (0, pad)).contiguous()
        dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
            _t(do),
            _t(q),
            _t(k),
            _t(v),
            bias,
            _t(out),
            lse_padded,
            seed,
            offset,
            0.0,
            [True, True, True, False],
            causal,
            scale=scale,
        )
        return _t(dq), _t(dk), _t(dv)
