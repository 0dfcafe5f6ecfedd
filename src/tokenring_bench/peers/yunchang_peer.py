"""yunchang (PyPI ``yunchang``, written against 0.6.4) as a benchmark peer.

yunchang's fast paths call the ``flash_attn`` package, which publishes no
wheel on PyPI (only a source distribution that compiles CUDA code), so it
cannot be installed where there is no internet or no CUDA toolkit.
Its fallbacks run PyTorch's own SDPA kernels (``AttnType.TORCH_*``), forward
only: ``yunchang.kernels.attention.pytorch_attn_backward`` raises "Not
implemented backward for PyTorch attention types". Modes:

- ``"ulysses"``: ``LongContextAttention`` (USP) with Ulysses degree P and ring
  degree 1: all-to-all from sequence shards to head shards, attention on the
  whole sequence, all-to-all back. Contiguous layout. (yunchang's own
  ``UlyssesAttention`` is not used: with a torch attention type it runs a
  second ring over the default group on the head-sharded tensors, which mixes
  heads of different ranks.)
- ``"ring"``: ``ring_flash_attn_func`` over the group, contiguous layout.
- ``"zigzag"``: ``zigzag_ring_flash_attn_func``, zigzag layout, causal only.

Precision: yunchang's torch kernels return the log-sum-exp cast to the input
dtype, and the ring merges partial outputs with it; in bfloat16 that moves the
merge weights by up to about 1% (docs/peers.md, "Expected precision").
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch
import torch.distributed as dist

from tokenring.options import Layout

from .base import Peer, PeerCase, Runner, divisibility_reasons, require_distributed, ulysses_reasons

__all__ = ["YUNCHANG_ATTN_TYPES", "YUNCHANG_MODES", "YunchangAttention"]

YUNCHANG_MODES = ("ulysses", "ring", "zigzag")
YUNCHANG_ATTN_TYPES = ("torch_flash", "torch_efficient", "torch_cudnn", "torch_math", "fa")
"""``AttnType`` values this adapter knows (``"fa"`` needs the flash_attn package)."""

_INSTALL_HINT = "pip install yunchang (docs/peers.md, 'Installing the peers without internet')"
_NO_FLASH_ATTN = (
    "AttnType.FA needs the flash_attn package, which is not installed (flash-attn "
    "publishes no wheel on PyPI, only a source distribution that compiles CUDA code "
    "with nvcc and the CUDA toolkit matching torch)"
)
_NO_BACKWARD = (
    "yunchang has no backward for its torch attention types "
    "(yunchang.kernels.attention.pytorch_attn_backward raises); its backward needs flash_attn"
)


def _yunchang() -> tuple[ModuleType | None, str | None]:
    """The yunchang package, or None and why it cannot be imported."""
    try:
        return importlib.import_module("yunchang"), None
    except ImportError as err:
        return None, f"yunchang is not installed ({err}; {_INSTALL_HINT})"


def _has_flash_attn() -> bool:
    """Whether yunchang found the flash_attn package when it was imported."""
    return bool(getattr(importlib.import_module("yunchang.globals"), "HAS_FLASH_ATTN", False))


class YunchangAttention(Peer):
    """yunchang's Ulysses, ring or zigzag-ring attention (forward only without flash_attn).

    ``mode``: one of ``YUNCHANG_MODES``. ``attn_type``: the per-block kernel,
    one of ``YUNCHANG_ATTN_TYPES`` (yunchang's ``AttnType`` values).
    """

    def __init__(self, mode: str = "ulysses", *, attn_type: str = "torch_flash") -> None:
        if mode not in YUNCHANG_MODES:
            valid = ", ".join(repr(m) for m in YUNCHANG_MODES)
            raise ValueError(f"unknown mode {mode!r}; valid values are {valid}")
        if attn_type not in YUNCHANG_ATTN_TYPES:
            valid = ", ".join(repr(a) for a in YUNCHANG_ATTN_TYPES)
            raise ValueError(f"unknown attn_type {attn_type!r}; valid values are {valid}")
        self.mode = mode
        self.attn_type = attn_type
        self.name = f"yunchang-{mode}" + ("" if attn_type == "torch_flash" else f"[{attn_type}]")
        self._usp: dict[tuple[int, int], torch.nn.Module] = {}

    def describe(self) -> str:
        yc, _ = _yunchang()
        version = getattr(yc, "__version__", "not installed") if yc else "not installed"
        return f"{self.name}: yunchang {version}, mode {self.mode}, AttnType {self.attn_type}"

    def layout(self, case: PeerCase) -> Layout:
        return Layout.ZIGZAG if self.mode == "zigzag" else Layout.CONTIGUOUS

    def case_reasons(self, case: PeerCase) -> list[str]:
        """The reasons that depend on the case alone (not on this installation)."""
        reasons = []
        torch_kernel = self.attn_type.startswith("torch_")
        if case.backward and torch_kernel:
            reasons.append(_NO_BACKWARD)
        if self.attn_type != "torch_math" and case.device_type != "cuda":
            reasons.append(
                f"AttnType {self.attn_type} runs CUDA kernels only (got {case.device_type})"
            )
        if self.mode == "zigzag" and not case.causal:
            reasons.append("yunchang's zigzag ring asserts causal=True")
        ring_steps = self.mode != "ulysses" and case.world > 1
        if ring_steps and self.attn_type in ("torch_cudnn", "torch_math"):
            reasons.append(
                f"yunchang's {self.attn_type} forward returns an all-zero log-sum-exp, so "
                "merging ring steps gives wrong results"
            )
        if case.gqa and self.attn_type == "torch_efficient":
            reasons.append(
                "yunchang calls aten._scaled_dot_product_efficient_attention directly, and that "
                "op takes no grouped key/value heads (GQA)"
            )
        if case.gqa and self.attn_type in ("torch_cudnn", "torch_math"):
            reasons.append(
                f"yunchang's {self.attn_type} calls F.scaled_dot_product_attention without "
                "enable_gqa, which does not accept grouped key/value heads"
            )
        dtypes = {
            "torch_flash": {torch.float16, torch.bfloat16},
            "fa": {torch.float16, torch.bfloat16},
            "torch_cudnn": {torch.float16, torch.bfloat16},
            "torch_efficient": {torch.float16, torch.bfloat16, torch.float32},
        }.get(self.attn_type)
        if dtypes is not None and case.dtype not in dtypes:
            names = sorted(str(d).removeprefix("torch.") for d in dtypes)
            reasons.append(
                f"dtype {str(case.dtype).removeprefix('torch.')} not in {names} ({self.attn_type})"
            )
        if self.mode == "ulysses":
            reasons += ulysses_reasons(case)
        reasons += divisibility_reasons(self.layout(case), case)
        return reasons

    def not_supported_reasons(self, case: PeerCase) -> list[str]:
        yc, why = _yunchang()
        if yc is None:
            return [str(why), *self.case_reasons(case)]
        reasons = []
        if self.attn_type == "fa" and not _has_flash_attn():
            reasons.append(_NO_FLASH_ATTN)
        return reasons + self.case_reasons(case)

    def _usp_module(self, yc: ModuleType, world: int, rank: int) -> torch.nn.Module:
        """yunchang's USP module for pure Ulysses, made once per process world.

        ``set_seq_parallel_pg`` creates process groups (collective on the
        default group) and stores them in yunchang's global ``PROCESS_GROUP``,
        which ``LongContextAttention`` copies when it is built.
        """
        key = (id(dist.group.WORLD), world)
        if key not in self._usp:
            from yunchang.kernels import AttnType

            yc.set_seq_parallel_pg(world, 1, rank, world)
            self._usp[key] = yc.LongContextAttention(
                ring_impl_type="basic", attn_type=AttnType(self.attn_type)
            )
        return self._usp[key]

    def build(self, case: PeerCase, group: dist.ProcessGroup | None, rank: int) -> Runner:
        require_distributed(self.name)
        yc, why = _yunchang()
        if yc is None:
            raise NotImplementedError(why)
        from yunchang.kernels import AttnType

        causal = case.causal
        if self.mode == "ulysses":
            if group is not None and dist.get_world_size(group) != dist.get_world_size():
                raise ValueError(
                    "yunchang's Ulysses builds its process groups from global ranks "
                    "(set_seq_parallel_pg): run it on the default group"
                )
            module = self._usp_module(yc, case.world, dist.get_rank())

            def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                return module(q, k, v, causal=causal)

            return Runner(run=run)

        fn = yc.ring_flash_attn_func if self.mode == "ring" else yc.zigzag_ring_flash_attn_func
        attn_type = AttnType(self.attn_type)
        pg = group if group is not None else dist.group.WORLD

        def run_ring(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return fn(q, k, v, causal=causal, group=pg, attn_type=attn_type)

        return Runner(run=run_ring)
