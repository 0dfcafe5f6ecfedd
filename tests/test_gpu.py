"""GPU correctness (marker ``gpu``): CUDA kernel adapters on one GPU, and every strategy
on all local GPUs with NCCL. Run on the GPU machine: ``pytest -m gpu tests/test_gpu.py``."""

from __future__ import annotations

import itertools
import json
import os

import pytest
import torch

import tokenring as tr
from gpu_cases import (
    DTYPES,
    HEADS,
    STEP_ROUNDING,
    _inputs,
    distributed_cases,
    graph_case,
    kernel_errors,
    soak_case,
)
from reference import attention_reference, reference_with_grads, rel_err

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

KERNELS = ["cudnn", "flash", "efficient"]
STRATEGIES = ["tokenring", "ring", "ulysses", "allgather"]
# Single-kernel bounds vs float64 on random N(0,1) inputs: a few roundings of the dtype.
KERNEL_TOL = {"bfloat16": 2e-2, "float16": 3e-3}


def _record(name: str, payload) -> None:
    """Append results to $TOKENRING_GPU_RECORD (a JSON-lines file) when set."""
    path = os.environ.get("TOKENRING_GPU_RECORD")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"test": name, **payload}) + "\n")


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq,dim", [(256, 128), (200, 64)])
def test_cuda_kernel_matches_float64(kernel, dtype, heads, causal, seq, dim):
    q, k, v, do = _inputs(0, 2, seq, HEADS[heads], dim, DTYPES[dtype], "cuda")
    # The executor hands kernels strided views of row-major storage: test those.
    q, k, v = (t.transpose(0, 1).contiguous().transpose(0, 1) for t in (q, k, v))
    errs = kernel_errors(kernel, q, k, v, do, causal)
    _record(
        "kernel",
        {
            "kernel": kernel,
            "dtype": dtype,
            "heads": heads,
            "causal": causal,
            "seq": seq,
            "dim": dim,
            "errors": errs,
        },
    )
    tol = KERNEL_TOL[dtype]
    bad = {n: e for n, e in errs.items() if n != "deterministic" and not e <= tol}
    assert not bad, f"{kernel} {dtype} {heads} causal={causal}: {bad}"


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("layout,causal", [("zigzag", True), ("contiguous", False)])
@pytest.mark.parametrize("heads", ["mha", "gqa"])
@pytest.mark.parametrize("seq", [1024, 1001])
def test_every_strategy_on_one_gpu_matches_float64(strategy, kernel, layout, causal, heads, seq):
    """One rank: each strategy's schedule reduces to local blocks; through the CUDA
    adapters, forward and backward, within twice the kernel's own error plus a rounding.
    An odd length (1001) splits zigzag's two chunks unevenly (501 and 500 tokens)."""
    q, k, v, do = _inputs(1, 2, seq, HEADS[heads], 128, torch.bfloat16, "cuda")
    single = kernel_errors(kernel, q, k, v, do, causal)
    parts = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = tr.attention(
        *parts, strategy=strategy, causal=causal, layout=layout, kernel=kernel, return_lse=True
    )
    grads = torch.autograd.grad(out, parts, do)
    ref_out, ref_lse, ref_grads = reference_with_grads(q, k, v, do, causal=causal)
    errs = {"out": rel_err(out, ref_out), "lse": rel_err(lse, ref_lse)}
    errs.update({n: rel_err(g, r) for n, g, r in zip(("dq", "dk", "dv"), grads, ref_grads)})
    _record(
        "one-gpu",
        {
            "strategy": strategy,
            "kernel": kernel,
            "layout": layout,
            "causal": causal,
            "heads": heads,
            "seq": seq,
            "errors": errs,
        },
    )
    bad = {n: e for n, e in errs.items() if not e <= 2 * single[n] + STEP_ROUNDING["bfloat16"]}
    assert not bad, bad


def _distributed_cases():
    cases = []
    for strategy, layout, causal, heads, dtype, kernel in itertools.product(
        STRATEGIES,
        ("contiguous", "zigzag"),
        (False, True),
        list(HEADS),
        ("bfloat16", "float16"),
        ("cudnn", "flash"),
    ):
        cases.append(
            dict(
                strategy=strategy,
                layout=layout,
                causal=causal,
                heads=heads,
                dtype=dtype,
                kernel=kernel,
                seq=2048,
                dim=128,
            )
        )
    return cases


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_every_strategy_on_all_gpus_matches_float64():
    from tokenring_bench.launch import run_local

    world = torch.cuda.device_count()
    cases = _distributed_cases()
    results = run_local(distributed_cases, (cases,), world=world, backend="nccl", timeout_s=1200)
    failures = []
    for i, case in enumerate(cases):
        per_rank = [r[i] for r in results]
        single = per_rank[0]["single"]
        worst = {n: max(r["errors"][n] for r in per_rank) for n in per_rank[0]["errors"]}
        _record("distributed", {"case": case, "worst": worst, "single": single, "world": world})
        if worst["dtype_ok"] != 1.0:
            failures.append(f"wrong dtype in {case}")
        for name in ("out", "lse", "dq", "dk", "dv"):
            bound = 2 * single[name] + world * STEP_ROUNDING[case["dtype"]]
            if not worst[name] <= bound:
                failures.append(f"{name} {worst[name]:.3g} > {bound:.3g} in {case}")
    assert not failures, "\n".join(failures)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_soak_1000_calls_per_strategy_do_not_grow_cuda_memory():
    """Issue 5's GPU soak: no growth of live CUDA memory or of the peak after warm-up."""
    from tokenring_bench.launch import run_local

    world = torch.cuda.device_count()
    args = (STRATEGIES, 1000, 20, 8192 * world // 2)
    results = run_local(soak_case, args, world=world, backend="nccl", timeout_s=600)
    failures = []
    for rank, per_rank in enumerate(results):
        for r in per_rank:
            _record("soak", {"rank": rank, "world": world, **r})
            if r["allocated_after_mib"] != r["allocated_before_mib"]:
                failures.append(f"rank {rank} {r['strategy']}: live memory grew {r}")
            if r["peak_soak_mib"] > r["peak_warmup_mib"] + 1.0:
                failures.append(f"rank {rank} {r['strategy']}: peak grew {r}")
            if not r["max_diff_vs_first"] <= 2e-2:
                failures.append(f"rank {rank} {r['strategy']}: results drifted {r}")
    assert not failures, "\n".join(failures)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_forward_can_be_captured_in_a_cuda_graph():
    """A whole sharded forward, NCCL transfers included, captured once and replayed on new
    inputs: right against float64 and bitwise equal to an eager call."""
    from tokenring_bench.launch import run_local

    world = torch.cuda.device_count()
    cases = [
        dict(strategy=s, layout=layout, causal=causal, heads=h, seq=2048)
        for s in STRATEGIES
        for layout, causal in (("zigzag", True), ("contiguous", False))
        for h in ("mha", "gqa")
    ]
    results = run_local(graph_case, (cases,), world=world, backend="nccl", timeout_s=300)
    failures = []
    for rank, per_rank in enumerate(results):
        for r in per_rank:
            _record("graph", {"rank": rank, "world": world, **r})
            if not (r["err"] <= 2e-2 and r["bitwise_eager"] == 1.0):
                failures.append(f"rank {rank}: {r}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize(
    "shape", [(2, 300, 5, 80), (1, 4096, 32, 128), (3, 129, 8, 64), (1, 16384, 32, 128)]
)
@pytest.mark.parametrize("rowmajor_part", [False, True])
@pytest.mark.parametrize("seed", range(8))
def test_fused_merge_matches_torch_merge(dtype, shape, rowmajor_part, seed):
    """Several seeds per shape: the bug this guards against was a race between warps,
    wrong in some launches only."""
    from tokenring.execution.merge import merge_into_torch
    from tokenring.execution.merge_triton import merge_into_triton

    g = torch.Generator(device="cuda").manual_seed(seed)
    b, n, h, d = shape
    store = torch.randn(n, b, h, d, device="cuda", generator=g)  # row-major like the executor
    out = store.permute(1, 0, 2, 3)
    lse = torch.randn(n, b, h, device="cuda", generator=g).permute(1, 2, 0)
    part = torch.randn(b, n, h, d, device="cuda", generator=g).to(DTYPES[dtype])
    if rowmajor_part:
        part = part.transpose(0, 1).contiguous().transpose(0, 1)
    part_lse = torch.randn(b, h, n, device="cuda", generator=g)
    lse[0, 0, :3] = float("-inf")  # rows with no key yet (holding 0, as an accumulator
    out[0, :3, 0] = 0.0  # does: kernels and zeroed slots give such rows 0) ...
    part_lse[0, 0, 1:4] = float("-inf")  # ... and partials with none
    part_lse[-1, 1, 7] = float("nan")
    ref_out, ref_lse = out.clone(), lse.clone()
    merge_into_torch(ref_out, ref_lse, part, part_lse)
    merge_into_triton(out, lse, part, part_lse)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert torch.isnan(out[-1, 7, 1]).all(), "NaN must propagate"
    assert not torch.isnan(out[0, :3, 0]).any(), "empty rows must not become NaN"


@pytest.mark.parametrize("heads", [(0, 4), (4, 8), (6, 7)])
def test_fused_merge_on_a_head_slice_of_row_major_storage(heads):
    """All-gather merges into one head group of its accumulator: views whose head stride
    and sequence stride do not match their shape. The fused kernel agrees with torch."""
    from tokenring.execution.merge import merge_into_torch
    from tokenring.execution.merge_triton import merge_into_triton

    g = torch.Generator(device="cuda").manual_seed(0)
    h0, h1 = heads
    store = torch.randn(300, 2, 8, 64, device="cuda", generator=g)
    lse_store = torch.randn(300, 2, 8, device="cuda", generator=g)
    out, lse = store.permute(1, 0, 2, 3)[:, :, h0:h1], lse_store.permute(1, 2, 0)[:, h0:h1]
    part = torch.randn(2, 300, h1 - h0, 64, device="cuda", generator=g).bfloat16()
    part_lse = torch.randn(2, h1 - h0, 300, device="cuda", generator=g)
    ref_store, ref_lse_store = store.clone(), lse_store.clone()
    ref_out = ref_store.permute(1, 0, 2, 3)[:, :, h0:h1]
    ref_lse = ref_lse_store.permute(1, 2, 0)[:, h0:h1]
    merge_into_torch(ref_out, ref_lse, part, part_lse)
    merge_into_triton(out, lse, part, part_lse)
    torch.testing.assert_close(store, ref_store, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse_store, ref_lse_store, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("layout,causal", [("zigzag", True), ("contiguous", False)])
def test_captured_call_replays_on_new_inputs_on_one_gpu(strategy, layout, causal):
    """``tr.CapturedCall`` on one GPU: the replay computes on the new inputs (right against
    float64) and equals an eager call on them, bitwise."""
    q, k, v, _ = _inputs(3, 1, 2048, HEADS["gqa"], 128, torch.bfloat16, "cuda")

    def call(q, k, v):
        return tr.attention(q, k, v, strategy=strategy, causal=causal, layout=layout)

    graph = tr.CapturedCall(call, q, k, v)
    q2, k2, v2, _ = _inputs(4, 1, 2048, HEADS["gqa"], 128, torch.bfloat16, "cuda")
    replayed = graph(q2, k2, v2)
    with torch.no_grad():
        eager = call(q2, k2, v2)
    ref, _ = attention_reference(q2.double(), k2.double(), v2.double(), causal=causal)
    _record(
        "one-gpu-graph", {"strategy": strategy, "layout": layout, "err": rel_err(replayed, ref)}
    )
    assert torch.equal(replayed, eager)
    assert rel_err(replayed, ref) <= 2e-2
    with pytest.raises(ValueError, match="input 0: captured for"):
        graph(q2[:, :1024], k2, v2)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_compiled_call_matches_eager_on_one_gpu(strategy):
    """``torch.compile`` (inductor) of a call on CUDA: forward and gradients as eager."""
    q, k, v, do = _inputs(5, 2, 1024, HEADS["gqa"], 128, torch.bfloat16, "cuda")

    def f(q, k, v):
        return tr.attention(q, k, v, strategy=strategy, causal=True, layout="zigzag")

    results = []
    for fn in (f, torch.compile(f, fullgraph=True)):
        parts = [t.clone().requires_grad_() for t in (q, k, v)]
        out = fn(*parts)
        results.append([out.detach(), *torch.autograd.grad(out, parts, do)])
    worst = max(rel_err(b, a) for a, b in zip(*results))
    _record("one-gpu-compile", {"strategy": strategy, "worst": worst})
    assert worst <= 1e-2, worst


def _masked_reference(q, k, v, do, allowed):
    """Float64 out, LSE and gradients under ``allowed`` (``[Lq, Lk]``, every row allowed
    at least one key)."""
    qr, kr, vr = (t.double().requires_grad_() for t in (q, k, v))
    out, lse = attention_reference(qr, kr, vr, causal=False, allowed=allowed)
    grads = torch.autograd.grad(out, (qr, kr, vr), do.double())
    return out.detach(), lse.detach(), grads


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("shape", [(200, 328), (256, 256), (77, 500)])
def test_efficient_kernel_takes_an_explicit_block_mask(dtype, shape):
    """The memory-efficient kernel under a block mask (what documents and windows need):
    rows with keys against float64, rows with none a zero partial with an LSE of -inf,
    forward and backward (the LSE and delta of the allowed rows)."""
    from tokenring.execution.kernels import BlockMask, select_kernel
    from tokenring.execution.kernels.base import BlockSpec

    lq, lk = shape
    dt = DTYPES[dtype]
    q, k, v, do = _inputs(3, 2, max(lq, lk), (8, 2), 64, dt, "cuda")
    q, do, k, v = q[:, :lq], do[:, :lq], k[:, :lk], v[:, :lk]
    g = torch.Generator().manual_seed(lq)
    allowed = torch.rand(lq, lk, generator=g) < 0.3
    allowed[5] = False  # a row that attends nothing in this block
    spec = BlockSpec("cuda", dt, 64, 8, 2, False, backward=True, masked=True)
    kernel = select_kernel("efficient", spec)
    mask = BlockMask(allowed.cuda())
    scale = 64**-0.5
    out, lse = kernel.forward(q, k, v, False, scale, mask)
    rows = allowed.any(1)
    ref_out, ref_lse, ref_grads = _masked_reference(q[:, rows], k, v, do[:, rows], allowed[rows])
    delta = (do.float() * out.float()).sum(-1).transpose(1, 2)
    grads = kernel.backward(do, q, k, v, out, lse, delta, False, scale, mask)
    errs = {
        "out": rel_err(out[:, rows], ref_out),
        "lse": rel_err(lse[:, :, rows], ref_lse),
        "empty_rows_ok": float(
            bool((out[:, ~rows] == 0).all()) and bool(torch.isneginf(lse[:, :, ~rows]).all())
        ),
    }
    # dq of the allowed rows; dk, dv of every key (the empty row contributes nothing)
    errs["dq"] = rel_err(grads[0][:, rows], ref_grads[0])
    errs["dk"] = rel_err(grads[1], ref_grads[1])
    errs["dv"] = rel_err(grads[2], ref_grads[2])
    _record("masked-kernel", {"dtype": dtype, "shape": shape, "errors": errs})
    tol = 2e-2 if dtype == "bfloat16" else 1e-4
    assert errs["empty_rows_ok"] == 1.0
    bad = {n: e for n, e in errs.items() if n != "empty_rows_ok" and not e <= tol}
    assert not bad, bad


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_flash_varlen_runs_masked_blocks(dtype):
    """Flash's variable-length call with windows (``kernel="flash-varlen"``) on random
    masked blocks of both layouts (documents of 1 token, windows, causal or not, batch
    1 and 2, MHA/GQA/MQA): the block's output, LSE and gradients against float64 under
    the explicit mask (the same blocks as the CPU test of the packing)."""
    import random

    from test_varlen_kernels import check_varlen_kernel, random_blocks
    from tokenring.execution.kernels import select_kernel
    from tokenring.execution.kernels.base import BlockSpec

    dt = DTYPES[dtype]
    kernel = select_kernel("flash-varlen", BlockSpec("cuda", dt, 64, 4, 2, False, masked=True))
    errs = check_varlen_kernel(kernel, random_blocks(random.Random(5), 60), dt, "cuda")
    worst = {n: max(e[n] for e in errs) for n in errs[0]}
    _record("flash-varlen-blocks", {"dtype": dtype, "worst": worst})
    bad = {n: e for n, e in worst.items() if not e <= 2e-2}
    assert not bad, bad


def test_a_device_cu_seqlens_costs_no_host_sync_once_read():
    """A ``cu_seqlens`` tensor on the GPU is read once (one sync); the same tensor passed
    again costs no host sync at all (``torch.cuda.set_sync_debug_mode("error")`` raises on
    any), forward under documents on one GPU."""
    q = torch.randn(1, 256, 4, 64, device="cuda", dtype=torch.bfloat16)
    cu = torch.tensor([0, 100, 256], device="cuda", dtype=torch.int32)
    first = tr.attention(q, q, q, causal=True, cu_seqlens=cu)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        again = tr.attention(q, q, q, causal=True, cu_seqlens=cu)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(again, first)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("dtype,kernel", [("bfloat16", "auto"), ("bfloat16", "efficient"),
                                          ("float32", "auto")])  # fmt: skip
def test_documents_windows_and_sinks_on_one_gpu(strategy, dtype, kernel):
    """Every strategy on one GPU under packed documents, a causal window and sinks, S=1001,
    forward and backward (q, k, v and the sinks) against float64; in bf16 ``auto`` runs
    the masked blocks as flash's variable-length calls, ``efficient`` as sub-calls."""
    from reference import allowed_pairs

    seq, documents, window = 1001, [0, 1, 300, 301, 777, 1001], (127, 0)
    dt = DTYPES[dtype]
    q, k, v, do = _inputs(4, 2, seq, (8, 2), 64, dt, "cuda")
    sinks = torch.randn(8, generator=torch.Generator().manual_seed(9)).cuda()
    allowed = allowed_pairs(seq, True, window, documents).cuda()
    ref = [t.double().requires_grad_() for t in (q, k, v, sinks)]
    ref_out, ref_lse = attention_reference(*ref[:3], causal=True, allowed=allowed, sinks=ref[3])
    ref_grads = torch.autograd.grad(ref_out, ref, do.double())
    parts = [t.clone().requires_grad_() for t in (q, k, v)]
    mine = sinks.clone().requires_grad_()
    out, lse = tr.attention(
        *parts, strategy=strategy, causal=True, layout="zigzag", window_size=window,
        cu_seqlens=documents, sinks=mine, return_lse=True, kernel=kernel,
    )  # fmt: skip
    grads = torch.autograd.grad(out, [*parts, mine], do)
    errs = {"out": rel_err(out, ref_out), "lse": rel_err(lse, ref_lse)}
    errs.update(
        {n: rel_err(g, r) for n, g, r in zip(("dq", "dk", "dv", "dsinks"), grads, ref_grads)}
    )
    _record("one-gpu-masked", {"strategy": strategy, "dtype": dtype, "kernel": kernel,
                               "errors": errs})  # fmt: skip
    tol = 2e-2 if dtype == "bfloat16" else 1e-4
    bad = {n: e for n, e in errs.items() if not e <= tol}
    assert not bad, bad


@pytest.mark.parametrize("kernel", ["auto", "efficient"])
def test_padded_joint_tokens_on_one_gpu(kernel):
    """``joint_mask`` through the CUDA kernels (auto: dense blocks on cuDNN, the joint
    blocks with their mask on the memory-efficient kernel): output, joint output and
    gradients against float64 over the concatenated sequence with the padded keys masked."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 64, 4, 64, generator=g) for _ in range(3))
    jq, jk, jv = (torch.randn(2, 9, 4, 64, generator=g) for _ in range(3))
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False
    keys = torch.cat([mask, torch.ones(2, 64, dtype=torch.bool)], dim=1)
    allowed = keys[:, None, :].expand(-1, 73, -1)
    full = [t.double().requires_grad_() for t in (jq, q, jk, k, jv, v)]
    cat_q, cat_k, cat_v = (torch.cat(full[i : i + 2], 1) for i in (0, 2, 4))
    ref, _ = attention_reference(cat_q, cat_k, cat_v, causal=False, allowed=allowed)
    ref.sum().backward()
    mine = [t.to("cuda", torch.bfloat16).requires_grad_() for t in (q, k, v, jq, jk, jv)]
    joint = dict(joint_q=mine[3], joint_k=mine[4], joint_v=mine[5], joint_strategy="front")
    out, jo = tr.attention(*mine[:3], **joint, joint_mask=mask.cuda(), kernel=kernel)
    (out.float().sum() + jo.float().sum()).backward()
    assert rel_err(out.cpu(), ref[:, 9:]) < 2e-2 and rel_err(jo.cpu(), ref[:, :9]) < 2e-2
    for got, want in zip(mine, [full[1], full[3], full[5], full[0], full[2], full[4]]):
        assert rel_err(got.grad.cpu(), want.grad) < 3e-2
    assert float(mine[4].grad[1, 6:].abs().max()) == 0.0  # padded keys: no gradient
