"""Dense calls on the fastest kernel, masked calls on one that takes masks.

A block cut into sub-calls (``base.BlockMask.calls``) is mostly dense and causal
calls, with explicit masks only where a window's edge cuts. On CUDA only the
memory-efficient kernel takes a mask, and it is several times slower per pair than
cuDNN or flash, so running the whole call on it would give most of that speed
away. ``SplitMasks`` runs what needs no mask on one backend and what does on
another; ``select_kernel`` makes one when no single backend is best at both.
"""

from __future__ import annotations

from dataclasses import replace

from .base import BlockMask, BlockSpec, KernelBackend

__all__ = ["SplitMasks"]

SMALL = 64
"""Sub-calls with fewer query or key tokens run on the mask-taking kernel."""


class SplitMasks(KernelBackend):
    """``dense`` for calls without a mask, ``masked`` for calls with one or with per-row
    key lengths."""

    explicit_masks = True
    padded_keys = True
    row_masks = True

    def __init__(self, dense: KernelBackend, masked: KernelBackend, small: int = SMALL):
        self.dense, self.masked, self.small = dense, masked, small
        self.name = f"{dense.name}+{masked.name}"
        self.device_types = dense.device_types & masked.device_types
        self.dtypes = dense.dtypes & masked.dtypes
        self.native_gqa = False  # each part expands heads as it needs
        self.deterministic_backward = dense.deterministic_backward and masked.deterministic_backward

    def not_supported_reasons(self, spec: BlockSpec) -> list[str]:
        unmasked = replace(spec, masked=False, ragged=False, row_masks=False)
        return self.dense.not_supported_reasons(unmasked) + self.masked.not_supported_reasons(spec)

    def _for_dense(self, q, k) -> KernelBackend:
        """The dense kernel, or for calls of a few tokens the other one (cuDNN's backward
        crashed on the tiny sub-calls of short documents, one H100, cuDNN 9.19:
        ``benchmarks/cudnn_small_probe.py``)."""
        return self.masked if min(q.shape[1], k.shape[1]) < self.small else self.dense

    def forward(self, q, k, v, causal: bool, scale: float, mask: BlockMask | None = None,
                key_lengths=None, key_mask=None):  # fmt: skip
        if key_lengths is not None or key_mask is not None:
            return self.masked.forward(q, k, v, causal, scale, key_lengths=key_lengths,
                                       key_mask=key_mask)  # fmt: skip
        if mask is None:
            return self._for_dense(q, k).forward(q, k, v, causal, scale)
        if mask.calls is None:
            return self.masked.forward(q, k, v, causal, scale, mask)
        return self._forward_calls(q, k, v, scale, mask)

    def backward(self, do, q, k, v, out, lse, delta, causal: bool, scale: float,
                 mask: BlockMask | None = None, key_mask=None):  # fmt: skip
        if key_mask is not None:
            return self.masked.backward(do, q, k, v, out, lse, delta, causal, scale,
                                        key_mask=key_mask)  # fmt: skip
        if mask is None:
            return self._for_dense(q, k).backward(do, q, k, v, out, lse, delta, causal, scale)
        if mask.calls is None:
            return self.masked.backward(do, q, k, v, out, lse, delta, causal, scale, mask)
        return self._backward_calls(do, q, k, v, out, lse, delta, scale, mask.calls)

    def _forward(self, q, k, v, causal, scale):
        raise AssertionError("SplitMasks runs its parts' kernels")

    def _backward(self, do, q, k, v, out, lse, delta, causal, scale):
        raise AssertionError("SplitMasks runs its parts' kernels")


def split_if_faster(spec: BlockSpec, backends: tuple[KernelBackend, ...]) -> KernelBackend | None:
    """For a spec with masks: the best backend for dense calls paired with the best one
    that takes masks, when they differ (None when one backend is best at both, or none
    takes masks)."""
    unmasked = replace(spec, masked=False, ragged=False, row_masks=False)
    dense = next((b for b in backends if not b.not_supported_reasons(unmasked)), None)
    masked = next((b for b in backends if not b.not_supported_reasons(spec)), None)
    if dense is None or masked is None or dense is masked:
        return None
    return SplitMasks(dense, masked)
