"""Which topology describes the machine a call runs on (for ``strategy="auto"``).

``topology_for`` matches a preset to the devices: A10s -> ``a10-pcie-4`` (up to 4),
H100 and H200 -> ``h100-nvlink-2`` (2 GPUs), ``h100-nvswitch-8`` (up to 8) or
``h100-ib`` (more, in nodes of 8; the H200 with its own measured kernel table), CPU
-> ``cpu-gloo``. Any other GPU is planned as an H100, and the notes say so.

``auto_topology`` is what ``auto`` plans with: a calibration file or preset named by
``Settings.topology`` (``TOKENRING_TOPOLOGY``) wins, but never fails a call. A file of
fewer devices than the call's ranks (``tokenring calibrate`` on one process writes
one device) lends its device to the matched preset's links; a setting that cannot be
used at all gives way to the matched preset. Either way it says what it did, and how
to measure the machine (``calibrate_command``), for a warning.
"""

from __future__ import annotations

import shlex
from dataclasses import replace
from pathlib import Path

import torch

from .presets import PRESETS, h100_ib, h200_device, preset
from .topology import Topology

__all__ = ["auto_topology", "calibrate_command", "load_topology", "topology_for"]


def calibrate_command(ranks: int | str, output: str | Path) -> str:
    """The command that measures ``ranks`` ranks of this machine (a number, or a word
    standing for one), links included, into the topology file ``output`` (``tokenring
    calibrate`` under ``torchrun``)."""
    path = shlex.quote(str(output))
    return f"torchrun --nproc-per-node {ranks} -m tokenring_bench calibrate --output {path}"


def _gpu_preset(world: int) -> Topology:
    """The H100 preset for ``world`` GPUs; beyond 8, nodes of 8 (the last one partly
    filled when ``world`` is not a multiple of 8)."""
    if world <= 2:
        return preset("h100-nvlink-2", world)
    return preset("h100-nvswitch-8", world) if world <= 8 else h100_ib(world)


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


def topology_for(device: torch.device, world: int) -> Topology:
    """The preset matched to ``world`` ranks on devices like ``device`` (see the module
    docstring)."""
    if device.type != "cuda":
        return preset("cpu-gloo", world)
    name = torch.cuda.get_device_name(device)
    if "A10" in name and "A100" not in name and world <= 4:
        return preset("a10-pcie-4", world)
    topo = _gpu_preset(world)
    if "H200" in name:
        return replace(topo, name=f"{topo.name} (H200)", device=h200_device())
    if "H100" not in name:
        notes = (*topo.notes, f"{name}: no preset; planned as an H100 (run tokenring calibrate)")
        return replace(topo, notes=notes)
    return topo


def _with_matched_links(found: Topology, matched: Topology, setting: str) -> Topology:
    """``found``'s device with ``matched``'s links (a file of fewer devices than ranks)."""
    notes = (*found.notes, f"{setting}: {found.devices} device(s); links of {matched.name!r}")
    return replace(
        matched, name=f"{found.name} + {matched.name} links", device=found.device, notes=notes
    )


def auto_topology(
    device: torch.device, world: int, setting: str | None
) -> tuple[Topology, str | None]:
    """The topology ``strategy="auto"`` plans ``world`` ranks on devices like ``device``
    with, and what was wrong with ``setting`` (None: nothing). Never raises for the
    setting: see the module docstring."""
    if not setting:
        return topology_for(device, world), None
    if setting in PRESETS:
        try:
            return preset(setting, world), None
        except ValueError as error:
            matched = topology_for(device, world)
            return matched, f"{error}: strategy='auto' plans for preset {matched.name!r} instead"
    try:
        found = Topology.load(setting)
    except ValueError as error:
        matched = topology_for(device, world)
        return matched, (
            f"topology {setting!r} is neither a preset ({', '.join(PRESETS)}) nor a readable "
            f"topology file ({error}): strategy='auto' plans for preset {matched.name!r} instead"
        )
    if found.devices >= world:
        return found.first(world), None
    matched = topology_for(device, world)
    ranks = found.measured_ranks
    measured = f" (calibrated on {ranks} rank{'s' if ranks > 1 else ''})" if ranks else ""
    return _with_matched_links(found, matched, setting), (
        f"topology file {setting!r} ({found.name!r}) has {found.devices} device(s){measured}, "
        f"not {world}: strategy='auto' plans {world} ranks with its device and the links of "
        f"preset {matched.name!r}. To measure {world} ranks, links included: "
        f"{calibrate_command(world, setting)}"
    )
