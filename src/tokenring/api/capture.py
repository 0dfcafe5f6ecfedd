"""``CapturedCall``: a sharded call captured in a CUDA graph, replayed on new inputs.

Where the host is the limit (short sequences, DiT sampling at 4K-16K tokens,
decode, small shards at large P), replaying a graph costs one launch instead
of the Python and the dozens of launches of a call. A call is capturable
once everything it sets up on the host exists: its lanes (communicators),
its plan (made after a cross-rank exchange that cannot run inside a
capture) and the kernels' own caches. So the helper first calls it a few
times on a side stream (as torch asks), then captures one call, NCCL
transfers included (every rank must capture, in step, as for any collective).

    graph = tr.CapturedCall(lambda q, k, v: tr.attention(q, k, v, causal=True,
                                                         layout="zigzag"), q, k, v)
    out = graph(q2, k2, v2)      # new inputs copied in, the graph replayed

Fixed shapes, dtypes and devices; forward only (a capture holds no autograd
graph). The outputs of a replay live in the graph's buffers, overwritten by
the next replay: they are cloned unless ``clone_outputs=False``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["CapturedCall"]


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _tensors(item)]
    return []


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_clone(item) for item in value)
    return value


class CapturedCall:
    """``fn(*inputs)`` captured in a CUDA graph for ``example_inputs``' shapes.

    ``fn`` takes tensors and returns a tensor or a (nested) tuple of them, e.g. a
    call of ``tokenring.attention``. ``warmup``: eager calls before the capture (at
    least one, so the plan and the lanes exist). Collective like the call itself:
    every rank of the group makes the same ``CapturedCall`` at the same point, and
    replays it at the same points.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        *example_inputs: torch.Tensor,
        warmup: int = 2,
        clone_outputs: bool = True,
    ):
        if not example_inputs or not all(
            isinstance(t, torch.Tensor) and t.is_cuda for t in example_inputs
        ):
            raise ValueError("CapturedCall needs CUDA tensors as inputs (CUDA graphs)")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup must be a positive int (the plan must exist), got {warmup!r}")
        self.fn = fn
        self.clone_outputs = clone_outputs
        self.inputs = tuple(t.clone() for t in example_inputs)
        with torch.no_grad():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up off the capturing stream, as torch asks
                for _ in range(warmup):
                    fn(*self.inputs)
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.synchronize()
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.outputs = fn(*self.inputs)
        if not _tensors(self.outputs):
            raise ValueError("the captured function returned no tensor")

    def _check(self, inputs: tuple) -> None:
        if len(inputs) != len(self.inputs):
            raise ValueError(f"expected {len(self.inputs)} inputs, got {len(inputs)}")
        for i, (new, old) in enumerate(zip(inputs, self.inputs)):
            if not isinstance(new, torch.Tensor) or (new.shape, new.dtype, new.device) != (
                old.shape, old.dtype, old.device,
            ):  # fmt: skip
                got = (
                    (tuple(new.shape), new.dtype, new.device)
                    if isinstance(new, torch.Tensor)
                    else type(new).__name__
                )
                raise ValueError(
                    f"input {i}: captured for {(tuple(old.shape), old.dtype, old.device)}, "
                    f"got {got}"
                )

    def __call__(self, *inputs: torch.Tensor) -> Any:
        """Copy ``inputs`` into the captured ones and replay; return the outputs (cloned
        unless ``clone_outputs=False``)."""
        self._check(inputs)
        for new, static in zip(inputs, self.inputs):
            if new.data_ptr() != static.data_ptr():
                static.copy_(new)
        return self.replay()

    def replay(self) -> Any:
        """Replay on what the captured inputs hold now."""
        self.graph.replay()
        return _clone(self.outputs) if self.clone_outputs else self.outputs
