"""Case functions for tests/test_integrations.py: tiny random models, sharded on the
pool against the same model on one process (float64)."""

from __future__ import annotations

import torch
import torch.distributed as dist

import tokenring as tr
from reference import rel_err

FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
}


def tiny_causal_lm(family: str, seed: int = 0):
    """A 2-layer GQA model (4 query heads, 2 key/value heads) with random weights, float64."""
    import transformers

    config_cls, model_cls = (getattr(transformers, n) for n in FAMILIES[family])
    config = config_cls(
        vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(seed)
    return model_cls(config).double()


def llm_case(w, *, world: int, family: str, layout: str, strategy: str, seq: int = 32) -> dict:
    """Logits, loss and every parameter gradient of the sharded model (summed over the
    group as documented) against the same model on one process."""
    from tokenring.integrations.transformers import enable, shard_batch

    group = w.group(world)
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 101, (2, seq), generator=g)
    labels = ids.clone()
    labels[0, 5] = -100  # ignored tokens count out of the mean
    batch = {"input_ids": ids, "labels": labels}
    reference = tiny_causal_lm(family)
    ref = reference(**batch)
    ref.loss.backward()

    model = tiny_causal_lm(family)
    handle = enable(model, group=group, strategy=strategy, layout=layout)
    part = shard_batch(batch, layout=layout, group=group)
    out = model(**part)
    out.loss.backward()
    loss = out.loss.detach().clone()
    dist.all_reduce(loss, group=group)
    grad_err = 0.0
    for p, r in zip(model.parameters(), reference.parameters(), strict=True):
        grad = p.grad.clone()
        dist.all_reduce(grad, group=group)
        grad_err = max(grad_err, rel_err(grad, r.grad))
    handle.disable()
    restored = model.config._attn_implementation
    return {
        "logits": rel_err(out.logits, tr.shard(ref.logits.detach(), layout=layout, group=group)),
        "loss": abs(loss.item() - ref.loss.item()) / abs(ref.loss.item()),
        "grads": grad_err,
        "restored": restored == "sdpa",
    }
