"""What the planner knows about a machine: its devices, their links, and what things cost.

A ``Topology`` is a ``DeviceModel`` (every device alike: block-kernel rates,
memory bandwidth for merges, host time per operation) and ``Links`` (how
bytes get from one device to another: the *resources* they cross, each with
a capacity in GB/s per direction, and a latency). Links are full duplex:
``a -> b`` and ``b -> a`` cross different resources. A resource several
routes cross (a PCIe switch's uplink, a GPU's NVSwitch port, a NIC) is
shared by the transfers using it at the same time (``timing.py``).

Topologies come from presets (``presets.py``) or from a JSON file (the format
is ``to_dict``; docs/scaling.md, "Topology files"), which ``tokenring
calibrate`` writes for the machine it runs on.
"""

from __future__ import annotations

import json
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

from ..options import Pass

__all__ = [
    "FORMAT",
    "ClusterLinks",
    "DeviceModel",
    "ExplicitLinks",
    "HostCosts",
    "KernelModel",
    "Links",
    "Route",
    "Topology",
]

FORMAT = "tokenring-topology/1"


def block_flops(pass_: Pass, lq: int, lk: int, causal: bool, batch_heads: int, dim: int) -> float:
    """FLOPs of one block kernel call, counted as the benchmark counts them: ``4 Lq Lk D``
    per head forward (two matmuls), 2.5 times that backward (five), half for a causal
    square."""
    flops = 4.0 * lq * lk * dim * batch_heads * (0.5 if causal else 1.0)
    return flops * (2.5 if pass_ is Pass.BACKWARD else 1.0)


def _interp(xs: tuple[float, ...], x: float) -> tuple[int, int, float]:
    """Bracketing indices of ``x`` in increasing ``xs`` and the weight of the upper one."""
    if x <= xs[0]:
        return 0, 0, 0.0
    if x >= xs[-1]:
        n = len(xs) - 1
        return n, n, 0.0
    hi = next(i for i, v in enumerate(xs) if v >= x)
    lo = hi - 1
    return lo, hi, (x - xs[lo]) / (xs[hi] - xs[lo])


@dataclass(frozen=True)
class KernelModel:
    """Achieved TFLOP/s of the block kernel, measured on a grid of block shapes.

    ``full[pass]`` is a table over query length x key length (``lengths``, powers
    of two) of non-causal blocks, ``causal[pass]`` the causal squares, all at
    ``ref_heads`` (batch x heads) and ``head_dim``. A block with more heads has
    more independent work, like a longer query: it is looked up at query length
    ``Lq * batch_heads / ref_heads``. Between grid points rates are interpolated
    in log2 of the lengths; below the grid a kernel takes the time of the
    smallest grid block (it is latency-bound there), above it the rate of the
    largest. ``float32_factor``: how much slower float32 blocks run.
    """

    lengths: tuple[int, ...]
    full: dict[Pass, tuple[tuple[float, ...], ...]]
    causal: dict[Pass, tuple[float, ...]]
    ref_heads: int = 32
    head_dim: int = 128
    launch_us: float = 5.0
    float32_factor: float = 8.0

    def __post_init__(self) -> None:
        n = len(self.lengths)
        if n < 2 or list(self.lengths) != sorted(set(self.lengths)):
            raise ValueError("kernel lengths must be at least two increasing values")
        for pass_ in Pass:
            rows = self.full.get(pass_)
            if rows is None or len(rows) != n or any(len(r) != n for r in rows):
                raise ValueError(f"kernel table full[{pass_.value}] must be {n} x {n}")
            if len(self.causal.get(pass_, ())) != n:
                raise ValueError(f"kernel table causal[{pass_.value}] must have {n} values")
            values = [v for r in rows for v in r] + list(self.causal[pass_])
            if not all(v > 0 and math.isfinite(v) for v in values):
                raise ValueError("kernel rates must be positive and finite")

    @property
    def _logs(self) -> tuple[float, ...]:
        return tuple(math.log2(n) for n in self.lengths)

    def _full_rate(self, pass_: Pass, lq: float, lk: float) -> float:
        logs = self._logs
        table = self.full[pass_]
        i0, i1, wi = _interp(logs, math.log2(lq))
        j0, j1, wj = _interp(logs, math.log2(lk))

        def at(i: int, j: int) -> float:
            return math.log2(table[i][j])

        top = at(i0, j0) * (1 - wj) + at(i0, j1) * wj
        bottom = at(i1, j0) * (1 - wj) + at(i1, j1) * wj
        return 2.0 ** (top * (1 - wi) + bottom * wi)

    def _causal_rate(self, pass_: Pass, length: float) -> float:
        i0, i1, w = _interp(self._logs, math.log2(length))
        values = self.causal[pass_]
        return 2.0 ** (math.log2(values[i0]) * (1 - w) + math.log2(values[i1]) * w)

    def seconds(
        self,
        pass_: Pass,
        lq: int,
        lk: int,
        causal: bool,
        batch_heads: int,
        head_dim: int,
        float32: bool = False,
    ) -> float:
        """Time of one block kernel call (remembered: a simulation asks for the same few
        block shapes on every rank)."""
        key = (pass_, lq, lk, causal, batch_heads, head_dim, float32)
        found = self._seconds.get(key)
        if found is None:
            found = self._seconds[key] = self._block_seconds(*key)
        return found

    @cached_property
    def _seconds(self) -> dict[tuple, float]:
        return {}

    def _block_seconds(self, pass_, lq, lk, causal, batch_heads, head_dim, float32) -> float:
        if lq <= 0 or lk <= 0:
            return 0.0
        small = self.lengths[0]
        # Below the grid the kernel is latency-bound: it costs what the smallest block costs.
        eq = max(lq * batch_heads / self.ref_heads, small)
        ek = max(lk, small)
        if causal:
            rate = self._causal_rate(pass_, max(lq, small))
            rate *= self._full_rate(pass_, eq, ek) / self._full_rate(pass_, max(lq, small), ek)
        else:
            rate = self._full_rate(pass_, eq, ek)
        work = block_flops(
            pass_, eq * self.ref_heads / batch_heads, ek, causal, batch_heads, head_dim
        )
        seconds = work / (rate * 1e12)
        if float32:
            seconds *= self.float32_factor
        return max(seconds, self.launch_us * 1e-6)

    def scaled(self, factor: dict[Pass, float]) -> KernelModel:
        """The same shape of rates, ``factor[pass]`` times faster (another card)."""
        return replace(
            self,
            full={
                p: tuple(tuple(v * factor[p] for v in r) for r in t) for p, t in self.full.items()
            },
            causal={p: tuple(v * factor[p] for v in t) for p, t in self.causal.items()},
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "lengths": list(self.lengths),
            "ref_heads": self.ref_heads,
            "head_dim": self.head_dim,
            "launch_us": self.launch_us,
            "float32_factor": self.float32_factor,
            **{
                p.value: {"full": [list(r) for r in self.full[p]], "causal": list(self.causal[p])}
                for p in Pass
            },
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> KernelModel:
        return cls(
            lengths=tuple(int(n) for n in d["lengths"]),
            full={p: tuple(tuple(float(v) for v in r) for r in d[p.value]["full"]) for p in Pass},
            causal={p: tuple(float(v) for v in d[p.value]["causal"]) for p in Pass},
            ref_heads=int(d.get("ref_heads", 32)),
            head_dim=int(d.get("head_dim", 128)),
            launch_us=float(d.get("launch_us", 5.0)),
            float32_factor=float(d.get("float32_factor", 8.0)),
        )


@dataclass(frozen=True)
class HostCosts:
    """Host (Python and launch) time per operation of a call, in microseconds."""

    call_us: float = 40.0  # once per call: argument checks, plan lookup, buffers
    compute_us: float = 15.0  # one block kernel call (and its merge's launch)
    merge_us: float = 8.0  # one merge or accumulation
    post_us: float = 20.0  # one group of transfers on a lane, or one collective
    transfer_us: float = 5.0  # each send or receive inside a group
    wait_us: float = 5.0  # one wait

    def to_dict(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HostCosts:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown host cost(s) {sorted(unknown)}")
        return cls(**{k: float(v) for k, v in d.items()})


@dataclass(frozen=True)
class DeviceModel:
    """One device (all devices of a topology are alike).

    ``memory_gbps``: what merges and gradient accumulations stream at.
    ``synchronous``: kernels run on the host thread (CPU), so host time and compute
    add up and a wait blocks the host. ``comm_yields_to_compute``: a transfer that
    becomes ready while (or as) a compute kernel starts waits for that kernel to
    end, because the kernel holds every SM (seen on H100 in profiler traces,
    benchmarks/RESULTS.md section 3); transfers already running keep running. Off in
    the presets: applied to every post it predicts several times the 0.5 ms per call
    that the traces showed lost (docs/scaling.md). ``overlap_slowdown``: a kernel runs
    this fraction slower while its device moves data (NCCL's kernels take SMs and
    memory bandwidth); fitted, for the H100 presets, to the committed 2 x H100 rows.
    """

    name: str
    kernel: KernelModel
    memory_gbps: float = 2000.0
    host: HostCosts = field(default_factory=HostCosts)
    synchronous: bool = False
    comm_yields_to_compute: bool = False
    overlap_slowdown: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kernel": self.kernel.to_dict(),
            "memory_gbps": self.memory_gbps,
            "host_us": self.host.to_dict(),
            "synchronous": self.synchronous,
            "comm_yields_to_compute": self.comm_yields_to_compute,
            "overlap_slowdown": self.overlap_slowdown,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DeviceModel:
        return cls(
            name=str(d["name"]),
            kernel=KernelModel.from_dict(d["kernel"]),
            memory_gbps=float(d.get("memory_gbps", 2000.0)),
            host=HostCosts.from_dict(d.get("host_us", {})),
            synchronous=bool(d.get("synchronous", False)),
            comm_yields_to_compute=bool(d.get("comm_yields_to_compute", False)),
            overlap_slowdown=float(d.get("overlap_slowdown", 0.0)),
        )


@dataclass(frozen=True)
class Route:
    """How bytes get from one device to another: the resources they cross, the latency,
    and ``p2p_cap_gbps``, the most one point-to-point send/receive reaches on it
    (NCCL runs a send/receive on fewer channels than a collective)."""

    via: tuple[str, ...]
    latency_us: float
    p2p_cap_gbps: float | None = None


class Links(ABC):
    """The links of a topology: capacity of each resource and the route between devices."""

    devices: int

    @abstractmethod
    def capacity(self, resource: str) -> float:
        """GB/s of ``resource`` (one direction)."""

    @abstractmethod
    def route(self, src: int, dst: int) -> Route:
        """The route from device ``src`` to device ``dst`` (``src != dst``)."""

    @abstractmethod
    def to_dict(self) -> dict[str, Any]: ...

    @abstractmethod
    def first(self, devices: int) -> Links:
        """The links among the first ``devices`` devices only."""

    def relabelled(self, perm: Sequence[int]) -> Callable[[str], str] | None:
        """Where permuting the devices (``i`` becomes ``perm[i]``) leaves the links as they
        are (every route's image is the route between the images, with the same
        capacities, latency and cap): each resource's image by name. None where it does
        not, or where these links cannot tell (the planner then simulates every rank)."""
        return None

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Links:
        kind = d.get("kind")
        if kind == "cluster":
            return ClusterLinks.from_dict(d)
        if kind == "explicit":
            return ExplicitLinks.from_dict(d)
        raise ValueError(f"unknown links kind {kind!r}; valid values are 'cluster', 'explicit'")


_RESOURCE = re.compile(r"(d|nic)(\d+)(?:>d(\d+)|\.(out|in))")
"""A ``ClusterLinks`` resource: a device's port or NIC side, or a mesh link ``dA>dB``."""


@dataclass(frozen=True)
class ClusterLinks(Links):
    """Nodes of ``gpus_per_node`` devices. Inside a node either a switch (each device
    has one port per direction of ``intra_gbps``: NVSwitch) or a full mesh (a link of
    its own per ordered pair: ``mesh``); across nodes each device has a NIC of
    ``inter_gbps`` per direction on a non-blocking fabric (rail-optimised clusters)."""

    devices: int
    gpus_per_node: int
    intra: str  # "switch" or "mesh"
    intra_gbps: float
    intra_latency_us: float
    p2p_cap_gbps: float | None = None
    inter_gbps: float = 0.0
    inter_latency_us: float = 0.0

    def __post_init__(self) -> None:
        if self.intra not in ("switch", "mesh"):
            raise ValueError(f"intra must be 'switch' or 'mesh', got {self.intra!r}")
        if self.devices < 1 or self.gpus_per_node < 1:
            raise ValueError("devices and gpus_per_node must be positive")
        if self.devices > self.gpus_per_node and self.inter_gbps <= 0:
            raise ValueError("more devices than one node holds, but no inter-node bandwidth")

    def capacity(self, resource: str) -> float:
        return self.inter_gbps if resource.startswith("nic") else self.intra_gbps

    def route(self, src: int, dst: int) -> Route:
        g = self.gpus_per_node
        if src // g == dst // g:
            via = (f"d{src}>d{dst}",) if self.intra == "mesh" else (f"d{src}.out", f"d{dst}.in")
            return Route(via, self.intra_latency_us, self.p2p_cap_gbps)
        return Route((f"nic{src}.out", f"nic{dst}.in"), self.inter_latency_us)

    def first(self, devices: int) -> ClusterLinks:
        return replace(self, devices=devices)

    def relabelled(self, perm: Sequence[int]) -> Callable[[str], str] | None:
        """Every resource belongs to one device (ports, NIC) or one ordered pair (mesh
        links), all of a kind alike: a permutation that keeps nodes whole is a symmetry."""
        g, n = self.gpus_per_node, len(perm)
        images: dict[int, int] = {}
        for x in range(n):
            node = perm[x] // g
            if images.setdefault(x // g, node) != node:
                return None  # a node split
        if len(set(images.values())) != len(images) or sorted(perm) != list(range(n)):
            return None

        def rename(resource: str) -> str:
            match = _RESOURCE.fullmatch(resource)
            if match is None:
                raise ValueError(f"not a resource of these links: {resource!r}")
            kind, a, b, side = match.groups()
            if b is not None:
                return f"d{perm[int(a)]}>d{perm[int(b)]}"
            return f"{kind}{perm[int(a)]}.{side}"

        return rename

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "cluster", **{k: getattr(self, k) for k in self.__dataclass_fields__}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClusterLinks:
        fields = {k: v for k, v in d.items() if k != "kind"}
        return cls(**fields)


@dataclass(frozen=True)
class ExplicitLinks(Links):
    """Every route written out (small machines with an irregular tree, such as PCIe)."""

    devices: int
    resources: dict[str, float]
    routes: dict[tuple[int, int], Route]

    def __post_init__(self) -> None:
        for (a, b), route in self.routes.items():
            missing = [r for r in route.via if r not in self.resources]
            if missing:
                raise ValueError(f"route {a}->{b} crosses undeclared resource(s) {missing}")
        for a in range(self.devices):
            for b in range(self.devices):
                if a != b and (a, b) not in self.routes:
                    raise ValueError(f"no route from device {a} to device {b}")

    def capacity(self, resource: str) -> float:
        return self.resources[resource]

    def route(self, src: int, dst: int) -> Route:
        return self.routes[(src, dst)]

    def first(self, devices: int) -> ExplicitLinks:
        routes = {k: v for k, v in self.routes.items() if k[0] < devices and k[1] < devices}
        return replace(self, devices=devices, routes=routes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "explicit",
            "devices": self.devices,
            "resources": dict(self.resources),
            "routes": [
                {
                    "src": a,
                    "dst": b,
                    "via": list(r.via),
                    "latency_us": r.latency_us,
                    "p2p_cap_gbps": r.p2p_cap_gbps,
                }
                for (a, b), r in sorted(self.routes.items())
            ],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExplicitLinks:
        routes = {
            (int(r["src"]), int(r["dst"])): Route(
                tuple(r["via"]), float(r["latency_us"]), r.get("p2p_cap_gbps")
            )
            for r in d["routes"]
        }
        resources = {k: float(v) for k, v in d["resources"].items()}
        return cls(int(d["devices"]), resources, routes)


@dataclass(frozen=True)
class Topology:
    """A machine as the planner sees it. ``notes``: where its numbers come from;
    ``measured_ranks``: how many ranks ``tokenring calibrate`` measured it on (None: not
    calibrated)."""

    name: str
    device: DeviceModel
    links: Links
    notes: tuple[str, ...] = ()
    measured_ranks: int | None = None

    @property
    def devices(self) -> int:
        return self.links.devices

    def first(self, devices: int) -> Topology:
        """This machine restricted to its first ``devices`` devices."""
        if not 1 <= devices <= self.devices:
            raise ValueError(f"topology {self.name!r} has {self.devices} devices, not {devices}")
        return replace(self, links=self.links.first(devices))

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "name": self.name,
            "device": self.device.to_dict(),
            "links": self.links.to_dict(),
            "notes": list(self.notes),
            "measured_ranks": self.measured_ranks,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Topology:
        if d.get("format") != FORMAT:
            raise ValueError(f"not a topology file: format is {d.get('format')!r}, not {FORMAT!r}")
        return cls(
            name=str(d["name"]),
            device=DeviceModel.from_dict(d["device"]),
            links=Links.from_dict(d["links"]),
            notes=tuple(d.get("notes", ())),
            measured_ranks=None if d.get("measured_ranks") is None else int(d["measured_ranks"]),
        )

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Topology:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"cannot read topology file {str(path)!r}: {error}") from None
        return cls.from_dict(data)
