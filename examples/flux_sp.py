"""A denoising loop of a small random Flux transformer, sequence parallel with USP.

Every rank passes the usual full inputs and gets the full output at each step;
inside, image tokens are sharded over a Ulysses x TokenRing mesh and the text
tokens attend as joint tokens. The loop (Euler steps of the flow Flux predicts)
runs twice, unsharded and sequence parallel, and the final latents are compared;
both are timed. CPU (gloo) or one GPU per process (NCCL):

    torchrun --nproc-per-node 4 examples/flux_sp.py --ulysses 2 --ring 2
    torchrun --nproc-per-node 8 examples/flux_sp.py --ulysses 4 --ring 2 --size 64

Needs ``pip install 'tokenring-attention[diffusers]'``.
"""

from __future__ import annotations

import argparse
import itertools
import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from diffusers import FluxTransformer2DModel

import tokenring as tr
from tokenring.integrations.diffusers import enable


def inputs(size: int, text: int, device, dtype) -> dict:
    """A batch of one: ``size x size`` image tokens, ``text`` text tokens (the same on
    every rank: the generator is seeded)."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    rows, cols = torch.meshgrid(torch.arange(float(size)), torch.arange(float(size)), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3)
    return dict(
        hidden_states=rand(1, size * size, 16), encoder_hidden_states=rand(1, text, 64),
        pooled_projections=rand(1, 32), timestep=torch.tensor([0.5], device=device, dtype=dtype),
        img_ids=img_ids.to(device, dtype), txt_ids=torch.zeros(text, 3, device=device, dtype=dtype),
    )  # fmt: skip


def denoise(model, batch: dict, steps: int) -> tuple[torch.Tensor, float]:
    """Euler steps from t = 1 (the noise in ``batch``) to t = 0; the latents and seconds."""
    start = time.perf_counter()
    x = batch["hidden_states"]
    times = torch.linspace(1.0, 0.0, steps + 1, device=x.device, dtype=x.dtype)
    for t, t_next in itertools.pairwise(times):
        step = {**batch, "hidden_states": x, "timestep": t.reshape(1)}
        x = x + (t_next - t) * model(**step).sample
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return x, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ulysses", type=int, default=2)
    parser.add_argument("--ring", type=int, default=2)
    parser.add_argument("--size", type=int, default=32, help="image tokens per side")
    parser.add_argument("--text", type=int, default=16, help="text tokens")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=300))
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    mesh = tr.sp_mesh(ulysses=args.ulysses, ring=args.ring)

    torch.manual_seed(0)  # the same weights everywhere
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=32,
        num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=32,
        axes_dims_rope=(8, 12, 12),
    ).to(device, dtype)  # fmt: skip
    batch = inputs(args.size, args.text, device, dtype)
    with torch.no_grad():
        alone, alone_s = denoise(model, batch, args.steps)
        handle = enable(model, mesh=mesh, strategy="usp", ring_impl="tokenring")
        sharded, sharded_s = denoise(model, batch, args.steps)
        handle.disable()
    err = ((sharded.float() - alone.float()).norm() / alone.float().norm()).item()
    if dist.get_rank() == 0:
        print(
            f"{args.steps} steps, {args.size * args.size} image + {args.text} text tokens, USP "
            f"{args.ulysses} x {args.ring}: relative difference {err:.2e}; "
            f"{alone_s:.2f} s unsharded, {sharded_s:.2f} s sequence parallel"
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
