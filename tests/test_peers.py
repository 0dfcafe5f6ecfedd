"""Benchmark peers (tokenring_bench.peers): capability tables, layouts, sharding round trips,
PyTorch context parallel's global switches, and end-to-end runs against float64.

CPU tests run everywhere; the yunchang / para-attn ones skip unless those packages
are importable (wheels in .whl/, see docs/peers.md). Tests marked ``gpu`` run every
peer on 2 GPUs with NCCL: ``pytest -m gpu tests/test_peers.py`` on the GPU machine.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import traceback

import pytest
import torch

from reference import attention_reference, rel_err
from tokenring.options import Layout
from tokenring_bench.peers import (
    ParaAttention,
    Peer,
    PeerCase,
    Runner,
    TorchContextParallel,
    YunchangAttention,
    default_peers,
    layout_positions,
)
from tokenring_bench.peers.torch_cp import cp_api, cp_switches

HAS_YUNCHANG = importlib.util.find_spec("yunchang") is not None
HAS_PARA_ATTN = importlib.util.find_spec("para_attn") is not None


def make_case(**overrides) -> PeerCase:
    """The llama3-gqa benchmark case on 2 GPUs, with overrides."""
    base = dict(
        world=2,
        seq_len=8192,
        heads_q=32,
        heads_kv=8,
        head_dim=128,
        dtype=torch.bfloat16,
        causal=True,
        backward=False,
        device_type="cuda",
    )
    base.update(overrides)
    return PeerCase(**base)


def global_inputs(seed, seq, heads, head_dim, dtype, device="cpu"):
    """Global q, k, v, do, identical on every rank."""
    g = torch.Generator().manual_seed(seed)
    hq, hkv = heads
    shapes = [(1, seq, hq, head_dim), (1, seq, hkv, head_dim), (1, seq, hkv, head_dim)]
    shapes.append(shapes[0])
    return [
        torch.randn(s, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
        for s in shapes
    ]


def reference(q, k, v, do, causal):
    """Float64 output and gradients of q, k, v."""
    qr, kr, vr = (t.double().requires_grad_() for t in (q, k, v))
    out, _ = attention_reference(qr, kr, vr, causal=causal)
    grads = torch.autograd.grad(out, (qr, kr, vr), do.double())
    return out.detach(), grads


# ---------------------------------------------------------------------------
# Cases, options and capability tables (pure, no processes)
# ---------------------------------------------------------------------------


def test_peer_case_from_tensors():
    q, k, v, _ = global_inputs(0, 16, (4, 2), 8, torch.float32)
    case = PeerCase.from_tensors(q, k, v, causal=True, backward=False, world=2)
    assert (case.seq_len, case.heads_q, case.heads_kv, case.head_dim) == (16, 4, 2, 8)
    assert case.gqa and case.device_type == "cpu" and case.dtype == torch.float32


@pytest.mark.parametrize(
    "shapes,message",
    [
        (((1, 16, 4, 8), (1, 16, 3, 8), (1, 16, 3, 8)), "multiple of key/value heads"),
        (((1, 16, 4, 8), (1, 8, 4, 8), (1, 8, 4, 8)), "must agree in batch, seq and head_dim"),
        (((16, 4, 8), (1, 16, 4, 8), (1, 16, 4, 8)), "4-D"),
        (((1, 16, 4, 8), (1, 16, 4, 8), (1, 16, 2, 8)), "same shape"),
    ],
)
def test_peer_case_rejects_malformed_inputs(shapes, message):
    q, k, v = (torch.zeros(s) for s in shapes)
    with pytest.raises(ValueError, match=message):
        PeerCase.from_tensors(q, k, v, causal=False, backward=False, world=1)


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: TorchContextParallel("ring"), "rotate_method 'ring'; valid values are"),
        (lambda: TorchContextParallel(kernel="math"), "kernel 'math'; valid values are"),
        (lambda: YunchangAttention("usp"), "mode 'usp'; valid values are"),
        (lambda: YunchangAttention(attn_type="sage_fp8"), "attn_type 'sage_fp8'"),
        (lambda: ParaAttention("unified"), "mode 'unified'; valid values are"),
    ],
)
def test_constructors_reject_unknown_options(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_default_peers_have_unique_names():
    names = [p.name for p in default_peers()]
    assert len(names) == len(set(names))
    assert {"torch-cp-allgather", "torch-cp-alltoall"} <= set(names)


# (peer, case overrides, substrings expected in the reasons; () = must be able to run)
CASE_REASONS = [
    (TorchContextParallel("allgather"), {}, ()),
    (TorchContextParallel("alltoall"), {"causal": False, "backward": True}, ()),
    (TorchContextParallel("allgather"), {"device_type": "cpu"}, ("only shards the CUDA",)),
    (TorchContextParallel("allgather"), {"seq_len": 8190}, ("divisible by 4",)),
    (TorchContextParallel("allgather"), {"causal": False, "seq_len": 8190}, ()),
    (TorchContextParallel("allgather", load_balance=False), {"seq_len": 8190}, ()),
    (TorchContextParallel("allgather"), {"dtype": torch.float32}, ()),
    (TorchContextParallel(kernel="flash"), {"dtype": torch.float32}, ("dtype float32",)),
    (TorchContextParallel(), {"dtype": torch.float64}, ("math fallback",)),
    (YunchangAttention("ulysses"), {}, ()),
    (YunchangAttention("ulysses"), {"backward": True}, ("no backward",)),
    (YunchangAttention("ulysses"), {"world": 16}, ("key/value heads (8) divisible",)),
    (YunchangAttention("ring"), {"causal": False, "seq_len": 8190}, ()),
    (YunchangAttention("zigzag"), {"causal": False}, ("asserts causal=True",)),
    (YunchangAttention("zigzag"), {"seq_len": 8190}, ("divisible by 4",)),
    (YunchangAttention("ring", attn_type="torch_cudnn"), {"heads_kv": 32}, ("all-zero",)),
    (YunchangAttention("ulysses", attn_type="torch_cudnn"), {"heads_kv": 32}, ()),
    (YunchangAttention("ring", attn_type="torch_efficient"), {}, ("grouped key/value",)),
    (YunchangAttention("ring", attn_type="torch_efficient"), {"heads_kv": 32}, ()),
    (YunchangAttention("ulysses", attn_type="torch_math"), {"device_type": "cpu"}, ("enable_gqa",)),
    (
        YunchangAttention("ulysses", attn_type="torch_math"),
        {"device_type": "cpu", "heads_kv": 32, "dtype": torch.float32},
        (),
    ),
    (YunchangAttention("ring"), {"device_type": "cpu"}, ("CUDA kernels only",)),
    (ParaAttention("ulysses"), {"backward": True}, ()),
    (ParaAttention("ulysses"), {"device_type": "cpu", "dtype": torch.float32}, ()),
    (ParaAttention("ulysses"), {"world": 3, "seq_len": 8190}, ("heads (32) divisible",)),
    (ParaAttention("ring"), {"heads_kv": 32}, ()),
    (ParaAttention("ring"), {}, ("enable_gqa=False",)),
    (ParaAttention("ring"), {"heads_kv": 32, "backward": True}, ("no backward",)),
    (ParaAttention("ring"), {"heads_kv": 32, "device_type": "cpu"}, ("CUDA only",)),
]


@pytest.mark.parametrize(
    "peer,overrides,expected",
    CASE_REASONS,
    ids=[f"{p.name}-{i}" for i, (p, _, _) in enumerate(CASE_REASONS)],
)
def test_case_reasons_table(peer, overrides, expected):
    """The installation-independent part of not_supported_reasons, case by case."""
    reasons = peer.case_reasons(make_case(**overrides))
    if not expected:
        assert reasons == []
    for text in expected:
        assert any(text in r for r in reasons), (text, reasons)


def test_missing_libraries_are_reasons_not_errors():
    """A peer whose library is absent says so (with the install hint) instead of raising."""
    case = make_case(heads_kv=32)
    if not HAS_YUNCHANG:
        reasons = YunchangAttention("ulysses").not_supported_reasons(case)
        assert any(
            "yunchang is not installed" in r and "pip install yunchang" in r for r in reasons
        )
    if not HAS_PARA_ATTN:
        reasons = ParaAttention("ring").not_supported_reasons(case)
        assert any(
            "para-attn is not installed" in r and "pip install para-attn" in r for r in reasons
        )
    assert TorchContextParallel().not_supported_reasons(case) == []


def test_flash_attn_absence_is_a_reason():
    pytest.importorskip("yunchang")
    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash_attn is installed here")
    reasons = YunchangAttention("zigzag", attn_type="fa").not_supported_reasons(make_case())
    assert any("flash_attn package" in r for r in reasons)


def test_prepare_on_unsupported_case_raises_not_implemented_with_every_reason():
    q, k, v, do = global_inputs(0, 16, (4, 2), 8, torch.float64)
    with pytest.raises(NotImplementedError) as err:
        TorchContextParallel().prepare(q, k, v, causal=True, grad_out=do)
    text = str(err.value)
    assert text.startswith("torch-cp-allgather cannot run S=16")
    assert "only shards the CUDA" in text and "math fallback" in text


# ---------------------------------------------------------------------------
# Layouts: each peer's shards against independent references
# ---------------------------------------------------------------------------


def test_layout_positions_small_tables():
    assert layout_positions(Layout.ZIGZAG, 2, 0, 8).tolist() == [0, 1, 6, 7]
    assert layout_positions(Layout.ZIGZAG, 2, 1, 8).tolist() == [2, 3, 4, 5]
    assert layout_positions(Layout.CONTIGUOUS, 2, 1, 8).tolist() == [4, 5, 6, 7]
    assert layout_positions(Layout.ZIGZAG, 1, 0, 4).tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("causal", [False, True])
def test_torch_cp_shards_match_pytorch_load_balancer(world, causal):
    """Causal: PyTorch's head-tail balancer, chunked by rank; else contiguous chunks."""
    from torch.distributed.tensor.experimental._attention import _HeadTailLoadBalancer

    seq = 6 * 2 * world
    peer = TorchContextParallel()
    case = make_case(world=world, seq_len=seq, causal=causal)
    if causal:
        order = _HeadTailLoadBalancer(seq, world, "cpu")._generate_indices().reshape(-1).long()
    else:
        order = torch.arange(seq)
    for rank in range(world):
        assert torch.equal(peer.local_positions(case, rank), order.chunk(world)[rank])
        peer.check_balancer(cp_api()[0], case, rank)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_every_peer_layout_is_a_permutation(world):
    for peer in default_peers():
        for causal in (True, False):
            case = make_case(world=world, seq_len=8 * world, causal=causal)
            order = torch.cat([peer.local_positions(case, r) for r in range(world)])
            assert torch.equal(order.sort().values, torch.arange(8 * world)), peer.name


def test_yunchang_basic_extract_matches_contiguous_layout():
    yc_extract = pytest.importorskip("yunchang.comm.extract_local")
    peer = YunchangAttention("ring")
    for world in (1, 2, 4):
        case = make_case(world=world, seq_len=8 * world, causal=False)
        tokens = torch.arange(8 * world).view(1, -1)
        for rank in range(world):
            theirs = yc_extract.basic_extract_local(tokens, rank, world).reshape(-1)
            assert torch.equal(theirs, peer.local_positions(case, rank))


# ---------------------------------------------------------------------------
# PyTorch context parallel: every global switch is restored
# ---------------------------------------------------------------------------


def test_torch_cp_switches_restore_global_state_even_on_error():
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.experimental import _attention as api

    options = api._cp_options
    before = (options.rotate_method, options.enable_load_balance)
    handlers = DTensor._op_dispatcher._custom_op_handlers
    with pytest.raises(RuntimeError, match="inside"), cp_switches(api, "alltoall", False, "flash"):
        assert options.rotate_method is api._RotateMethod.ALL_TO_ALL
        assert options.enable_load_balance is False
        assert DTensor._op_dispatcher._custom_op_handlers is not handlers
        assert torch.backends.cuda.flash_sdp_enabled()
        assert not torch.backends.cuda.math_sdp_enabled()
        raise RuntimeError("inside")
    assert (options.rotate_method, options.enable_load_balance) == before
    assert DTensor._op_dispatcher._custom_op_handlers is handlers
    assert torch.backends.cuda.math_sdp_enabled()


# ---------------------------------------------------------------------------
# The shared plumbing: shard, run, unshard over real process groups (gloo)
# ---------------------------------------------------------------------------


class EchoPeer(Peer):
    """A stand-in peer whose "attention" returns 2*q: tests prepare/forward/unshard alone."""

    def __init__(self, layout: str) -> None:
        self._layout = Layout(layout)
        self.name = f"echo-{layout}"

    def not_supported_reasons(self, case):
        return []

    def layout(self, case):
        return self._layout

    def build(self, case, group, rank):
        return Runner(run=lambda q, k, v: 2 * q + 0 * (k.sum() + v.sum()))


def echo_roundtrip(w, *, world, layout):
    group = w.group(world)
    q, k, v, do = global_inputs(3, 8 * world, (4, 2), 8, torch.float64)
    peer = EchoPeer(layout)
    state = peer.prepare(q, k, v, causal=True, grad_out=do, group=group)
    out = peer.unshard(state, peer.forward(state))
    _, (dq, dk, _) = peer.forward_backward(state)
    other = peer.prepare(2 * q, k, v, causal=True, group=group)
    with peer.session(state), peer.session(other):
        again = peer.unshard(state, peer.forward(state))
        doubled = peer.unshard(other, peer.forward(other))
        inside = peer.in_session
    return {
        "out": bool(torch.equal(out, 2 * q)),
        "again": bool(torch.equal(again, 2 * q)) and bool(torch.equal(doubled, 4 * q)),
        "inside": inside,
        "dq": bool(torch.equal(peer.unshard(state, dq), 2 * do)),
        "dk": bool(torch.equal(peer.unshard(state, dk), torch.zeros_like(k))),
        "closed": not peer.in_session,
        "local_len": state.q.shape[1],
    }


@pytest.mark.parametrize("world", [1, 2, 4])
def test_shard_run_unshard_roundtrip(pool, world):
    cases = [dict(world=world, layout=lay) for lay in ("contiguous", "zigzag")]
    for per_rank in pool.run(echo_roundtrip, cases):
        for result in per_rank:
            assert result == {
                "out": True,
                "again": True,
                "dq": True,
                "dk": True,
                "inside": True,
                "closed": True,
                "local_len": 8,
            }


class SwitchProbePeer(EchoPeer):
    """A stand-in whose runner needs PyTorch context parallel's switches (``scope``) and
    records, at each call, whether they are on."""

    def __init__(self, key: str) -> None:
        super().__init__("zigzag")
        self.key = key
        self.seen: list[bool] = []

    def build(self, case, group, rank):
        from torch.distributed.tensor import DTensor

        api, _ = cp_api()
        handlers = DTensor._op_dispatcher._custom_op_handlers

        def run(q, k, v):
            on = DTensor._op_dispatcher._custom_op_handlers is not handlers
            self.seen.append(on and api._cp_options.enable_load_balance)
            return q

        def scope():
            return cp_switches(api, "alltoall", True, "flash")

        return Runner(run=run, scope=scope, scope_key=self.key)


def test_one_session_serves_every_input_set_of_a_case():
    """Rotating input sets inside one session must not switch the dispatcher off midway
    (each state's scope is entered once, by the session, not again per state)."""
    q, k, v, _ = global_inputs(0, 8, (2, 2), 4, torch.float32)
    peer = SwitchProbePeer("case-1")
    first, second = (peer.prepare(x, k, v, causal=True) for x in (q, 2 * q))
    with peer.session(first):
        for state in (second, first, second):
            peer.forward(state)
    peer.forward(first)  # no session: switches on for the call only
    assert peer.seen == [True, True, True, True]
    assert not peer.in_session
    other = SwitchProbePeer("case-2")
    mixed = other.prepare(q, k, v, causal=True)
    other.key = "case-3"
    clash = other.prepare(q, k, v, causal=True)
    with other.session(mixed), pytest.raises(RuntimeError, match="other settings"):
        other.forward(clash)


# ---------------------------------------------------------------------------
# yunchang and para-attn end to end on CPU processes (gloo)
# ---------------------------------------------------------------------------


def run_peer_against_float64(w, *, world, peer, causal, heads, backward, seq=32, dim=16):
    """Errors of one peer's unsharded output (and gradients) against float64 attention."""
    group = w.group(world)
    q, k, v, do = global_inputs(5, seq, heads, dim, torch.float32)
    ref, ref_grads = reference(q, k, v, do, causal)
    state = peer.prepare(q, k, v, causal=causal, grad_out=do if backward else None, group=group)
    errs = {"out": rel_err(peer.unshard(state, peer.forward(state)), ref)}
    if backward:
        out, grads = peer.forward_backward(state)
        errs["out_fb"] = rel_err(peer.unshard(state, out), ref)
        for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
            errs[name] = rel_err(peer.unshard(state, g), r)
    return errs


CPU_FLOAT32_TOL = 2e-5


@pytest.mark.skipif(not HAS_PARA_ATTN, reason="para-attn is not installed")
@pytest.mark.parametrize("world", [2, 4])
def test_para_attn_ulysses_on_cpu_matches_float64(pool, world):
    cases = [
        dict(world=world, peer=ParaAttention("ulysses"), causal=c, heads=h, backward=True)
        for c, h in itertools.product((False, True), ((4, 4), (8, 4)))
    ]
    for case, per_rank in zip(cases, pool.run(run_peer_against_float64, cases)):
        for errs in per_rank:
            bad = {n: e for n, e in errs.items() if not e <= CPU_FLOAT32_TOL}
            assert not bad, (case, bad)


@pytest.mark.skipif(not HAS_YUNCHANG, reason="yunchang is not installed")
def test_yunchang_ulysses_math_on_cpu_matches_float64(pool):
    """Forward only (yunchang's torch kernels have no backward); yunchang's Ulysses groups
    are global, so this runs on the whole pool (4 ranks)."""
    peer = YunchangAttention("ulysses", attn_type="torch_math")
    cases = [
        dict(world=4, peer=peer, causal=c, heads=(4, 4), backward=False) for c in (False, True)
    ]
    for case, per_rank in zip(cases, pool.run(run_peer_against_float64, cases)):
        for errs in per_rank:
            assert errs["out"] <= CPU_FLOAT32_TOL, (case, errs)


def yunchang_zigzag_positions(w, *, world):
    """yunchang's own zigzag sharding of token indices on this rank (needs its groups)."""
    import yunchang

    rank = torch.distributed.get_rank()
    yunchang.set_seq_parallel_pg(1, world, rank, world)
    tokens = torch.arange(4 * world).view(1, -1)
    return yunchang.zigzag_extract_local(tokens, rank, world, world, 1).reshape(-1).tolist()


@pytest.mark.skipif(not HAS_YUNCHANG, reason="yunchang is not installed")
def test_yunchang_zigzag_extract_matches_zigzag_layout(pool):
    (per_rank,) = pool.run(yunchang_zigzag_positions, [dict(world=4)])
    case = make_case(world=4, seq_len=16)
    peer = YunchangAttention("zigzag")
    for rank, theirs in enumerate(per_rank):
        assert theirs == peer.local_positions(case, rank).tolist()


# ---------------------------------------------------------------------------
# GPU: every peer on 2 GPUs with NCCL (run on the GPU machine)
# ---------------------------------------------------------------------------

GPU_HEADS = {"mha": (8, 8), "gqa": (8, 2)}
GPU_SEQ, GPU_DIM, GPU_DTYPE = 2048, 128, torch.bfloat16
# yunchang merges ring steps with a bfloat16 log-sum-exp (its torch kernels cast it to the
# input dtype): up to 2**-6 of rounding for an LSE in [4, 8), about 1% on a merge weight.
# A looser bound that still catches a wrong layout or a wrong merge (errors of order 1).
LSE_IN_INPUT_DTYPE_TOL = 5e-2


def _gpu_cases() -> list[dict]:
    """Every peer configuration the bench uses, with whether it is expected to run."""
    cases = []
    for rotate, kernel, causal, heads in itertools.product(
        ("allgather", "alltoall"), ("auto", "flash"), (False, True), GPU_HEADS
    ):
        peer = TorchContextParallel(rotate, kernel=kernel)
        cases.append(dict(peer=peer, causal=causal, heads=heads, backward=True, expect=True))
    for kernel in ("efficient", "cudnn"):
        peer = TorchContextParallel("allgather", kernel=kernel)
        cases.append(dict(peer=peer, causal=True, heads="mha", backward=True, expect=True))
    no_lb = TorchContextParallel("alltoall", load_balance=False)
    cases.append(dict(peer=no_lb, causal=True, heads="gqa", backward=True, expect=True))
    if HAS_YUNCHANG:
        for mode, attn, causal, heads in itertools.product(
            ("ulysses", "ring", "zigzag"),
            ("torch_flash", "torch_efficient"),
            (False, True),
            GPU_HEADS,
        ):
            expect = not (
                (mode == "zigzag" and not causal) or (attn == "torch_efficient" and heads == "gqa")
            )
            peer = YunchangAttention(mode, attn_type=attn)
            cases.append(dict(peer=peer, causal=causal, heads=heads, backward=False, expect=expect))
        peer = YunchangAttention("ring")
        cases.append(dict(peer=peer, causal=True, heads="mha", backward=True, expect=False))
    if HAS_PARA_ATTN:
        for causal, heads in itertools.product((False, True), GPU_HEADS):
            peer = ParaAttention("ulysses")
            cases.append(dict(peer=peer, causal=causal, heads=heads, backward=True, expect=True))
            peer = ParaAttention("ring")
            expect = heads == "mha"
            cases.append(dict(peer=peer, causal=causal, heads=heads, backward=False, expect=expect))
        peer = ParaAttention("ring")
        cases.append(dict(peer=peer, causal=True, heads="mha", backward=True, expect=False))
    return cases


def _single_device_errors(q, k, v, do, causal, ref, ref_grads) -> dict[str, float]:
    """PyTorch's own SDPA on the whole sequence at the same precision: the yardstick."""
    import torch.nn.functional as F

    qs, ks, vs = (t.detach().transpose(1, 2).requires_grad_() for t in (q, k, v))
    out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, enable_gqa=True)
    grads = torch.autograd.grad(out, (qs, ks, vs), do.transpose(1, 2))
    errs = {"out": rel_err(out.transpose(1, 2), ref)}
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        errs[name] = rel_err(g.transpose(1, 2), r)
    return errs


def gpu_peer_cases(ctx, cases: list[dict]) -> list[dict]:
    """Run each case on every rank; errors vs float64, or why it did not run."""
    refs = {}
    results = []
    for i, case in enumerate(cases):
        peer, causal, backward = case["peer"], case["causal"], case["backward"]
        ctx.report(("case", i, len(cases), peer.name))
        key = (causal, case["heads"])
        q, k, v, do = global_inputs(
            11, GPU_SEQ, GPU_HEADS[case["heads"]], GPU_DIM, GPU_DTYPE, ctx.device
        )
        if key not in refs:
            ref, ref_grads = reference(q, k, v, do, causal)
            refs[key] = (ref, ref_grads, _single_device_errors(q, k, v, do, causal, ref, ref_grads))
        ref, ref_grads, single = refs[key]
        pc = PeerCase.from_tensors(q, k, v, causal=causal, backward=backward, world=ctx.world)
        row = {"name": peer.name, "reasons": peer.not_supported_reasons(pc), "single": single}
        try:
            state = peer.prepare(q, k, v, causal=causal, grad_out=do if backward else None)
        except NotImplementedError as err:
            row["refused"] = str(err)
            results.append(row)
            continue
        try:
            errs = {"out": rel_err(peer.unshard(state, peer.forward(state)), ref)}
            if backward:
                with peer.session(state):
                    out, grads = peer.forward_backward(state)
                errs["out_fb"] = rel_err(peer.unshard(state, out), ref)
                for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
                    errs[name] = rel_err(peer.unshard(state, g), r)
            row["errors"] = errs
        except Exception:
            row["raised"] = traceback.format_exc()
        results.append(row)
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
    return results


def _record(payload) -> None:
    """Append to $TOKENRING_GPU_RECORD (JSON lines) when set, like tests/test_gpu.py."""
    path = os.environ.get("TOKENRING_GPU_RECORD")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"test": "peers", **payload}, default=str) + "\n")


def judge_gpu_results(cases: list[dict], results: list[list[dict]], world: int) -> list[str]:
    """Failures of ``gpu_peer_cases`` results (one list per rank); records every case."""
    failures = []
    for i, case in enumerate(cases):
        per_rank = [r[i] for r in results]
        first = per_rank[0]
        label = (
            f"{first['name']} causal={case['causal']} {case['heads']} backward={case['backward']}"
        )
        summary = {
            "name": first["name"],
            "causal": case["causal"],
            "heads": case["heads"],
            "backward": case["backward"],
            "expect": case["expect"],
            "reasons": first["reasons"],
            "refused": first.get("refused"),
            "raised": next((r["raised"] for r in per_rank if "raised" in r), None),
            "single": first["single"],
        }
        if all("errors" in r for r in per_rank):
            summary["worst"] = {
                n: max(r["errors"][n] for r in per_rank) for n in per_rank[0]["errors"]
            }
        _record(summary)
        if not case["expect"]:
            if not summary["refused"] or not first["reasons"]:
                failures.append(f"{label}: expected a clean refusal, got {summary}")
            continue
        if summary["raised"] or summary["refused"]:
            failures.append(f"{label}: {summary['refused'] or summary['raised']}")
            continue
        loose = isinstance(case["peer"], YunchangAttention) and case["peer"].mode != "ulysses"
        for name, err in summary["worst"].items():
            base = name.removesuffix("_fb")
            bound = 2 * first["single"][base] + world * 2.0**-8
            if loose:
                bound = max(bound, LSE_IN_INPUT_DTYPE_TOL)
            if not err <= bound:
                failures.append(f"{label}: {name} {err:.3g} > {bound:.3g}")
    return failures


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs"
)
def test_every_peer_on_two_gpus_matches_float64():
    from tokenring_bench.launch import run_local

    world = 2
    cases = _gpu_cases()
    results = run_local(gpu_peer_cases, (cases,), world=world, backend="nccl", timeout_s=420)
    failures = judge_gpu_results(cases, results, world)
    assert not failures, "\n".join(failures)
