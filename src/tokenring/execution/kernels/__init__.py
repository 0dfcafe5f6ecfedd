"""Block-attention backends behind one contract, and the choice among them."""

from __future__ import annotations

from functools import lru_cache

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
    "prefers_varlen",
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


VARLEN_DOCUMENTS_BELOW = 3072
"""Documents shorter than this on average run as variable-length calls; longer ones
as one sub-call each on the fastest dense kernel. One H100, S = 32K, bf16, per allowed
pair against dense causal cuDNN, forward (benchmarks/RESULTS.md 0e): 64 documents of
512 run at 0.23x as flash's variable-length call and 0.05x as cuDNN sub-calls (each
costs about 75 us where its arithmetic takes a few); documents of 2K-8K at 0.54x and
0.80x (flash is 0.56x of cuDNN on dense blocks). The crossover, where a sub-call's
overhead equals flash's slower rate on one document, lies near 3K tokens. Windows
always run as variable-length calls (0.47x against 0.21x)."""


def prefers_varlen(windowed: bool, mean_document: int) -> bool:
    """Whether ``auto`` runs masked blocks as variable-length calls, where a kernel can:
    under a window, or documents shorter than ``VARLEN_DOCUMENTS_BELOW`` on average
    (``mean_document``, 0 for one document)."""
    return windowed or 0 < mean_document < VARLEN_DOCUMENTS_BELOW


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
    if spec.ragged:
        parts.append("per-row key lengths (a KV cache)")
    if spec.row_masks:
        parts.append("per-row key masks (padded joint tokens)")
    if spec.masked:
        parts.append("explicit block masks")
    elif spec.documents:
        parts.append(f"documents of {spec.documents} tokens on average")
    if spec.backward:
        parts.append(f"backward, deterministic={spec.deterministic}")
    return ", ".join(parts)


@lru_cache(maxsize=256)
def select_kernel(choice: str, spec: BlockSpec) -> KernelBackend:
    """The backend for ``choice`` ("auto" or a name); ValueError explains every refusal.
    Remembered: a pure function of the spec and this installation, asked again by every
    fresh description (a packed batch makes one per step)."""
    if choice == "auto":
        # a whole masked block in a few calls, where a kernel can
        if prefers_varlen(spec.masked, spec.documents):
            varlen = next(
                (b for b in BACKENDS if isinstance(b, VarlenMasks)
                 and not b.not_supported_reasons(spec)), None,
            )  # fmt: skip
            if varlen is not None:
                return varlen
        if spec.masked or spec.ragged or spec.row_masks:  # dense on the fastest, the rest not
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
