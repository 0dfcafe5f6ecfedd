"""Ranks that behave alike, so that the planner simulates one of each kind.

USP over ``U x R`` ranks runs ``U`` copies of one ring, one per Ulysses member ``u``: with
equal pieces, rank ``(r, u)`` does what ``(r, 0)`` does on other heads. Where the links
look the same from every member too (each device its own ports and NIC, Ulysses groups
inside nodes), turning every ``u`` into ``u + 1`` maps the whole run onto itself, so every
rank of an orbit starts and ends each operation at the same time as its representative
``(r, 0)``. The simulator then runs the representatives only (``timing.py``): a flow loads
each resource class with what it loads on all the class's members together (what the
copies of all flows load on one member), so max-min sharing gives every flow the rate it
has in the full run. ``U`` times fewer schedules to build and ranks to simulate; the
planner's tests check that the predictions equal the full simulation's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..call.description import CallDescription
from ..options import Strategy
from ..schedules.geometry import mesh_pieces
from .topology import Links

__all__ = ["RankSymmetry", "usp_symmetry"]


@dataclass(frozen=True)
class RankSymmetry:
    """A cyclic group of rank permutations that leaves a run unchanged: ``generator[i]`` is
    rank ``i``'s image, ``order`` its order; every orbit has ``order`` ranks, and its
    smallest is its representative."""

    generator: tuple[int, ...]
    order: int
    rename: Callable[[str], str] = field(compare=False, repr=False)
    """A resource's name as its class's (the least name of its orbit)."""

    @property
    def representatives(self) -> tuple[int, ...]:
        return tuple(r for r in range(len(self.generator)) if r == self.representative(r))

    def representative(self, rank: int) -> int:
        found, x = rank, rank
        for _ in range(self.order - 1):
            x = self.generator[x]
            found = min(found, x)
        return found


def usp_symmetry(call: CallDescription, links: Links) -> RankSymmetry | None:
    """A rotation of the members of every Ulysses group of a USP call (all of them, or
    within blocks the links keep apart), where its pieces and ``links`` make it a
    symmetry; None where they do not (the planner then simulates every rank)."""
    U, world = call.ulysses, call.world
    if call.strategy is not Strategy.USP or U < 2 or world % U:
        return None
    R = world // U
    table = call.table
    for r in range(R):  # equal pieces across each Ulysses group, piece by piece
        lengths = {tuple(table.length(p) for p in mesh_pieces(call.layout, R, U, r, u))
                   for u in range(U)}  # fmt: skip
        if len(lengths) > 1:
            return None
    for d in (d for d in range(U, 1, -1) if U % d == 0):  # the largest that the links allow
        found = _rotation(links, R, U, d)
        if found is not None:
            return found
    return None


def _rotation(links: Links, R: int, U: int, d: int) -> RankSymmetry | None:
    """``u -> u + 1`` within each block of ``d`` consecutive Ulysses members (all of them
    when ``d = U``; blocks keep a Ulysses group that spans nodes inside each node), if the
    links allow it."""
    generator = tuple(r * U + (u // d) * d + (u % d + 1) % d for r in range(R) for u in range(U))
    powers = [tuple(range(R * U))]
    for _ in range(d - 1):
        powers.append(tuple(generator[x] for x in powers[-1]))
    renames = [links.relabelled(p) for p in powers]
    if any(f is None for f in renames):
        return None

    names: dict[str, str] = {}

    def rename(resource: str) -> str:
        found = names.get(resource)
        if found is None:
            found = names[resource] = min(f(resource) for f in renames)
        return found

    return RankSymmetry(generator, d, rename)
