"""A few training steps of a small random Llama, sequence-parallel with tokenring.

Every process holds the whole model; each sequence is sharded over a
sequence-parallel group of ``--sp`` ranks, and the rest of the world is plain data
parallel (different batches). Gradients: summed over the sequence-parallel group
(each rank's loss is its share of the sequence's loss), averaged over data-parallel
replicas. CPU (gloo) or one GPU per process (NCCL):

    torchrun --nproc-per-node 4 examples/train_llama.py --sp 2       # 2 x 2 on CPU
    torchrun --nproc-per-node 8 examples/train_llama.py --sp 8 --seq 32768   # 8 GPUs

Needs ``pip install 'tokenring-attention[transformers]'``.
"""

from __future__ import annotations

import argparse
import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from transformers import LlamaConfig, LlamaForCausalLM

from tokenring.integrations.transformers import enable, shard_batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sp", type=int, default=None, help="sequence-parallel degree (default: all)"
    )
    parser.add_argument("--seq", type=int, default=1024, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument(
        "--strategy", default="auto", help="tokenring, ring, ulysses, allgather, auto"
    )
    parser.add_argument("--layout", default="zigzag")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=300))
    world, rank = dist.get_world_size(), dist.get_rank()
    sp = args.sp or world
    if world % sp:
        raise SystemExit(f"--sp {sp} must divide the world size {world}")
    device = torch.device("cuda" if cuda else "cpu")
    mesh = init_device_mesh(device.type, (world // sp, sp), mesh_dim_names=("dp", "sp"))
    sp_group, dp_group = mesh.get_group("sp"), mesh.get_group("dp")

    torch.manual_seed(0)  # the same initial weights everywhere
    config = LlamaConfig(
        vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=args.seq,
        attn_implementation="sdpa",
    )  # fmt: skip
    dtype = torch.bfloat16 if cuda else torch.float32
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    handle = enable(model, group=sp_group, strategy=args.strategy, layout=args.layout)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    # one batch per replica, seen every step: the loss must fall
    data = torch.Generator().manual_seed(1000 + dist.get_rank(dp_group))
    ids = torch.randint(0, config.vocab_size, (1, args.seq), generator=data).to(device)
    part = shard_batch({"input_ids": ids, "labels": ids}, layout=args.layout, group=sp_group)
    for step in range(args.steps):
        start = time.perf_counter()
        loss = model(**part).loss
        loss.backward()
        for p in model.parameters():
            dist.all_reduce(p.grad, group=sp_group)  # the sequence's gradient
            dist.all_reduce(p.grad, group=dp_group)
            p.grad /= world // sp  # the mean over replicas
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        total = loss.detach().float()
        dist.all_reduce(total, group=sp_group)  # the sequence's loss
        if rank == 0:
            print(f"step {step}: loss {total.item():.4f} ({time.perf_counter() - start:.2f} s)")
    handle.disable()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
