"""Run every rank's schedule against a topology in simulated time.

Each rank has a compute stream and one stream per lane, as the executor does
on CUDA (docs/architecture.md):

- the compute stream runs, in program order, block kernels and merges, and the
  ``Wait`` of each handle (it stalls until that movement has completed);
- a ``Post`` is issued where it stands in program order: its lane's stream
  waits for the compute stream's work issued before it (the data it sends),
  and for the lane's previous post (NCCL runs a communicator's work in order);
- with ``comm_yields_to_compute`` a post whose stream becomes ready while a
  block kernel runs, or as one starts, waits for that kernel to end (the
  kernel holds the SMs its NCCL kernel needs), and then goes first;
- point-to-point transfers are matched k-th send to k-th receive per
  (source, destination, lane); a transfer flows once both sides have started;
  a collective flows once every member has started, as one flow per ordered
  pair of members;
- a kernel runs ``1 + overlap_slowdown`` times slower while its device moves
  data (NCCL's kernels take SMs and memory bandwidth from it);
- flows share every resource of their routes max-min fairly (``Links``), a
  point-to-point flow is capped at its route's ``p2p_cap_gbps``, and a flow
  completes its route's latency after its last byte.

Host time is not simulated on asynchronous devices: there the host queues work
ahead of the GPU in steady state, so a call takes the longer of the simulated
device time and its host time (``Prediction.ms``). On a synchronous device
(CPU) every operation's host cost sits on the compute stream, and waits block.
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

from ..call.description import CallDescription
from ..execution.timeline import Span
from ..options import Pass
from ..schedules.ir import Compute, Merge, Post, Schedule, Transfer, Wait
from .costs import collective_pair_bytes, compute_seconds, merge_seconds, rows_bytes
from .symmetry import RankSymmetry
from .topology import Topology

__all__ = ["Prediction", "StepCost", "lower_bound_ms", "simulate_timing"]

Axes = dict[str, list[tuple[int, ...]]]
EPS = 1e-12


@dataclass(frozen=True)
class StepCost:
    """One step of one rank: its wall time, the compute in it, the exposed wait for data,
    and (synchronous devices) the host time spent in it."""

    step: int
    ms: float
    compute_ms: float
    comm_ms: float
    host_ms: float = 0.0


@dataclass(frozen=True)
class Prediction:
    """A simulated call. Asynchronous devices: ``ms`` is the longer of device time and
    host time (the host queues ahead); synchronous ones: the device time, which
    includes the host time."""

    ms: float
    device_ms: float
    host_ms: float
    slowest_rank: int
    steps: tuple[StepCost, ...]
    timeline: tuple | None = field(repr=False, compare=False)
    """What ``spans`` is drawn from: (transfer spans, each rank's stream, pass); None
    when the simulation kept only the numbers (``replay`` runs it again)."""
    synchronous: bool = False
    replay: Callable[[], Prediction] | None = field(default=None, repr=False, compare=False)
    """Runs the same simulation again keeping its timeline (the planner keeps none: at
    large P a timeline holds P^2 entries, and choosing needs only ``steps``)."""

    @cached_property
    def spans(self) -> tuple[Span, ...]:
        """Every rank's kernels and transfers, by rank and start (made when asked, by
        simulating again where the timeline was not kept)."""
        timeline = self.timeline
        if timeline is None:
            if self.replay is None:
                raise ValueError("this prediction was made without its timeline")
            timeline = self.replay().timeline
        comm, streams, phase = timeline
        kernels = [
            Span(rank, i.step, "compute", i.label, i.start * 1e3, i.end * 1e3, 0, phase)
            for rank, stream in enumerate(streams)
            for i in stream
            if i.kind == "kernel"
        ]
        return tuple(sorted(comm + kernels, key=lambda s: (s.rank, s.start_ms)))

    @property
    def compute_ms(self) -> float:
        return sum(s.compute_ms for s in self.steps)

    @property
    def comm_ms(self) -> float:
        return sum(s.comm_ms for s in self.steps)

    @property
    def dominant(self) -> str:
        """Which term decides the time: ``host``, ``compute`` or ``communication``."""
        if not self.synchronous and self.host_ms >= self.device_ms:
            return "host"
        terms = {"compute": self.compute_ms, "communication": self.comm_ms}
        if self.synchronous:
            terms["host"] = self.host_ms
        return max(terms, key=terms.get)


@dataclass(eq=False)
class _Item:
    """One entry of a compute stream: a kernel (``seconds``), a wait, or a post marker."""

    kind: str  # "kernel", "host" (synchronous devices), "wait", "post"
    step: int
    seconds: float = 0.0
    label: str = ""
    handle: str = ""
    post: _Post | None = None
    start: float = -1.0
    end: float = -1.0
    remaining: float = 0.0  # seconds of work left at full speed (a running kernel)
    speed: float = 1.0
    since: float = 0.0  # when ``remaining`` was last brought up to date
    version: int = 0


@dataclass(eq=False)
class _Post:
    rank: int
    handle: str
    lane: tuple[str, int]
    step: int
    ready: float | None = None  # when its stream may start (compute work before it done)
    behind: _Item | None = None  # the kernel it yielded to
    start: float | None = None
    moves: tuple = ()
    pending: int = 0  # flows (and collectives) not yet complete
    done: float | None = None
    nbytes: float = 0.0


@dataclass(eq=False)
class _Flow:
    """Bytes on their way; each byte loads resource ``r`` by ``load[r]`` (1 on every hop
    of a point-to-point route; a collective member's sends to all others are one flow
    whose bytes spread over the routes to each)."""

    ends: tuple[int, ...]  # the ranks whose devices move its data
    load: dict[str, float]
    cap: float | None
    remaining: float
    latency: float
    owners: list  # posts, or a collective record, completed when the flow is
    rate: float = 0.0
    since: float = 0.0  # when ``remaining`` was last brought up to date
    version: int = 0


@dataclass(eq=False)
class _Collective:
    members: tuple[int, ...]
    posts: dict[int, _Post] = field(default_factory=dict)
    moves: dict[int, object] = field(default_factory=dict)
    pending: int = 0


class _Sim:
    def __init__(
        self,
        schedules: list[Schedule | None],
        axes: Axes,
        pass_: Pass,
        call: CallDescription,
        topo: Topology,
        placement: list[int],
        symmetry: RankSymmetry | None = None,
    ) -> None:
        self.schedules, self.axes, self.pass_, self.call = schedules, axes, pass_, call
        self.symmetry = symmetry
        # the ranks simulated: all, or one of each orbit of ``symmetry``
        self.simulated = [s is not None for s in schedules]
        self.topo, self.device, self.placement = topo, topo.device, placement
        self.sync = topo.device.synchronous
        self.host = topo.device.host
        self.now = 0.0
        self.streams: list[list[_Item]] = []
        self.cursor: list[int] = [0] * len(schedules)
        self.running: list[_Item | None] = [None] * len(schedules)
        self.lanes: list[dict[tuple[str, int], list[_Post]]] = [{} for _ in schedules]
        self.lane_cursor: list[dict[tuple[str, int], int]] = [{} for _ in schedules]
        self.deferred = [0] * len(schedules)  # posts that yielded to a kernel, not started
        self.handles: list[dict[str, list[_Post]]] = [{} for _ in schedules]
        self.p2p: dict[tuple, tuple[list, list]] = {}  # (src, dst, axis, lane) -> sends, recvs
        self.collectives: dict[tuple, list[_Collective]] = defaultdict(list)
        self.coll_count: dict[tuple, int] = defaultdict(int)
        self.flows: set[_Flow] = set()
        self.on: dict[str, set[_Flow]] = defaultdict(set)  # resource -> flows crossing it
        self.changed: set[str] = set()  # resources whose flows changed since rates were set
        self.moving = [0] * len(schedules)  # flows each rank's device takes part in
        self.events: list[tuple] = []  # (time, order, kind, object, version)
        self.order = 0
        self.wake = {r for r, s in enumerate(schedules) if s is not None}  # to look at now
        self.host_seconds = [0.0] * len(schedules)
        self.spans: list[Span] = []
        # each rank's group on each axis (looked up for every move)
        self.groups = _groups_by_rank(axes)
        self.routes: dict[tuple[int, int], object] = {}
        for rank, sched in enumerate(schedules):
            self.streams.append(self._stream(rank, sched) if sched is not None else [])

    # -- building ------------------------------------------------------------
    def _stream(self, rank: int, sched: Schedule) -> list[_Item]:
        h, items = self.host, []
        host = h.call_us * 1e-6
        for op in sched.ops:
            cost = _host_seconds(op, h)
            items += self._host(op.step, cost)
            match op:
                case Compute():
                    seconds = compute_seconds(sched, op, self.pass_, self.call, self.device)
                    label = f"{op.q_owner if op.q_owner is not None else '*'}x" + (
                        f"{op.kv_owner if op.kv_owner is not None else '*'}"
                    )
                    items.append(_Item("kernel", op.step, seconds, label))
                case Merge():
                    seconds = merge_seconds(sched, op, self.pass_, self.call, self.device)
                    items.append(_Item("kernel", op.step, seconds, "merge"))
                case Post():
                    lanes = {(m.axis, m.lane) for m in op.moves}
                    for lane in sorted(lanes):
                        moves = tuple(m for m in op.moves if (m.axis, m.lane) == lane)
                        post = _Post(rank, op.handle, lane, op.step, moves=moves)
                        self.lanes[rank].setdefault(lane, []).append(post)
                        self.lane_cursor[rank][lane] = 0
                        self.handles[rank].setdefault(op.handle, []).append(post)
                        items.append(_Item("post", op.step, post=post))
                case Wait():
                    items.append(_Item("wait", op.step, handle=op.handle))
            host += cost
        self.host_seconds[rank] = host
        return items

    def _host(self, step: int, seconds: float) -> list[_Item]:
        """On a synchronous device an operation's host time is spent on its stream."""
        return [_Item("host", step, seconds, "host")] if self.sync else []

    def _route(self, a: int, b: int):
        """The route from rank ``a``'s device to rank ``b``'s (remembered per pair)."""
        key = (self.placement[a], self.placement[b])
        found = self.routes.get(key)
        if found is None:
            found = self.routes[key] = self.topo.links.route(*key)
        return found

    def _global(self, rank: int, axis: str, peer: int) -> int:
        return self._members(rank, axis)[peer]

    def _members(self, rank: int, axis: str) -> tuple[int, ...]:
        group = self.groups[axis].get(rank)
        if group is None:
            raise ValueError(f"rank {rank} is in no group of axis {axis!r}")
        return group

    # -- posts and flows ------------------------------------------------------
    def _start_post(self, post: _Post) -> None:
        post.start = self.now
        sched = self.schedules[post.rank]
        for move in post.moves:
            if isinstance(move, Transfer):
                peer = self._global(post.rank, move.axis, move.peer)
                if not self.simulated[peer]:
                    raise AssertionError(f"a transfer with rank {peer}, which is not simulated")
                src, dst = (post.rank, peer) if move.send else (peer, post.rank)
                key = (src, dst, move.axis, move.lane)
                sends, recvs = self.p2p.setdefault(key, ([], []))
                post.pending += 1
                if move.send:
                    nbytes = rows_bytes(sched, move.rows, self.pass_, self.call)
                    post.nbytes += nbytes
                    sends.append((post, nbytes))
                else:
                    recvs.append(post)
                if sends and recvs:
                    (sender, nbytes), receiver = sends.pop(0), recvs.pop(0)
                    self._flow(src, dst, nbytes, [sender, receiver])
            else:
                members = self._members(post.rank, move.axis)
                key = (members, move.axis, move.lane)
                index = self.coll_count[(post.rank, key)]
                self.coll_count[(post.rank, key)] += 1
                records = self.collectives[key]
                while len(records) <= index:
                    records.append(_Collective(members))
                coll = records[index]
                coll.posts[post.rank], coll.moves[post.rank] = post, move
                post.pending += 1
                if len(coll.posts) == sum(self.simulated[m] for m in members):
                    self._start_collective(coll)

    def _start_collective(self, coll: _Collective) -> None:
        n = len(coll.members)
        for a in coll.members:
            if a not in coll.moves:  # not simulated: a copy of a member that is
                continue
            move, sched = coll.moves[a], self.schedules[a]
            nbytes = collective_pair_bytes(sched, move, self.pass_, self.call)
            coll.posts[a].nbytes += nbytes * (n - 1)
            if nbytes <= 0 or n == 1:
                continue
            load, latency = _member_load(self._route, a, coll.members)
            coll.pending += 1
            self._add(_Flow((a,), self._classes(load), None, nbytes * (n - 1), latency, [coll]))
        if coll.pending == 0:
            for post in coll.posts.values():
                self._finish(post)

    def _flow(self, src: int, dst: int, nbytes: float, owners: list) -> None:
        route = self._route(src, dst)
        cap = route.p2p_cap_gbps * 1e9 if route.p2p_cap_gbps else None
        load = self._classes(dict.fromkeys(route.via, 1.0))
        self._add(_Flow((src, dst), load, cap, nbytes, route.latency_us * 1e-6, owners))

    def _classes(self, load: dict[str, float]) -> dict[str, float]:
        """A flow's load by resource; with a symmetry, by resource class: what it loads on
        all of a class's members together, which is what the copies of every flow load
        on one member (``symmetry.py``)."""
        if self.symmetry is None:
            return load
        rename, found = self.symmetry.rename, defaultdict(float)
        for r, w in load.items():
            found[rename(r)] += w
        return dict(found)

    def _push(self, time: float, kind: str, obj, version: int = 0) -> None:
        self.order += 1
        heapq.heappush(self.events, (time, self.order, kind, obj, version))

    def _add(self, flow: _Flow) -> None:
        if flow.remaining <= 0:
            self._push(self.now + flow.latency, "arrive", flow)
            return
        flow.since = self.now
        self.flows.add(flow)
        for r in flow.load:
            self.on[r].add(flow)
        self.changed.update(flow.load)
        self._moving(flow, +1)

    def _remove(self, flow: _Flow) -> None:
        self.flows.discard(flow)
        for r in flow.load:
            self.on[r].discard(flow)
        self.changed.update(flow.load)
        self._moving(flow, -1)

    def _moving(self, flow: _Flow, change: int) -> None:
        """Count the flows each device takes part in; a kernel there changes speed."""
        for rank in flow.ends:
            before = self.moving[rank] > 0
            self.moving[rank] += change
            kernel = self.running[rank]
            if kernel is not None and before != (self.moving[rank] > 0):
                self._pace(rank, kernel)

    def _pace(self, rank: int, kernel: _Item) -> None:
        """(Re)schedule the end of ``kernel`` at its speed now."""
        kernel.remaining -= kernel.speed * (self.now - kernel.since)
        kernel.since = self.now
        slow = self.device.overlap_slowdown if self.moving[rank] else 0.0
        kernel.speed = 1.0 / (1.0 + slow)
        kernel.version += 1
        end = self.now + max(kernel.remaining, 0.0) / kernel.speed
        self._push(end, "kernel", (rank, kernel), kernel.version)

    def _finish(self, owner) -> None:
        if isinstance(owner, _Collective):
            owner.pending -= 1
            if owner.pending == 0:
                for post in owner.posts.values():
                    self._finish(post)
            return
        owner.pending -= 1
        if owner.pending == 0:
            owner.done = self.now
            self.wake.add(owner.rank)
            track = (
                f"{owner.lane[0]}:{owner.lane[1]}"
                if owner.lane[0] != "group"
                else f"lane{owner.lane[1]}"
            )
            self.spans.append(
                Span(
                    owner.rank,
                    owner.step,
                    track,
                    owner.handle,
                    owner.start * 1e3,
                    self.now * 1e3,
                    int(owner.nbytes),
                    self.pass_.value,
                )
            )

    def _component(self) -> set[_Flow]:
        """The flows that share resources, directly or through others, with a changed one."""
        flows: set[_Flow] = set()
        frontier = set(self.changed)
        seen: set[str] = set()
        while frontier:
            r = frontier.pop()
            seen.add(r)
            for f in self.on.get(r, ()):
                if f not in flows:
                    flows.add(f)
                    frontier.update(x for x in f.load if x not in seen)
        self.changed.clear()
        return flows

    def _rates(self) -> None:
        """Max-min fair rates (progressive filling, weighted by load) of the flows a change
        touched; the others keep theirs."""
        flows = self._component()
        if len(flows) == 1:  # alone on its resources (a ring's hop): no sharing to solve
            self._rate_alone(next(iter(flows)))
            return
        links = self.topo.links
        left: dict[str, float] = {}
        weight: dict[str, float] = defaultdict(float)
        users: dict[str, list[_Flow]] = defaultdict(list)
        for f in flows:
            f.remaining -= f.rate * (self.now - f.since)
            f.since = self.now
            f.rate = -1.0
            for r, w in f.load.items():
                users[r].append(f)
                weight[r] += w
                if r not in left:
                    left[r] = links.capacity(r) * 1e9
        capped = sorted((f for f in flows if f.cap is not None), key=lambda f: f.cap)
        # Resources by their fair share now; entries go stale as flows are fixed.
        heap = [(left[r] / w, r) for r, w in weight.items() if w > EPS]
        heapq.heapify(heap)
        unfixed, next_capped = len(flows), 0
        while unfixed:
            share, bottleneck = float("inf"), None
            while heap:
                value, r = heap[0]
                if weight[r] > EPS and abs(value - left[r] / weight[r]) <= 1e-9 * (1 + value):
                    share, bottleneck = value, r
                    break
                heapq.heappop(heap)
            while next_capped < len(capped) and capped[next_capped].rate >= 0:
                next_capped += 1
            if next_capped < len(capped) and capped[next_capped].cap <= share:
                fixed, rate = [capped[next_capped]], capped[next_capped].cap
            elif bottleneck is None:  # rounding left only weightless flows
                fixed, rate = [f for f in flows if f.rate < 0], float("inf")
            else:
                fixed, rate = [f for f in users[bottleneck] if f.rate < 0], share
            touched = set()
            for f in fixed:
                f.rate = rate
                unfixed -= 1
                for r, w in f.load.items():
                    left[r] = max(left[r] - rate * w, 0.0)
                    weight[r] -= w
                    touched.add(r)
            for r in touched:
                if weight[r] > EPS:
                    heapq.heappush(heap, (left[r] / weight[r], r))
        for f in flows:
            f.version += 1
            self._push(self.now + max(f.remaining, 0.0) / f.rate, "flow", f, f.version)

    def _rate_alone(self, f: _Flow) -> None:
        """``_rates`` for a flow that shares no resource: the least of its cap and its
        resources' capacities over its load on them (the same arithmetic, in one pass)."""
        f.remaining -= f.rate * (self.now - f.since)
        f.since = self.now
        links, rate = self.topo.links, float("inf")
        for r, w in f.load.items():
            if w > EPS:
                rate = min(rate, links.capacity(r) * 1e9 / w)
        if f.cap is not None and f.cap <= rate:
            rate = f.cap
        f.rate = rate
        f.version += 1
        self._push(self.now + max(f.remaining, 0.0) / rate, "flow", f, f.version)

    # -- the event loop -------------------------------------------------------
    def _step_streams(self) -> None:
        """Start what can start now on the ranks something happened to (``wake``)."""
        while self.wake:
            ranks, self.wake = sorted(self.wake), set()
            for rank in ranks:
                self._step_rank(rank)

    def _step_rank(self, rank: int) -> None:
        stream = self.streams[rank]
        # posts that yielded go first
        moved = self.deferred[rank] > 0 and self._step_lanes(rank, deferred_only=True)
        while self.running[rank] is None and self.cursor[rank] < len(stream):
            item = stream[self.cursor[rank]]
            if item.kind == "wait":
                posts = self.handles[rank].get(item.handle, [])
                if any(p.done is None or p.done > self.now + EPS for p in posts):
                    break
                item.start = item.end = self.now
            elif item.kind == "post":
                item.post.ready = self.now
                item.start = item.end = self.now
            else:
                item.start, item.remaining, item.since = self.now, item.seconds, self.now
                self.running[rank] = item
                self._pace(rank, item)
            self.cursor[rank] += 1
            moved = True
        moved |= self._step_lanes(rank, deferred_only=False)
        if moved:
            self.wake.add(rank)

    def _step_lanes(self, rank: int, *, deferred_only: bool) -> bool:
        moved = False
        for lane, posts in self.lanes[rank].items():
            i = self.lane_cursor[rank][lane]
            while i < len(posts):
                post = posts[i]
                previous_done = i == 0 or posts[i - 1].done is not None
                if post.ready is None or not previous_done:
                    break
                if post.behind is not None:
                    if post.behind.end < 0:
                        break
                    self.deferred[rank] -= 1
                elif deferred_only:
                    break
                elif self._yields(rank):
                    post.behind = self.running[rank]
                    self.deferred[rank] += 1
                    break
                self._start_post(post)
                i += 1
                moved = True
                if post.done is None:
                    break
            self.lane_cursor[rank][lane] = i
        return moved

    def _yields(self, rank: int) -> bool:
        kernel = self.running[rank]
        return self.device.comm_yields_to_compute and not self.sync and kernel is not None

    def run(self) -> None:
        while True:
            self._step_streams()
            if self.changed:
                self._rates()
            if not self.events:
                break
            self.now = max(self.now, self.events[0][0])
            while self.events and self.events[0][0] <= self.now + EPS:
                _, _, kind, obj, version = heapq.heappop(self.events)
                if kind == "flow":
                    if obj.version == version and obj in self.flows:
                        self._remove(obj)
                        self._push(self.now + obj.latency, "arrive", obj)
                elif kind == "arrive":
                    for owner in obj.owners:
                        self._finish(owner)
                elif obj[1].version == version:  # a kernel's end
                    rank, kernel = obj
                    kernel.end = self.now
                    self.running[rank] = None
                    self.wake.add(rank)
        stuck = [r for r, s in enumerate(self.streams) if self.cursor[r] < len(s)]
        if stuck:
            raise RuntimeError(f"simulated schedules deadlock: ranks {stuck} never finish")

    # -- results --------------------------------------------------------------
    def prediction(self, keep_timeline: bool = True) -> Prediction:
        ends = []
        for rank, stream in enumerate(self.streams):
            end = max((i.end for i in stream), default=0.0)
            posts = [p.done for ps in self.lanes[rank].values() for p in ps]
            ends.append(max([end, *[d for d in posts if d is not None]]))
        simulated = [r for r in range(len(ends)) if self.simulated[r]]
        slowest = max(simulated, key=lambda r: ends[r])
        steps: dict[int, list[float]] = {}  # step -> [wall, compute, host]
        last = 0.0
        for item in self.streams[slowest]:
            entry = steps.setdefault(item.step, [0.0, 0.0, 0.0])
            if item.kind in ("kernel", "host"):
                entry[1 if item.kind == "kernel" else 2] += item.end - item.start
            entry[0] += max(item.end - last, 0.0)
            last = max(last, item.end)
        tail = ends[slowest] - last
        if tail > 0 and steps:
            steps[max(steps)][0] += tail
        costs = tuple(
            StepCost(s, ms * 1e3, c * 1e3, max(ms - c - h, 0.0) * 1e3, h * 1e3)
            for s, (ms, c, h) in sorted(steps.items())
        )
        device_ms = ends[slowest] * 1e3
        if self.sync:
            host_ms, ms = sum(c.host_ms for c in costs), device_ms
        else:
            host_ms = max(self.host_seconds) * 1e3
            ms = max(device_ms, host_ms)
        return Prediction(
            ms,
            device_ms,
            host_ms,
            slowest,
            costs,
            (self.spans, self.streams, self.pass_.value) if keep_timeline else None,
            self.sync,
        )


def _host_seconds(op, h) -> float:
    """Host time of one operation (``HostCosts`` ``h``)."""
    match op:
        case Compute():
            return h.compute_us * 1e-6
        case Merge():
            return h.merge_us * 1e-6
        case Post():
            lanes = {(m.axis, m.lane) for m in op.moves}
            return (h.post_us * len(lanes) + h.transfer_us * len(op.moves)) * 1e-6
        case Wait():
            return h.wait_us * 1e-6
    raise TypeError(f"not an operation: {op!r}")


def lower_bound_ms(
    schedule: Schedule,
    pass_: Pass,
    call: CallDescription,
    topology: Topology,
    axes: Axes | None = None,
) -> float:
    """A time the simulation of a pass of which ``schedule`` is one rank's cannot beat,
    from that rank alone (ranks on devices of the same number), the longest of:

    - its kernels back to back at full speed (a kernel only ever runs slower; a
      synchronous device's stream carries the host time too);
    - on each lane, its posts one after another (a lane runs them in order), each no
      shorter than its largest move: the bytes over the most loaded resource of their
      route at that resource's full capacity (or the point-to-point cap), plus latency;
    - on an asynchronous device, its host time.

    What lets the planner skip simulating a candidate that cannot be the fastest
    (``choose.py``)."""
    device, links = topology.device, topology.links
    axes = axes if axes is not None else {"group": [tuple(range(schedule.world))]}
    groups = _groups_by_rank(axes)
    kernels = host = 0.0
    lanes: dict[tuple[str, int], float] = defaultdict(float)
    for op in schedule.ops:
        if isinstance(op, Compute):
            kernels += compute_seconds(schedule, op, pass_, call, device)
        elif isinstance(op, Merge):
            kernels += merge_seconds(schedule, op, pass_, call, device)
        elif isinstance(op, Post):
            longest: dict[tuple[str, int], float] = defaultdict(float)
            for move in op.moves:
                members = groups[move.axis][schedule.rank]
                seconds = _move_seconds(schedule, move, members, pass_, call, links)
                lane = (move.axis, move.lane)
                longest[lane] = max(longest[lane], seconds)
            for lane, seconds in longest.items():
                lanes[lane] += seconds
        host += _host_seconds(op, device.host)
    comm = max(lanes.values(), default=0.0)
    if device.synchronous:
        return max(kernels + host, comm) * 1e3
    return max(kernels, comm, host + device.host.call_us * 1e-6) * 1e3


def _move_seconds(schedule: Schedule, move, members, pass_: Pass, call, links) -> float:
    """The least time one move of ``schedule``'s rank can take alone on ``links`` (a
    receive: 0, its sender's move counts)."""
    me = schedule.rank
    if isinstance(move, Transfer):
        if not move.send:
            return 0.0
        nbytes = rows_bytes(schedule, move.rows, pass_, call)
        route = links.route(me, members[move.peer])
        rate = min(links.capacity(r) for r in route.via) * 1e9
        if route.p2p_cap_gbps:
            rate = min(rate, route.p2p_cap_gbps * 1e9)
        return nbytes / rate + route.latency_us * 1e-6 if nbytes > 0 else 0.0
    n = len(members)
    nbytes = collective_pair_bytes(schedule, move, pass_, call) * (n - 1)
    if nbytes <= 0 or n == 1:
        return 0.0
    load, latency = _member_load(links.route, me, members)
    return max(nbytes * w / (links.capacity(r) * 1e9) for r, w in load.items()) + latency


def _member_load(route, me: int, members: tuple[int, ...]) -> tuple[dict[str, float], float]:
    """A collective member's sends to every other member as one flow: each byte's load on
    each resource (spread evenly over the routes to the others) and the longest latency.
    ``route(a, b)``: the route from rank ``a`` to rank ``b``."""
    load: dict[str, float] = defaultdict(float)
    latency, share = 0.0, 1.0 / (len(members) - 1)
    for b in members:
        if b != me:
            found = route(me, b)
            latency = max(latency, found.latency_us * 1e-6)
            for r in found.via:
                load[r] += share
    return dict(load), latency


def _groups_by_rank(axes: Axes) -> dict[str, dict[int, tuple[int, ...]]]:
    """Each rank's group on each axis."""
    return {axis: {r: group for group in groups for r in group} for axis, groups in axes.items()}


def simulate_timing(
    schedules: list[Schedule],
    pass_: Pass,
    call: CallDescription,
    topology: Topology,
    axes: Axes | None = None,
    placement: list[int] | None = None,
    keep_timeline: bool = True,
    symmetry: RankSymmetry | None = None,
) -> Prediction:
    """Simulate one pass of ``schedules`` (one per rank of the sequence-parallel group)
    on ``topology``; rank ``i`` runs on device ``placement[i]`` (default: device ``i``).
    ``keep_timeline=False``: the numbers only (``Prediction.spans`` then needs a
    ``replay``). ``symmetry``: ranks that behave alike (``symmetry.py``): only each
    orbit's representative has a schedule (the others' entries are None) and is
    simulated; its timeline holds those ranks only."""
    world = len(schedules)
    if world > topology.devices:
        raise ValueError(
            f"{world} ranks but topology {topology.name!r} has {topology.devices} devices"
        )
    axes = axes if axes is not None else {"group": [tuple(range(world))]}
    if symmetry is not None and placement is not None:
        raise ValueError("a symmetry is of ranks on devices of the same number (no placement)")
    if symmetry is not None and [s is not None for s in schedules] != [
        r == symmetry.representative(r) for r in range(world)
    ]:
        raise ValueError("with a symmetry, exactly the representatives have schedules")
    sim = _Sim(schedules, axes, pass_, call, topology, placement or list(range(world)), symmetry)
    sim.run()
    return sim.prediction(keep_timeline)
