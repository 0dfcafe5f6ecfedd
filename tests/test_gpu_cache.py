"""The KV cache on one GPU (marker ``gpu``): flash-attention's reads of a valid prefix
per row, against float64; prefill and decode steps, eager and
captured in a CUDA graph, against float64 attention over each row's history; a
captured step costs no host sync."""

from __future__ import annotations

import pytest
import torch

import tokenring as tr
from cache_cases import run_steps
from reference import attention_reference, rel_err
from tokenring.execution.kernels.cache_flash import flash_key_lengths

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

BF16_TOL = 2e-2
FP32_TOL = 1e-4  # float32 kernels sum in another order than float64 does


@pytest.mark.parametrize("length", [1, 4])
@pytest.mark.parametrize("heads", [(8, 2), (4, 4), (8, 1)])
def test_flash_reads_each_rows_valid_keys(length, heads):
    """Batch-major storage of 768 rows, 600 of them offered, rows holding 5, 300 and 600
    valid keys: each row's output equals float64 attention over its own keys."""
    g = torch.Generator().manual_seed(length)
    hq, hkv = heads
    storage_k = torch.randn(3, 768, hkv, 64, generator=g).to("cuda", torch.bfloat16)
    storage_v = torch.randn(3, 768, hkv, 64, generator=g).to("cuda", torch.bfloat16)
    q = torch.randn(3, length, hq, 64, generator=g).to("cuda", torch.bfloat16)
    used = torch.tensor([5, 300, 600], device="cuda")
    out, lse = flash_key_lengths(q, storage_k[:, :600], storage_v[:, :600], 0.125, used)
    for b, n in enumerate(used.tolist()):
        ref_out, ref_lse = attention_reference(
            q[b : b + 1].cpu(), storage_k[b : b + 1, :n].cpu(), storage_v[b : b + 1, :n].cpu(),
            causal=False, scale=0.125,
        )  # fmt: skip
        assert rel_err(out[b : b + 1].cpu(), ref_out) < BF16_TOL, (b, n)
        assert rel_err(lse[b : b + 1].cpu(), ref_lse) < 1e-3, (b, n)


STEPS = [(700, False, None), *[(1, False, None)] * 5, (5, False, [3, 5]), (1, False, None)]


@pytest.mark.parametrize("dtype, tol", [("bfloat16", BF16_TOL), ("float32", FP32_TOL)])
@pytest.mark.parametrize("capture", [False, True])
@pytest.mark.parametrize("heads", [(8, 2), (8, 1)])
def test_prefill_and_decode_on_one_gpu(capture, heads, dtype, tol):
    """Every step within its dtype's rounding of float64 attention over the history,
    eager and with the one-token steps replayed from a captured graph. In float32 the
    plan's code keeps a kernel's output as the result and merges into it in place
    (``program._elided``): these are its CUDA cases on one GPU."""
    errors, lengths, _ = run_steps(None, "cuda", seed=1, batch=2, heads=heads, head_dim=64,
                                   capacity=1024, steps=STEPS, dtype=dtype,
                                   capture=capture)  # fmt: skip
    assert max(errors) < tol, errors
    assert lengths == [709, 711]  # 700 + 5 + 3 (5) real + 1


def test_a_captured_step_costs_no_host_sync():
    """Replaying a captured decode step reads nothing back to the host, and refuses to
    append past the capacity before it replays."""
    cache = tr.KVCache(batch=2, capacity=40, heads_kv=2, head_dim=64, dtype=torch.bfloat16,
                       device="cuda")  # fmt: skip
    x = torch.randn(2, 30, 8, 64, device="cuda", dtype=torch.bfloat16)
    kv = torch.randn(2, 30, 2, 64, device="cuda", dtype=torch.bfloat16)
    cache.attend(x, kv, kv)
    step = cache.capture(x[:, :1], kv[:, :1], kv[:, :1])
    assert cache.lengths.tolist() == [30, 30]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(10):
            step(x[:, :1], kv[:, :1], kv[:, :1])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert cache.lengths.tolist() == [40, 40]
    with pytest.raises(ValueError, match="past the capacity of 40"):
        step(x[:, :1], kv[:, :1], kv[:, :1])
