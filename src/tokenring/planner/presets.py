"""Named machines: the topologies the planner knows without a calibration file.

Every number says where it comes from (``Topology.notes``; docs/scaling.md has
the table). The block-kernel table of the GPU presets is the one measured on one
H200 (``data/h200-bf16.json``, written by ``benchmarks/calibrate_h200_probe.py``),
scaled per card: the H100 by the single-device rows of ``benchmarks/runs/
2026-11-25-h100x2-session2.json``, other cards by their dense bf16 peak.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from functools import cache
from importlib import resources

from ..options import Pass
from .topology import (
    ClusterLinks,
    DeviceModel,
    ExplicitLinks,
    HostCosts,
    KernelModel,
    Route,
    Topology,
)

__all__ = ["PRESETS", "h200_device", "preset", "preset_names"]

H100_OVER_H200 = {Pass.FORWARD: 0.9, Pass.BACKWARD: 0.9}
"""H100 SXM block rates over the H200 table, fitted to the committed 2 x H100 rows at
64K-128K, where communication hides behind compute and host time is negligible. The
single-device causal rows alone say 0.93-1.02: the pair ran its blocks slower than
one GPU runs a whole sequence (two busy GPUs, NCCL's kernels beside them; docs/scaling.md)."""

OVERLAP = 0.0
"""Kernel slowdown while data moves: the committed rows show none beyond the fit above
(scanning 0 to 0.4 moved no row by more than 5%), so the presets leave it off."""

GPU_HOST = HostCosts(call_us=60, compute_us=12, merge_us=8, post_us=25, transfer_us=6, wait_us=4)
"""Host microseconds per operation on a GPU host: the one-rank call measured on the H200
(data/h200-bf16.json) and per-operation costs from the 2 x H100 host profile."""


@cache
def _h200() -> tuple[KernelModel, float]:
    raw = json.loads(resources.files(__package__).joinpath("data/h200-bf16.json").read_text())
    return replace(KernelModel.from_dict(raw["kernel"]), launch_us=5.0), float(raw["merge_gbps"])


def _gpu(name: str, factor: dict[Pass, float], memory_gbps: float) -> DeviceModel:
    kernel, _ = _h200()
    return DeviceModel(
        name,
        kernel.scaled(factor),
        memory_gbps=memory_gbps,
        host=GPU_HOST,
        overlap_slowdown=OVERLAP,
    )


def h200_device() -> DeviceModel:
    """One H200 as measured (data/h200-bf16.json)."""
    return _gpu("H200", {p: 1.0 for p in Pass}, _h200()[1])


def _h100() -> DeviceModel:
    # Merges stream at the H200's measured rate times the memory bandwidth ratio (3.35/4.8).
    return _gpu("H100 SXM", H100_OVER_H200, _h200()[1] * 3.35 / 4.8)


NVLINK = dict(intra_gbps=370.0, intra_latency_us=8.0, p2p_cap_gbps=143.0)
"""H100 NVLink, per GPU and direction: 370 GB/s for collectives (450 GB/s at NCCL's
typical 80 % bus efficiency), 143 GB/s for one point-to-point transfer (the K,V
transfer measured in graph replay on the pair, RESULTS.md), 8 us latency."""


def h100_nvlink_2(gpus: int) -> Topology:
    """The pair our 2 x H100 RESULTS come from (NV18, one NVLink bundle each way)."""
    links = ClusterLinks(gpus, 2, "mesh", **NVLINK)
    return Topology(
        "h100-nvlink-2",
        _h100(),
        links,
        (
            "kernel: H200 table x 0.9, fitted to the committed 2 x H100 rows at 64K-128K",
            "p2p 143 GB/s: the K,V transfer measured in graph replay (RESULTS.md, 32K)",
            "collectives 370 GB/s: NV18 (450 GB/s) at NCCL's typical 80% bus efficiency",
        ),
    )


def h100_nvswitch_8(gpus: int) -> Topology:
    """One HGX H100 node: 8 GPUs, each with one NVSwitch port per direction."""
    links = ClusterLinks(gpus, 8, "switch", **NVLINK)
    return Topology(
        "h100-nvswitch-8",
        _h100(),
        links,
        ("kernel and p2p cap as h100-nvlink-2; every GPU's NVSwitch port 370 GB/s per direction",),
    )


def h100_ib(gpus: int) -> Topology:
    """Nodes of 8 H100 on NVSwitch, one 400 Gb/s InfiniBand NIC per GPU (rail-optimised)."""
    links = ClusterLinks(gpus, 8, "switch", **NVLINK, inter_gbps=45.0, inter_latency_us=12.0)
    return Topology(
        "h100-ib",
        _h100(),
        links,
        ("as h100-nvswitch-8 inside a node; across nodes 400 Gb/s = 50 GB/s per GPU, 45 achieved",),
    )


A10_OVER_H200 = 0.149
"""A10 over H200 block rates, fitted to the TokenRing paper's 3.5 ms per compute-bound
step (4 x A10, 24K tokens, 32 heads, fp16): about 97 TFLOP/s on 6K blocks, 78% of the A10's
125 TFLOP/s dense fp16 peak (the peaks' ratio, 125/989 = 0.126, would give 4.1 ms)."""


def a10_pcie_4(gpus: int) -> Topology:
    """The original TokenRing testbed: 4 x A10 on PCIe 4.0, GPUs 0-1 under one switch and
    2-3 under another (PIX inside a switch, PXB between them through the bridge)."""
    device = _gpu("A10", {p: A10_OVER_H200 for p in Pass}, memory_gbps=500.0)
    resources_gbps = {f"d{i}.{d}": 24.0 for i in range(4) for d in ("up", "down")}
    resources_gbps |= {f"sw{s}.{d}": 21.3 for s in "AB" for d in ("up", "down")}
    switch = {0: "A", 1: "A", 2: "B", 3: "B"}
    routes = {}
    for a in range(4):
        for b in range(4):
            if a == b:
                continue
            if switch[a] == switch[b]:
                routes[(a, b)] = Route((f"d{a}.up", f"d{b}.down"), 10.0, 20.0)
            else:
                via = (f"d{a}.up", f"sw{switch[a]}.up", f"sw{switch[b]}.down", f"d{b}.down")
                routes[(a, b)] = Route(via, 15.0, 13.0)
    links = ExplicitLinks(4, resources_gbps, routes).first(gpus)
    return Topology(
        "a10-pcie-4",
        device,
        links,
        (
            "kernel: H200 table x 0.149: the paper's compute-bound 3.5 ms TokenRing steps at 24K",
            "PXB p2p 13 GB/s: ring's 7.6 ms per step moving 98 MB of K,V (TokenRing paper, 24K)",
            "switch uplink 21.3 GB/s per direction: the paper's 4.6 ms step (Q and partials)",
            "PIX p2p 20 GB/s, GPU port 24 GB/s: PCIe 4.0 x16 (31.5 GB/s) at typical P2P efficiency",
        ),
    )


def npu_mesh_8(gpus: int) -> Topology:
    """8 accelerators in a full mesh: a link of its own per ordered pair (each device's
    bandwidth split over seven peers), the topology the TokenRing claims target."""
    device = _gpu("NPU (H200-like kernels at 0.4x)", {p: 0.4 for p in Pass}, memory_gbps=1600.0)
    links = ClusterLinks(gpus, 8, "mesh", intra_gbps=28.0, intra_latency_us=10.0)
    return Topology(
        "npu-mesh-8",
        device,
        links,
        (
            "assumed: 392 GB/s per device over 7 peers = 28 GB/s per ordered pair, 10 us",
            "assumed: block rates 0.4x the H200's (a ~400 TFLOP/s-class accelerator)",
        ),
    )


@cache
def _cpu() -> tuple[KernelModel, float]:
    raw = json.loads(resources.files(__package__).joinpath("data/cpu-float32.json").read_text())
    return KernelModel.from_dict(raw["kernel"]), float(raw["merge_gbps"])


CPU_HOST = HostCosts(
    call_us=35, compute_us=0, merge_us=200, post_us=420, transfer_us=300, wait_us=0
)
"""Host microseconds per operation of gloo processes on a CPU: fitted, with the link and
the kernel factors below, by ``benchmarks/fit_cpu_preset.py`` to the committed CPU bench
rows (``benchmarks/runs/2026-12-06-cpu2-e053273-bench.json``)."""

CPU_KERNEL = {Pass.FORWARD: 1.15, Pass.BACKWARD: 1.43}
"""The CPU kernel table (measured at head_dim 128) times these for the bench's head_dim 32."""


def cpu_gloo(gpus: int) -> Topology:
    """Processes on one CPU host over gloo (tests, the demo): synchronous kernels, the
    block-kernel table measured on the 2-core development box (``data/cpu-float32.json``)."""
    kernel, merge_gbps = _cpu()
    device = DeviceModel(
        "CPU",
        kernel.scaled(CPU_KERNEL),
        memory_gbps=merge_gbps,
        host=CPU_HOST,
        synchronous=True,
        comm_yields_to_compute=False,
    )
    links = ClusterLinks(
        gpus, max(gpus, 1), "mesh", intra_gbps=0.17, intra_latency_us=110.0, p2p_cap_gbps=3.9
    )
    return Topology(
        "cpu-gloo",
        device,
        links,
        (
            "kernel table: tokenring calibrate --dtype fp32 on 2 gloo processes of 2 CPU cores",
            "host costs, links and kernel factors fitted to the committed CPU bench rows "
            "(benchmarks/fit_cpu_preset.py)",
        ),
    )


PRESETS: dict[str, tuple[int | None, Callable[[int], Topology]]] = {
    "a10-pcie-4": (4, a10_pcie_4),
    "h100-nvlink-2": (2, h100_nvlink_2),
    "h100-nvswitch-8": (8, h100_nvswitch_8),
    "h100-ib": (None, h100_ib),
    "npu-mesh-8": (8, npu_mesh_8),
    "cpu-gloo": (None, cpu_gloo),
}
"""Name -> (most devices it has, or None for any number; the builder)."""


def preset_names() -> list[str]:
    return list(PRESETS)


def preset(name: str, gpus: int) -> Topology:
    """Preset ``name`` with ``gpus`` devices (at most what it has)."""
    if name not in PRESETS:
        raise ValueError(f"unknown topology preset {name!r}; valid values are {preset_names()}")
    most, build = PRESETS[name]
    if gpus < 1 or (most is not None and gpus > most):
        limit = f"1 to {most}" if most is not None else "at least 1"
        raise ValueError(f"preset {name!r} takes {limit} devices, not {gpus}")
    if name == "h100-ib" and gpus > 8 and gpus % 8:
        raise ValueError(f"preset 'h100-ib' is nodes of 8: {gpus} GPUs is not a multiple of 8")
    return build(gpus)
