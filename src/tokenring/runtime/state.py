"""What the library keeps between calls, in one visible place.

A ``Runtime`` holds the settings (``Settings``: transfer timeout, fused merge,
cache sizes) and, per process group, a ``GroupRuntime``: that group's lanes,
its plans (what each distinct call decided, reused by later identical calls)
and the call descriptions all its ranks have agreed on. Nothing else in the
library keeps state between calls.

``tokenring.runtime()`` returns the default runtime, made on first use; the
environment variables ``TOKENRING_TIMEOUT_S``, ``TOKENRING_FUSED_MERGE`` and
``TOKENRING_TOPOLOGY`` are read then, and only then. ``tokenring.configure(...)`` changes settings
at run time (see docs/architecture.md, "Runtime"). ``print(tokenring.runtime())`` is a
short summary (``Runtime.summary``), ``runtime().why()`` why ``auto`` chose what it did.

Plans and agreed checks are kept per group in call order, so that every
member of a group, making the same calls, keeps and evicts the same entries
(a rank that skipped the cross-rank check while another ran it would hang).
"""

from __future__ import annotations

import os
import weakref
from collections import Counter, OrderedDict
from dataclasses import dataclass, field, fields, replace
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from ..execution.comm import Lanes, group_world, make_lanes
from ..execution.operations import TransferFailed
from .meshes import SpMesh

if TYPE_CHECKING:
    from ..planner.topology import Topology

__all__ = [
    "BoundedCache",
    "GroupRuntime",
    "Runtime",
    "Settings",
    "configure",
    "destroy_lanes",
    "runtime",
    "setup_lanes",
]


@dataclass(frozen=True)
class Settings:
    """Options of the whole library (change them with ``tokenring.configure``)."""

    timeout: timedelta = timedelta(seconds=300)
    """How long a transfer may wait for its peer before ``TransferFailed`` (gloo: every
    wait; NCCL: the lanes' watchdog, fixed when a group's lanes are made)."""
    fused_merge: bool = True
    """Merge partial results with the fused Triton kernel on CUDA where Triton is installed."""
    max_plans: int = 256
    """Prepared calls (plans) kept per group (least recently used dropped first)."""
    max_agreed: int = 1024
    """Cross-rank agreements remembered per group."""
    stream_tail_min: int = 1 << 20
    """TokenRing returns its last step's partial in halves, so that the first half's
    return hides behind the second half's compute, when a rank's query shard has at least
    this many elements (batch x tokens x heads x head_dim; 0: always). Smaller blocks
    compute too fast for it to pay, and the extra message costs a round of latency."""
    workspace_bytes: int = 1 << 20
    """The largest scratch buffer (slots in transit) a plan keeps for its next call on the
    CPU, where every operation has completed when a call returns, so that call allocates
    only its results (0: never keep one). Larger calls allocate theirs per call: beside
    their compute the allocation costs little, and kept it would hold that much memory
    per plan. On CUDA scratch is always allocated per call (docs/architecture.md)."""
    topology: str | None = None
    """What ``strategy="auto"`` plans for: a preset name or a topology file (``tokenring
    calibrate`` writes one); default: the preset matched to the devices (docs/scaling.md)."""

    @classmethod
    def from_env(cls) -> Settings:
        """Defaults, overridden by ``TOKENRING_TIMEOUT_S``, ``TOKENRING_FUSED_MERGE`` and
        ``TOKENRING_TOPOLOGY``."""
        base = cls()
        timeout = os.environ.get("TOKENRING_TIMEOUT_S")
        fused = os.environ.get("TOKENRING_FUSED_MERGE")
        return replace(
            base,
            timeout=timedelta(seconds=float(timeout)) if timeout else base.timeout,
            fused_merge=fused != "0" if fused is not None else base.fused_merge,
            topology=os.environ.get("TOKENRING_TOPOLOGY") or None,
        )

    def validated(self) -> Settings:
        if not isinstance(self.timeout, timedelta) or self.timeout.total_seconds() <= 0:
            raise ValueError(f"timeout must be a positive timedelta, got {self.timeout!r}")
        if not isinstance(self.fused_merge, bool):
            raise ValueError(f"fused_merge must be a bool, got {self.fused_merge!r}")
        for name in ("max_plans", "max_agreed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("stream_tail_min", "workspace_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        if self.topology is not None and not isinstance(self.topology, str):
            raise ValueError(
                f"topology must be a preset name or a file path, got {self.topology!r}"
            )
        return self


class BoundedCache(OrderedDict):
    """A least-recently-used map with a size limit."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit

    def get_fresh(self, key: Any) -> Any:
        value = self.get(key)
        if value is not None:
            self.move_to_end(key)
        return value

    def put(self, key: Any, value: Any) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.limit:
            self.popitem(last=False)


@dataclass
class GroupRuntime:
    """The state of one process group: lanes, prepared calls (by their raw arguments),
    plans (by call description and site), agreed call descriptions."""

    name: str
    calls: BoundedCache
    plans: BoundedCache
    agreed: BoundedCache
    lanes: Lanes | None = None


SUMMARY_LINES, SUMMARY_WIDTH = 40, 120
"""The most lines ``str(runtime())`` prints, and the most characters in each."""
SUMMARY_GROUPS = 8
"""Groups the summary shows, most recently made last (the rest are counted)."""


def _counts(strategies: list[str]) -> str:
    """``" (tokenring 3, ring 1)"``: how many of each, most first ("" for none)."""
    found = Counter(strategies).most_common()
    return f" ({', '.join(f'{name} {n}' for name, n in found)})" if found else ""


def _group_lines(state: GroupRuntime) -> list[str]:
    """A group's line (its lanes, prepared calls, plans by strategy, agreements, the
    scratch its plans keep), then one line per plan, the most recently used first."""
    plans = [plan.description for plan in reversed(state.plans.values())]
    ranks = len(state.lanes.global_ranks) if state.lanes else 0
    lanes = f"lanes over {ranks} rank{'s' * (ranks > 1)}" if ranks else "no lanes"
    kept = sum(plan.workspace_bytes for plan in state.plans.values())
    head = (
        f"group {state.name!r} ({lanes}): {len(state.calls)} calls, {len(state.agreed)} "
        f"agreed, {len(plans)} plans{_counts([d.strategy.value for d in plans])}"
        + (f", {kept / 1024:.0f} KiB kept in workspaces" if kept else "")
    )
    return [head, *(f"  plan: {d.summary()}" for d in plans)]


def _auto_lines(auto: BoundedCache) -> list[str]:
    """``auto``'s line (decisions by strategy), then one line per decision with why, the
    most recent first."""
    choices = list(reversed(auto.values()))
    counts = _counts([c.strategy.value for c in choices])
    head = f"auto: {len(choices)} decision(s){counts}; the planner's reasons: tr.runtime().why()"
    return [head, *(f"  {choice.summary()}" for choice in choices)]


def _fit(blocks: list[list[str]], room: int) -> list[str]:
    """Each block's first line, then as many of its other lines as fit in ``room`` lines,
    shared evenly (what a short block leaves goes to the others); the rest counted in
    a "... and N more" line."""
    needs = [len(block) - 1 for block in blocks]
    allowed = dict.fromkeys(range(len(blocks)), 0)
    left = room - len(blocks)
    by_need = sorted(allowed, key=needs.__getitem__)
    for served, i in enumerate(by_need):
        allowed[i] = min(needs[i], max(left, 0) // (len(by_need) - served))
        left -= allowed[i]
    lines: list[str] = []
    for i, (head, *rest) in enumerate(blocks):
        lines.append(head)
        if len(rest) <= allowed[i]:
            lines += rest
        elif allowed[i] > 0:
            lines += [*rest[: allowed[i] - 1], f"  ... and {len(rest) - allowed[i] + 1} more"]
    return lines


def _settings_line(settings: Settings) -> str:
    """``settings: timeout=300s, fused_merge=True, ...``: every setting by name."""

    def shown(value: object) -> str:
        return f"{value.total_seconds():g}s" if isinstance(value, timedelta) else str(value)

    return "settings: " + ", ".join(
        f"{f.name}={shown(getattr(settings, f.name))}" for f in fields(settings)
    )


def _cut(line: str) -> str:
    return line if len(line) <= SUMMARY_WIDTH else line[: SUMMARY_WIDTH - 3] + "..."


@dataclass(repr=False)
class Runtime:
    """Settings and per-group state (see the module docstring). ``str()`` and ``repr()``
    are ``summary()``; the attributes hold the detail."""

    settings: Settings = field(default_factory=Settings.from_env)
    groups: dict[str, GroupRuntime] = field(default_factory=dict)
    destroyed: set[str] = field(default_factory=set)
    """Sub-groups whose lanes were destroyed: torch would give new ones the same names
    and their creation would hang, so they cannot be made again in this process."""
    sp_groups: dict[tuple[int, ...], dist.ProcessGroup] = field(default_factory=dict)
    """One process group per sequence-parallel sub-mesh (its sorted global ranks)."""
    meshes: dict[int, tuple[object, SpMesh]] = field(default_factory=dict)
    """What each mesh a call named says about this rank (read once per mesh), by the
    mesh's identity: DeviceMesh equality ignores its groups, and two meshes over the same
    ranks and names hold different groups (the mesh is kept, so its id is never reused)."""
    named: dict[str, dist.ProcessGroup] = field(default_factory=dict)
    """Groups by name, for compiled calls (which can only pass names)."""
    named_meshes: dict[tuple[str, str], object] = field(default_factory=dict)
    """Meshes by the names of their ring and ulysses groups, likewise."""
    auto: BoundedCache = field(default_factory=lambda: BoundedCache(256))
    """What ``strategy="auto"`` chose per call shape (``auto.AutoChoice``, with the report)."""
    topologies: dict[tuple, Topology] = field(default_factory=dict)
    """The machine ``auto`` plans for, by (topology setting, device type, ranks): read and
    checked once (a setting that does not fit warns then, once)."""
    sites: dict[tuple, tuple] = field(default_factory=dict)
    """Where calls run, by (strategy, group, mesh, ring_impl): the site and its group's state."""
    read_tensors: BoundedCache = field(default_factory=lambda: BoundedCache(64))
    """Integer tensors read to the host (``cu_seqlens`` on a device), by identity: a tensor
    passed again unchanged is not read again (no host sync). See ``read_ints``."""

    def read_ints(self, tensor: torch.Tensor) -> tuple[int, ...]:
        """A 1-D integer tensor's values, read once per tensor and version: the same tensor
        object, not modified in place since (its version counter), is answered from
        memory. The entry holds a weak reference, so a tensor made later at the same
        address is never taken for it."""
        found = self.read_tensors.get_fresh(id(tensor))
        if found is not None and found[0]() is tensor and found[1] == tensor._version:
            return found[2]
        values = tuple(tensor.tolist())
        self.read_tensors.put(id(tensor), (weakref.ref(tensor), tensor._version, values))
        return values

    def summary(self) -> str:
        """What this runtime holds, in at most ``SUMMARY_LINES`` lines of at most
        ``SUMMARY_WIDTH`` characters whatever was called: the settings; each group's
        lanes, prepared calls and plans (counted by strategy, then a line per plan);
        ``auto``'s decisions (counted by strategy, then a line per decision with why).
        Lines that do not fit are counted ("... and N more"); ``groups``, ``auto`` and
        ``settings`` hold everything, ``why()`` the planner's reasons in full."""
        plans = [
            p.description.strategy.value for s in self.groups.values() for p in s.plans.values()
        ]
        head = [
            f"tokenring runtime: {len(self.groups)} group(s), {len(plans)} plan(s), "
            f"{len(self.auto)} auto decision(s), {len(self.meshes)} mesh(es)",
            f"plans by strategy, every group:{_counts(plans) or ' none'}",
            _settings_line(self.settings),
        ]
        groups = list(self.groups.values())
        blocks = [_group_lines(state) for state in groups[-SUMMARY_GROUPS:]]
        if len(groups) > SUMMARY_GROUPS:
            hidden = len(groups) - SUMMARY_GROUPS
            head.append(f"... and {hidden} more group(s): tr.runtime().groups")
        lines = head + _fit([*blocks, _auto_lines(self.auto)], SUMMARY_LINES - len(head))
        return "\n".join(_cut(line) for line in lines)

    def __repr__(self) -> str:
        return self.summary()

    def why(self) -> str:
        """Why ``strategy="auto"`` chose what it did, for every call shape it decided
        (oldest first): the call as it runs, then the planner's explanation."""
        return "\n\n".join(choice.explain() for choice in self.auto.values())

    def configure(self, **changes: Any) -> Settings:
        """Change settings (names of ``Settings``); returns the new settings."""
        known = {f.name for f in fields(Settings)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(
                f"unknown setting(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}"
            )
        self.settings = replace(self.settings, **changes).validated()
        for state in self.groups.values():
            state.calls.limit = state.plans.limit = self.settings.max_plans
            state.agreed.limit = self.settings.max_agreed
            state.calls.clear()  # prepared calls and plans carry the settings they were
            state.plans.clear()  # made with
        self.auto.clear()  # so do auto's decisions (the topology, stream_tail_min)
        if "topology" in changes:
            self.topologies.clear()  # a file named again is read (and checked) again
        return self.settings

    def group(self, group: dist.ProcessGroup | None) -> GroupRuntime:
        """The state of ``group`` (default: the world; made on first use)."""
        name = _group_name(group)
        state = self.groups.get(name)
        if state is None:
            plans = self.settings.max_plans
            state = GroupRuntime(
                name,
                BoundedCache(plans),
                BoundedCache(plans),
                BoundedCache(self.settings.max_agreed),
            )
            self.groups[name] = state
        return state

    def lanes(self, group: dist.ProcessGroup | None) -> Lanes:
        """The lanes of ``group``, made (collectively over its members) on first use."""
        state = self.group(group)
        if state.lanes is None:
            if state.name in self.destroyed:
                raise RuntimeError(
                    "the lanes of this sub-group were destroyed (destroy_lanes); torch would "
                    "give new ones the same names and their creation would hang, so they "
                    "cannot be made again in this process: call destroy_lanes only at shutdown"
                )
            timeout = self.settings.timeout
            try:
                state.lanes = make_lanes(group, timeout)
            except RuntimeError as err:  # a member that never came (DistStoreError, gloo)
                raise TransferFailed(
                    f"tokenring: the lanes of process group {state.name!r} (made on its first "
                    f"call, with every member) were not made within the timeout of "
                    f"{timeout.total_seconds():g} s: a member does not make this call, or "
                    f"makes it much later (see tokenring.configure, tokenring.setup_lanes): "
                    f"{err}"
                ) from err
        return state.lanes

    def sp_mesh(self, mesh: object) -> SpMesh:
        """``SpMesh.of(mesh)``, read once per mesh (which also makes it known by name)."""
        known = self.meshes.get(id(mesh))
        if known is not None:
            return known[1]
        found = SpMesh.of(mesh)
        self.meshes[id(mesh)] = (mesh, found)
        self.named_meshes[(found.ring_group.group_name, found.ulysses_group.group_name)] = mesh
        return found

    def remember(self, group: dist.ProcessGroup | None) -> None:
        """Make ``group`` known by name (for compiled calls)."""
        if group is not None:
            self.named[group.group_name] = group

    def named_group(self, name: str) -> dist.ProcessGroup | None:
        """The group a compiled call named (None: the default group, or no distributed)."""
        if not name or name == dist.group.WORLD.group_name:
            return None
        group = self.named.get(name)
        if group is None:
            raise RuntimeError(
                f"tokenring does not know process group {name!r}: before compiling, make one "
                "eager call with it or call tokenring.setup_lanes(group)"
            )
        return group

    def named_mesh(self, ring: str, ulysses: str) -> object:
        """The mesh a compiled call named by its groups."""
        mesh = self.named_meshes.get((ring, ulysses))
        if mesh is None:
            raise RuntimeError(
                "tokenring does not know this mesh: make it with tokenring.sp_mesh, or make "
                "one eager call with it or call tokenring.setup_lanes(mesh=mesh) before compiling"
            )
        return mesh

    def sp_group(self, members: tuple[int, ...]) -> dist.ProcessGroup:
        """The process group of a mesh's ring x ulysses sub-mesh (``members``: its global
        ranks), for the cross-rank checks, plans and joint tokens of ``usp`` calls: the
        default group when it is the whole world, else made (collectively over the
        members) on first use."""
        ranks = tuple(sorted(members))
        if ranks == tuple(range(dist.get_world_size())):
            return dist.group.WORLD
        group = self.sp_groups.get(ranks)
        if group is None:
            group = dist.new_group(
                list(ranks), timeout=self.settings.timeout, use_local_synchronization=True,
                group_desc="tokenring_sp",
            )  # fmt: skip
            self.sp_groups[ranks] = group
        return group

    def destroy_lanes(self) -> None:
        """Destroy every lane this runtime made (plans of those groups go with them)."""
        for state in self.groups.values():
            if state.lanes is None:
                continue
            if len(state.lanes.global_ranks) != dist.get_world_size():
                self.destroyed.add(state.name)
            state.lanes.destroy()
        self.groups.clear()
        self.meshes.clear()
        self.named_meshes.clear()
        self.sites.clear()


def _group_name(group: dist.ProcessGroup | None) -> str:
    if not (dist.is_available() and dist.is_initialized()):
        return "<single process>"
    name = getattr(group if group is not None else dist.group.WORLD, "group_name", None)
    if name is None:  # not a process group this rank is in (e.g. GroupMember.NON_GROUP_MEMBER)
        group_world(group)  # raises the ValueError that says so
        raise ValueError(f"group must be a torch.distributed ProcessGroup, got {group!r}")
    return name


_DEFAULT: list[Runtime] = []


def runtime() -> Runtime:
    """The default runtime (made on first use; environment variables are read then)."""
    if not _DEFAULT:
        _DEFAULT.append(Runtime())
    return _DEFAULT[0]


def configure(**changes: Any) -> Settings:
    """Change the default runtime's settings, e.g. ``configure(timeout=timedelta(seconds=60))``
    or ``configure(fused_merge=False)``; returns the new ``Settings``."""
    return runtime().configure(**changes)


def setup_lanes(group: dist.ProcessGroup | None = None, *, mesh: object = None) -> None:
    """Create the lanes of ``group`` now (collective over its members; see ``comm``), or of
    both dims of ``mesh``, and make them known for compiled calls."""
    rt = runtime()
    if mesh is not None:
        sp = rt.sp_mesh(mesh)
        for dim_group in (sp.ring_group, sp.ulysses_group):
            rt.lanes(dim_group)
        return
    rt.remember(group)
    rt.lanes(group)


def destroy_lanes() -> None:
    """Destroy every lane the default runtime made (at shutdown; see ``Runtime.destroy_lanes``)."""
    runtime().destroy_lanes()
