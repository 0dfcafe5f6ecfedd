"""A text-to-video denoising loop of a small random Wan transformer, sequence parallel.

Every rank passes the usual full inputs (the video latent, the text embeddings) and
gets the full prediction at each step; inside, the video tokens are sharded over the
ranks as Wan's own context-parallel plan says, self-attention runs through tokenring
and cross-attention to the text stays local. The loop (Euler steps of the flow the
model predicts) runs twice, unsharded and sequence parallel, and the final latents
are compared; both are timed. Token counts need not divide by the number of ranks.
CPU (gloo) or one GPU per process (NCCL):

    torchrun --nproc-per-node 3 examples/wan_sp.py --frames 3 --size 12
    torchrun --nproc-per-node 8 examples/wan_sp.py --frames 21 --size 60 --strategy ring

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
from diffusers import WanTransformer3DModel

from tokenring.integrations.diffusers import enable


def inputs(frames: int, size: int, text: int, device, dtype) -> dict:
    """A batch of one: a latent of ``frames`` x ``size`` x ``size`` (16 channels) and
    ``text`` text embeddings, the same on every rank (the generator is seeded)."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    return dict(hidden_states=rand(1, 16, frames, size, size),
                encoder_hidden_states=rand(1, text, 64))  # fmt: skip


def denoise(model, batch: dict, steps: int) -> tuple[torch.Tensor, float]:
    """Euler steps of the predicted flow from t = 1 (the noise in ``batch``) to t = 0;
    the latents and the seconds taken."""
    start = time.perf_counter()
    x = batch["hidden_states"]
    times = torch.linspace(1.0, 0.0, steps + 1, device=x.device, dtype=x.dtype)
    for t, t_next in itertools.pairwise(times):
        step = {**batch, "hidden_states": x, "timestep": (t * 1000).reshape(1)}
        x = x + (t_next - t) * model(**step).sample
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return x, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=3, help="latent frames")
    parser.add_argument("--size", type=int, default=12, help="latent height and width")
    parser.add_argument("--text", type=int, default=16, help="text tokens")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps")
    parser.add_argument("--strategy", default="tokenring",
                        help="tokenring, ring, ulysses, allgather")  # fmt: skip
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=300))
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32

    torch.manual_seed(0)  # the same weights everywhere
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=16,
        out_channels=16, text_dim=64, freq_dim=32, ffn_dim=256, num_layers=2,
    ).to(device, dtype)  # fmt: skip
    batch = inputs(args.frames, args.size, args.text, device, dtype)
    tokens = args.frames * (args.size // 2) ** 2
    with torch.no_grad():
        alone, alone_s = denoise(model, batch, args.steps)
        handle = enable(model, strategy=args.strategy)
        sharded, sharded_s = denoise(model, batch, args.steps)
        handle.disable()
    err = ((sharded.float() - alone.float()).norm() / alone.float().norm()).item()
    if dist.get_rank() == 0:
        print(
            f"{args.steps} steps, {tokens} video + {args.text} text tokens over "
            f"{dist.get_world_size()} ranks ({args.strategy}): relative difference {err:.2e}; "
            f"{alone_s:.2f} s unsharded, {sharded_s:.2f} s sequence parallel"
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
