"""What each strategy sends in total, by formula (docs/algorithms.md, "Traffic"): the
independent reference for the executor's byte counts and the planner's."""

from __future__ import annotations

from math import gcd


def expected_traffic(strategy, layout, causal, world, local, batch, heads, head_dim, itemsize):
    """Total bytes all ranks send, per (pass, slot kind): the formulas of
    docs/algorithms.md, "Traffic"."""
    P, L = world, local
    hq, hkv = heads
    if P == 1:
        return {}
    full = P * (P - 1) * L  # every shard visits every other rank once, whole
    if strategy == "ulysses":
        hk = hkv // gcd(P, hkv)  # key/value heads each rank receives
        kv = P * (P - 1) * L * batch * 2 * hk * head_dim * itemsize
        return {
            "forward/query": (P - 1) * L * batch * hq * head_dim * itemsize,
            "forward/kv": kv,
            "forward/query_result": (P - 1) * L * batch * hq * (head_dim * itemsize + 4),
            "backward/query": (P - 1) * L * batch * hq * (2 * head_dim * itemsize + 8),
            "backward/kv": kv,
            "backward/query_result": (P - 1) * L * batch * hq * head_dim * itemsize,
            "backward/kv_result": kv,
        }
    if strategy == "allgather":
        gathered = P * (P - 1) * L * batch * 2 * hkv * head_dim
        return {
            "forward/kv": gathered * itemsize,
            "backward/kv": gathered * itemsize,
            "backward/kv_result": gathered * 4,
        }
    if strategy == "tokenring":
        if not causal:
            q_rows = part_rows = full
        elif layout == "zigzag":
            q_rows = part_rows = 3 * full // 4
        else:
            q_rows = part_rows = full // 2
        return {
            "forward/query": q_rows * batch * hq * head_dim * itemsize,
            "forward/query_result": part_rows * batch * hq * (head_dim * itemsize + 4),
            "backward/query": q_rows * batch * hq * (2 * head_dim * itemsize + 8),
            "backward/query_result": part_rows * batch * hq * head_dim * itemsize,
        }
    if not causal:
        kv_rows = full
    elif layout == "zigzag":
        kv_rows = (P - 1) * L // 2 + (P - 1) ** 2 * L
    else:
        kv_rows = full // 2
    kv_bytes = kv_rows * batch * hkv * 2 * head_dim * itemsize
    return {
        "forward/kv": kv_bytes,
        "backward/kv": kv_bytes,
        "backward/kv_result": P * P * L * batch * hkv * 2 * head_dim * 4,
    }
