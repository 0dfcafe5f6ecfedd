"""CPU block kernel: PyTorch's flash-attention implementation for CPU."""

from __future__ import annotations

from functools import cache

import torch

from .base import KernelBackend, delta_surrogate, hides_nan_in, restore_query_nan, row_bias

__all__ = ["CpuFlash"]


@cache
def _hides_nan(dtype: torch.dtype) -> bool:
    """Whether this build's CPU flash kernel drops a NaN in a query row for ``dtype``
    (a property of the PyTorch build and the CPU, probed once per dtype)."""
    q = torch.zeros(1, 1, 2, 8, dtype=dtype)
    q[0, 0, 0, 0] = float("nan")
    kv = torch.ones(1, 1, 2, 8, dtype=dtype)
    out, _ = torch._scaled_dot_product_flash_attention_for_cpu(q, kv, kv, 0.0, False, scale=1.0)
    return not bool(torch.isnan(out).any())


class CpuFlash(KernelBackend):
    """``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward.

    Takes different query and key/value head counts natively (GQA, MQA), and an
    explicit mask as an additive bias (``attn_mask``) both ways. Its LSE is already
    float32 ``(B, H, L)``.
    """

    name = "cpu_flash"
    priority = 10
    device_types = frozenset({"cpu"})
    dtypes = frozenset({torch.float32, torch.bfloat16, torch.float16, torch.float64})
    max_head_dim = 1024
    native_gqa = True
    explicit_masks = True
    padded_keys = True
    row_masks = True
    guarded = True
    """Restores a query row's NaN in every block (``unguarded``: a caller does, once)."""

    def hides_query_nan(self, dtype: torch.dtype) -> bool:
        return _hides_nan(dtype)

    def unguarded(self) -> CpuFlash:
        return _unguarded()

    def _forward(self, q, k, v, causal, scale, bias=None):
        # the torch-namespace binding of the aten op: a few microseconds less host time
        # per call than going through torch.ops.aten (the same op)
        out, lse = torch._scaled_dot_product_flash_attention_for_cpu(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, causal,
            attn_mask=bias, scale=scale,
        )  # fmt: skip
        out = out.transpose(1, 2)
        # On AVX-512 builds the kernel returns zeros and a finite LSE for a query row that
        # holds a NaN (AVX2 builds and float64 give NaN); where this build does, restore
        # the NaN, so that it propagates as in attention computed exactly, whatever the CPU.
        # One reduction on the usual path: one dispatch fewer than isnan() on the tensor.
        if self.guarded and hides_nan_in(self, q):
            out, lse = restore_query_nan(q, out, lse)
        return out, lse

    def _masked_forward(self, q, k, v, mask, scale):
        return self._forward(q, k, v, False, scale, mask.additive(q.dtype))

    def _masked_backward(self, do, q, k, v, out, lse, delta, mask, scale):
        return self._backward(do, q, k, v, out, lse, delta, False, scale, mask.additive(q.dtype))

    def _rows_forward(self, q, k, v, scale, allowed):
        return self._forward(q, k, v, False, scale, row_bias(allowed, q.dtype))

    def _rows_backward(self, do, q, k, v, out, lse, delta, scale, allowed):
        return self._backward(
            do, q, k, v, out, lse, delta, False, scale, row_bias(allowed, q.dtype)
        )

    def _backward(self, do, q, k, v, out, lse, delta, causal, scale, bias=None):
        if out is None:
            out = delta_surrogate(do, delta)
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            do.transpose(1, 2),
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            out.transpose(1, 2),
            lse,
            0.0,
            causal,
            attn_mask=bias,
            scale=scale,
        )
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


@cache
def _unguarded() -> CpuFlash:
    """The CPU kernel without its per-block NaN restoration (``KernelBackend.unguarded``)."""
    kernel = CpuFlash()
    kernel.guarded = False
    return kernel
