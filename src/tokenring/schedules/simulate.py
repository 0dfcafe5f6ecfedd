"""Run the schedules of all ranks symbolically, without tensors.

Every slot is a grid of cells: one per (sequence piece, head) it holds. A
cell carries a label, which piece and head its rows are, and for result
slots which token pairs have been accumulated into it: (position on its own
side, position on the other side, head on the other side), counted. A block
contributes the pairs its kernel computes, by its kind alone (all of them; the
causal triangle by local index; or those the mask allows, for a masked call),
so the coverage check compares what kernels would compute with what the mask
allows, token pair by token pair. Point-to-point transfers are matched send-to-receive in
order per (source, destination, lane), collectives in order per (axis group,
lane), as NCCL and gloo do. The simulation fails on:

- a deadlock (every rank waits on data nobody provides);
- mismatched shapes between sender and receiver, or members of a collective
  that disagree on what it is;
- a read of a cell whose receive has not been waited for, or that was never written;
- rows that hold other pieces than the schedule says (``Rows.content``), which is
  where the executor reads every token range from;
- a causal block that is not square or pairs different positions;
- a write to a cell that an unfinished send is still reading;
- a result merged into rows of another piece or head;
- a query head meeting a key/value head it does not use (GQA mapping);
- a move of rows that are not contiguous in storage.

``check_coverage`` then reads each rank's final result cells: the test of "every
token pair the mask allows is computed exactly once, and nothing else", per
head, against a predicate the caller gives. ``check_stream_order`` repeats the
run under NCCL's stream rules.
"""

from __future__ import annotations

from collections import Counter, defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache

from .geometry import PieceTable, canonical
from .ir import (
    GROUP_AXIS,
    AllGather,
    AllToAll,
    Compute,
    Direction,
    Merge,
    Move,
    Post,
    ReduceScatter,
    Rows,
    Schedule,
    SlotKind,
    Transfer,
    Wait,
)
from .masks import BlockKind

__all__ = [
    "Axes",
    "ScheduleError",
    "Simulation",
    "check_coverage",
    "check_stream_order",
    "simulate",
]

Axes = dict[str, list[tuple[int, ...]]]
"""Per axis, its groups: the global ranks of each, in axis order."""


class ScheduleError(AssertionError):
    """A schedule violates a data-flow rule."""


Label = tuple[int, int]  # (global piece, global head of the slot's family): _label_piece


@dataclass
class Cell:
    label: Label | None = None
    contrib: Counter = field(default_factory=Counter)  # (own pos, other pos, other head) -> n
    zero: bool = False  # holds zeros: contributes nothing
    pending_recv: bool = False
    sending: int = 0

    def content(self) -> Cell:
        return Cell(self.label, Counter(self.contrib), self.zero)


@dataclass
class Simulation:
    """Final result cells of every rank (``[cell][head]``) and what each rank sent."""

    query_results: list[list[list[Cell]]]
    kv_results: list[list[list[Cell]] | None]
    sends: list[list[tuple[int, Move, SlotKind]]]


@lru_cache(maxsize=4096)
def _label_piece(table: PieceTable, piece: int) -> int:
    """The piece a cell's label names: replicated pieces (the same positions on several
    ranks, such as queries every rank holds) carry one label, so their results merge."""
    return canonical(table, piece)


def _family_heads(kind: SlotKind, heads_q: int, heads_kv: int) -> int:
    return heads_q if kind in (SlotKind.QUERY, SlotKind.QUERY_RESULT) else heads_kv


def default_axes(world: int) -> Axes:
    return {GROUP_AXIS: [tuple(range(world))]}


class _Run:
    """The state of one symbolic run over all ranks."""

    def __init__(self, schedules: list[Schedule], heads_q: int, heads_kv: int, axes: Axes):
        self.schedules = schedules
        self.hq, self.hkv = heads_q, heads_kv
        self.axes = axes
        self.state: list[dict[str, list[list[Cell]]]] = []
        for sched in schedules:
            slots = {}
            for name, spec in sched.slots.items():
                heads = _family_heads(spec.kind, heads_q, heads_kv) // spec.head_parts
                grid = [[Cell(zero=spec.zeroed) for _ in range(heads)] for _ in range(spec.cells)]
                if spec.local and spec.kind in (SlotKind.QUERY, SlotKind.KV):
                    table = sched.geometry.q if spec.kind is SlotKind.QUERY else sched.geometry.kv
                    for i, piece in enumerate(sched.pieces):
                        for h in range(heads):
                            grid[i][h] = Cell((_label_piece(table, piece), h))
                slots[name] = grid
            self.state.append(slots)
        self.p2p: dict[tuple, deque] = defaultdict(deque)  # (src, dst, axis, lane) -> payloads
        self.collectives: dict[tuple, list[dict[int, tuple]]] = defaultdict(list)
        self.posted_collectives: dict[tuple[int, tuple], int] = Counter()
        self.handles: list[dict[str, list]] = [dict() for _ in schedules]
        self.sends: list[list[tuple[int, Move, SlotKind]]] = [[] for _ in schedules]

    # -- addressing ---------------------------------------------------------
    def members(self, axis: str, rank: int) -> tuple[int, ...]:
        for group in self.axes[axis]:
            if rank in group:
                return group
        raise ScheduleError(f"rank {rank} is in no group of axis {axis!r}")

    def heads(self, rank: int, rows: Rows) -> range:
        grid = self.state[rank][rows.slot]
        held = len(grid[0])
        if held % rows.part.count:
            raise ScheduleError(f"rank {rank}: {rows} splits {held} heads unevenly")
        size = held // rows.part.count
        return range(rows.part.index * size, (rows.part.index + 1) * size)

    def block(self, rank: int, rows: Rows) -> list[list[Cell]]:
        grid = self.state[rank][rows.slot]
        if rows.stop > len(grid):
            raise ScheduleError(f"rank {rank}: {rows} is outside a slot of {len(grid)} cells")
        heads = self.heads(rank, rows)
        return [[grid[i][h] for h in heads] for i in range(rows.start, rows.stop)]

    def contiguous(self, rank: int, rows: Rows) -> None:
        spec = self.schedules[rank].slots[rows.slot]
        if rows.part.count not in (1, spec.groups):
            raise ScheduleError(f"rank {rank}: moves {rows}, not contiguous in its storage")

    def read(self, rank: int, rows: Rows, *, zeros_ok: bool = True) -> list[list[Cell]]:
        cells = self.block(rank, rows)
        table = self.schedules[rank].table(rows)
        for piece, row in zip(rows.pieces, cells):
            if not table.length(piece):
                continue  # no tokens: nothing is read
            for c in row:
                if c.pending_recv:
                    raise ScheduleError(f"rank {rank}: reads {rows} before its receive completed")
                if c.label is None and not (c.zero and zeros_ok):
                    raise ScheduleError(f"rank {rank}: reads {rows}, which was never written")
                if c.label is not None and c.label[0] != _label_piece(table, piece):
                    raise ScheduleError(
                        f"rank {rank}: {rows} says piece {piece} where piece {c.label[0]} is"
                    )
        return cells

    def writable(self, rank: int, rows: Rows) -> list[list[Cell]]:
        cells = self.block(rank, rows)
        for row in cells:
            for c in row:
                if c.sending:
                    raise ScheduleError(f"rank {rank}: overwrites {rows} while a send reads it")
        return cells

    @staticmethod
    def put(rank: int, cell: Cell, content: Cell, fresh: bool) -> None:
        """Write (``fresh``) or accumulate ``content`` into ``cell``. Content with no label
        that is not zeros comes from a piece of no tokens (reads check the others): it
        carries nothing."""
        if content.label is None:
            if fresh:
                cell.label, cell.contrib, cell.zero = None, Counter(), content.zero
            return
        if fresh or (cell.zero and cell.label is None):
            cell.label, cell.contrib, cell.zero = content.label, Counter(content.contrib), False
            return
        if cell.label is None:
            raise ScheduleError(
                f"rank {rank}: accumulates {content.label} into a cell never written"
            )
        if cell.label != content.label:
            raise ScheduleError(
                f"rank {rank}: accumulates {content.label} into a cell holding {cell.label}"
            )
        cell.contrib.update(content.contrib)

    # -- operations ---------------------------------------------------------
    def post(self, rank: int, op: Post) -> None:
        entries = []
        for move in op.moves:
            if isinstance(move, Transfer):
                kind = self.schedules[rank].slots[move.rows.slot].kind
                self.contiguous(rank, move.rows)
                if move.send:
                    cells = self.read(rank, move.rows)
                    for row in cells:
                        for c in row:
                            c.sending += 1
                    payload = [[c.content() for c in row] for row in cells]
                    dst = self.members(move.axis, rank)[move.peer]
                    self.p2p[(rank, dst, move.axis, move.lane)].append((move.rows, kind, payload))
                    self.sends[rank].append((op.step, move, kind))
                    entries.append(("send", move, cells))
                else:
                    for row in self.writable(rank, move.rows):
                        for c in row:
                            c.pending_recv = True
                    entries.append(("recv", move, None))
                continue
            self.contiguous(rank, move.src)
            self.contiguous(rank, move.dst)
            cells = self.read(rank, move.src)
            for row in cells:
                for c in row:
                    c.sending += 1
            for row in self.writable(rank, move.dst):
                for c in row:
                    c.pending_recv = True
            group = self.members(move.axis, rank)
            lane_key = (move.axis, group, move.lane)
            index = self.posted_collectives[(rank, lane_key)]
            self.posted_collectives[(rank, lane_key)] += 1
            log = self.collectives[lane_key]
            while len(log) <= index:
                log.append({})
            payload = [[c.content() for c in row] for row in cells]
            log[index][rank] = (move, payload, len(self.block(rank, move.dst)[0]))
            self.sends[rank].append((op.step, move, self.schedules[rank].slots[move.src.slot].kind))
            entries.append(("collective", move, (cells, lane_key, index)))
        self.handles[rank][op.handle] = entries

    def try_wait(self, rank: int, op: Wait) -> bool:
        entries = self.handles[rank].get(op.handle)
        if entries is None:
            raise ScheduleError(f"rank {rank}: waits on unknown handle {op.handle}")
        need: Counter = Counter(
            (self.members(m.axis, rank)[m.peer], m.axis, m.lane)
            for kind, m, _ in entries
            if kind == "recv"
        )
        for (src, axis, lane), n in need.items():
            if len(self.p2p[(src, rank, axis, lane)]) < n:
                return False
        for kind, _, extra in entries:
            if kind == "collective":
                _, lane_key, index = extra
                if len(self.collectives[lane_key][index]) < len(lane_key[1]):
                    return False
        for kind, move, extra in entries:
            if kind == "send":
                for row in extra:
                    for c in row:
                        c.sending -= 1
            elif kind == "recv":
                self.receive(rank, move)
            else:
                cells, lane_key, index = extra
                for row in cells:
                    for c in row:
                        c.sending -= 1
                self.complete(rank, move, lane_key, self.collectives[lane_key][index])
        del self.handles[rank][op.handle]
        return True

    def receive(self, rank: int, move: Transfer) -> None:
        src = self.members(move.axis, rank)[move.peer]
        rows, src_kind, payload = self.p2p[(src, rank, move.axis, move.lane)].popleft()
        dst_kind = self.schedules[rank].slots[move.rows.slot].kind
        cells = self.block(rank, move.rows)
        if (
            (rows.stop - rows.start, len(payload[0])) != (len(cells), len(cells[0]))
            or src_kind != dst_kind
            or rows.pieces != move.rows.pieces
        ):
            raise ScheduleError(
                f"rank {rank}: receives {move.rows} ({dst_kind.value}) from rank {src} "
                f"but it sent {rows} ({src_kind.value})"
            )
        for row, sent in zip(cells, payload):
            for cell, content in zip(row, sent):
                cell.pending_recv = False
                self.put(rank, cell, content, fresh=True)

    def complete(self, rank: int, move, lane_key: tuple, posts: dict[int, tuple]) -> None:
        """This rank's share of a collective every member has posted."""
        group = lane_key[1]
        mine = posts[rank][0]
        for member in group:
            other = posts[member][0]
            same = (type(other), other.placement, getattr(other, "direction", None)) == (
                type(mine),
                mine.placement,
                getattr(mine, "direction", None),
            ) and getattr(other, "parts", None) == getattr(mine, "parts", None)
            if not same:
                raise ScheduleError(
                    f"collective mismatch on {lane_key[0]} lane {lane_key[2]}: rank {rank} "
                    f"posted {mine}, rank {member} posted {other}"
                )
        me = group.index(rank)
        dst = self.block(rank, mine.dst)
        for row in dst:
            for c in row:
                c.pending_recv = False
        match mine:
            case AllGather():
                for s, member in enumerate(group):
                    payload = posts[member][1]
                    for i, target in enumerate(mine.placement[s]):
                        self._fill(rank, dst[target], payload[i], fresh=True)
            case AllToAll(direction=Direction.SEQ_TO_HEADS):
                parts = self.state[rank][mine.dst.slot][0]
                size = len(parts)
                for s, member in enumerate(group):
                    payload = posts[member][1]
                    lo = mine.parts[me] * size
                    for i, target in enumerate(mine.placement[s]):
                        self._fill(rank, dst[target], payload[i][lo : lo + size], fresh=True)
            case AllToAll(direction=Direction.HEADS_TO_SEQ):
                written: set[int] = set()
                for s, member in enumerate(group):
                    payload = posts[member][1]
                    size = len(payload[0])
                    lo = mine.parts[s] * size
                    fresh = mine.parts[s] not in written
                    written.add(mine.parts[s])
                    for i, source in enumerate(mine.placement[me]):
                        self._fill(rank, dst[i][lo : lo + size], payload[source], fresh=fresh)
            case ReduceScatter():
                for s, member in enumerate(group):
                    payload = posts[member][1]
                    for i, source in enumerate(mine.placement[me]):
                        self._fill(rank, dst[i], payload[source], fresh=s == 0)

    def _fill(self, rank: int, cells: list[Cell], contents: list[Cell], fresh: bool) -> None:
        if len(cells) != len(contents):
            raise ScheduleError(
                f"rank {rank}: a collective delivers {len(contents)} heads into {len(cells)}"
            )
        for cell, content in zip(cells, contents):
            self.put(rank, cell, content, fresh)

    def positions(self, rank: int, rows: Rows) -> list[list[int]]:
        """Global positions of every token of ``rows``, per cell."""
        table = self.schedules[rank].table(rows)
        return [table.positions_of(p) for p in rows.pieces]

    def kernel_pairs(
        self, rank: int, op: Compute, q_pos: list[list[int]], kv_pos: list[list[int]]
    ) -> dict[tuple[int, int], list[tuple[int, int]]]:
        """Per (query cell, key cell): the (query, key) position pairs the kernel call of
        ``op`` computes, by its kind: all; the causal triangle by local index (top-left,
        on a square whose positions agree); or those the mask allows."""
        q_flat = [x for cell in q_pos for x in cell]
        kv_flat = [y for cell in kv_pos for y in cell]
        if op.kind is BlockKind.DIAG and q_flat != kv_flat:
            raise ScheduleError(
                f"rank {rank}: causal block {op.q} x {op.kv} is not a square over the same "
                "positions"
            )
        pairs: dict[tuple[int, int], list[tuple[int, int]]] = {}
        q_start = 0
        for i, q_cell in enumerate(q_pos):
            kv_start = 0
            for k, kv_cell in enumerate(kv_pos):
                found = []
                for a, x in enumerate(q_cell):
                    for b, y in enumerate(kv_cell):
                        if op.kind is BlockKind.FULL:
                            keep = True
                        elif op.kind is BlockKind.DIAG:
                            keep = kv_start + b <= q_start + a
                        else:
                            keep = op.mask.allows(x, y)
                        if keep:
                            found.append((x, y))
                if found:
                    pairs[(i, k)] = found
                kv_start += len(kv_cell)
            q_start += len(q_cell)
        return pairs

    def compute(self, rank: int, op: Compute) -> None:
        q_cells = self.read(rank, op.q, zeros_ok=False)
        kv_cells = self.read(rank, op.kv, zeros_ok=False)
        nq, nkv = len(q_cells[0]), len(kv_cells[0])
        if nq % nkv:
            raise ScheduleError(f"rank {rank}: {nq} query heads against {nkv} key/value heads")
        ratio, group = nq // nkv, self.hq // self.hkv
        q_adds = [[Counter() for _ in row] for row in q_cells]
        kv_adds = [[Counter() for _ in row] for row in kv_cells]
        pairs = self.kernel_pairs(rank, op, self.positions(rank, op.q), self.positions(rank, op.kv))
        for (i, k), found in pairs.items():
            for a, qc in enumerate(q_cells[i]):
                kc = kv_cells[k][a // ratio]
                if kc.label[1] != qc.label[1] // group:
                    raise ScheduleError(
                        f"rank {rank}: query head {qc.label[1]} meets key/value head "
                        f"{kc.label[1]} in {op}"
                    )
                q_add, kv_add = q_adds[i][a], kv_adds[k][a // ratio]
                for x, y in found:
                    q_add[(x, y, kc.label[1])] += 1
                    kv_add[(y, x, qc.label[1])] += 1
        self.accumulate(rank, op.q_out, q_cells, q_adds, op.fresh_q)
        if op.kv_out is not None:
            self.accumulate(rank, op.kv_out, kv_cells, kv_adds, op.fresh_kv)

    def accumulate(self, rank, rows: Rows, sources, adds, fresh: tuple[bool, ...]) -> None:
        target = self.writable(rank, rows)
        if len(target) != len(sources) or len(target[0]) != len(sources[0]):
            raise ScheduleError(f"rank {rank}: result rows {rows} do not match their inputs")
        for t_row, s_row, a_row, new in zip(target, sources, adds, fresh):
            for cell, src, add in zip(t_row, s_row, a_row):
                self.put(rank, cell, Cell(src.label, add), new)

    def merge(self, rank: int, op: Merge) -> None:
        src = self.read(rank, op.src)
        dst = self.writable(rank, op.dst)
        table = self.schedules[rank].table(op.dst)
        for piece, d_row, s_row in zip(op.dst.pieces, dst, src):
            if not table.length(piece):
                continue  # no tokens: nothing merges
            for cell, content in zip(d_row, s_row):
                if cell.label is None and not cell.zero:
                    raise ScheduleError(f"rank {rank}: merges into unwritten rows {op.dst}")
                self.put(rank, cell, content, fresh=False)

    def run(self) -> Simulation:
        pc = [0] * len(self.schedules)
        while any(pc[r] < len(s.ops) for r, s in enumerate(self.schedules)):
            progressed = False
            for rank, sched in enumerate(self.schedules):
                while pc[rank] < len(sched.ops):
                    op = sched.ops[pc[rank]]
                    match op:
                        case Wait():
                            if not self.try_wait(rank, op):
                                break
                        case Post():
                            self.post(rank, op)
                        case Compute():
                            self.compute(rank, op)
                        case Merge():
                            self.merge(rank, op)
                    pc[rank] += 1
                    progressed = True
            if not progressed:
                stuck = {
                    r: s.ops[pc[r]] for r, s in enumerate(self.schedules) if pc[r] < len(s.ops)
                }
                raise ScheduleError(f"deadlock: ranks wait forever at {stuck}")
        for rank, handles in enumerate(self.handles):
            if handles:
                raise ScheduleError(f"rank {rank}: moves never waited for: {sorted(handles)}")
        leftovers = {k: len(v) for k, v in self.p2p.items() if v}
        if leftovers:
            raise ScheduleError(f"sends never received: {leftovers}")
        for lane_key, log in self.collectives.items():
            for index, posts in enumerate(log):
                if len(posts) != len(lane_key[1]):
                    raise ScheduleError(f"collective {index} on {lane_key} not posted by all")
        return Simulation(
            query_results=[self.state[r][s.query_result] for r, s in enumerate(self.schedules)],
            kv_results=[
                self.state[r][s.kv_result] if s.kv_result else None
                for r, s in enumerate(self.schedules)
            ],
            sends=self.sends,
        )


def simulate(
    schedules: list[Schedule], heads_q: int = 2, heads_kv: int = 1, axes: Axes | None = None
) -> Simulation:
    """Execute ``schedules`` (one per rank) symbolically; raise ScheduleError on a hazard."""
    axes = axes if axes is not None else default_axes(len(schedules))
    return _Run(schedules, heads_q, heads_kv, axes).run()


def check_coverage(
    sim: Simulation,
    schedules: list[Schedule],
    allowed: Callable[[int, int], bool],
    heads_q: int = 2,
    heads_kv: int = 1,
) -> None:
    """Raise ScheduleError unless every rank's results hold, per head, every token pair
    ``allowed(query position, key position)`` admits exactly once and nothing else.

    Query side: the result cell of query piece ``p`` and head ``h`` must hold, for every
    position ``x`` of ``p`` and every key position ``y`` allowed, ``(x, y, h // group)``
    once. Key side (backward): the cell of key piece ``k`` and key/value head ``g``,
    for every ``y`` of ``k``, ``(y, x, h)`` for every allowed query position ``x`` and
    query head ``h`` that uses ``g``. ``allowed`` should be written independently of
    the library's masks (it is the reference).
    """
    group = heads_q // heads_kv
    for rank, sched in enumerate(schedules):
        geometry = sched.geometry
        sides = [(sim.query_results[rank], geometry.q, geometry.kv, False)]
        if sim.kv_results[rank] is not None:
            sides.append((sim.kv_results[rank], geometry.kv, geometry.q, True))
        for cells, own, other, kv_side in sides:
            for piece, row in zip(sched.pieces, cells):
                if not own.length(piece):
                    continue  # a piece of no tokens holds no result
                for head, cell in enumerate(row):
                    expected: Counter = Counter()
                    for x in own.positions_of(piece):
                        for y in other.positions:
                            if not (allowed(y, x) if kv_side else allowed(x, y)):
                                continue
                            if kv_side:
                                for h in range(head * group, (head + 1) * group):
                                    expected[(x, y, h)] += 1
                            else:
                                expected[(x, y, head // group)] += 1
                    if expected and cell.label != (_label_piece(own, piece), head):
                        raise ScheduleError(
                            f"rank {rank}: the result of piece {piece}, head {head} holds "
                            f"{cell.label}"
                        )
                    if cell.contrib != expected:
                        missing = expected - cell.contrib
                        extra = cell.contrib - expected
                        raise ScheduleError(
                            f"rank {rank}: {'key' if kv_side else 'query'} piece {piece}, "
                            f"head {head}: missing {sorted(missing)[:4]}, extra or repeated "
                            f"{sorted(extra)[:4]}"
                        )


def check_stream_order(schedules: list[Schedule], axes: Axes | None = None) -> None:
    """Raise ScheduleError if the schedules can deadlock under NCCL's execution model.

    ``simulate`` treats moves like gloo (posted operations progress on their
    own). On NCCL each lane is a stream that runs its groups in order; a group
    starts once the compute stream has reached the point where it was posted,
    and completes only when every peer holding the matching operation has
    started it too (for a collective: every member of its axis group). A
    ``Wait`` makes the compute stream wait for its groups. A receive-only group
    queued ahead of the send its peer is waiting for deadlocks here although
    gloo would run it.
    """
    axes = axes if axes is not None else default_axes(len(schedules))

    def members(axis: str, rank: int) -> tuple[int, ...]:
        return next(g for g in axes[axis] if rank in g)

    # Per rank: items on each stream, with their dependencies (item ids) and, for
    # transfer groups, their point-to-point operations or their collective.
    items: list[list[dict]] = []
    for rank, sched in enumerate(schedules):
        rank_items: list[dict] = []
        last_compute: int | None = None
        groups: dict[str, list[int]] = {}
        for op in sched.ops:
            if isinstance(op, Post):
                lanes = sorted({(m.axis, m.lane) for m in op.moves})
                for axis, lane in lanes:
                    moves = [m for m in op.moves if (m.axis, m.lane) == (axis, lane)]
                    rank_items.append(
                        {
                            "stream": (axis, lane),
                            "deps": [] if last_compute is None else [last_compute],
                            "p2p": [
                                (members(axis, rank)[m.peer], m.send)
                                for m in moves
                                if isinstance(m, Transfer)
                            ],
                            "collective": not isinstance(moves[0], Transfer),
                            "label": f"{op.handle} ({axis} lane {lane})",
                        }
                    )
                    groups.setdefault(op.handle, []).append(len(rank_items) - 1)
            else:
                deps = groups.pop(op.handle, []) if isinstance(op, Wait) else []
                if last_compute is not None:
                    deps = [*deps, last_compute]
                rank_items.append(
                    {"stream": "compute", "deps": deps, "p2p": [], "collective": False, "label": op}
                )
                last_compute = len(rank_items) - 1
        items.append(rank_items)
    partners: dict[tuple[int, int], set[tuple[int, int]]] = defaultdict(set)
    # The k-th send r -> p on a lane meets the k-th receive at p from r on that lane.
    queues: dict[tuple, deque] = defaultdict(deque)
    collectives: dict[tuple, list[list[tuple[int, int]]]] = defaultdict(list)
    counts: Counter = Counter()
    for rank, rank_items in enumerate(items):
        for idx, item in enumerate(rank_items):
            for peer, is_send in item["p2p"]:
                src, dst = (rank, peer) if is_send else (peer, rank)
                queues[(src, dst, item["stream"], is_send)].append((rank, idx))
            if item["collective"]:
                axis, lane = item["stream"]
                key = (axis, members(axis, rank), lane)
                k = counts[(rank, key)]
                counts[(rank, key)] += 1
                log = collectives[key]
                while len(log) <= k:
                    log.append([])
                log[k].append((rank, idx))
    for (src, dst, stream, is_send), sends in list(queues.items()):
        if not is_send:
            continue
        recvs = queues.get((src, dst, stream, False), deque())
        if len(recvs) != len(sends):
            raise ScheduleError(f"{stream}: {len(sends)} sends {src}->{dst}, {len(recvs)} receives")
        for s, r in zip(sends, recvs):
            partners[s].add(r)
            partners[r].add(s)
    for key, log in collectives.items():
        for k, posts in enumerate(log):
            if len(posts) != len(key[1]):
                raise ScheduleError(f"collective {k} on {key}: posted by {len(posts)} members")
            for a in posts:
                partners[a].update(p for p in posts if p != a)
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
        if (rank, idx) not in done and (item["p2p"] or item["collective"])
    ]
    if stuck:
        raise ScheduleError("deadlock under NCCL stream order: " + "; ".join(stuck[:6]))
