"""para-attn (PyPI ``para-attn``, written against 0.3.38) as a benchmark peer.

para-attn is pure Python on top of PyTorch (no flash_attn): PyPI ships only
its source distribution, from which a ``py3-none-any`` wheel builds offline.
Two modes, both on contiguous shards, both taking SDPA's ``[batch, heads,
seq, head_dim]`` layout (we pass transposed views, as a model would):

- ``"ulysses"``: ``para_attn.para_attn_interface.ulysses_attn_func``:
  all-to-all from sequence shards to head shards, SDPA on the whole sequence,
  all-to-all back; differentiable (autograd all-to-all). For GQA we pass
  ``attn_func=partial(F.scaled_dot_product_attention, enable_gqa=True)``,
  its documented hook for the attention call.
- ``"ring"``: ``ring_attn_func``: PyTorch's own ring
  (``_templated_ring_attention``) with load balancing off and all-to-all
  rotation, blocks by para-attn's CUDA kernel chooser. Forward only
  (``RingAttnFunc.backward`` raises NotImplementedError) and MHA only (its
  kernel chooser builds ``SDPAParams`` with ``enable_gqa=False``).
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType

import torch
import torch.distributed as dist
import torch.nn.functional as F

from tokenring.options import Layout

from .base import Peer, PeerCase, Runner, divisibility_reasons, require_distributed, ulysses_reasons

__all__ = ["PARA_ATTN_MODES", "ParaAttention"]

PARA_ATTN_MODES = ("ulysses", "ring")
_INSTALL_HINT = "pip install para-attn (docs/peers.md, 'Installing the peers without internet')"


def _para_attn() -> tuple[ModuleType | None, str | None]:
    """para-attn's interface module, or None and why it cannot be imported."""
    try:
        return importlib.import_module("para_attn.para_attn_interface"), None
    except ImportError as err:
        return None, f"para-attn is not installed ({err}; {_INSTALL_HINT})"


class ParaAttention(Peer):
    """para-attn's Ulysses (forward+backward) or ring (forward only) attention."""

    def __init__(self, mode: str = "ulysses") -> None:
        if mode not in PARA_ATTN_MODES:
            valid = ", ".join(repr(m) for m in PARA_ATTN_MODES)
            raise ValueError(f"unknown mode {mode!r}; valid values are {valid}")
        self.mode = mode
        self.name = f"para-attn-{mode}"

    def describe(self) -> str:
        api, _ = _para_attn()
        version = "not installed"
        if api is not None:
            version = getattr(importlib.import_module("para_attn"), "__version__", "unknown")
        return f"{self.name}: para-attn {version}, {self.mode}"

    def layout(self, case: PeerCase) -> Layout:
        return Layout.CONTIGUOUS

    def case_reasons(self, case: PeerCase) -> list[str]:
        """The reasons that depend on the case alone (not on this installation)."""
        reasons = []
        if self.mode == "ring":
            if case.backward:
                reasons.append(
                    "para-attn's ring has no backward (RingAttnFunc.backward raises "
                    "NotImplementedError)"
                )
            if case.device_type != "cuda":
                reasons.append(f"para-attn's ring kernels are CUDA only (got {case.device_type})")
            if case.gqa:
                reasons.append(
                    "para-attn's ring picks its kernel with SDPAParams(enable_gqa=False), so "
                    "no kernel accepts fewer key/value heads than query heads"
                )
            low = {torch.float16, torch.bfloat16, torch.float32}
            if case.dtype not in low:
                reasons.append(
                    f"dtype {str(case.dtype).removeprefix('torch.')} has no CUDA SDPA kernel "
                    "for para-attn's ring"
                )
        else:
            reasons += ulysses_reasons(case)
        reasons += divisibility_reasons(self.layout(case), case)
        return reasons

    def not_supported_reasons(self, case: PeerCase) -> list[str]:
        api, why = _para_attn()
        reasons = [] if api is not None else [str(why)]
        return reasons + self.case_reasons(case)

    def build(self, case: PeerCase, group: dist.ProcessGroup | None, rank: int) -> Runner:
        require_distributed(self.name)
        api, why = _para_attn()
        if api is None:
            raise NotImplementedError(why)
        pg = group if group is not None else dist.group.WORLD
        causal = case.causal

        if self.mode == "ring":

            def run_ring(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                out = api.ring_attn_func(
                    q.transpose(1, 2),
                    k.transpose(1, 2),
                    v.transpose(1, 2),
                    is_causal=causal,
                    mesh=pg,
                )
                return out.transpose(1, 2)

            return Runner(run=run_ring)

        attn_func = None
        if case.gqa:
            attn_func = functools.partial(F.scaled_dot_product_attention, enable_gqa=True)

        def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            out = api.ulysses_attn_func(
                q.transpose(1, 2),
                k.transpose(1, 2),
                v.transpose(1, 2),
                is_causal=causal,
                mesh=pg,
                attn_func=attn_func,
            )
            return out.transpose(1, 2)

        return Runner(run=run)
