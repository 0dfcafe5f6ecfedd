"""Packed documents and sliding windows through the public API, on gloo processes,
against float64 attention on the gathered sequence under the mask written from its
definition (``reference.allowed_pairs``).

Random packings (documents of one token, shorter than a chunk, ``1 mod 2P``), random
windows, causal or not, both layouts, every strategy, P = 1 to 4, MHA/GQA/MQA in
turn. The CI runs a sample per (world, strategy); the sweep is marked ``slow``.
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch

import tokenring as tr
from dist_cases import assert_errors_within, check_attention, check_sinks, expect_error
from test_masks import random_packing, random_window

HEADS = [(4, 4), (8, 2), (4, 1)]
ULYSSES_P3_HEADS = [(6, 6), (12, 3), (6, 1)]
STRATEGIES = ["tokenring", "ring", "ulysses", "allgather", "auto"]
FP32_TOL = 1e-5


def _cases(world: int, strategy: str, count: int) -> list[dict]:
    rng = random.Random(f"{world}-{strategy}")
    heads = ULYSSES_P3_HEADS if strategy == "ulysses" and world == 3 else HEADS
    cases = []
    for i, layout in zip(range(count), itertools.cycle(("zigzag", "contiguous"))):
        seq = rng.choice([2 * world + 1, 17, 29, 40])
        causal = i % 4 in (0, 1)
        kind = i % 3  # documents, a window, or both
        documents = random_packing(rng, seq, world) if kind != 1 else None
        window = random_window(rng, causal) if kind != 0 else None
        cases.append(
            dict(world=world, strategy=strategy, layout=layout, causal=causal,
                 heads=heads[i % 3], dtype="float32", batch=2, head_dim=8, seq=seq,
                 window=window, documents=documents, seed=i, seq_len=True)
        )  # fmt: skip
    return cases


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_under_documents_and_windows(pool, world, strategy):
    """Output, LSE and gradients against float64 under the explicit mask."""
    cases = _cases(world, strategy, 3)
    assert_errors_within(FP32_TOL, cases, pool.run(check_attention, cases))


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_under_many_documents_and_windows(pool, world, strategy):
    cases = _cases(world, strategy, 16)
    assert_errors_within(FP32_TOL, cases, pool.run(check_attention, cases, timeout=600))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_sinks_in_every_strategy(pool, world):
    """``sinks`` (gpt-oss's ``s_aux``), alone and with documents or a window, every
    strategy, a loss reading the output and the LSE: out, the LSE with the sink, and
    the gradients of q, k, v and of the sinks (summed over the group) against float64."""
    rng = random.Random(world)
    cases = []
    for i, strategy in enumerate(["tokenring", "ring", "ulysses", "allgather"]):
        seq = 2 * world + 7
        causal = i % 2 == 0
        documents = random_packing(rng, seq, world) if i % 2 else None
        window = random_window(rng, causal) if i == 2 else None
        heads = (6, 3) if world == 3 else (4, 2)
        cases.append(
            dict(world=world, strategy=strategy, layout=("zigzag", "contiguous")[i % 2],
                 causal=causal, heads=heads, seq=seq, window=window, documents=documents,
                 seed=i)
        )  # fmt: skip
    results = pool.run(check_sinks, cases)
    keys = ("out", "lse", "dq", "dk", "dv", "dsinks")
    assert_errors_within(FP32_TOL, cases, results, keys)
    assert all(r["dsinks_dtype_ok"] for per_rank in results for r in per_rank)


def perturbed_document(w, *, world: int, strategy: str, layout: str, causal: bool) -> list:
    """Run a packed batch twice, the second time with one document's q, k, v changed;
    return, per document, whether this rank's outputs of it changed (and whether any
    changed at all beyond rounding)."""
    group = w.group(world)
    documents = [0, 3, 4, 13, 14, 31]
    seq = documents[-1]
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, seq, 6, 8, generator=g) for _ in range(3))
    changed = 2  # the document [4, 13)
    q2, k2, v2 = (t.clone() for t in (q, k, v))
    for t in (q2, k2, v2):
        t[:, documents[changed] : documents[changed + 1]] += 1.0

    def run(q, k, v):
        parts = [tr.shard(x, layout=layout, group=group, cu_seqlens=documents) for x in (q, k, v)]
        return tr.attention(*parts, strategy=strategy, causal=causal, layout=layout,
                            group=group, cu_seqlens=documents)  # fmt: skip

    before, after = run(q, k, v), run(q2, k2, v2)
    positions = torch.arange(seq)[None, :, None, None].expand(1, seq, 1, 1).float()
    mine = tr.shard(positions, layout=layout, group=group, cu_seqlens=documents)[0, :, 0, 0]
    verdict = []
    for d in range(len(documents) - 1):
        rows = (mine >= documents[d]) & (mine < documents[d + 1])
        verdict.append(bool(rows.any()) and not torch.equal(before[:, rows], after[:, rows]))
    return verdict


@pytest.mark.parametrize("strategy", ["tokenring", "ring", "ulysses", "allgather"])
def test_changing_one_document_changes_only_its_outputs(pool, strategy):
    """Other documents' outputs stay bitwise the same (how packing silently broke
    elsewhere), in both layouts, causal or not, over 3 ranks."""
    world = 3
    cases = [
        dict(world=world, strategy=strategy, layout=layout, causal=causal)
        for layout in ("zigzag", "contiguous")
        for causal in (False, True)
    ]
    for case, per_rank in zip(cases, pool.run(perturbed_document, cases)):
        changed = [any(r[d] for r in per_rank) for d in range(5)]
        assert changed == [False, False, True, False, False], case


def eight_tokens(rank, world):
    """q, k, v of 8 tokens per rank, and the global length of two ranks."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 8, 2, 8, generator=g) for _ in range(3))
    return q, k, v, {"seq_len": 16}


def documents_differ(rank, world):
    """The last rank packs the sequence differently."""
    q, k, v, extra = eight_tokens(rank, world)
    return q, k, v, {**extra, "cu_seqlens": [0, 8, 16] if rank < world - 1 else [0, 7, 16]}


BAD_MASKS = [
    (dict(causal=True, window_size=(4, 2)), "the right side must be 0 or -1"),
    (dict(window_size=(4,)), "window_size must be (left, right)"),
    (dict(cu_seqlens=[0, 5, 5, 16]), "cu_seqlens must increase"),
    (dict(cu_seqlens=[1, 16]), "cu_seqlens must start at 0"),
    (dict(cu_seqlens=[0, 4, 12]), "cu_seqlens ends at 12, but seq_len is 16"),
    (dict(cu_seqlens=torch.tensor([0.0, 16.0])), "1-D integer tensor"),
    (dict(sinks=torch.zeros(3)), "sinks must be [heads_q] = [2], got shape (3,)"),
    (dict(sinks=torch.zeros(2, dtype=torch.int64)), "sinks must be a floating-point tensor"),
]


def test_bad_masks_raise_the_same_error_on_every_rank(pool):
    cases = [dict(world=2, make=eight_tokens, call="attention", **kw) for kw, _ in BAD_MASKS]
    cases.append(dict(world=2, make=documents_differ, call="attention"))
    needles = [needle for _, needle in BAD_MASKS] + ["cu_seqlens"]
    for case, needle, per_rank in zip(cases, needles, pool.run(expect_error, cases)):
        assert len(set(per_rank)) == 1 and needle in per_rank[0], (case, per_rank)


def test_joint_tokens_refuse_documents_windows_and_sinks():
    q = torch.randn(1, 8, 2, 8)
    joint = dict(joint_k=torch.randn(1, 3, 2, 8), joint_v=torch.randn(1, 3, 2, 8),
                 joint_strategy="front")  # fmt: skip
    with pytest.raises(ValueError, match="joint tokens take no cu_seqlens or window_size"):
        tr.attention(q, q, q, cu_seqlens=[0, 3, 8], **joint)
    with pytest.raises(ValueError, match="joint tokens take no sinks"):
        tr.attention(q, q, q, sinks=torch.zeros(2), **joint)


def test_shard_checks_the_documents_against_the_sequence():
    x = torch.randn(1, 10, 2, 4)
    with pytest.raises(ValueError, match="cu_seqlens ends at 9, but the sequence"):
        tr.shard(x, layout="zigzag", cu_seqlens=[0, 4, 9])


def test_split_kernel_runs_dense_parts_and_masked_parts_on_their_own_backends():
    """``SplitMasks`` (what CUDA gets: cuDNN for dense calls, the memory-efficient kernel
    for masked ones), here with CPU backends: a block under documents and a window, cut
    into sub-calls, equals float64 attention under the mask, forward and backward, and
    each part ran on the backend meant for it."""
    from reference import allowed_pairs, attention_reference, rel_err
    from tokenring.execution.block_masks import block_mask
    from tokenring.execution.kernels import CpuFlash, MathKernel, SplitMasks
    from tokenring.schedules.masks import Mask

    seq, documents, window = 40, (0, 7, 8, 29, 40), (5, 0)
    ran = []

    class Spy(MathKernel):
        def _masked_forward(self, q, k, v, mask, scale):
            ran.append("masked")
            return super()._masked_forward(q, k, v, mask, scale)

    class DenseSpy(CpuFlash):
        def _forward(self, q, k, v, causal, scale, bias=None):
            ran.append("dense")
            return super()._forward(q, k, v, causal, scale, bias)

    kernel = SplitMasks(DenseSpy(), Spy(), small=0)
    cells = (((0, seq),),)
    mask = block_mask(cells, cells, Mask(True, window, documents), torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(1, seq, 2, 8, generator=g, dtype=torch.float64) for _ in range(4))
    out, lse = kernel.forward(q, k, v, False, 8**-0.5, mask)
    allowed = allowed_pairs(seq, True, window, documents)
    refs = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = attention_reference(*refs, causal=False, allowed=allowed)
    ref_grads = torch.autograd.grad(ref_out, refs, do)
    delta = (do * out).sum(-1).transpose(1, 2)
    grads = kernel.backward(do, q, k, v, out, lse, delta, False, 8**-0.5, mask)
    assert rel_err(out, ref_out) < 1e-12 and rel_err(lse, ref_lse) < 1e-12
    assert all(rel_err(a, b) < 1e-12 for a, b in zip(grads, ref_grads))
    assert "dense" in ran and "masked" in ran


def test_usp_under_documents_and_windows(pool):
    """USP on a 2 x 2 mesh, both rings across, packed documents (zigzag per document,
    as the mesh lays out a sequence) and windows, against float64 under the mask."""
    from usp_mask_cases import usp_masked_case

    cases = [
        dict(world=4, ring_impl=ring, layout=layout, causal=causal, seq=seq,
             documents=documents, window=window)
        for ring, layout, causal, seq, documents, window in [
            ("tokenring", "zigzag", True, 37, (0, 1, 9, 10, 30, 37), None),
            ("ring", "zigzag", False, 29, (0, 13, 14, 29), (3, 2)),
            ("tokenring", "contiguous", True, 33, None, (4, 0)),
            ("ring", "contiguous", True, 40, (0, 10, 20, 21, 40), (6, 0)),
        ]
    ]  # fmt: skip
    results = pool.run(usp_masked_case, cases)
    assert_errors_within(FP32_TOL, cases, results)
    assert all(r["roundtrip"] == 1.0 for per_rank in results for r in per_rank)


@pytest.mark.slow
def test_usp_under_documents_and_windows_on_degenerate_meshes(pool):
    """USP on 4 x 1 (Ulysses alone) and 1 x 4 (the ring alone) meshes under packed
    documents and windows, both rings, against float64 under the mask."""
    from usp_mask_cases import usp_masked_case

    cases = [
        dict(world=4, ring_impl=ring, layout=layout, causal=causal, seq=seq,
             documents=documents, window=window, ulysses=u, ring=4 // u)
        for u in (4, 1)
        for ring, layout, causal, seq, documents, window in [
            ("tokenring", "zigzag", True, 37, (0, 1, 9, 10, 30, 37), (5, 0)),
            ("ring", "contiguous", False, 29, (0, 13, 14, 29), (3, 2)),
        ]
    ]  # fmt: skip
    results = pool.run(usp_masked_case, cases)
    assert_errors_within(FP32_TOL, cases, results)
    assert all(r["roundtrip"] == 1.0 for per_rank in results for r in per_rank)


def test_a_cu_seqlens_tensor_is_read_once_per_tensor_and_version(monkeypatch):
    """The same ``cu_seqlens`` tensor passed again is not read again (on a GPU a read is a
    host sync; every layer of a model gets the same tensor), a tensor changed in place is
    read again, and the results equal the packing given as a list."""
    from tokenring.runtime import runtime

    q = torch.randn(1, 12, 2, 8, generator=torch.Generator().manual_seed(0))
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    first = tr.attention(q, q, q, causal=True, cu_seqlens=cu)
    reads = []
    real = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(1) or real(t))
    again = tr.attention(q, q, q, causal=True, cu_seqlens=cu)
    assert reads == [] and torch.equal(again, first)
    cu[1] = 7  # in place: the version counter moves, the tensor is read again
    changed = tr.attention(q, q, q, causal=True, cu_seqlens=cu)
    assert reads == [1]
    assert torch.equal(changed, tr.attention(q, q, q, causal=True, cu_seqlens=[0, 7, 12]))
    assert not torch.equal(changed, first)
    held = [entry for entry in runtime().read_tensors.values() if entry[0]() is cu]
    assert [values for _, _, values in held] == [(0, 7, 12)]
