"""Benchmark peers: the same attention problem run by other implementations.

``tokenring bench`` times these next to TokenRing and ring attention and checks
each answer against the single-device result. Every peer follows one
calling convention (``base.Peer``): ``not_supported_reasons(case)``,
``prepare`` (untimed), ``forward`` / ``forward_backward`` (timed), ``unshard``.
What each peer is, which layout it shards with and what it cannot do:
docs/peers.md.
"""

from __future__ import annotations

from .base import Peer, PeerCase, PeerState, Runner, layout_positions
from .para_attn_peer import PARA_ATTN_MODES, ParaAttention
from .torch_cp import ROTATE_METHODS, TORCH_CP_KERNELS, TorchContextParallel
from .yunchang_peer import YUNCHANG_ATTN_TYPES, YUNCHANG_MODES, YunchangAttention

__all__ = [
    "PARA_ATTN_MODES",
    "ROTATE_METHODS",
    "TORCH_CP_KERNELS",
    "YUNCHANG_ATTN_TYPES",
    "YUNCHANG_MODES",
    "ParaAttention",
    "Peer",
    "PeerCase",
    "PeerState",
    "Runner",
    "TorchContextParallel",
    "YunchangAttention",
    "default_peers",
    "layout_positions",
]


def default_peers() -> list[Peer]:
    """The peers ``tokenring bench`` lists, in table order.

    Includes configurations that cannot run where flash_attn is missing (for
    example yunchang with flash_attn), so the table shows them with the reason.
    """
    return [
        TorchContextParallel("allgather"),
        TorchContextParallel("alltoall"),
        YunchangAttention("ulysses"),
        YunchangAttention("ring"),
        YunchangAttention("zigzag"),
        YunchangAttention("zigzag", attn_type="fa"),
        ParaAttention("ulysses"),
        ParaAttention("ring"),
    ]
