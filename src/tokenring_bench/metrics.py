"""How the demo and the benchmark score a result against its reference."""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["max_over_ranks", "rel_err"]


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max |actual - expected| / max |expected|``; any NaN in ``actual`` counts as infinite."""
    a, e = actual.double(), expected.double()
    if torch.isnan(a).any():
        return float("inf")
    return ((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()


def max_over_ranks(value: float, device: torch.device) -> float:
    """The largest ``value`` any rank of the default group holds."""
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()
