"""Run the schedules of all ranks symbolically, without tensors.

Every slot cell (one sub-chunk of one slot) carries a label: which shard's
rows it holds and, for result slots, which (key chunk, relation) pairs have
been accumulated into it. Transfers are matched send-to-receive in order per
(source, destination, lane), as NCCL and gloo do. The simulation fails on:

- a deadlock (every rank waits on a transfer nobody posts);
- mismatched transfer shapes between sender and receiver;
- a read of a cell whose receive has not been waited for, or that was never written;
- a write to a cell that an unfinished send is still reading;
- a result merged into rows of a different owner.

``coverage`` then says, for each rank's final results, which pairs were
accumulated how many times: the test of "every pair the mask allows is
computed exactly once, and nothing else".
"""

from __future__ import annotations

from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field

from ..layouts import chunk_ids
from ..options import Layout
from .blocks import Rel, pair_relation
from .ir import Compute, Merge, Post, Rows, Schedule, SlotKind, Transfer, Wait

__all__ = ["ScheduleError", "Simulation", "expected_coverage", "simulate"]


class ScheduleError(AssertionError):
    """A schedule violates a data-flow rule."""


@dataclass
class Cell:
    row: tuple[int, int] | None = None  # (owner group rank, sub-chunk)
    contrib: Counter = field(default_factory=Counter)  # (global chunk, Rel) -> count
    pending_recv: bool = False
    sending: int = 0

    def copy_content(self) -> Cell:
        return Cell(self.row, Counter(self.contrib))


@dataclass
class Simulation:
    """Final cell contents of each rank's result slots, and bytes moved per lane."""

    query_results: list[list[Cell]]
    kv_results: list[list[Cell] | None]
    sends: list[list[tuple[int, Transfer, SlotKind]]]


def _cells(state: dict[str, list[Cell]], rows: Rows) -> list[Cell]:
    return state[rows.slot][rows.start : rows.stop]


def simulate(schedules: list[Schedule], layout: Layout) -> Simulation:
    """Execute ``schedules`` (one per group rank) symbolically; raise ScheduleError on a hazard."""
    world = len(schedules)
    state: list[dict[str, list[Cell]]] = []
    for rank, sched in enumerate(schedules):
        slots = {name: [Cell(), Cell()] for name in sched.slots}
        for name, spec in sched.slots.items():
            if spec.local and spec.kind in (SlotKind.QUERY, SlotKind.KV):
                slots[name] = [Cell((rank, 0)), Cell((rank, 1))]
        state.append(slots)

    queues: dict[tuple[int, int, int], deque] = defaultdict(deque)  # (src, dst, lane)
    handles: list[dict[str, list]] = [dict() for _ in range(world)]
    pc = [0] * world
    sends: list[list[tuple[int, Transfer, SlotKind]]] = [[] for _ in range(world)]

    def chunk(label: tuple[int, int]) -> int:
        return chunk_ids(layout, world, label[0])[label[1]]

    def read(rank: int, rows: Rows) -> list[Cell]:
        cells = _cells(state[rank], rows)
        for c in cells:
            if c.pending_recv:
                raise ScheduleError(f"rank {rank}: reads {rows} before its receive was waited for")
            if c.row is None:
                raise ScheduleError(f"rank {rank}: reads {rows}, which was never written")
        return cells

    def writable(rank: int, rows: Rows) -> list[Cell]:
        cells = _cells(state[rank], rows)
        for c in cells:
            if c.sending:
                raise ScheduleError(f"rank {rank}: overwrites {rows} while a send reads it")
        return cells

    def post(rank: int, op: Post) -> None:
        entries = []
        for t in op.transfers:
            kind = schedules[rank].slots[t.rows.slot].kind
            if t.send:
                cells = read(rank, t.rows)
                for c in cells:
                    c.sending += 1
                payload = [c.copy_content() for c in cells]
                sends[rank].append((op.step, t, kind))
                queues[(rank, t.peer, t.lane)].append((t.rows, kind, payload))
                entries.append(("send", t, cells))
            else:
                for c in writable(rank, t.rows):
                    c.pending_recv = True
                entries.append(("recv", t, None))
        handles[rank][op.handle] = entries

    def try_wait(rank: int, op: Wait) -> bool:
        entries = handles[rank].get(op.handle)
        if entries is None:
            raise ScheduleError(f"rank {rank}: waits on unknown handle {op.handle}")
        # A receive completes once the matching send is queued; NCCL and gloo
        # match in order per (source, destination, lane).
        recvs = [t for kind, t, _ in entries if kind == "recv"]
        need: Counter = Counter((t.peer, t.lane) for t in recvs)
        for (peer, lane), n in need.items():
            if len(queues[(peer, rank, lane)]) < n:
                return False
        for kind, t, cells in entries:
            if kind == "send":
                for c in cells:
                    c.sending -= 1
                continue
            rows, src_kind, payload = queues[(t.peer, rank, t.lane)].popleft()
            dst_kind = schedules[rank].slots[t.rows.slot].kind
            if (rows.start, rows.stop) != (t.rows.start, t.rows.stop) or src_kind != dst_kind:
                raise ScheduleError(
                    f"rank {rank}: receives {t.rows} ({dst_kind.value}) from rank {t.peer} "
                    f"but it sent {rows} ({src_kind.value})"
                )
            for cell, content in zip(_cells(state[rank], t.rows), payload):
                cell.row, cell.contrib, cell.pending_recv = content.row, content.contrib, False
        del handles[rank][op.handle]
        return True

    def accumulate(
        rank: int, rows: Rows, labels: list, adds: list[Counter], fresh: tuple[bool, ...]
    ) -> None:
        for cell, label, add, new in zip(writable(rank, rows), labels, adds, fresh):
            if new:
                cell.row, cell.contrib = label, Counter()
            elif cell.row != label:
                raise ScheduleError(
                    f"rank {rank}: accumulates rows of {label} into {rows} holding {cell.row}"
                )
            cell.contrib.update(add)

    def compute(rank: int, op: Compute) -> None:
        q_cells, kv_cells = read(rank, op.q), read(rank, op.kv)
        if op.causal and len(q_cells) != len(kv_cells):
            raise ScheduleError(f"rank {rank}: causal block {op.q} x {op.kv} is not square")
        q_adds = [Counter() for _ in q_cells]
        kv_adds = [Counter() for _ in kv_cells]
        for i, qc in enumerate(q_cells):
            for k, kc in enumerate(kv_cells):
                rel = Rel.FULL if not op.causal or i > k else Rel.DIAG if i == k else Rel.NONE
                if rel is Rel.NONE:
                    continue
                if rel is Rel.DIAG and qc.row != kc.row:
                    raise ScheduleError(f"rank {rank}: causal diagonal pairs different chunks")
                q_adds[i][(chunk(kc.row), rel)] += 1
                kv_adds[k][(chunk(qc.row), rel)] += 1
        accumulate(rank, op.q_out, [c.row for c in q_cells], q_adds, op.fresh_q)
        if op.kv_out is not None:
            accumulate(rank, op.kv_out, [c.row for c in kv_cells], kv_adds, op.fresh_kv)

    def merge(rank: int, op: Merge) -> None:
        src = read(rank, op.src)
        accumulate(
            rank, op.dst, [c.row for c in src], [c.contrib for c in src], (False,) * len(src)
        )

    while any(pc[r] < len(schedules[r].ops) for r in range(world)):
        progressed = False
        for rank, sched in enumerate(schedules):
            while pc[rank] < len(sched.ops):
                op = sched.ops[pc[rank]]
                if isinstance(op, Wait):
                    if not try_wait(rank, op):
                        break
                elif isinstance(op, Post):
                    post(rank, op)
                elif isinstance(op, Compute):
                    compute(rank, op)
                else:
                    merge(rank, op)
                pc[rank] += 1
                progressed = True
        if not progressed:
            stuck = {
                r: schedules[r].ops[pc[r]] for r in range(world) if pc[r] < len(schedules[r].ops)
            }
            raise ScheduleError(f"deadlock: ranks wait forever at {stuck}")
    for rank in range(world):
        if handles[rank]:
            raise ScheduleError(f"rank {rank}: transfers never waited for: {sorted(handles[rank])}")
    leftovers = {k: len(v) for k, v in queues.items() if v}
    if leftovers:
        raise ScheduleError(f"sends never received: {leftovers}")
    return Simulation(
        query_results=[state[r][s.query_result] for r, s in enumerate(schedules)],
        kv_results=[
            state[r][s.kv_result] if s.kv_result else None for r, s in enumerate(schedules)
        ],
        sends=sends,
    )


def expected_coverage(world: int, causal: bool, chunk: int, *, kv_side: bool = False) -> Counter:
    """The (other chunk, relation) multiset a result row must hold: each allowed pair once.

    On the query side (``kv_side=False``) ``chunk`` is a query chunk and the
    others are key chunks; on the key side the roles swap.
    """
    out: Counter = Counter()
    for other in range(2 * world):
        rel = (
            pair_relation(other, chunk, causal) if kv_side else pair_relation(chunk, other, causal)
        )
        if rel is not Rel.NONE:
            out[(other, rel)] += 1
    return out


def check_stream_order(schedules: list[Schedule]) -> None:
    """Raise ScheduleError if the schedules can deadlock under NCCL's execution model.

    ``simulate`` treats transfers like gloo (posted operations progress on
    their own). On NCCL each lane is a stream that runs its groups in order;
    a group starts once the compute stream has reached the point where it was
    posted, and its transfers complete only when every peer group holding
    the matching operation has started too. A ``Wait`` makes the compute
    stream wait for its groups. A receive-only group queued ahead of the send
    its peer is waiting for deadlocks here although gloo would run it.
    """
    # Per rank: items on each stream. An item is a dict with its stream, its
    # dependencies (item ids) and, for transfer groups, its operations.
    items: list[list[dict]] = []
    for sched in schedules:
        rank_items: list[dict] = []
        last_compute: int | None = None
        groups: dict[str, list[int]] = {}
        for op in sched.ops:
            if isinstance(op, Post):
                for lane in sorted({t.lane for t in op.transfers}):
                    rank_items.append(
                        {
                            "stream": f"lane{lane}",
                            "deps": [] if last_compute is None else [last_compute],
                            "ops": [(t.peer, t.send) for t in op.transfers if t.lane == lane],
                            "lane": lane,
                            "label": f"{op.handle} (lane {lane})",
                        }
                    )
                    groups.setdefault(op.handle, []).append(len(rank_items) - 1)
            else:
                deps = groups.pop(op.handle, []) if isinstance(op, Wait) else []
                if last_compute is not None:
                    deps = [*deps, last_compute]
                rank_items.append({"stream": "compute", "deps": deps, "ops": [], "label": op})
                last_compute = len(rank_items) - 1
        items.append(rank_items)
    # Pair every send with its receive: the k-th send r -> p on a lane meets the
    # k-th receive at p from r on that lane.
    queues: dict[tuple[int, int, int, bool], deque] = defaultdict(deque)
    for rank, rank_items in enumerate(items):
        for idx, item in enumerate(rank_items):
            for peer, is_send in item["ops"]:
                src, dst = (rank, peer) if is_send else (peer, rank)
                queues[(src, dst, item["lane"], is_send)].append((rank, idx))
    partners: dict[tuple[int, int], set[tuple[int, int]]] = defaultdict(set)
    for (src, dst, lane, is_send), sends in list(queues.items()):
        if not is_send:
            continue
        recvs = queues.get((src, dst, lane, False), deque())
        if len(recvs) != len(sends):
            raise ScheduleError(
                f"lane {lane}: {len(sends)} sends {src}->{dst}, {len(recvs)} receives"
            )
        for s, r in zip(sends, recvs):
            partners[s].add(r)
            partners[r].add(s)
    started: set[tuple[int, int]] = set()
    done: set[tuple[int, int]] = set()
    progress = True
    while progress:
        progress = False
        for rank, rank_items in enumerate(items):
            for idx, item in enumerate(rank_items):
                key = (rank, idx)
                if key in done:
                    continue
                earlier = [i for i in range(idx) if rank_items[i]["stream"] == item["stream"]]
                if any((rank, i) not in done for i in earlier):
                    continue
                if any((rank, d) not in done for d in item["deps"]):
                    continue
                if key not in started:
                    started.add(key)
                    progress = True
                if all(p in started for p in partners.get(key, ())):
                    done.add(key)
                    progress = True
    stuck = [
        f"rank {rank}: {item['label']}"
        for rank, rank_items in enumerate(items)
        for idx, item in enumerate(rank_items)
        if (rank, idx) not in done and item["ops"]
    ]
    if stuck:
        raise ScheduleError("deadlock under NCCL stream order: " + "; ".join(stuck[:6]))
