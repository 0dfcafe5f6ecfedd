"""What each operation of a schedule costs for one call: bytes moved, device time, host time.

Sizes follow the schedule language (``schedules/ir.py``): rows hold the tokens of
their pieces (the schedule's geometry), one of ``head_parts`` parts of their
family's heads, and per pass the components of ``COMPONENTS``. Inputs (q, k, v,
do) travel in the input dtype; results in the slot's precision (float32 when it
accumulates, the input dtype on the wire); ``lse`` and ``delta`` are float32.
"""

from __future__ import annotations

from ..call.description import CallDescription
from ..execution.kernels import prefers_varlen
from ..options import Pass
from ..schedules.blocks import sub_calls
from ..schedules.ir import (
    COMPONENTS,
    FAMILY,
    AllGather,
    AllToAll,
    Compute,
    Direction,
    Merge,
    Precision,
    ReduceScatter,
    Rows,
    Schedule,
    SlotKind,
)
from ..schedules.masks import BlockKind
from ..schedules.segments import varlen_block
from .topology import DeviceModel

MASKED_SLOWDOWN = 5.0
"""How much slower per computed pair a kernel call under an explicit mask runs than a
dense one (one H100: the memory-efficient kernel with a bias against cuDNN, 32K x 32K,
benchmarks/RESULTS.md 0e)."""

DECODE_ROWS = 16
"""Blocks of at most this many query tokens are priced by the bytes of keys and values
they read (``_decode_seconds``), not by the kernel table, whose smallest measured block
is hundreds of tokens a side."""

KV_READ_OVER_STREAM = 1.6
"""How much faster a decode block reads keys and values than ``memory_gbps`` (the merges'
rate, which reads and writes): one H100 read them at 2.96-3.06 TB/s from 128K cached
tokens on, against the 1,878 GB/s merges are priced at (benchmarks/RESULTS.md 0f)."""

DECODE_LATENCY_US = 30.0
"""A decode block's time beyond its bytes (one H100, batch 1: 48 us at 16K cached tokens
where the bytes take 22 us; 30 us fits 16K-512K within 10 %, RESULTS.md 0f)."""

VARLEN_SLOWDOWN = 2.0
"""How much slower per allowed pair flash's variable-length call runs than the dense
kernel the tables measure (one H100, 32K: dense causal flash 0.53x of cuDNN forward,
0.57x forward and backward; under a 4K window 0.43x and 0.46x; RESULTS.md 0e)."""

__all__ = ["collective_pair_bytes", "compute_seconds", "merge_seconds", "rows_bytes"]

RESULT_KINDS = (SlotKind.QUERY_RESULT, SlotKind.KV_RESULT)


def _heads(call: CallDescription, family: str, head_parts: int, part_count: int) -> int:
    total = call.heads_kv if family == "kv" else call.heads_q
    return max(total // head_parts, 1) // part_count or 1


def rows_bytes(
    sched: Schedule, rows: Rows, pass_: Pass, call: CallDescription, tokens: float | None = None
) -> float:
    """Bytes of ``rows`` of one of ``sched``'s slots (``tokens`` overrides their count)."""
    spec = sched.slots[rows.slot]
    tokens = sched.tokens(rows) if tokens is None else tokens
    total = 0.0
    for component in COMPONENTS[(pass_, spec.kind)]:
        family = FAMILY[component]
        heads = _heads(call, "kv" if family == "kv" else "q", spec.head_parts, rows.part.count)
        if family == "row":
            width, size = 1, 4
        elif spec.kind in RESULT_KINDS and spec.precision is Precision.ACCUM:
            width, size = call.head_dim, 4
        else:
            width, size = call.head_dim, call.itemsize
        total += call.batch * tokens * heads * width * size
    return total


def collective_pair_bytes(sched: Schedule, move, pass_: Pass, call: CallDescription) -> float:
    """Bytes one member sends to each other member in collective ``move``."""
    match move:
        case AllGather():
            return rows_bytes(sched, move.src, pass_, call)
        case AllToAll(direction=Direction.SEQ_TO_HEADS):
            # the sender's cells, with the head part the receiver holds
            return rows_bytes(sched, move.dst, pass_, call, tokens=sched.tokens(move.src))
        case AllToAll():
            # the receiver's cells (about this member's), with the head part the sender holds
            return rows_bytes(sched, move.src, pass_, call, tokens=sched.tokens(move.dst))
        case ReduceScatter():
            return rows_bytes(sched, move.dst, pass_, call)
    raise TypeError(f"not a collective: {move!r}")


def compute_seconds(
    sched: Schedule, op: Compute, pass_: Pass, call: CallDescription, device: DeviceModel
) -> float:
    """Device time of one block kernel call and the accumulations it implies."""
    spec = sched.slots[op.q.slot]
    heads = _heads(call, "q", spec.head_parts, op.q.part.count)
    bh, wide = call.batch * heads, call.itemsize >= 4
    if op.kind is BlockKind.PARTIAL and _runs_varlen(call, device):
        seconds = _varlen_seconds(sched, op, pass_, call, device, bh, wide)
    elif op.kind is BlockKind.PARTIAL:  # as it runs: its sub-calls (execution/block_masks.py)
        q_cells = sched.table(op.q).cells(op.q.pieces)
        kv_cells = sched.table(op.kv).cells(op.kv.pieces)
        seconds = 0.0
        for q0, q1, k0, k1, kind in sub_calls(q_cells, kv_cells, op.mask):
            part = device.kernel.seconds(
                pass_, q1 - q0, k1 - k0, kind is BlockKind.DIAG, bh, call.head_dim, wide
            )
            seconds += part * (MASKED_SLOWDOWN if kind is BlockKind.PARTIAL else 1.0)
    elif sched.tokens(op.q) <= DECODE_ROWS and not device.synchronous:
        seconds = _decode_seconds(rows_bytes(sched, op.kv, pass_, call), device)
    else:
        lq, lk = sched.tokens(op.q), sched.tokens(op.kv)
        causal = op.kind is BlockKind.DIAG
        seconds = device.kernel.seconds(pass_, lq, lk, causal, bh, call.head_dim, wide)
    # Cells that accumulate instead of overwrite add one merge pass over their rows.
    if not all(op.fresh_q):
        seconds += _stream_seconds(rows_bytes(sched, op.q_out, pass_, call), device)
    if op.kv_out is not None and not all(op.fresh_kv):
        seconds += _stream_seconds(rows_bytes(sched, op.kv_out, pass_, call), device)
    return seconds


def _runs_varlen(call: CallDescription, device: DeviceModel) -> bool:
    """Whether ``auto`` runs the call's masked blocks as variable-length calls (a GPU
    with such a kernel: flash; never the CPU's kernels)."""
    return not device.synchronous and prefers_varlen(call.mask.windowed, call.mask.mean_document)


def _varlen_seconds(
    sched: Schedule, op: Compute, pass_: Pass, call: CallDescription, device: DeviceModel,
    batch_heads: int, wide: bool,
) -> float:  # fmt: skip
    """A masked block as it runs on the GPU: one call per window group
    (``schedules/segments.py``), priced as a dense call with the group's queries and
    as many keys per query as it allows, at flash's rate (``VARLEN_SLOWDOWN``)."""
    q_cells = sched.table(op.q).cells(op.q.pieces)
    kv_cells = sched.table(op.kv).cells(op.kv.pieces)
    seconds = 0.0
    for rows, pairs in varlen_block(q_cells, kv_cells, op.mask).sizes:
        keys = max(1, round(pairs / rows))
        seconds += VARLEN_SLOWDOWN * device.kernel.seconds(
            pass_, rows, keys, False, batch_heads, call.head_dim, wide
        )
    return seconds


def _decode_seconds(kv_bytes: float, device: DeviceModel) -> float:
    """A block of a few queries against many keys (a decode step): it reads the keys and
    values once and computes next to nothing, so it costs their bytes at the device's
    read rate and a fixed latency."""
    return kv_bytes / (device.memory_gbps * KV_READ_OVER_STREAM * 1e9) + DECODE_LATENCY_US * 1e-6


def merge_seconds(
    sched: Schedule, op: Merge, pass_: Pass, call: CallDescription, device: DeviceModel
) -> float:
    """Device time of one merge (read the partial, read and write the accumulator)."""
    return _stream_seconds(rows_bytes(sched, op.src, pass_, call), device)


def _stream_seconds(nbytes: float, device: DeviceModel) -> float:
    return 3 * nbytes / (device.memory_gbps * 1e9) + device.kernel.launch_us * 1e-6
