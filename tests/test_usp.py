"""The Ulysses x TokenRing (or ring) hybrid on a 2-D mesh, against float64 attention on the
gathered sequence; degenerate meshes against the 1-D strategies; its errors."""

from __future__ import annotations

import itertools

import pytest

from usp_cases import degenerate_case, usp_case, usp_error

FP32_TOL = 1e-5
MESHES = [(2, 2), (4, 1), (1, 4)]  # (ulysses, ring) on the pool's 4 ranks
HEADS = {"mha": (4, 4), "gqa": (8, 2)}


@pytest.mark.parametrize("ulysses,ring", MESHES, ids=lambda x: str(x))
@pytest.mark.parametrize("ring_impl", ["tokenring", "ring"])
def test_usp_matches_float64_reference(pool, ulysses, ring, ring_impl):
    """Both group orders, both layouts, causal or not, MHA and GQA (with 4 Ulysses ranks
    and 2 key/value heads, each is replicated on two ranks); out, lse and gradients."""
    cases = [
        dict(
            world=4,
            ulysses=ulysses,
            ring=ring,
            inner=inner,
            ring_impl=ring_impl,
            layout=layout,
            causal=causal,
            heads=heads,
            seq=32,
            seed=i,
        )
        for i, (inner, layout, causal, heads) in enumerate(
            itertools.product(
                (True, False), ("zigzag", "contiguous"), (False, True), HEADS.values()
            )
        )
    ]
    failures = []
    for case, per_rank in zip(cases, pool.run(usp_case, cases, timeout=300)):
        for rank, errs in enumerate(per_rank):
            if errs["roundtrip"] != 1.0:
                failures.append(f"{case} rank {rank}: unshard(shard(x)) != x")
            for key in ("out", "lse", "dq", "dk", "dv"):
                if not errs[key] <= FP32_TOL:
                    failures.append(f"{case} rank {rank}: {key} error {errs[key]:.3g}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("ulysses,ring", [(1, 4), (4, 1)], ids=lambda x: str(x))
@pytest.mark.parametrize("ring_impl", ["tokenring", "ring"])
def test_a_degenerate_mesh_equals_the_one_dimensional_strategy(pool, ulysses, ring, ring_impl):
    """ring=1 is Ulysses over the mesh, ulysses=1 is the ring strategy: bitwise the same
    outputs and gradients as the 1-D calls on the same shards."""
    cases = [
        dict(world=4, ulysses=ulysses, ring=ring, ring_impl=ring_impl, layout=layout, causal=causal)
        for layout in ("zigzag", "contiguous")
        for causal in (False, True)
    ]
    for case, per_rank in zip(cases, pool.run(degenerate_case, cases, timeout=240)):
        assert max(per_rank) == 0.0, (case, per_rank)


USP_ERRORS = {
    "heads_not_divisible": "every rank: strategy 'usp' cannot run heads 3/3 over a mesh of 2 x 2 "
    "(ring x ulysses): heads_q (3) is not divisible by the Ulysses degree 2 (degrees that "
    "would work for heads 3/3: 1, 3)",
    "no_mesh": "strategy='usp' needs mesh=: a DeviceMesh with dims 'ring' and 'ulysses' "
    "(tokenring.sp_mesh makes one)",
    "mesh_for_ring": "mesh= is for strategy='usp'; strategy 'ring' takes group=",
    "ring_impl_for_ring": "ring_impl= is for strategy='usp', not strategy 'ring'",
    "unknown_ring_impl": "every rank: unknown ring_impl 'spiral'; valid values are "
    "'tokenring', 'ring'",
    "joint_causal": "every rank: joint tokens need causal=False (joint attention has no mask), "
    "got causal=True",
}


def test_usp_errors_name_the_problem_on_every_rank(pool):
    cases = [dict(world=4, make=name, ulysses=2, ring=2) for name in USP_ERRORS]
    for case, messages in zip(cases, pool.run(usp_error, cases, timeout=120)):
        assert messages == [USP_ERRORS[case["make"]]] * 4, (case["make"], messages)


def test_sp_mesh_orders_and_rejects_sizes(pool):
    from usp_cases import mesh_layout_case

    (per_rank,) = pool.run(mesh_layout_case, [dict(world=4)])
    for rank, got in enumerate(per_rank):
        assert got["inner"] == (rank // 2, rank % 2), "ulysses_inner: ulysses groups neighbour"
        assert got["outer"] == (rank % 2, rank // 2), "ulysses_inner=False: rings neighbour"
        assert (
            got["bad_size"] == "sp_mesh(ulysses=3, ring=1) needs a world size divisible by 3, got 4"
        )
        assert got["dp"] == ("dp", "ring", "ulysses")
        assert got["dp_coords"] == (rank // 2, rank % 2, 0), "dp outermost, then ring"


@pytest.mark.parametrize("ulysses,ring", [(2, 1), (1, 2)], ids=lambda x: str(x))
def test_usp_on_a_mesh_with_a_data_parallel_dim(pool, ulysses, ring):
    """World 4 as 2 copies of a 2-rank mesh: each copy is its own sequence-parallel group
    (a sub-group the runtime makes), and each matches float64."""
    cases = [
        dict(
            world=4,
            ulysses=ulysses,
            ring=ring,
            inner=True,
            ring_impl="tokenring",
            layout=layout,
            causal=causal,
            heads=(4, 2),
            seq=16,
        )
        for layout in ("zigzag", "contiguous")
        for causal in (False, True)
    ]
    for case, per_rank in zip(cases, pool.run(usp_case, cases, timeout=240)):
        for errs in per_rank:
            assert errs["roundtrip"] == 1.0
            assert max(errs[k] for k in ("out", "lse", "dq", "dk", "dv")) <= FP32_TOL, case
