"""What a schedule depends on: strategy, layout, world, rank, geometry, mask, pass, heads."""

from __future__ import annotations

from dataclasses import dataclass

from ..options import Layout, Pass, Strategy
from .geometry import Geometry, piece_table
from .masks import Mask

__all__ = ["ScheduleKey"]


@dataclass(frozen=True)
class ScheduleKey:
    """Everything that decides one rank's schedule for one pass.

    ``layout`` says which pieces each rank holds; ``geometry`` their token ranges
    (which pieces are empty, and how they meet under ``mask``). Head counts matter
    only to strategies that split heads (Ulysses replicates key/value heads when
    there are fewer than ranks; all-gather moves keys and values in head groups);
    TokenRing and ring ignore them. For the Ulysses x ring hybrid (``usp``)
    ``world`` is the size of the sequence-parallel mesh, ``ulysses`` the size of
    its Ulysses axis (the ring axis has ``world // ulysses`` members), ``rank`` is
    ``ring_rank * ulysses + ulysses_rank``, and ``ring_impl`` says which ring runs
    across.
    """

    strategy: Strategy
    layout: Layout
    world: int
    rank: int
    geometry: Geometry
    mask: Mask
    pass_: Pass
    heads_q: int = 1
    heads_kv: int = 1
    ulysses: int = 1
    ring_impl: Strategy = Strategy.TOKENRING
    stream_tail: bool = True
    """TokenRing: return the last step's partial in halves (see ``tokenring.py``)."""

    @classmethod
    def of_sequence(
        cls, strategy: Strategy, layout: Layout, world: int, rank: int, seq_len: int,
        causal: bool, pass_: Pass, **rest,
    ) -> ScheduleKey:  # fmt: skip
        """Self-attention over a sequence of ``seq_len`` tokens in ``layout``."""
        table = piece_table(layout, seq_len, world)
        return cls(
            strategy, layout, world, rank, Geometry.self_attention(table), Mask(causal), pass_,
            **rest,
        )  # fmt: skip
