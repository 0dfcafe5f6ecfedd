"""Case functions for the hybrid (USP) and joint-token tests; every rank of the pool runs them.

Each returns plain numbers for the test process to judge against its bounds.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

import tokenring as tr
from dist_cases import DTYPES, make_inputs
from reference import attention_reference, grad_floor, reference_with_grads, rel_err

_MESHES: dict[tuple, Any] = {}


def mesh_of(ulysses: int, ring: int, inner: bool):
    """One mesh per shape and order for the pool's lifetime (making one makes groups)."""
    key = (ulysses, ring, inner)
    if key not in _MESHES:
        _MESHES[key] = tr.sp_mesh(ulysses=ulysses, ring=ring, ulysses_inner=inner)
    return _MESHES[key]


def usp_case(
    w, *, world: int, ulysses: int, ring: int, inner: bool, ring_impl: str, layout: str,
    causal: bool, heads: tuple[int, int], seq: int, seed: int = 0, batch: int = 1,
    head_dim: int = 16, dtype: str = "float32",
) -> dict[str, float]:  # fmt: skip
    """USP on the whole pool: errors of out, lse and gradients against float64, and
    whether ``unshard`` inverts ``shard`` on the mesh exactly."""
    mesh = mesh_of(ulysses, ring, inner)
    q, k, v, do = make_inputs(seed, batch, seq, heads, head_dim, DTYPES[dtype])
    ref_out, ref_lse, ref_grads = reference_with_grads(q, k, v, do, causal=causal)

    def local(x, dim=1):
        return tr.shard(x, layout=layout, mesh=mesh, dim=dim)

    parts = [local(t).requires_grad_() for t in (q, k, v)]
    out, lse = tr.attention(
        *parts, strategy="usp", mesh=mesh, ring_impl=ring_impl, causal=causal, layout=layout,
        return_lse=True, seq_len=seq,
    )  # fmt: skip
    grads = torch.autograd.grad(out, parts, local(do))
    errs = {"out": rel_err(out, local(ref_out)), "lse": rel_err(lse, local(ref_lse, dim=2))}
    errs.update(
        {
            n: rel_err(g, local(r), grad_floor(local(r), ref_grads))
            for n, g, r in zip(("dq", "dk", "dv"), grads, ref_grads)
        }
    )
    errs["roundtrip"] = float(torch.equal(tr.unshard(local(q), layout=layout, mesh=mesh), q))
    return errs


def degenerate_case(
    w, *, world: int, ulysses: int, ring: int, ring_impl: str, layout: str, causal: bool
) -> float:
    """A mesh with one axis of size 1 runs the 1-D strategy over the other: the largest
    difference between the two (outputs and gradients), same inputs, same shards."""
    mesh = mesh_of(ulysses, ring, True)
    one_d = "ulysses" if ring == 1 else ring_impl
    q, k, v, do = make_inputs(4, 2, 8 * world, (8, 4), 16, torch.float32)
    results = []
    for kwargs, sharding in (
        (dict(strategy="usp", mesh=mesh, ring_impl=ring_impl), {"mesh": mesh}),
        (dict(strategy=one_d), {}),
    ):
        parts = [tr.shard(t, layout=layout, **sharding).requires_grad_() for t in (q, k, v)]
        out = tr.attention(*parts, causal=causal, layout=layout, **kwargs)
        grads = torch.autograd.grad(out, parts, tr.shard(do, layout=layout, **sharding))
        results.append([out, *grads])
    return max((a - b).abs().max().item() for a, b in zip(*results))


def _concat_reference(q, k, v, joint, do, djo, front: bool, with_q: bool, joint_mask=None):
    """Float64 attention over the concatenated sequence: the image part and the joint
    part of out and lse, and the gradients of ``sum(out_image * do) + sum(out_joint * djo)``
    for q, k, v, then joint_q (if used), joint_k, joint_v. ``joint_mask`` (``[B, J]``):
    the joint tokens that are no query's keys where False."""
    image_len, joint_len = q.shape[1], joint[1].shape[1]
    full = [t.double().requires_grad_() for t in (q, k, v, *joint)]
    fq, fk, fv, fjq, fjk, fjv = full

    def cat(image, extra):
        return torch.cat([extra, image] if front else [image, extra], dim=1)

    image = slice(joint_len, None) if front else slice(0, image_len)
    tail = slice(0, joint_len) if front else slice(image_len, None)
    big_q = cat(fq, fjq) if with_q else fq
    allowed = None
    if joint_mask is not None:  # every query row sees the image keys and the real joint ones
        keys = cat(torch.ones(q.shape[0], image_len, dtype=torch.bool), joint_mask)
        allowed = keys[:, None, :].expand(-1, big_q.shape[1], -1)
    out, lse = attention_reference(big_q, cat(fk, fjk), cat(fv, fjv), causal=False,
                                   allowed=allowed)  # fmt: skip
    image_rows = image if with_q else slice(None)
    loss = (out[:, image_rows] * do).sum()
    if with_q:
        loss = loss + (out[:, tail] * djo).sum()
    used = full if with_q else [*full[:3], fjk, fjv]
    grads = torch.autograd.grad(loss, used)
    joint_out = (out[:, tail].detach(), lse[:, :, tail].detach()) if with_q else None
    return out[:, image_rows].detach(), lse[:, :, image_rows].detach(), joint_out, grads


def joint_case(
    w, *, world: int, strategy: str, joint_strategy: str, heads: tuple[int, int],
    joint_len: int = 5, ulysses: int = 1, ring: int = 1, with_q: bool = True,
    layout: str = "contiguous", dtype: torch.dtype = torch.float32, unequal: bool = False,
    seq: int | None = None, padded: bool = False,
) -> dict[str, float]:  # fmt: skip
    """Joint tokens against float64 attention over the concatenated sequence.

    Every rank's backward gets ``d joint_out / size`` (its loss takes the joint term
    divided by the group size); the joint tensors' gradients, each rank's share,
    are summed over the group and compared with the unsharded ones. ``unequal``: rank
    r takes the share ``(r + 1) / (1 + ... + size)`` instead (as when each rank's loss
    sees the joint output only through its own tokens, the integrations' case).
    """
    usp = strategy == "usp"
    sharding = {"mesh": mesh_of(ulysses, ring, True)} if usp else {"group": w.group(world)}
    size = ulysses * ring if usp else world
    seq = 4 * size if seq is None else seq
    q, k, v, do = make_inputs(21, 2, seq, heads, 8, dtype)
    jq, jk, jv, djo = make_inputs(22, 2, joint_len, heads, 8, dtype)
    front = joint_strategy == "front"
    joint_mask = None
    if padded:  # the second row's text padded: its last two tokens (mid-row too, on front)
        joint_mask = torch.ones(2, joint_len, dtype=torch.bool)
        joint_mask[1, -2:] = False
    ref_out, ref_lse, ref_joint, ref_grads = _concat_reference(
        q, k, v, (jq, jk, jv), do, djo, front, with_q, joint_mask
    )

    def local(x, dim=1):
        return tr.shard(x, layout=layout, dim=dim, **sharding)

    parts = [local(t).requires_grad_() for t in (q, k, v)]
    joints = [t.clone().requires_grad_() for t in ((jq,) if with_q else ()) + (jk, jv)]
    result = tr.attention(
        *parts, strategy=strategy, layout=layout, joint_q=joints[0] if with_q else None,
        joint_k=joints[-2], joint_v=joints[-1], joint_strategy=joint_strategy,
        joint_mask=joint_mask, return_lse=True, seq_len=seq, **sharding,
    )  # fmt: skip
    if with_q:
        out, lse, jo, jlse = result
        share = 1 / size
        group = None if usp else sharding["group"]
        if unequal and size > 1:
            me = tr.runtime().sp_mesh(sharding["mesh"]).rank if usp else dist.get_rank(group)
            share = (me + 1) / (size * (size + 1) / 2)
        grads = torch.autograd.grad((out, jo), parts + joints, (local(do), djo * share))
    else:
        out, lse = result
        grads = torch.autograd.grad(out, parts + joints, local(do))
    errs = {"out": rel_err(out, local(ref_out)), "lse": rel_err(lse, local(ref_lse, dim=2))}
    if with_q:
        errs["joint_out"] = rel_err(jo, ref_joint[0])
        errs["joint_lse"] = rel_err(jlse, ref_joint[1])
        everyone = [torch.empty_like(jo) for _ in range(size)] if size > 1 else [jo]
        if size > 1:
            dist.all_gather(everyone, jo.contiguous(), group=None if usp else sharding["group"])
        errs["joint_out_identical"] = float(all(torch.equal(jo, other) for other in everyone))
    names = ["dq", "dk", "dv", *(["djq"] if with_q else []), "djk", "djv"]
    group = None if usp else sharding["group"]
    for name, mine, ref in zip(names, grads, ref_grads):
        if name.startswith("dj"):  # this rank's share: summed over the group, the gradient
            total = mine.clone()
            if size > 1:
                dist.all_reduce(total, group=group)
            errs[name] = rel_err(total, ref)
        else:
            errs[name] = rel_err(mine, local(ref), grad_floor(local(ref), ref_grads[:3]))
    return errs


def usp_error(w, *, world: int, make: str, ulysses: int, ring: int) -> str:
    """The ValueError message of one bad ``usp`` call, named by ``make``."""
    mesh = mesh_of(ulysses, ring, True)
    q = torch.randn(1, 8, 6, 8)
    k = torch.randn(1, 8, 6, 8)
    calls = {
        "heads_not_divisible": dict(strategy="usp", mesh=mesh),
        "no_mesh": dict(strategy="usp"),
        "mesh_for_ring": dict(strategy="ring", mesh=mesh),
        "ring_impl_for_ring": dict(strategy="ring", ring_impl="ring"),
        "unknown_ring_impl": dict(strategy="usp", mesh=mesh, ring_impl="spiral"),
        "joint_causal": dict(
            strategy="usp", mesh=mesh, causal=True, joint_k=k[:, :3], joint_v=k[:, :3],
            joint_strategy="front",
        ),
    }  # fmt: skip
    if make == "heads_not_divisible":
        q, k = torch.randn(1, 8, 3, 8), torch.randn(1, 8, 3, 8)
    try:
        tr.attention(q, k, k, **calls[make])
    except ValueError as err:
        return str(err)
    return "<no error>"


def mesh_layout_case(w, *, world: int) -> dict[str, Any]:
    """Where ``sp_mesh`` puts this rank, its refusal of a size that does not divide the
    world, and the leading ``dp`` dim when the world is a multiple of the mesh."""
    from tokenring.runtime.meshes import SpMesh

    inner = SpMesh.of(mesh_of(2, 2, True))
    outer = SpMesh.of(mesh_of(2, 2, False))
    try:
        tr.sp_mesh(ulysses=3, ring=1)
        bad = "<no error>"
    except ValueError as err:
        bad = str(err)
    dp_mesh = mesh_of(1, 2, True)  # 2 copies of a 2 x 1 mesh
    return {
        "inner": (inner.r, inner.u),
        "outer": (outer.r, outer.u),
        "bad_size": bad,
        "dp": tuple(dp_mesh.mesh_dim_names),
        "dp_coords": tuple(dp_mesh.get_coordinate()),
    }


def layer_case(w, *, world: int) -> bool:
    """The layer and ``tr.attention`` with the same options give bitwise the same."""
    q, k, v, _ = make_inputs(3, 1, 16, (4, 2), 8, torch.float32)
    jq, jk, jv, _ = make_inputs(4, 1, 3, (4, 2), 8, torch.float32)
    joint = dict(joint_q=jq, joint_k=jk, joint_v=jv, joint_strategy="front")
    same = []
    layer = tr.SequenceParallelAttention("ulysses", layout="zigzag")
    parts = [tr.shard(t, layout="zigzag") for t in (q, k, v)]
    got = layer(*parts, **joint)
    want = tr.attention(*parts, strategy="ulysses", layout="zigzag", **joint)
    same += [torch.equal(a, b) for a, b in zip(got, want)]
    mesh = mesh_of(2, 2, True)
    layer = tr.SequenceParallelAttention("usp", mesh=mesh, layout="zigzag", ring_impl="ring")
    parts = [tr.shard(t, layout="zigzag", mesh=mesh) for t in (q, k, v)]
    got = layer(*parts, causal=True)
    want = tr.attention(
        *parts, strategy="usp", mesh=mesh, ring_impl="ring", layout="zigzag", causal=True
    )
    same.append(torch.equal(got, want))
    auto = tr.SequenceParallelAttention("auto", mesh=mesh, layout="zigzag")
    want = tr.attention(*parts, strategy="auto", mesh=mesh, layout="zigzag", causal=True)
    same.append(torch.equal(auto(*parts, causal=True), want))
    return all(same)
