"""Flash-attention against keys that hold a valid prefix per batch row (a KV cache).

``aten._flash_attention_forward`` runs a batch as variable-length sequences: query
``b`` is rows ``cum_seq_q[b]..`` of a packed query tensor, its keys start at row
``cum_seq_k[b]`` of a packed key tensor and, with ``seqused_k``, it uses only
``seqused_k[b]`` of them. A KV cache stores each batch row's tokens contiguously
(``api/cache.py``: ``[batch, rows, heads_kv, head_dim]``), so the packed key tensor
is that storage seen flat and ``cum_seq_k[b] = b * rows``: no copy, no mask, and only
the valid keys are read. With ``block_table`` the same storage is read as pages of
``PAGE`` tokens, which makes flash-attention split each sequence's keys over several
thread blocks (split-KV): what a decode step of one sequence needs to use every
multiprocessor. Every index tensor is made on the device (no host sync), so a step is
capturable in a CUDA graph. See docs/algorithms.md, "KV cache".
"""

from __future__ import annotations

import torch

__all__ = ["PAGE", "TAKES_PAGES", "flash_key_lengths", "rows_per_sequence"]

aten = torch.ops.aten

PAGE = 256
"""Tokens per page of flash-attention's paged keys (its kernels take multiples of 256)."""


TAKES_PAGES = "block_table" in str(aten._flash_attention_forward.default._schema)
"""Whether this PyTorch's flash call takes ``block_table`` and ``num_splits`` (PyTorch
2.13 does; 2.11, on the GPU machine, does not: there every read is flat)."""


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
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, key_lengths: torch.Tensor,
    *, paged: bool | None = None, num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Attention of ``q`` ``[B, L, H, D]`` over the first ``key_lengths[b]`` keys of each
    row of ``k``, ``v`` ``[B, N, Hkv, D]``: ``(out [B, L, H, D], lse [B, H, L])``.
    ``paged``: read the keys as pages (flash's own split-KV, ``num_splits`` parts;
    default: where this PyTorch takes pages and the storage allows it). Rows with no
    valid key come out unspecified (the kernel contract clears them)."""
    batch, length, heads, dim = q.shape
    heads_kv, keys = k.shape[2], k.shape[1]
    rows = rows_per_sequence(k)
    if rows is None or rows_per_sequence(v) != rows or v.stride(0) != k.stride(0):
        k, v = k.contiguous(), v.contiguous()
        rows = keys
    device = q.device
    flat_q = q.reshape(batch * length, heads, dim)
    cu_q = torch.arange(0, (batch + 1) * length, length, dtype=torch.int32, device=device)
    used = key_lengths.to(torch.int32)
    if paged is None:
        aligned = rows % PAGE == 0 and k.storage_offset() % (PAGE * heads_kv * dim) == 0
        paged = TAKES_PAGES and aligned
    if paged and not TAKES_PAGES:
        raise ValueError(f"this PyTorch ({torch.__version__})'s flash call takes no block_table")
    if paged:
        pages = rows // PAGE
        shape, stride = (
            (batch * pages, PAGE, heads_kv, dim),
            (PAGE * heads_kv * dim, heads_kv * dim, dim, 1),
        )
        paged_k, paged_v = k.as_strided(shape, stride), v.as_strided(shape, stride)
        first = torch.arange(batch, dtype=torch.int32, device=device)[:, None] * pages
        table = first + torch.arange(-(-keys // PAGE), dtype=torch.int32, device=device)[None, :]
        cu_k = torch.arange(0, (batch + 1) * keys, keys, dtype=torch.int32, device=device)
        splits = {"num_splits": num_splits} if num_splits is not None else {}
        out, lse, *_ = aten._flash_attention_forward(
            flat_q, paged_k, paged_v, cu_q, cu_k, length, keys, 0.0, False, False, scale=scale,
            seqused_k=used, block_table=table, **splits,
        )  # fmt: skip
        return out.view(batch, length, heads, dim), lse.view(heads, batch, length).transpose(0, 1)
    shape, stride = (batch * rows, heads_kv, dim), (heads_kv * dim, dim, 1)
    flat_k, flat_v = k.as_strided(shape, stride), v.as_strided(shape, stride)
    cu_k = torch.arange(0, (batch + 1) * rows, rows, dtype=torch.int32, device=device)
    out, lse, *_ = aten._flash_attention_forward(
        flat_q, flat_k, flat_v, cu_q, cu_k, length, keys, 0.0, False, False, scale=scale,
        seqused_k=used,
    )  # fmt: skip
    return out.view(batch, length, heads, dim), lse.view(heads, batch, length).transpose(0, 1)
