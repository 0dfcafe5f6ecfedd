"""The benchmark cases of docs/benchmarking.md, and their arithmetic.

GPU cases use head_dim 128 and bf16; on CPU (gloo) the same cases run at a
reduced size (fewer heads, smaller head_dim, shorter sequences, float32) so
that ``tokenring bench`` finishes in minutes and still checks every path.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PASSES", "Case", "cases_for", "flops"]

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
]
_CPU_SPECS = [
    ("llama2-mha", 4, 4, True, "zigzag", [256, 512]),
    ("llama3-gqa", 4, 1, True, "zigzag", [256, 512]),
    ("dit-mha", 3, 3, False, "contiguous", [256, 512]),
]


def cases_for(device_type: str, names: list[str] | None, seqs: list[int] | None) -> list[Case]:
    """The cases to run on ``device_type``, optionally restricted by name and length."""
    gpu = device_type == "cuda"
    specs = _GPU_SPECS if gpu else _CPU_SPECS
    out = []
    for name, hq, hkv, causal, layout, lengths in specs:
        if names and name not in names:
            continue
        for seq in seqs or lengths:
            out.append(
                Case(
                    name,
                    hq,
                    hkv,
                    causal,
                    layout,
                    seq,
                    128 if gpu else 32,
                    "bfloat16" if gpu else "float32",
                )
            )
    return out


def flops(case: Case, pass_: str) -> float:
    """Floating-point operations of one call on the whole sequence (causal counts half
    the square; the backward costs 2.5 forwards, as flash-attention counts it)."""
    forward = 4.0 * case.batch * case.seq * case.seq * case.heads_q * case.head_dim
    if case.causal:
        forward /= 2
    return forward * (3.5 if pass_ == "forward_backward" else 1.0)
