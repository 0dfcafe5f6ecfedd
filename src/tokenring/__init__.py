"""tokenring: exact attention over sequences sharded across GPUs.

``import tokenring as tr`` then ``tr.token_ring_attn(q, k, v, causal=True, layout="zigzag")``
on each rank's shard (see ``tr.shard``); ``tr.attention(..., strategy=...)`` for any
strategy, or ``strategy="auto"`` for the planner's pick (``tr.plan`` says why). The
library needs torch alone. docs/ explains the algorithms; docs/architecture.md the
packages (``api`` the front door, ``call`` a call's description, ``schedules`` the
strategies as data, ``execution`` running them, ``runtime`` the state kept between
calls, ``planner`` the cost model).
"""

from __future__ import annotations

from .api.attention import allgather_attn, attention, ring_attn, token_ring_attn, ulysses_attn
from .api.cache import KVCache
from .api.capture import CapturedCall
from .api.layer import SequenceParallelAttention
from .api.meshes import sp_mesh
from .api.sharding import shard, unshard
from .execution.kernels import kernel_names
from .execution.operations import TransferFailed
from .options import JointStrategy, Layout, RingImpl, Strategy
from .planner import PlanReport, plan
from .runtime import Settings, configure, destroy_lanes, runtime, setup_lanes

__all__ = [
    "CapturedCall",
    "JointStrategy",
    "KVCache",
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
