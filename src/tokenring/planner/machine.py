"""Which topology describes the machine a call runs on (for ``strategy="auto"``).

A calibration file or preset named by ``Settings.topology`` (``TOKENRING_TOPOLOGY``)
wins; otherwise the preset matched to the device: A10s -> ``a10-pcie-4`` (up to 4),
H100 and H200 -> ``h100-nvlink-2`` (2 GPUs), ``h100-nvswitch-8`` (up to 8) or
``h100-ib`` (more; the H200 with its own measured kernel table), CPU ->
``cpu-gloo``. Any other GPU is planned as an H100, and ``describe`` says so.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from .presets import PRESETS, h200_device, preset
from .topology import Topology

__all__ = ["load_topology", "topology_for"]


def _gpu_preset(world: int) -> str:
    if world <= 2:
        return "h100-nvlink-2"
    return "h100-nvswitch-8" if world <= 8 else "h100-ib"


def load_topology(name_or_path: str | Path | Topology, gpus: int) -> Topology:
    """A preset by name, a topology file, or a ``Topology``, with ``gpus`` devices."""
    if isinstance(name_or_path, Topology):
        return name_or_path.first(gpus)
    if str(name_or_path) in PRESETS:
        return preset(str(name_or_path), gpus)
    if not Path(name_or_path).is_file():
        raise ValueError(
            f"topology {str(name_or_path)!r} is neither a preset ({', '.join(PRESETS)}) nor a file"
        )
    return Topology.load(name_or_path).first(gpus)


def topology_for(device: torch.device, world: int, setting: str | None = None) -> Topology:
    """The topology of ``world`` ranks on devices like ``device`` (see the module docstring)."""
    if setting:
        return load_topology(setting, world)
    if device.type != "cuda":
        return preset("cpu-gloo", world)
    name = torch.cuda.get_device_name(device)
    if "A10" in name and "A100" not in name and world <= 4:
        return preset("a10-pcie-4", world)
    topo = preset(_gpu_preset(world), world)
    if "H200" in name:
        return replace(topo, name=f"{topo.name} (H200)", device=h200_device())
    if "H100" not in name:
        notes = (*topo.notes, f"{name}: no preset; planned as an H100 (run tokenring calibrate)")
        return replace(topo, notes=notes)
    return topo
