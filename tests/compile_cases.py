"""Case functions for tests/test_compile.py: compiled calls against eager ones, on the pool."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

import tokenring as tr
from dist_cases import make_inputs
from reference import rel_err
from tokenring.execution.timeline import Recorder
from usp_cases import mesh_of


def _where(w, world: int, strategy: str) -> dict:
    if strategy == "usp":
        return {"mesh": mesh_of(2, world // 2, True)}
    return {"group": w.group(world)}


def compiled_vs_eager_case(
    w, *, world: int, strategy: str, layout: str, causal: bool, heads: tuple[int, int],
    fullgraph: bool = True, backend: str = "aot_eager", joint: bool = False,
) -> dict[str, float]:  # fmt: skip
    """The same forward and backward, eager and under ``torch.compile``: the largest
    relative difference of outputs and gradients, and how many graphs and breaks Dynamo made.
    (Not bitwise: the compiled backward hands the kernel contiguous gradients, which
    changes the kernel's summation order.)"""
    where = _where(w, world, strategy)
    call = dict(strategy=strategy, layout=layout, causal=causal, **where)
    sharding = {"mesh": where["mesh"]} if "mesh" in where else {"group": where["group"]}
    q, k, v, do = make_inputs(17, 2, 8 * world, heads, 16, torch.float32)
    parts = [tr.shard(t, layout=layout, **sharding) for t in (q, k, v)]
    do = tr.shard(do, layout=layout, **sharding)
    extra = {}
    if joint:
        jq, jk, jv, _ = make_inputs(18, 2, 3, heads, 16, torch.float32)
        extra = dict(joint_q=jq, joint_k=jk, joint_v=jv, joint_strategy="front")

    def f(q, k, v, *joints):
        kw = dict(call, **extra)
        if joints:
            kw.update(joint_q=joints[0], joint_k=joints[1], joint_v=joints[2])
        result = tr.attention(q, k, v, **kw)
        return result if joint else (result,)

    def run(fn):
        inputs = [t.clone().requires_grad_() for t in parts]
        joints = [t.clone().requires_grad_() for t in extra.values() if isinstance(t, torch.Tensor)]
        outputs = fn(*inputs, *joints)
        grads = torch.autograd.grad(
            outputs, inputs + joints, (do, *(torch.ones_like(o) for o in outputs[1:]))
        )
        return [*(o.detach() for o in outputs), *grads]

    torch._dynamo.reset()
    eager = run(f)
    explained = torch._dynamo.explain(f)(
        *parts, *[t for t in extra.values() if isinstance(t, torch.Tensor)]
    )
    compiled = run(torch.compile(f, fullgraph=fullgraph, backend=backend))
    return {
        "diff": max(rel_err(b, a) for a, b in zip(eager, compiled)),
        "graphs": float(explained.graph_count),
        "breaks": float(explained.graph_break_count),
    }


class _Block(torch.nn.Module):
    """Projections around sequence-parallel attention: a transformer's attention sublayer."""

    def __init__(self, dim: int, heads: int, layer: tr.SequenceParallelAttention):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)
        self.attn = layer

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).unbind(2)
        return x + self.proj(self.attn(q, k, v, causal=True).reshape(b, n, d))


def training_case(w, *, world: int, strategy: str, steps: int = 3) -> dict[str, float]:
    """A two-layer model trains for ``steps`` steps compiled (inductor) and eager, from the
    same weights on the same data: the largest difference of losses and of weights."""
    group = w.group(world)
    layer = tr.SequenceParallelAttention(strategy, group=group, layout="zigzag")
    torch.manual_seed(0)
    model = torch.nn.Sequential(_Block(16, 4, layer), _Block(16, 4, layer))
    data = torch.randn(2, 8 * world, 16, generator=torch.Generator().manual_seed(1))
    x = tr.shard(data, layout="zigzag", group=group)
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        copy = torch.nn.Sequential(_Block(16, 4, layer), _Block(16, 4, layer))
        copy.load_state_dict(model.state_dict())
        forward = torch.compile(copy) if compiled else copy
        opt = torch.optim.SGD(copy.parameters(), lr=0.1)
        losses = []
        for _ in range(steps):
            opt.zero_grad()
            loss = forward(x).pow(2).mean()
            loss.backward()
            for p in copy.parameters():  # the sequence is sharded: sum the weight gradients
                dist.all_reduce(p.grad, group=group)
            opt.step()
            losses.append(loss.detach())
        results.append((torch.stack(losses), [p.detach().clone() for p in copy.parameters()]))
    (eager_losses, eager_weights), (comp_losses, comp_weights) = results
    return {
        "loss_diff": (eager_losses - comp_losses).abs().max().item(),
        "weight_diff": max((a - b).abs().max().item() for a, b in zip(eager_weights, comp_weights)),
        "loss_moved": (eager_losses[0] - eager_losses[-1]).abs().item(),
    }


def compile_refusals_case(w, *, world: int) -> dict[str, str]:
    """What a compiled call says when it cannot run: a group or a mesh tokenring has not
    seen yet (then known after ``setup_lanes``), and a recorder (eager only)."""
    fresh = dist.new_group(list(range(world)))  # collective: every rank makes it
    q, k, v, _ = make_inputs(19, 1, 4 * world, (2, 2), 8, torch.float32)
    q, k, v = (tr.shard(t, layout="contiguous", group=fresh) for t in (q, k, v))
    said = {}
    torch._dynamo.reset()
    try:
        torch.compile(lambda q, k, v: tr.attention(q, k, v, group=fresh), fullgraph=True)(q, k, v)
    except RuntimeError as error:
        said["unknown_group"] = str(error)
    tr.setup_lanes(fresh)
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v: tr.attention(q, k, v, group=fresh), fullgraph=True)
    said["known_after_setup"] = str(rel_err(compiled(q, k, v), tr.attention(q, k, v, group=fresh)))
    torch._dynamo.reset()
    recorder = Recorder(w.rank, q.device)
    try:
        torch.compile(lambda q: tr.attention(q, k, v, recorder=recorder), fullgraph=True)(q)
    except Exception as error:  # Dynamo reports the refusal in its own exception type
        said["recorder"] = f"{type(error).__name__}: {error}"
    # A twin mesh (same ranks and names, so equal as DeviceMeshes, other groups) called
    # eagerly first must not stand in for the mesh the compiled call names.
    twin = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("ring", "ulysses"))
    tr.attention(q, k, v, strategy="usp", mesh=twin)
    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("ring", "ulysses"))

    def usp(q, k, v):
        return tr.attention(q, k, v, strategy="usp", mesh=mesh)

    torch._dynamo.reset()
    try:
        torch.compile(usp, fullgraph=True)(q, k, v)
    except RuntimeError as error:
        said["unknown_mesh"] = str(error)
    tr.setup_lanes(mesh=mesh)
    torch._dynamo.reset()
    said["mesh_known_after_setup"] = str(rel_err(torch.compile(usp)(q, k, v), usp(q, k, v)))
    return said
