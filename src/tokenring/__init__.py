"""tokenring: exact attention over sequences sharded across GPUs.

``import tokenring as tr`` then ``tr.token_ring_attn(q, k, v, causal=True, layout="zigzag")``
on each rank's shard (see ``tr.shard``). docs/ explains the algorithms.
"""

from __future__ import annotations

from .api import attention, ring_attn, token_ring_attn
from .comm import destroy_lanes, setup_lanes
from .kernels import kernel_names
from .layouts import shard, unshard
from .options import Layout, Strategy

__all__ = [
    "Layout",
    "Strategy",
    "attention",
    "destroy_lanes",
    "kernel_names",
    "ring_attn",
    "setup_lanes",
    "shard",
    "token_ring_attn",
    "unshard",
]

__version__ = "0.1.0"
