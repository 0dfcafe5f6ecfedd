"""tokenring: exact attention over sequences sharded across GPUs.

``import tokenring as tr`` then ``tr.token_ring_attn(q, k, v, causal=True, layout="zigzag")``
on each rank's shard (see ``tr.shard``); ``tr.attention(..., strategy=...)`` for any
strategy, or ``strategy="auto"`` for the planner's pick (``tr.plan`` says why). The
library needs torch alone. docs/ explains the algorithms.
"""

from __future__ import annotations

from . import ops  # noqa: F401  (registers the custom ops that torch.compile calls)
from .api import allgather_attn, attention, ring_attn, token_ring_attn, ulysses_attn
from .executor import TransferFailed
from .graphs import CapturedCall
from .kernels import kernel_names
from .layer import SequenceParallelAttention
from .layouts import shard, unshard
from .mesh import sp_mesh
from .options import JointStrategy, Layout, RingImpl, Strategy
from .planner import PlanReport, plan
from .runtime import Settings, configure, destroy_lanes, runtime, setup_lanes

__all__ = [
    "CapturedCall",
    "JointStrategy",
    "Layout",
    "PlanReport",
    "RingImpl",
    "SequenceParallelAttention",
    "Settings",
    "Strategy",
    "TransferFailed",
    "allgather_attn",
    "attention",
    "configure",
    "destroy_lanes",
    "kernel_names",
    "plan",
    "ring_attn",
    "runtime",
    "setup_lanes",
    "shard",
    "sp_mesh",
    "token_ring_attn",
    "ulysses_attn",
    "unshard",
]

__version__ = "0.2.0"
