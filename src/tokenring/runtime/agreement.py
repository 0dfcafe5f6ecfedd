"""The first call of a kind agrees across ranks: every rank raises the same error.

Each rank describes its call (``tokenring.call.checks``) and collects its problems
instead of raising; once per distinct description and group, over the group's first
lane, the ranks exchange a digest of (description, whether it has problems): 17
bytes in one all-gather. Where every digest is the same and no rank has problems,
they agree; otherwise they exchange (description, problems, local length) whole, and
every rank raises the same ``ValueError``: every rank's problems, or how their calls
differ. A packed batch changes the description every step, so this round is on the
path of every fresh packing (``benchmarks/packing_host.py``).
Raising on one rank only would leave the others waiting in a transfer that never
comes. The exchange waits at most the runtime's timeout (``tokenring.configure``):
a rank that never makes the call makes the others raise ``TransferFailed`` then.
See docs/errors.md.
"""

from __future__ import annotations

import hashlib
import pickle
from dataclasses import fields
from datetime import timedelta

import torch

from ..call.description import CallDescription, Options
from ..execution.comm import Lanes
from ..execution.operations import TransferFailed
from .state import BoundedCache

__all__ = ["agree"]

LANE = 0


def _wait(work, lanes: Lanes, timeout: timedelta) -> None:
    """Wait for ``work``: on gloo at most ``timeout``; on NCCL the lane's watchdog (made
    with the timeout in force then) bounds it."""
    if lanes.backend == "gloo":
        work.wait(timeout)
    else:
        work.wait()


def exchange(obj: object, lanes: Lanes, timeout: timedelta) -> list:
    """Every member's ``obj`` (picklable), in group rank order: two all-gathers (sizes,
    then the padded bytes) on the group's first lane, each waiting at most ``timeout``."""
    device = torch.device("cuda", torch.cuda.current_device()) if lanes.backend == "nccl" else None
    payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8).to(device)
    members = len(lanes.global_ranks)
    size = torch.tensor([payload.numel()], dtype=torch.int64, device=device)
    sizes = torch.empty(members, dtype=torch.int64, device=device)
    _wait(lanes.all_gather_single(sizes, size, LANE), lanes, timeout)
    lengths = sizes.tolist()
    longest = max(lengths)
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[: payload.numel()] = payload
    gathered = torch.empty(members * longest, dtype=torch.uint8, device=device)
    _wait(lanes.all_gather_single(gathered, padded, LANE), lanes, timeout)
    shares = gathered.cpu().view(members, longest)
    return [pickle.loads(bytes(shares[r, :n].tolist())) for r, n in enumerate(lengths)]


def _digest(description: CallDescription, problems: tuple[str, ...]) -> bytes:
    """16 bytes that equal descriptions share (pickled alike: equal values built the
    same way; two equal ones that pickle apart only cost the whole exchange), and one
    that says whether this rank has problems."""
    found = hashlib.blake2b(pickle.dumps(description), digest_size=16).digest()
    return found + (b"\x01" if problems else b"\x00")


def _all_same(digest: bytes, lanes: Lanes, timeout: timedelta) -> bool:
    """Whether every member's ``digest`` equals this one and none has problems: one
    all-gather of a fixed size, so every member decides the same."""
    device = torch.device("cuda", torch.cuda.current_device()) if lanes.backend == "nccl" else None
    mine = torch.frombuffer(bytearray(digest), dtype=torch.uint8).to(device)
    members = len(lanes.global_ranks)
    gathered = torch.empty(members * mine.numel(), dtype=torch.uint8, device=device)
    _wait(lanes.all_gather_single(gathered, mine, LANE), lanes, timeout)
    rows = gathered.cpu().view(members, mine.numel())
    return bool((rows == rows[0]).all()) and not bool(rows[:, -1].any())


def _plain(value: object) -> object:
    return getattr(value, "value", value)


def _differences(reference: CallDescription, other: CallDescription, rank: int) -> list[str]:
    """How rank ``rank``'s description differs from rank 0's, field by field (the
    options' fields included)."""
    pairs = [(f.name, getattr(reference, f.name), getattr(other, f.name))
             for f in fields(CallDescription) if f.name != "options"]  # fmt: skip
    pairs += [(f.name, getattr(reference.options, f.name), getattr(other.options, f.name))
              for f in fields(Options)]  # fmt: skip
    return [
        f"{name}: rank 0 has {_plain(a)!r}, rank {rank} has {_plain(b)!r}"
        for name, a, b in pairs
        if a != b
    ]


def _who(ranks: list[int], members: int) -> str:
    if len(ranks) == members:
        return "every rank"
    return f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"


def _problems(reports: list[tuple[CallDescription, tuple[str, ...], int]]) -> str:
    """Every rank's problems, each once, with the ranks that have it ("every rank" when
    all do), in the order of the first rank that has each."""
    ranks_of: dict[str, list[int]] = {}
    for rank, (_, problems, _) in enumerate(reports):
        for problem in problems:
            ranks_of.setdefault(problem, []).append(rank)
    return "; ".join(f"{_who(r, len(reports))}: {p}" for p, r in ranks_of.items())


def _disagreement(reports: list[tuple[CallDescription, tuple[str, ...], int]]) -> str:
    """Why the ranks' calls differ, in words: unequal shards without ``seq_len`` get
    their own message (the lengths each rank holds, and what to pass)."""
    lengths = [length for _, _, length in reports]
    reference = reports[0][0]
    if len(set(lengths)) > 1 and reference.options.seq_len == len(lengths) * lengths[0]:
        given = [d.options for d, _, _ in reports]
        if all(o.seq_len == len(lengths) * n for o, n in zip(given, lengths)):
            return (
                f"the shards differ in length across ranks ({', '.join(map(str, lengths))} "
                f"tokens in group rank order): shards of unequal length need the global "
                f"length, seq_len={sum(lengths)}, on every rank"
            )
    for rank, (description, _, _) in enumerate(reports):
        diffs = _differences(reference, description, rank)
        if diffs:
            return "inputs differ across ranks: " + "; ".join(diffs)
    return ""


def agree(
    description: CallDescription,
    problems: tuple[str, ...],
    local_length: int,
    lanes: Lanes | None,
    agreed: BoundedCache,
    timeout: timedelta,
) -> None:
    """Raise the same ValueError on every rank if any rank's call is wrong or they differ.

    Exchanges this rank's report over ``lanes`` (the group's; None on one rank) unless
    ``description`` is in ``agreed`` (the group's memory of descriptions every rank
    agreed on, which it joins). ``TransferFailed`` when not every rank takes part
    within ``timeout``.
    """
    if lanes is None:
        if problems:
            raise ValueError("; ".join(problems))
        return
    if not problems and description in agreed:
        return
    rank = lanes.rank
    try:
        if _all_same(_digest(description, problems), lanes, timeout):
            agreed.put(description, True)
            return
        reports = exchange((description, problems, local_length), lanes, timeout)
    except RuntimeError as err:
        raise TransferFailed(
            f"tokenring: rank {rank} of {len(lanes.global_ranks)}: the first call of its kind "
            f"({description.summary() if not problems else 'with problems'}) waits for every "
            f"rank of the group to describe its call, and not every rank did within the "
            f"timeout of {timeout.total_seconds():g} s (a rank that does not make this call, "
            f"or makes it much later; see tokenring.configure): {err}"
        ) from err
    found = _problems(reports)
    if found:
        raise ValueError(found)
    disagreement = _disagreement(reports)
    if disagreement:
        raise ValueError(disagreement)
    agreed.put(description, True)
