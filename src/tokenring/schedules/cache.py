"""Calls against a KV cache sharded over the ranks, as schedules over one geometry.

A cache call (``tokenring.KVCache.attend``) attends a chunk of ``L`` new tokens per
sequence to everything cached before it and, by the mask, to the chunk itself. Every
cached token precedes every new one, so a new query sees all of them under a causal
mask: the cache needs to know how many tokens it holds, never where they sat in the
sequence. Its geometry (``cache_geometry``) therefore uses positions where only the
order matters:

- rank ``r``'s cache is key/value piece ``2r``, ``cell`` tokens at ``[r cell, (r+1)
  cell)``, *ragged*: each batch row holds a valid prefix whose length is known only
  when the call runs (``Geometry.ragged``);
- the chunk sits after every cache, at ``[P cell, P cell + L)``, split as
  ``torch.tensor_split`` splits it (the contiguous layout): rank ``r``'s part is
  key/value piece ``2r + 1``, staged next to its cache;
- the queries: *sharded*, rank ``r`` holds its part of the chunk as query piece
  ``2r + 1``; *replicated*, every rank holds the whole chunk as its piece ``2r + 1``
  (pieces of the same positions, one piece's data: ``geometry.canonical``). Query
  piece ``2r`` is empty.

Schedules: with replicated queries (decode, or a model whose other layers are not
sharded) nothing needs to travel but the partial results: ``local_schedule`` computes
each rank's partial against its own cache and chunk part, all-gathers the partials
(out and LSE in float32) and merges them in rank order, so every rank holds bitwise the
same result. Each rank receives ``(P - 1) B L H_q (D + 1) 4`` bytes, whatever the
cache's length (docs/algorithms.md, "KV cache"). With sharded queries every strategy
runs its own schedule over this geometry: TokenRing passes the queries (the cache never
moves), ring passes the caches, all-gather gathers them, Ulysses reshards by heads.
Pure: no process state.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

from ..options import Layout, Pass, Strategy
from . import build_schedule
from .builder import ScheduleBuilder
from .geometry import Geometry, PieceTable, Span, split_sizes
from .ir import AllGather, Precision, Rows, Schedule, SlotKind, SlotSpec
from .key import ScheduleKey
from .masks import Mask

__all__ = ["CacheKey", "cache_geometry", "cache_schedule", "chunk_parts", "local_schedule"]

LOCAL = "local"
"""The name of the replicated-query schedule (every strategy runs it)."""


def chunk_parts(chunk: int, world: int) -> tuple[Span, ...]:
    """Each rank's part ``[a, b)`` of a chunk of ``chunk`` tokens, as
    ``torch.tensor_split`` cuts it (the first ``chunk mod world`` ranks hold one more)."""
    parts, start = [], 0
    for size in split_sizes(chunk, world):
        parts.append((start, start + size))
        start += size
    return tuple(parts)


@lru_cache(maxsize=256)
def cache_geometry(
    world: int, cell: int, chunk: int, *, sharded: bool, ragged_chunk: bool = False,
    appended: bool = False,
) -> Geometry:  # fmt: skip
    """The pieces of a cache call (see the module docstring): caches of ``cell`` tokens
    per rank, a chunk of ``chunk`` new tokens, its queries ``sharded`` or replicated.
    ``ragged_chunk``: the chunk's rows hold fewer real tokens than ``chunk`` (padding
    that a query may not see: without a causal mask), so its parts are ragged too.
    ``appended``: the new tokens joined the caches before the call (where every new
    query sees every new key: one token, or no causal mask), so the chunk has no
    key/value pieces of its own (empty)."""
    start = world * cell
    parts = [(start + a, start + b) for a, b in chunk_parts(chunk, world)]
    kv_runs: list[tuple[Span, ...]] = []
    q_runs: list[tuple[Span, ...]] = []
    for r, (a, b) in enumerate(parts):
        kv_runs += [((r * cell, (r + 1) * cell),), ((a, a) if appended else (a, b),)]
        q_runs += [((a, a),), ((a, b),) if sharded else ((start, start + chunk),)]
    ragged = {2 * r for r in range(world)}
    if ragged_chunk and not appended:
        ragged |= {2 * r + 1 for r in range(world)}
    return Geometry(_table(q_runs), _table(kv_runs), frozenset(ragged))


def _table(runs: list[tuple[Span, ...]]) -> PieceTable:
    lengths = [sum(b - a for a, b in piece) for piece in runs]
    return PieceTable(PieceTable.from_lengths(lengths).bounds, tuple(runs))


@dataclass(frozen=True)
class CacheKey:
    """Everything that decides one rank's schedule for one cache call."""

    strategy: Strategy
    world: int
    rank: int
    cell: int
    """Tokens of each rank's cache piece (at least the most any row holds there)."""
    chunk: int
    sharded: bool
    causal: bool
    ragged_chunk: bool = False
    heads_q: int = 1
    heads_kv: int = 1
    appended: bool = False
    """The new tokens are in the caches already (``cache_geometry``)."""

    @property
    def geometry(self) -> Geometry:
        return cache_geometry(
            self.world, self.cell, self.chunk, sharded=self.sharded,
            ragged_chunk=self.ragged_chunk, appended=self.appended,
        )  # fmt: skip

    @property
    def mask(self) -> Mask:
        return Mask(self.causal)


def local_schedule(key: CacheKey) -> Schedule:
    """Replicated queries: this rank's partial against its own cache and chunk part, the
    partials all-gathered, merged in rank order (the same bits on every rank)."""
    P, r = key.world, key.rank
    mine = (2 * r, 2 * r + 1)
    slots = {
        "q": SlotSpec(SlotKind.QUERY, local=True),
        "kv": SlotSpec(SlotKind.KV, local=True),
        "acc": SlotSpec(SlotKind.QUERY_RESULT, Precision.ACCUM),
    }
    if P > 1:
        slots["partials"] = SlotSpec(SlotKind.QUERY_RESULT, Precision.ACCUM, cells=P)
        slots["out"] = SlotSpec(SlotKind.QUERY_RESULT, Precision.ACCUM, zeroed=True)
    b = ScheduleBuilder(LOCAL, r, P, mine, slots, key.geometry, key.mask)
    b.own_block(q_out="acc", kv_out=None)
    if P == 1:
        return b.build("acc", None)
    if not b.wrote("acc"):  # no keys here (an empty cache, no part of the chunk)
        b.slots["acc"] = replace(slots["acc"], zeroed=True)
    everyone = tuple(2 * s + 1 for s in range(P))
    gather = AllGather(
        Rows("acc", mine, 1, 2), Rows.whole("partials", everyone),
        tuple((s,) for s in range(P)), 0,
    )  # fmt: skip
    b.wait(b.post("partials", 0, [gather]), 0)
    out = Rows("out", mine, 1, 2)
    b.identity(out)
    for s in range(P):  # rank order, on every rank
        b.merge(Rows("partials", everyone, s, s + 1), out, 1)
    return b.build("out", None)


def cache_schedule(key: CacheKey) -> Schedule:
    """The forward schedule of one rank for one cache call: ``local_schedule`` for
    replicated queries, else the strategy's own schedule over the cache's geometry."""
    if not key.sharded:
        return local_schedule(key)
    return build_schedule(
        ScheduleKey(
            key.strategy,
            Layout.CONTIGUOUS,
            key.world,
            key.rank,
            key.geometry,
            key.mask,
            Pass.FORWARD,
            key.heads_q,
            key.heads_kv,
            stream_tail=False,
        )
    )
