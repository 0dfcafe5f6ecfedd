"""Generate with a small random Llama whose KV cache is sharded over the ranks.

Every process holds the whole model and the same prompt; each attention layer's keys
and values are kept by all ranks together (``ShardedKVCache``: a rank holds 1/P of
them), so the prompt may be longer than one rank could cache. The tokens are checked
against the same model's ``generate`` with its own cache on one process. CPU (gloo)
or one GPU per process (NCCL):

    torchrun --nproc-per-node 2 examples/generate_llama.py --prompt 384 --new 16
    torchrun --nproc-per-node 8 examples/generate_llama.py --prompt 131072 --new 64

Needs ``pip install 'tokenring-attention[transformers]'``.
"""

from __future__ import annotations

import argparse
import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import transformers
from packaging.version import Version
from transformers import LlamaConfig, LlamaForCausalLM

from tokenring.integrations.transformers import ShardedKVCache, enable


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=384, help="prompt tokens")
    parser.add_argument("--new", type=int, default=16, help="tokens to generate")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="model dtype (bfloat16: rounding may change greedy picks, so the "
                        "one-process check is skipped)")  # fmt: skip
    parser.add_argument("--no-check", action="store_true", help="skip the one-process check")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=300))
    world, rank = dist.get_world_size(), dist.get_rank()
    device = torch.device("cuda" if cuda else "cpu")

    torch.manual_seed(0)  # the same weights and prompt everywhere
    config = LlamaConfig(
        vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2,
        max_position_embeddings=args.prompt + args.new, attn_implementation="sdpa",
    )  # fmt: skip
    dtype = getattr(torch, args.dtype)
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
    ids = torch.randint(1, config.vocab_size, (1, args.prompt), device=device)
    settings = dict(max_new_tokens=args.new, do_sample=False, pad_token_id=0)

    handle = enable(model)
    total = args.prompt + args.new
    cache = ShardedKVCache(config=model.config, max_cache_len=total)
    # transformers 5.25 renamed generate's past_key_values= to cache= (both work)
    name = "cache" if Version(transformers.__version__) >= Version("5.25") else "past_key_values"
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, **{name: cache}, **settings)
    seconds = time.perf_counter() - start
    share = cache.layers[0].cache.local_capacity
    handle.disable()
    if rank == 0:
        print(
            f"{world} ranks, prompt {args.prompt} tokens, {args.new} generated in {seconds:.2f} s;"
            f" each rank caches {share} tokens of a sequence (of {total})"
        )
        print("tokens:", out[0, args.prompt :].tolist())
    if not args.no_check and dtype == torch.float32:
        with torch.no_grad():
            alone = model.generate(ids, **settings)  # one process's own cache
        same = torch.equal(out, alone)
        if rank == 0:
            print(f"same tokens as generate on one process: {same}")
        if not same:
            raise SystemExit(1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
