"""The benchmark cases of docs/benchmarking.md, and their arithmetic.

GPU cases use head_dim 128 and bf16; on CPU (gloo) the same cases run at a
reduced size (fewer heads, smaller head_dim, shorter sequences, float32) so
that ``tokenring bench`` finishes in minutes and still checks every path.

Two cases carry a mask: ``llama3-gqa-docs`` packs documents whose lengths are
drawn from a log-normal distribution (median 1,500 tokens on GPU, a long tail,
the same draw for a length on every run: ``packed_documents``), as pre-training
and fine-tuning batches are; ``llama3-gqa-window`` is a causal sliding window
of 4,096 tokens (Mistral's), 64 on CPU. Their work counts the pairs the mask
allows (``allowed_pairs``).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from itertools import pairwise

from tokenring.schedules.masks import Mask
from tokenring.schedules.segments import Segment

__all__ = ["PASSES", "Case", "allowed_pairs", "cases_for", "flops", "packed_documents"]

PASSES = ("forward", "forward_backward")


@dataclass(frozen=True)
class Case:
    name: str
    heads_q: int
    heads_kv: int
    causal: bool
    layout: str
    seq: int
    head_dim: int
    dtype: str
    batch: int = 1
    documents: tuple[int, ...] = ()
    """Document offsets of the packed sequence (``cu_seqlens``); empty: one document."""
    window: tuple[int, int] = (-1, -1)
    """A sliding window ``(left, right)``; -1 unbounded."""

    @property
    def mask(self) -> Mask:
        return Mask(self.causal, self.window, self.documents)

    @property
    def mask_options(self) -> dict:
        """The keywords of ``tr.attention`` that give the case's mask beyond causality."""
        found: dict = {}
        if self.documents:
            found["cu_seqlens"] = list(self.documents)
        if self.window != (-1, -1):
            found["window_size"] = self.window
        return found

    @property
    def shard_options(self) -> dict:
        """The keywords of ``tr.shard`` the case's layout needs (its documents)."""
        return {"cu_seqlens": list(self.documents)} if self.documents else {}

    @property
    def label(self) -> str:
        return (
            f"{self.name} S={self.seq // 1024}K"
            if self.seq >= 1024
            else f"{self.name} S={self.seq}"
        )


_GPU_SPECS = [
    ("llama2-mha", 32, 32, True, "zigzag", [8192, 16384, 32768, 65536, 131072]),
    ("llama3-gqa", 32, 8, True, "zigzag", [8192, 16384, 32768, 65536, 131072]),
    ("dit-mha", 24, 24, False, "contiguous", [4096, 16384, 65536]),
    ("llama3-gqa-docs", 32, 8, True, "zigzag", [32768, 65536, 131072]),
    ("llama3-gqa-window", 32, 8, True, "contiguous", [32768, 65536, 131072]),
    # Wan 2.1 14B's self-attention: 21 latent frames of 30 x 52 (480p) and 45 x 80 (720p)
    # patches; its cross-attention to the text stays local (not benchmarked)
    ("wan-video", 40, 40, False, "contiguous", [32760, 75600]),
]
_CPU_SPECS = [
    ("llama2-mha", 4, 4, True, "zigzag", [256, 512]),
    ("llama3-gqa", 4, 1, True, "zigzag", [256, 512]),
    ("dit-mha", 3, 3, False, "contiguous", [256, 512]),
    ("llama3-gqa-docs", 4, 1, True, "zigzag", [512]),
    ("llama3-gqa-window", 4, 1, True, "contiguous", [512]),
    ("wan-video", 4, 4, False, "contiguous", [510]),
]
CASE_NAMES = [name for name, *_ in _GPU_SPECS]

MEDIAN_DOCUMENT = {"cuda": 1500, "cpu": 48}
"""The median document length of ``llama3-gqa-docs``."""
WINDOW = {"cuda": (4095, 0), "cpu": (63, 0)}
"""The window of ``llama3-gqa-window``."""


def packed_documents(seq: int, median: int) -> tuple[int, ...]:
    """Document offsets ``[0, ..., seq]``: lengths drawn from a log-normal distribution
    (``median``, sigma 1: a quarter of the documents under half the median, one in a
    hundred over ten times it), at least 16 tokens, the last cut to fit; seeded by
    ``seq``, so a length always gets the same packing."""
    rng = random.Random(seq)
    bounds = [0]
    while bounds[-1] < seq:
        length = max(16, round(median * math.exp(rng.gauss(0.0, 1.0))))
        bounds.append(min(seq, bounds[-1] + length))
    return tuple(bounds)


def allowed_pairs(case: Case) -> int:
    """The (query, key) pairs the case's mask lets attend, per batch row and head."""
    documents = case.documents or (0, case.seq)
    left, right = case.window
    right = 0 if case.causal else right
    total = 0
    for a, b in pairwise(documents):
        total += Segment(0, b - a, ((0, b - a),), left, right).pairs
    return total


def cases_for(device_type: str, names: list[str] | None, seqs: list[int] | None) -> list[Case]:
    """The cases to run on ``device_type``, optionally restricted by name and length."""
    gpu = device_type == "cuda"
    specs = _GPU_SPECS if gpu else _CPU_SPECS
    out = []
    device = "cuda" if gpu else "cpu"
    for name, hq, hkv, causal, layout, lengths in specs:
        if names and name not in names:
            continue
        for seq in seqs or lengths:
            mask: dict = {}
            if name.endswith("-docs"):
                mask["documents"] = packed_documents(seq, MEDIAN_DOCUMENT[device])
            if name.endswith("-window"):
                mask["window"] = WINDOW[device]
            dim, dtype = (128, "bfloat16") if gpu else (32, "float32")
            out.append(Case(name, hq, hkv, causal, layout, seq, dim, dtype, **mask))
    return out


def flops(case: Case, pass_: str) -> float:
    """Floating-point operations of one call on the whole sequence (causal counts half
    the square; under documents or a window, the pairs the mask allows; the backward
    costs 2.5 forwards, as flash-attention counts it)."""
    forward = 4.0 * case.batch * case.seq * case.seq * case.heads_q * case.head_dim
    if case.mask_options:
        forward = 4.0 * case.batch * allowed_pairs(case) * case.heads_q * case.head_dim
    elif case.causal:
        forward /= 2
    return forward * (3.5 if pass_ == "forward_backward" else 1.0)
