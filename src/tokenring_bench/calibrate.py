"""``tokenring calibrate``: measure what the planner's model needs on this machine and
write it as a topology file (docs/scaling.md, "Topology files").

Per device (one GPU, or the CPU): the block kernel's achieved TFLOP/s over a grid of
query length x key length (non-causal) and causal squares, forward and backward, at
32 heads and head_dim 128 in the asked dtype; how much slower float32 runs; what a
merge streams at; host time of a one-rank call. With a process group of several
ranks (``tokenring calibrate`` under ``torchrun``, or ``--world-size``) also
point-to-point bandwidth one way and both ways, and all-to-all and all-gather
bandwidth between the ranks. What it could not measure is listed in the file's
``notes`` (and printed), and the preset it started from fills those parts.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import replace

import torch
import torch.distributed as dist

from tokenring.execution.kernels import BlockSpec, select_kernel
from tokenring.execution.merge import merge_into
from tokenring.options import Pass
from tokenring.planner.topology import (
    ClusterLinks,
    DeviceModel,
    KernelModel,
    Topology,
    block_flops,
)

__all__ = ["calibrate", "calibrate_device", "calibrate_links", "call_timer"]

GPU_LENGTHS = tuple(2**n for n in range(7, 17))  # 128 .. 64K
CPU_LENGTHS = tuple(2**n for n in range(5, 11))  # 32 .. 1K: CPU blocks are slow
LINK_BYTES = {"cuda": 256 << 20, "cpu": 32 << 20}
"""Bytes per rank each link measurement moves (gloo on a CPU is timed well with less)."""
# torch 2.13 renamed the flat all-gather (the old name warns); older releases have only that
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
REF_HEADS, HEAD_DIM = 32, 128


def call_timer(device: torch.device) -> Callable[[Callable[[], object], int], float]:
    """Seconds per call of ``fn`` (median of ``repeats``), GPU-timed on CUDA."""

    def cuda_time(fn: Callable[[], object], repeats: int) -> float:
        fn()
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times)

    def cpu_time(fn: Callable[[], object], repeats: int) -> float:
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    return cuda_time if device.type == "cuda" else cpu_time


def _block_rate(
    pass_: Pass,
    lq: int,
    lk: int,
    causal: bool,
    device: torch.device,
    dtype: torch.dtype,
    timer,
    repeats: int,
) -> float:
    """Achieved TFLOP/s of one block kernel call of this shape (the kernel ``auto`` picks)."""
    spec = BlockSpec(
        device.type, dtype, HEAD_DIM, REF_HEADS, REF_HEADS, causal, pass_ is Pass.BACKWARD
    )
    kernel = select_kernel("auto", spec)
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(length: int) -> torch.Tensor:
        shape = (1, length, REF_HEADS, HEAD_DIM)
        return torch.randn(shape, generator=gen, device=device, dtype=dtype)

    q, k, v = rand(lq), rand(lk), rand(lk)
    scale = HEAD_DIM**-0.5
    if pass_ is Pass.FORWARD:
        seconds = timer(lambda: kernel.forward(q, k, v, causal, scale), repeats)
    else:
        out, lse = kernel.forward(q, k, v, causal, scale)
        do = torch.randn_like(out)
        delta = (do.float() * out.float()).sum(-1).transpose(1, 2).contiguous()
        seconds = timer(
            lambda: kernel.backward(do, q, k, v, out, lse, delta, causal, scale), repeats
        )
    return block_flops(pass_, lq, lk, causal, REF_HEADS, HEAD_DIM) / seconds / 1e12


def _repeats_for(flops: float) -> int:
    """Fewer repeats for big blocks: each is timed well already."""
    return 3 if flops > 5e12 else 10


def _table_row(label: str, cells: list[str]) -> str:
    """One line of the kernel table as ``calibrate`` prints it: a label, then aligned cells."""
    return f"{label:>10}" + "".join(f" {cell:>8}" for cell in cells)  # a space at least


def measure_kernels(
    device: torch.device,
    dtype: torch.dtype,
    lengths: tuple[int, ...],
    progress: Callable[[str], None] = print,
) -> KernelModel:
    """The block-kernel table of ``KernelModel`` on ``device``."""
    timer = call_timer(device)
    full: dict[Pass, tuple[tuple[float, ...], ...]] = {}
    causal: dict[Pass, tuple[float, ...]] = {}
    for pass_ in Pass:
        progress(
            f"{pass_.value} block kernel, TFLOP/s (a row per query length Lq, "
            "a column per key length Lk; causal: Lq = Lk)"
        )
        progress(_table_row("Lq \\ Lk", [str(n) for n in lengths]))
        rows = []
        for lq in lengths:
            row = []
            for lk in lengths:
                reps = _repeats_for(block_flops(pass_, lq, lk, False, REF_HEADS, HEAD_DIM))
                row.append(_block_rate(pass_, lq, lk, False, device, dtype, timer, reps))
            rows.append(tuple(row))
            progress(_table_row(str(lq), [f"{r:.3g}" for r in row]))
        full[pass_] = tuple(rows)
        causal[pass_] = tuple(
            _block_rate(pass_, n, n, True, device, dtype, timer, _repeats_for(1e12 * n / 4096))
            for n in lengths
        )
        progress(_table_row("causal", [f"{r:.3g}" for r in causal[pass_]]))
    probe = lengths[len(lengths) // 2]
    fast = _block_rate(Pass.FORWARD, probe, probe, False, device, dtype, timer, 5)
    slow = _block_rate(Pass.FORWARD, probe, probe, False, device, torch.float32, timer, 5)
    launch = timer(lambda: torch.empty(1, device=device).add_(1), 50)
    return KernelModel(
        lengths=lengths,
        full=full,
        causal=causal,
        ref_heads=REF_HEADS,
        head_dim=HEAD_DIM,
        launch_us=max(launch * 1e6, 1.0),
        float32_factor=max(fast / slow, 1.0),
    )


def measure_merge_gbps(device: torch.device, dtype: torch.dtype) -> float:
    """GB/s a forward LSE merge of a 16K x 32-head block streams (bytes read and written)."""
    timer = call_timer(device)
    length = 16384 if device.type == "cuda" else 1024
    gen = torch.Generator(device=device).manual_seed(1)
    out = torch.randn(
        1, length, REF_HEADS, HEAD_DIM, device=device, dtype=torch.float32, generator=gen
    )
    lse = torch.randn(1, REF_HEADS, length, device=device, dtype=torch.float32, generator=gen)
    block = torch.randn(out.shape, device=device, dtype=dtype, generator=gen)
    block_lse = torch.randn(lse.shape, device=device, dtype=torch.float32, generator=gen)
    seconds = timer(lambda: merge_into(out, lse, block, block_lse), 20)
    moved = 2 * out.nbytes + block.nbytes + 3 * lse.nbytes
    return moved / seconds / 1e9


def _own_group() -> dist.ProcessGroup | None:
    """A group of this rank alone when several run (under ``torchrun``), else None: the
    one-rank call is timed on every rank at once, without traffic."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    return dist.new_group([dist.get_rank()], use_local_synchronization=True)


def measure_call_us(device: torch.device, dtype: torch.dtype) -> float:
    """Host microseconds of a one-rank ``tr.attention`` call (queued, not waited for).

    The tensors are tiny so that, on a CPU, where the kernel runs on the calling thread,
    the kernel's own time (priced by the kernel table) stays out of the host time."""
    import tokenring as tr

    q = torch.randn(1, 16, 2, 16, device=device, dtype=dtype)
    group = _own_group()
    calls = 200
    for _ in range(20):
        tr.attention(q, q, q, causal=True, group=group)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        tr.attention(q, q, q, causal=True, group=group)
    seconds = (time.perf_counter() - t0) / calls
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seconds * 1e6


def calibrate_device(
    base: DeviceModel,
    device: torch.device,
    dtype: torch.dtype,
    progress: Callable[[str], None] = print,
    lengths: tuple[int, ...] | None = None,
) -> DeviceModel:
    """``base`` with every per-device number measured on ``device`` (``lengths``: the
    kernel table's grid; default 128-64K on a GPU, 32-1K on a CPU)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    if lengths is None:
        lengths = GPU_LENGTHS if device.type == "cuda" else CPU_LENGTHS
    kernel = measure_kernels(device, dtype, lengths, progress)
    merge = measure_merge_gbps(device, dtype)
    call_us = measure_call_us(device, dtype)
    progress(f"merge {merge:.0f} GB/s, one-rank call {call_us:.0f} us of host time")
    host = replace(base.host, call_us=call_us)
    return replace(
        base,
        name=name,
        kernel=kernel,
        memory_gbps=merge,
        host=host,
        synchronous=device.type == "cpu",
    )


def _bandwidth(fn: Callable[[], object], nbytes: int, device: torch.device) -> float:
    """GB/s of ``fn`` moving ``nbytes`` per rank (wall time, all ranks in step)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(5):
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times) / 1e9


def calibrate_links(device: torch.device, nbytes: int = 256 << 20) -> dict[str, float]:
    """P2P bandwidth one way and both ways between ranks 0 and 1, and all-to-all and
    all-gather bandwidth per rank over the default group (every rank calls this)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    buf = torch.empty(nbytes // 2, dtype=torch.float16, device=device)
    recv = torch.empty_like(buf)

    def one_way() -> None:
        if rank == 0:
            dist.send(buf, 1)
        elif rank == 1:
            dist.recv(recv, 0)

    def both_ways() -> None:
        if rank in (0, 1):
            peer = 1 - rank
            ops = [dist.P2POp(dist.isend, buf, peer), dist.P2POp(dist.irecv, recv, peer)]
            for work in dist.batch_isend_irecv(ops):
                work.wait()

    chunk = buf.numel() // world * world
    a2a_in, a2a_out = buf[:chunk], recv[:chunk]
    piece = buf[: chunk // world]
    gathered = recv[: piece.numel() * world]
    return {
        "p2p_one_way_gbps": _bandwidth(one_way, nbytes, device),
        "p2p_both_ways_gbps": _bandwidth(both_ways, nbytes, device),
        "all_to_all_gbps": _bandwidth(
            lambda: dist.all_to_all_single(a2a_out, a2a_in),
            a2a_in.nbytes * (world - 1) // world,
            device,
        ),
        "all_gather_gbps": _bandwidth(
            lambda: _ALL_GATHER(gathered, piece),
            piece.nbytes * (world - 1),
            device,
        ),
    }


def calibrate(
    base: Topology,
    device: torch.device,
    dtype: torch.dtype,
    progress: Callable[[str], None] = print,
    lengths: tuple[int, ...] | None = None,
) -> Topology:
    """``base`` (a preset of as many devices as ranks) with what can be measured here
    measured; ``notes`` say which, and ``measured_ranks`` on how many ranks."""
    measured = calibrate_device(base.device, device, dtype, progress, lengths)
    notes = [f"device measured by tokenring calibrate ({measured.name}, {dtype})"]
    links = base.links
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if world > 1:
        found = calibrate_links(device, LINK_BYTES.get(device.type, LINK_BYTES["cuda"]))
        progress(", ".join(f"{k} {v:.1f}" for k, v in found.items()))
        if isinstance(links, ClusterLinks):
            links = replace(
                links,
                intra_gbps=max(found["all_to_all_gbps"], found["all_gather_gbps"]),
                p2p_cap_gbps=found["p2p_one_way_gbps"],
            )
        notes.append("links measured: " + ", ".join(f"{k}={v:.1f}" for k, v in found.items()))
    else:
        notes.append(
            f"not_measured: links (one process: P2P, all-to-all and all-gather bandwidth come "
            f"from preset {base.name!r})"
        )
    return Topology(f"calibrated-{measured.name}", measured, links, tuple(notes), world)
