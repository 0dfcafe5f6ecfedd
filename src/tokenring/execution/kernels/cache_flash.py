"""Flash-attention against keys that hold a valid prefix per batch row (a KV cache).

``aten._flash_attention_forward`` runs a batch as variable-length sequences: query
``b`` is rows ``cum_seq_q[b]..`` of a packed query tensor, its keys start at row
``cum_seq_k[b]`` of a packed key tensor and, with ``seqused_k``, it uses only
``seqused_k[b]`` of them. A KV cache stores each batch row's tokens contiguously
(``api/cache.py``: ``[batch, rows, heads_kv, head_dim]``), so the packed key tensor
is that storage seen flat and ``cum_seq_k[b] = b * rows``: no copy, no mask, and only
the valid keys are read. Every index tensor is made on the device (no host sync), so a
step is capturable in a CUDA graph. (Flash's paged reads with ``block_table``, its own
split-KV, are not used: PyTorch 2.11, the GPU machine's, does not take them, so they
could not be checked; benchmarks/RESULTS.md 0f says what the flat read reaches.) See
docs/algorithms.md, "KV cache".
"""

from __future__ import annotations

import torch

__all__ = ["flash_key_lengths", "rows_per_sequence"]

aten = torch.ops.aten


def rows_per_sequence(x: torch.Tensor) -> int | None:
    """How many storage rows apart consecutive batch rows of ``x`` ``[B, N, H, D]`` sit
    when each row's tokens are contiguous (``N`` for one batch row), or None."""
    b, n, h, d = x.shape
    if x.stride(3) != 1 or x.stride(2) != d or x.stride(1) != h * d:
        return None
    if b == 1:
        return n
    if x.stride(0) % (h * d):
        return None
    return x.stride(0) // (h * d)


def flash_key_lengths(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, key_lengths: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q`` ``[B, L, H, D]`` over the first ``key_lengths[b]`` keys of each
    row of ``k``, ``v`` ``[B, N, Hkv, D]``: ``(out [B, L, H, D], lse [B, H, L])``. Rows
    with no valid key come out unspecified (the kernel contract clears them)."""
    batch, length, heads, dim = q.shape
    heads_kv, keys = k.shape[2], k.shape[1]
    rows = rows_per_sequence(k)
    if rows is None or rows_per_sequence(v) != rows or v.stride(0) != k.stride(0):
        k, v = k.contiguous(), v.contiguous()
        rows = keys
    device = q.device
    flat_q = q.reshape(batch * length, heads, dim)
    cu_q = torch.arange(0, (batch + 1) * length, length, dtype=torch.int32, device=device)
    shape, stride = (batch * rows, heads_kv, dim), (heads_kv * dim, dim, 1)
    flat_k, flat_v = k.as_strided(shape, stride), v.as_strided(shape, stride)
    cu_k = torch.arange(0, (batch + 1) * rows, rows, dtype=torch.int32, device=device)
    out, lse, *_ = aten._flash_attention_forward(
        flat_q, flat_k, flat_v, cu_q, cu_k, length, keys, 0.0, False, False, scale=scale,
        seqused_k=key_lengths.to(torch.int32),
    )  # fmt: skip
    return out.view(batch, length, heads, dim), lse.view(heads, batch, length).transpose(0, 1)
