"""The planner: predicts, from the schedules the executor runs, how long each strategy
takes on a machine, and picks the fastest (docs/scaling.md).

``tokenring.plan(...)`` prices one call; ``strategy="auto"`` in ``tokenring.attention``
asks it once per call shape; ``tokenring plan`` is the command line.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from ..call.description import CallDescription
from ..call.packing import read_window
from ..options import Layout, parse_enum
from .choose import Candidate, PlanReport, plan_call
from .machine import auto_topology, calibrate_command, load_topology, topology_for
from .presets import PRESETS, preset, preset_names
from .timing import Prediction, StepCost, simulate_timing
from .topology import Topology

__all__ = [
    "PRESETS",
    "Candidate",
    "PlanReport",
    "Prediction",
    "StepCost",
    "Topology",
    "auto_topology",
    "calibrate_command",
    "load_topology",
    "plan",
    "preset",
    "preset_names",
    "simulate_timing",
    "topology_for",
]

# every spelling ``plan`` takes for a dtype (the short, the torch name, the torch dtype)
DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    torch.bfloat16: torch.bfloat16,
    torch.float16: torch.float16,
    torch.float32: torch.float32,
}


def plan(
    *,
    topology: str | Path | Topology,
    gpus: int,
    seq: int,
    heads_q: int,
    heads_kv: int | None = None,
    head_dim: int,
    batch: int = 1,
    causal: bool = False,
    backward: bool = False,
    dtype: str | torch.dtype = "bf16",
    layout: str | Layout | None = None,
    usp: bool = True,
    documents: list[int] | tuple[int, ...] | None = None,
    window: tuple[int, int] | None = None,
    workers: int = 1,
    exhaustive: bool = False,
    progress: Callable[[Candidate], None] | None = None,
) -> PlanReport:
    """Rank every strategy (and USP split, with ``usp``) for one attention call of ``seq``
    tokens over ``gpus`` devices of ``topology`` (a preset name, a file, or a Topology);
    ``backward``: forward plus backward; ``dtype``: ``"bf16"`` / ``"bfloat16"``,
    ``"fp16"`` / ``"float16"``, ``"fp32"`` / ``"float32"`` or a torch dtype. ``layout``
    defaults to zigzag when causal (what balances the work), else contiguous.
    ``.choice`` is the fastest, ``.explain()`` says why, ``.to_dict()`` is what
    ``tokenring plan --json`` prints. ``documents``: the lengths of documents packed in
    the sequence (summing to ``seq``); ``window``: ``(left, right)`` as ``window_size``
    (docs/algorithms.md, section 1): blocks they leave empty are neither computed nor
    sent, and a block they cut is priced as the sub-calls it runs as. ``workers``:
    processes to simulate candidates in side by side (forked where the platform forks;
    the predictions are the same; ``tokenring plan`` uses every CPU it may).
    ``exhaustive``: simulate every candidate; by default a large candidate whose single
    rank already takes longer than the fastest simulated one is reported with that bound
    (``Candidate.at_least_ms``) instead (the choice is the same). ``progress``: told of
    each candidate as it is priced, bounded or refused (both layouts' when the layout is
    left open)."""
    for name, value in (
        ("gpus", gpus),
        ("seq", seq),
        ("heads_q", heads_q),
        ("head_dim", head_dim),
        ("batch", batch),
        ("workers", workers),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    heads_kv = heads_q if heads_kv is None else heads_kv
    if heads_kv < 1 or heads_q % heads_kv:
        raise ValueError(f"heads_q ({heads_q}) must be a multiple of heads_kv ({heads_kv})")
    if dtype not in DTYPES:
        raise ValueError(
            f"unknown dtype {dtype!r}; valid values are 'bf16' or 'bfloat16', 'fp16' or "
            "'float16', 'fp32' or 'float32', or the torch dtype"
        )
    if layout is not None:
        layout = parse_enum(Layout, layout, "layout")
    cu_seqlens: tuple[int, ...] = ()
    if documents is not None:
        if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in documents):
            raise ValueError(f"documents must be positive int lengths, got {documents!r}")
        if sum(documents) != seq:
            raise ValueError(f"documents must add up to seq={seq}, got {sum(documents)}")
        cu_seqlens = tuple(itertools.accumulate(documents, initial=0))
    window_size, problem = read_window(window, bool(causal))
    if problem:
        raise ValueError(problem)
    machine = load_topology(topology, gpus)

    def report(lay: Layout | None) -> PlanReport:
        call = CallDescription.of_shape(
            world=gpus, seq_len=seq, heads_q=heads_q, heads_kv=heads_kv, head_dim=head_dim,
            batch=batch, dtype=DTYPES[dtype], layout=lay, causal=bool(causal),
            wants_grad=bool(backward), window_size=window_size, cu_seqlens=cu_seqlens,
        )  # fmt: skip
        return plan_call(
            machine, call, backward=bool(backward), with_usp=usp, workers=workers,
            exhaustive=exhaustive, progress=progress,
        )  # fmt: skip

    if layout is not None or (documents is None and window is None):
        return report(layout)
    # a mask: which layout suits it is part of the question (a short window or many
    # short documents favour contiguous shards; long causal documents, zigzag)
    reports = [report(lay) for lay in Layout]
    priced = [r for r in reports if r.priced]
    best = min(priced or reports, key=lambda r: r.best.predicted_ms if r.priced else 0.0)
    layouts = tuple((r.layout, r.best.name, r.best.predicted_ms) for r in priced)
    return replace(best, layouts=layouts)
