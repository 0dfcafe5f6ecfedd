"""Block-attention backends behind one contract, and the choice among them."""

from __future__ import annotations

from .base import BlockMask, BlockSpec, KernelBackend, delta_surrogate
from .cpu_flash import CpuFlash
from .cuda_sdpa import CudnnAttention, EfficientAttention, FlashAttention
from .cuda_varlen import FlashVarlen
from .reference import MathKernel
from .split import SplitMasks, split_if_faster
from .varlen import VarlenMasks

__all__ = [
    "BACKENDS",
    "BlockMask",
    "BlockSpec",
    "KernelBackend",
    "SplitMasks",
    "delta_surrogate",
    "kernel_names",
    "select_kernel",
]

BACKENDS: tuple[KernelBackend, ...] = tuple(
    sorted(
        (
            CudnnAttention(),
            FlashAttention(),
            FlashVarlen(),
            EfficientAttention(),
            CpuFlash(),
            MathKernel(),
        ),
        key=lambda b: -b.priority,
    )
)


def kernel_names() -> list[str]:
    """Valid values of the ``kernel`` argument."""
    return ["auto", *(b.name for b in BACKENDS)]


def _describe(spec: BlockSpec) -> str:
    dtype = str(spec.dtype).removeprefix("torch.")
    parts = [
        f"device={spec.device_type}",
        f"dtype={dtype}",
        f"head_dim={spec.head_dim}",
        f"heads={spec.heads_q}/{spec.heads_kv}",
        f"causal={spec.causal}",
    ]
    if spec.masked:
        parts.append("explicit block masks")
    elif spec.documents:
        parts.append("documents")
    if spec.backward:
        parts.append(f"backward, deterministic={spec.deterministic}")
    return ", ".join(parts)


def select_kernel(choice: str, spec: BlockSpec) -> KernelBackend:
    """The backend for ``choice`` ("auto" or a name); ValueError explains every refusal."""
    if choice == "auto":
        if spec.masked or spec.documents:  # a whole masked block in a few calls, if one can
            varlen = next(
                (b for b in BACKENDS if isinstance(b, VarlenMasks)
                 and not b.not_supported_reasons(spec)), None,
            )  # fmt: skip
            if varlen is not None:
                return varlen
        if spec.masked:  # dense calls on the fastest, masked ones on a kernel that takes masks
            split = split_if_faster(spec, BACKENDS)
            if split is not None:
                return split
        rejected = []
        for backend in BACKENDS:
            reasons = backend.not_supported_reasons(spec)
            if not reasons:
                return backend
            rejected.append(f"  {backend.name}: {'; '.join(reasons)}")
        raise ValueError(f"no kernel supports {_describe(spec)}:\n" + "\n".join(rejected))
    for backend in BACKENDS:
        if backend.name == choice:
            reasons = backend.not_supported_reasons(spec)
            if reasons:
                raise ValueError(
                    f"kernel {choice!r} cannot run {_describe(spec)}: {'; '.join(reasons)}"
                )
            return backend
    valid = ", ".join(repr(n) for n in kernel_names())
    raise ValueError(f"unknown kernel {choice!r}; valid values are {valid}")
