"""Bad input raises the same ValueError on every rank, and nothing hangs."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import tokenring as tr
from dist_cases import expect_error, shard_check_case


def all_ranks(world: int) -> str:
    """How a message names a problem every rank of a group of ``world`` ranks has."""
    return "rank 0" if world == 1 else "every rank"


def _qkv(length=8, heads=(4, 4), dim=16, dtype=torch.float32, batch=1):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, length, heads[0], dim, generator=g, dtype=dtype)
    k = torch.randn(batch, length, heads[1], dim, generator=g, dtype=dtype)
    v = torch.randn(batch, length, heads[1], dim, generator=g, dtype=dtype)
    return q, k, v


def shard_not_in_the_layout(rank, world):
    """Every rank holds 8 tokens, but the global length says rank 0 holds 9."""
    return (*_qkv(length=8), {"layout": "zigzag", "seq_len": 8 * world + 1})


def heads_not_divisible(rank, world):
    return (*_qkv(heads=(6, 4)), {})


def dtype_mismatch(rank, world):
    q, k, v = _qkv()
    return q, k.double(), v, {}


def device_mismatch(rank, world):
    q, k, v = _qkv()
    return q, k.to("meta"), v, {}


def head_dim_mismatch(rank, world):
    q, _, _ = _qkv(dim=16)
    _, k, v = _qkv(dim=32)
    return q, k, v, {}


def unknown_layout(rank, world):
    return (*_qkv(), {"layout": "spiral"})


def unknown_kernel(rank, world):
    return (*_qkv(), {"kernel": "turbo"})


def unsupported_kernel(rank, world):
    return (*_qkv(), {"kernel": "cudnn"})


def lengths_differ_across_ranks(rank, world):
    return (*_qkv(length=8 + 2 * (rank == world - 1)), {})


def only_last_rank_is_wrong(rank, world):
    q, k, v = _qkv()
    return q, (k.half() if rank == world - 1 else k), v, {}


CASES = [
    (shard_not_in_the_layout, "q has 8 tokens, but the zigzag layout of seq_len="),
    (heads_not_divisible, "heads_q (6) must be a multiple of heads_kv (4)"),
    (dtype_mismatch, "q, k, v dtypes differ"),
    (device_mismatch, "q, k, v devices differ"),
    (head_dim_mismatch, "head_dim mismatch: q has 16, k has 32"),
    (unknown_layout, "unknown layout 'spiral'; valid values are 'contiguous', 'zigzag'"),
    (unknown_kernel, "unknown kernel 'turbo'; valid values are 'auto'"),
    (unsupported_kernel, "kernel 'cudnn' cannot run"),
    (lengths_differ_across_ranks, "shards of unequal length need the global length, seq_len="),
    (only_last_rank_is_wrong, "q, k, v dtypes differ"),
]


@pytest.mark.parametrize("world", [1, 3, 4])
@pytest.mark.parametrize("call", ["token_ring_attn", "ring_attn"])
def test_every_rank_raises_the_same_error(pool, world, call):
    cases = [
        dict(world=world, make=make, call=call)
        for make, _ in CASES
        if world > 1 or make not in (lengths_differ_across_ranks,)
    ]
    expected = {make.__name__: text for make, text in CASES}
    results = pool.run(expect_error, cases)
    for case, messages in zip(cases, results):
        text = expected[case["make"].__name__]
        assert len(set(messages)) == 1, f"ranks disagree for {case['make'].__name__}: {messages}"
        assert text in messages[0], f"{case['make'].__name__}: {messages[0]!r}"
    by_name = {c["make"].__name__: r for c, r in zip(cases, results)}
    if world > 1:
        assert by_name["only_last_rank_is_wrong"][0].startswith(f"rank {world - 1}: ")


def test_shard_takes_a_sequence_of_any_length():
    """Three tokens in zigzag on one rank: the whole sequence (no divisibility needed)."""
    x = torch.arange(3.0).view(1, 3, 1, 1)
    assert torch.equal(tr.shard(x, layout="zigzag"), x)


def test_empty_sequence_is_rejected():
    q = torch.zeros(1, 0, 2, 4)
    with pytest.raises(ValueError, match="local sequence is empty"):
        tr.token_ring_attn(q, q, q)


def test_wrong_rank_count_for_a_shard():
    with pytest.raises(ValueError, match="not initialized"):
        tr.token_ring_attn(*_qkv(), group=object())


def test_a_launch_of_several_ranks_without_a_process_group_is_refused():
    """Under torchrun (``WORLD_SIZE`` > 1) without ``init_process_group`` every rank would
    run alone on its own shard and return a wrong result without a word: attention,
    ``shard`` and ``unshard`` raise a ValueError that says what to call. In a process of
    its own, as torchrun starts it; with ``WORLD_SIZE=1`` the same calls run."""
    script = textwrap.dedent(
        """
        import os, torch, tokenring as tr
        x = torch.zeros(1, 8, 2, 4)
        calls = {"attention": lambda: tr.attention(x, x, x, causal=True),
                 "shard": lambda: tr.shard(x, layout="zigzag"),
                 "unshard": lambda: tr.unshard(x, layout="zigzag")}
        for size in ("2", "1"):
            os.environ["WORLD_SIZE"] = size
            for name, call in calls.items():
                try:
                    call()
                    print(size, name, "ran")
                except ValueError as error:
                    print(size, name, error)
        """
    )
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0"}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    expected = (
        "WORLD_SIZE=2 in the environment (a launcher such as torchrun started 2 ranks), but "
        "torch.distributed is not initialized, so each rank would run alone on its own part "
        "of the sequence: call torch.distributed.init_process_group first"
    )
    assert lines == [f"2 {name} {expected}" for name in ("attention", "shard", "unshard")] + [
        f"1 {name} ran" for name in ("attention", "shard", "unshard")
    ], lines


@pytest.mark.parametrize("world", [1, 2, 4])
def test_shard_check_finds_a_global_tensor_that_differs_across_ranks(pool, world):
    """``shard(check=True)``: a global tensor that differs on the last rank (one element by
    one unit in the last place, a token more, another dtype) raises the same ValueError
    on every rank, naming that rank; the same tensor everywhere passes and shards as
    without the check. Over a group of ``world`` ranks, and over a 2 x 2 mesh."""
    cases = [dict(world=world, differ=d) for d in ("", "value", "length", "dtype")]
    if world == 4:
        cases += [dict(world=4, differ=d, mesh=True) for d in ("", "value")]
    where = "shard(check=True): the global tensor differs across ranks: "
    advice = "; it must be the same full tensor on every rank (the same seed, or the same batch)"
    last, rows = world - 1, 4 * world + 1
    expected = {
        "": "same shard: True",
        "value": f"{where}the values of rank {last} differ from rank 0's{advice}",
        "length": f"{where}rank 0 has shape (2, {rows}, 3, 8) torch.float32, rank {last} has "
        f"shape (2, {rows + 1}, 3, 8) torch.float32{advice}",
        "dtype": f"{where}rank 0 has shape (2, {rows}, 3, 8) torch.float32, rank {last} has "
        f"shape (2, {rows}, 3, 8) torch.float64{advice}",
    }
    for case, messages in zip(cases, pool.run(shard_check_case, cases)):
        want = expected[case["differ"]] if world > 1 else "same shard: True"
        assert messages == [want] * len(messages), (case, messages)


def heads_6_6(rank, world):
    return (*_qkv(heads=(6, 6)), {})


def heads_6_3(rank, world):
    return (*_qkv(heads=(6, 3)), {})


def heads_4_4(rank, world):
    return (*_qkv(heads=(4, 4)), {})


ULYSSES_REFUSALS = [
    (
        2,
        heads_6_3,
        "strategy 'ulysses' cannot run heads 6/3 over 2 ranks: heads_kv (3) neither divides "
        "nor is divisible by the Ulysses degree 2 (degrees that would work for heads 6/3: "
        "1, 3, 6)",
    ),
    (
        3,
        heads_4_4,
        "strategy 'ulysses' cannot run heads 4/4 over 3 ranks: heads_q (4) is not divisible "
        "by the Ulysses degree 3 (degrees that would work for heads 4/4: 1, 2, 4)",
    ),
    (
        4,
        heads_6_6,
        "strategy 'ulysses' cannot run heads 6/6 over 4 ranks: heads_q (6) is not divisible "
        "by the Ulysses degree 4 (degrees that would work for heads 6/6: 1, 2, 3, 6)",
    ),
]


@pytest.mark.parametrize(
    "world,make,text", ULYSSES_REFUSALS, ids=lambda x: getattr(x, "__name__", x)
)
def test_a_strategy_refusal_names_the_reason_and_what_would_work_on_every_rank(
    pool, world, make, text
):
    for call in ("ulysses_attn", "attention"):
        extra = {"strategy": "ulysses"} if call == "attention" else {}
        (messages,) = pool.run(expect_error, [dict(world=world, make=make, call=call, **extra)])
        assert set(messages) == {f"{all_ranks(world)}: {text}"}, call
        assert len(messages) == world * (4 // world), "every rank of every group raised"


def test_generated_functions_share_the_signature_and_reject_unknown_options():
    """One signature for every per-strategy function: ``attention``'s, less the options
    that choose the strategy (and the mesh only ``usp`` takes, and the recorder)."""
    import inspect

    hidden = ("strategy", "mesh", "ring_impl", "recorder")
    expected = [p for p in inspect.signature(tr.attention).parameters if p not in hidden]
    assert expected[:10] == [
        "q", "k", "v", "causal", "softmax_scale", "layout", "group", "return_lse", "kernel",
        "deterministic",
    ]  # fmt: skip
    for fn in (tr.token_ring_attn, tr.ring_attn, tr.ulysses_attn, tr.allgather_attn):
        assert list(inspect.signature(fn).parameters) == expected, fn.__name__
        assert fn.__doc__ and "tokenring.attention" in fn.__doc__
        with pytest.raises(TypeError, match="unexpected keyword argument"):
            fn(*_qkv(), strategy="ring")


def _joint(heads=(4, 4), length=3, dim=16, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    jq = torch.randn(1, length, heads[0], dim, generator=g, dtype=dtype)
    jk = torch.randn(1, length, heads[1], dim, generator=g, dtype=dtype)
    return jq, jk, jk.clone()


def joint_with_causal(rank, world):
    jq, jk, jv = _joint()
    extra = dict(causal=True, joint_q=jq, joint_k=jk, joint_v=jv, joint_strategy="front")
    return (*_qkv(), extra)


def joint_with_strategy_none(rank, world):
    _, jk, jv = _joint()
    return (*_qkv(), dict(joint_k=jk, joint_v=jv))


def joint_strategy_without_tensors(rank, world):
    return (*_qkv(), dict(joint_strategy="rear"))


def joint_k_without_v(rank, world):
    _, jk, _ = _joint()
    return (*_qkv(), dict(joint_k=jk, joint_strategy="front"))


def joint_k_wrong_heads(rank, world):
    _, jk, jv = _joint(heads=(4, 2))
    return (*_qkv(), dict(joint_k=jk, joint_v=jv, joint_strategy="front"))


def joint_q_wrong_length(rank, world):
    jq, jk, jv = _joint()
    return (*_qkv(), dict(joint_q=jq[:, :2], joint_k=jk, joint_v=jv, joint_strategy="front"))


def joint_wrong_dtype(rank, world):
    _, jk, jv = _joint(dtype=torch.float64)
    return (*_qkv(), dict(joint_k=jk, joint_v=jv, joint_strategy="front"))


def unknown_joint_strategy(rank, world):
    _, jk, jv = _joint()
    return (*_qkv(), dict(joint_k=jk, joint_v=jv, joint_strategy="middle"))


JOINT_ERRORS = [
    (
        joint_with_causal,
        "joint tokens need causal=False (joint attention has no mask), got causal=True",
    ),
    (
        joint_with_strategy_none,
        "joint_k, joint_v given with joint_strategy='none'; say where the joint tokens go: "
        "joint_strategy='front' or 'rear'",
    ),
    (
        joint_strategy_without_tensors,
        "joint_strategy='rear' needs joint_k and joint_v (joint_q optional)",
    ),
    (joint_k_without_v, "joint_k and joint_v must be given together (joint_q is optional)"),
    (
        joint_k_wrong_heads,
        "joint_k must be [batch, joint_len > 0, heads_kv, head_dim] = [1, J, 4, 16], "
        "got (1, 3, 2, 16)",
    ),
    (
        joint_q_wrong_length,
        "joint_q must be [batch, joint_len, heads_q, head_dim] = [1, 3, 4, 16], got (1, 2, 4, 16)",
    ),
    (
        joint_wrong_dtype,
        "joint_k must match q's dtype and device (torch.float32, cpu), got torch.float64, cpu",
    ),
    (
        unknown_joint_strategy,
        "unknown joint_strategy 'middle'; valid values are 'none', 'front', 'rear'",
    ),
]


@pytest.mark.parametrize("world", [1, 2])
def test_joint_token_errors_are_the_same_on_every_rank(pool, world):
    cases = [dict(world=world, make=make, call="attention") for make, _ in JOINT_ERRORS]
    expected = {make.__name__: text for make, text in JOINT_ERRORS}
    prefix = f"{all_ranks(world)}: " if world > 1 else ""
    for case, messages in zip(cases, pool.run(expect_error, cases)):
        assert len(set(messages)) == 1, messages
        assert messages[0].startswith(prefix + expected[case["make"].__name__]), messages
