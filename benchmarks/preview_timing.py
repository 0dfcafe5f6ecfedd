"""First timing read on the GPU machine (before ``tokenring bench`` exists).

Times, on all local GPUs: TokenRing and ring, forward and forward+backward,
causal zigzag, 32 heads, head_dim 128, bf16, batch 1, for a few sequence
lengths; and the single-GPU kernel on the whole sequence (T1) on rank 0.
Prints a table; writes JSON to the path given as the first argument.
"""

from __future__ import annotations

import json
import statistics
import sys

import torch
import torch.distributed as dist

import tokenring as tr
from tokenring.kernels import BlockSpec, select_kernel
from tokenring.launch import run_local

HEADS, DIM = 32, 128


def _time(fn, reps: int = 10) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        dist.barrier()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    t = torch.tensor([statistics.median(times)], device="cuda")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def worker(ctx, seqs):
    rows = []
    world = ctx.world
    for seq in seqs:
        local = seq // world
        g = torch.Generator(device="cuda").manual_seed(ctx.rank)
        q, k, v, do = (
            torch.randn(1, local, HEADS, DIM, device="cuda", dtype=torch.bfloat16, generator=g)
            for _ in range(4)
        )
        for t in (q, k, v):
            t.requires_grad_()
        for strategy in ("tokenring", "ring"):

            def fwd(strategy=strategy):
                with torch.no_grad():
                    tr.attention(q, k, v, strategy=strategy, causal=True, layout="zigzag")

            def fwd_bwd(strategy=strategy):
                out = tr.attention(q, k, v, strategy=strategy, causal=True, layout="zigzag")
                torch.autograd.grad(out, (q, k, v), do)

            rows.append(
                {
                    "seq": seq,
                    "strategy": strategy,
                    "fwd_ms": _time(fwd),
                    "fwd_bwd_ms": _time(fwd_bwd),
                }
            )
            ctx.report(("case", len(rows), 3 * len(seqs), f"{strategy} S={seq}"))
        # T1: the whole sequence on one GPU (rank 0), the others wait
        spec = BlockSpec("cuda", torch.bfloat16, DIM, HEADS, HEADS, True, backward=True)
        kernel = select_kernel("auto", spec)
        t1 = {"fwd_ms": float("nan"), "fwd_bwd_ms": float("nan")}
        if ctx.rank == 0:
            fq, fk, fv, fdo = (
                torch.randn(1, seq, HEADS, DIM, device="cuda", dtype=torch.bfloat16, generator=g)
                for _ in range(4)
            )
            scale = DIM**-0.5

            def one():
                return kernel.forward(fq, fk, fv, True, scale)

            def one_bwd():
                out, lse = kernel.forward(fq, fk, fv, True, scale)
                delta = (fdo.float() * out.float()).sum(-1).transpose(1, 2)
                kernel.backward(fdo, fq, fk, fv, out, lse, delta, True, scale)

            t1 = {}
            for name, fn in (("fwd_ms", one), ("fwd_bwd_ms", one_bwd)):
                for _ in range(3):
                    fn()
                times = []
                for _ in range(10):
                    s, e = (
                        torch.cuda.Event(enable_timing=True),
                        torch.cuda.Event(enable_timing=True),
                    )
                    s.record()
                    fn()
                    e.record()
                    torch.cuda.synchronize()
                    times.append(s.elapsed_time(e))
                t1[name] = statistics.median(times)
        dist.barrier()
        rows.append({"seq": seq, "strategy": f"single-gpu ({kernel.name})", **t1})
        ctx.report(("case", len(rows), 3 * len(seqs), f"T1 S={seq}"))
    return rows


def main() -> None:
    out = sys.argv[1] if len(sys.argv) > 1 else "preview.json"
    world = torch.cuda.device_count()
    rows = run_local(
        worker,
        ([8192, 32768, 65536],),
        world=world,
        backend="nccl",
        timeout_s=500,
        on_message=lambda m: print(m[3], flush=True),
    )[0]
    t1 = {r["seq"]: r for r in rows if r["strategy"].startswith("single")}
    print(
        f"{'S':>7} {'strategy':>22} {'fwd ms':>9} {'fwd+bwd ms':>11} {'eff fwd':>8} {'eff f+b':>8}"
    )
    for r in rows:
        base = t1[r["seq"]]
        eff_f = base["fwd_ms"] / (world * r["fwd_ms"])
        eff_b = base["fwd_bwd_ms"] / (world * r["fwd_bwd_ms"])
        print(
            f"{r['seq']:>7} {r['strategy']:>22} {r['fwd_ms']:>9.3f} {r['fwd_bwd_ms']:>11.3f} "
            f"{eff_f:>8.3f} {eff_b:>8.3f}"
        )
    with open(out, "w") as f:
        json.dump(
            {
                "world": world,
                "device": torch.cuda.get_device_name(),
                "torch": torch.__version__,
                "rows": rows,
            },
            f,
            indent=1,
        )


if __name__ == "__main__":
    main()
