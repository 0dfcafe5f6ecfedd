"""A KV cache's decode step captured in a CUDA graph (``KVCache.capture``).

A decode step is host-bound: a few hundred microseconds of Python and launches for a
few microseconds of GPU work per layer. Replaying a graph costs one launch. A plain
``tokenring.CapturedCall`` around ``attend`` would not do: its warm-up and capture
calls would each append a token, and the graph would replay a plan made for one
length. Here the warm-up runs with the cache's state saved and restored, the step
uses a plan whose cache piece spans the whole local capacity (the kernel reads only
the valid keys: ``kernels/cache_flash.py``), and everything that changes from step to
step (which rank keeps the new token, where, the valid lengths) is computed on the
device from ``cache.lengths``, which the graph itself advances. The host keeps its
own count of the lengths (it knows each step adds the same tokens), so appending past
the capacity still raises a ``ValueError`` before the replay, with no sync.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .cache import KVCache

__all__ = ["CapturedStep"]


class CapturedStep:
    """One decode step of ``cache`` for inputs shaped like ``q``, ``k``, ``v``."""

    def __init__(
        self, cache: KVCache, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
        causal: bool, softmax_scale: float | None, return_lse: bool, warmup: int,
        clone_outputs: bool = True,
    ) -> None:  # fmt: skip
        if not all(isinstance(t, torch.Tensor) and t.is_cuda for t in (q, k, v)):
            raise ValueError("KVCache.capture needs CUDA tensors (a CUDA graph)")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup must be a positive int (the plan must exist), got {warmup!r}")
        self.cache = cache
        self.return_lse = return_lse
        self.clone_outputs = clone_outputs
        self.tokens = q.shape[1]
        self.inputs = tuple(t.clone() for t in (q, k, v))
        args = (causal, False, softmax_scale, "auto", None)
        lengths, host = cache.lengths.clone(), list(cache._host)
        with torch.no_grad():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up off the capturing stream, as torch asks
                for _ in range(warmup):
                    cache._attend(*self.inputs, *args, fixed=True)
                    cache.lengths.copy_(lengths)
                    cache._host = list(host)
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.synchronize()
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out, self.lse = cache._attend(*self.inputs, *args, fixed=True)
        cache._host = host  # the capture ran the host side once, and no kernel

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Append ``k``, ``v`` and return ``q``'s attention over everything cached (with
        ``return_lse`` also the LSE), as ``cache.attend`` would: fresh tensors, or with
        ``clone_outputs=False`` the graph's own, overwritten by the next step. Inputs
        that are ``self.inputs`` themselves (write the next token there) are not
        copied: the least host time per step."""
        for new, static in zip((q, k, v), self.inputs):
            if new.shape != static.shape or new.dtype != static.dtype:
                raise ValueError(
                    f"captured for {tuple(static.shape)} {static.dtype}, got "
                    f"{tuple(new.shape)} {new.dtype}"
                )
        cache = self.cache
        full = [n + self.tokens for n in cache._host]
        if max(full) > cache.capacity:
            raise ValueError(
                f"KVCache: a captured step of {self.tokens} token(s) would hold {max(full)} "
                f"in a sequence, past the capacity of {cache.capacity}; reset() the cache"
            )
        for new, static in zip((q, k, v), self.inputs):
            if new.data_ptr() != static.data_ptr():
                static.copy_(new)
        self.graph.replay()
        cache._host = full
        out, lse = self.out, self.lse
        if self.clone_outputs:
            out, lse = out.clone(), lse.clone()
        return (out, lse) if self.return_lse else out
