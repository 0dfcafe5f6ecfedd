"""One GPU: a decode step against one rank's part of a KV cache (``tr.KVCache``).

For local cache shards of 16K to 512K tokens and batches of 1 and 8 (Llama-3-8B
attention: 32 query heads, 8 key/value heads of 128, bfloat16), per step:

- the kernel alone reading each row's valid keys (``kernels/cache_flash.py``), and
  PyTorch's SDPA on the same keys as dense tensors; both captured in a CUDA graph and
  timed on the device;
- K,V bandwidth: the bytes of keys and values read over the kernel's time, against the
  device's copy bandwidth (bytes read and written by a large device-to-device copy over
  its time: the most a kernel that reads memory can reach);
- a whole ``cache.attend`` step, eager and replayed from ``cache.capture``: GPU time
  per step, and host time per step (issuing steps back to back without waiting;
  ``lean``: a captured step fed through its own input tensors, outputs not cloned).

Targets (issue 20): 0.7x of the copy bandwidth or better, and within 10 % of SDPA, on
shards of 128K-512K; a captured step at most 30 us of host time.

    python benchmarks/decode_cache.py --json decode.json
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from gpu_timing import device_ms, host_us

import tokenring as tr
from tokenring.execution.kernels.cache_flash import flash_key_lengths

HEADS_Q, HEADS_KV, DIM = 32, 8, 128
SHARDS = (16 << 10, 64 << 10, 128 << 10, 256 << 10, 512 << 10)
BATCHES = (1, 8)


def graph_ms(fn, iters: int = 50) -> float:
    """``gpu_ms`` of ``fn`` captured in a CUDA graph: the device's time alone, without the
    gaps a Python call's launches leave (what a captured decode step pays)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return device_ms(graph.replay, iters)


def copy_bandwidth() -> float:
    """GB/s of a 4 GiB device-to-device copy, counting the bytes read and written."""
    src = torch.empty(1 << 31, dtype=torch.int16, device="cuda")
    dst = torch.empty_like(src)
    ms = device_ms(lambda: dst.copy_(src), iters=20)
    return 2 * src.numel() * 2 / ms / 1e6


def filled_cache(batch: int, shard: int) -> tr.KVCache:
    """A one-rank cache holding ``shard`` random tokens per sequence. Filled through its
    storage (a benchmark's shortcut: a real prefill of 512K tokens would take seconds
    and measure the prefill)."""
    cache = tr.KVCache(batch=batch, capacity=shard + 64, heads_kv=HEADS_KV, head_dim=DIM,
                       dtype=torch.bfloat16, device="cuda")  # fmt: skip
    cache._k[:, :shard].normal_()
    cache._v[:, :shard].normal_()
    cache.lengths.fill_(shard)
    cache._host = [shard] * batch
    return cache


def sdpa_ms(q, k, v) -> float:
    """PyTorch's SDPA on the same keys as dense ``[B, Hkv, N, D]`` tensors (its layout)."""
    dense_k, dense_v = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
    q_sdpa = q.transpose(1, 2)
    return graph_ms(
        lambda: F.scaled_dot_product_attention(q_sdpa, dense_k, dense_v, enable_gqa=True)
    )


def one(batch: int, shard: int, copy_gbs: float) -> dict:
    cache = filled_cache(batch, shard)
    q = torch.randn(batch, 1, HEADS_Q, DIM, device="cuda", dtype=torch.bfloat16)
    kv = torch.randn(batch, 1, HEADS_KV, DIM, device="cuda", dtype=torch.bfloat16)
    k_valid, v_valid = cache._k[:, :shard], cache._v[:, :shard]
    used = cache.lengths
    row = {"batch": batch, "shard": shard}
    kv_bytes = 2 * batch * shard * HEADS_KV * DIM * 2
    row["flat_ms"] = graph_ms(lambda: flash_key_lengths(q, k_valid, v_valid, DIM**-0.5, used))
    row["flat_bw_ratio"] = kv_bytes / row["flat_ms"] / 1e6 / copy_gbs
    row["sdpa_ms"] = sdpa_ms(q, k_valid, v_valid)
    row["sdpa_bw_ratio"] = kv_bytes / row["sdpa_ms"] / 1e6 / copy_gbs
    row["vs_sdpa"] = row["flat_ms"] / row["sdpa_ms"]
    host_before = list(cache._host)
    lengths_before = cache.lengths.clone()

    def eager():
        cache.attend(q, kv, kv)
        cache.lengths.copy_(lengths_before)  # stay at this length: a step, not a prefill
        cache._host = list(host_before)

    row["eager_step_ms"] = device_ms(eager, iters=30)
    row["eager_host_us"] = host_us(eager, calls=100)
    step = cache.capture(q, kv, kv)

    def captured():
        step.graph.replay()  # the graph alone: the cache would grow past its capacity
        cache.lengths.copy_(lengths_before)

    row["captured_step_ms"] = device_ms(captured, iters=30)
    row["captured_host_us"] = host_us(lambda: step(q, kv, kv), calls=16)
    lean = cache.capture(q, kv, kv, clone_outputs=False)  # inputs written in place
    row["lean_host_us"] = host_us(lambda: lean(*lean.inputs), calls=16)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--shards", type=int, nargs="*", default=list(SHARDS))
    args = parser.parse_args()
    copy_gbs = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {copy_gbs:.0f} GB/s (read + write)")
    rows = []
    header = ("batch", "shard", "flat_ms", "sdpa_ms", "flat_bw_ratio",
              "sdpa_bw_ratio", "vs_sdpa", "eager_step_ms", "eager_host_us", "captured_step_ms",
              "captured_host_us", "lean_host_us")  # fmt: skip
    print(" ".join(f"{h:>12.12}" for h in header))
    for batch in BATCHES:
        for shard in args.shards:
            row = one(batch, shard, copy_gbs)
            rows.append(row)
            print(" ".join(f"{row[h]:>12.4g}" for h in header), flush=True)
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "copy_gbs": copy_gbs,
                       "rows": rows}, f, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
