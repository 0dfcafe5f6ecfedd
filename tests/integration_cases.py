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
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM"),
}
GPT_OSS = dict(
    head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=5,
    experts_implementation="eager",  # the grouped matmul takes no float64
    attn_implementation="eager",  # gpt-oss has no sdpa path (its sinks)
)  # fmt: skip
"""A tiny gpt-oss: sinks, sliding and full layers alternating, a mixture of experts."""
WINDOWED = {
    "mistral": {"sliding_window": 5},
    # Qwen2's layers from max_window_layers on slide: layer 0 full, layer 1 a window of 5
    "qwen2": {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 1},
    "gpt_oss": GPT_OSS,
}
"""Models with sliding-window layers, as ``windowed_llm_case`` builds them."""


def tiny_causal_lm(family: str, seed: int = 0, **config_overrides):
    """A 2-layer GQA model (4 query heads, 2 key/value heads) with random weights, float64."""
    import transformers

    config_cls, model_cls = (getattr(transformers, n) for n in FAMILIES[family])
    settings = dict(
        vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        attn_implementation="sdpa",
    )  # fmt: skip
    config = config_cls(**{**settings, **config_overrides})
    torch.manual_seed(seed)
    return model_cls(config).double()


def llm_case(w, *, world: int, family: str, layout: str, strategy: str, seq: int = 32) -> dict:
    """Logits, loss and every parameter gradient of the sharded model (summed over the
    group as documented) against the same model on one process."""
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
    logits, loss, grads, _ = _sharded_training_step(model, batch, group, strategy, layout)
    restored = model.config._attn_implementation
    return {
        "logits": rel_err(logits, tr.shard(ref.logits.detach(), layout=layout, group=group)),
        "loss": abs(loss.item() - ref.loss.item()) / abs(ref.loss.item()),
        "grads": max(rel_err(a, p.grad) for a, p in zip(grads, reference.parameters())),
        "restored": restored == "sdpa",
    }


def _sharded_training_step(model, batch, group, strategy, layout):
    """``enable`` + ``shard_batch`` + forward + backward; the loss and every gradient
    summed over the group, and this rank's logits."""
    from tokenring.integrations.transformers import enable, shard_batch

    handle = enable(model, group=group, strategy=strategy, layout=layout)
    part = shard_batch(batch, layout=layout, group=group)
    out = model(**part)
    out.loss.backward()
    loss = out.loss.detach().clone()
    dist.all_reduce(loss, group=group)
    grads = []
    for p in model.parameters():
        grad = p.grad.clone()
        dist.all_reduce(grad, group=group)
        grads.append(grad)
    handle.disable()
    return out.logits, loss, grads, part


def packed_llm_case(w, *, world: int, layout: str, strategy: str) -> dict:
    """Llama on a ``DataCollatorWithFlattening`` batch (documents of 5, 1, 13 and 10
    tokens): logits against each document run alone on one process; loss and every
    gradient (summed over the group) against the unsharded model on the packed batch."""
    from transformers import DataCollatorWithFlattening

    group = w.group(world)
    g = torch.Generator().manual_seed(3)
    docs = [torch.randint(0, 101, (n,), generator=g).tolist() for n in (5, 1, 13, 10)]
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=True)(
        [{"input_ids": d} for d in docs]
    )
    reference = tiny_causal_lm("llama")
    # without a cache, transformers reads the restarting positions as packed documents
    packed = {k: batch[k] for k in ("input_ids", "labels", "position_ids")}
    ref = reference(**packed, use_cache=False)
    ref.loss.backward()
    alone = torch.cat([reference(input_ids=torch.tensor([d])).logits for d in docs], dim=1)

    model = tiny_causal_lm("llama")
    logits, loss, grads, part = _sharded_training_step(model, batch, group, strategy, layout)
    cu = [0, 5, 6, 19, 29]
    mine = tr.shard(alone.detach(), layout=layout, group=group, cu_seqlens=cu)
    return {
        "reference_packed": rel_err(ref.logits, alone),
        "logits_vs_alone": rel_err(logits, mine),
        "loss": abs(loss.item() - ref.loss.item()) / abs(ref.loss.item()),
        "grads": max(rel_err(a, p.grad) for a, p in zip(grads, reference.parameters())),
        "documents_found": float(tuple(part.get("tokenring_cu_seqlens", ())) == tuple(cu)),
    }


def windowed_llm_case(
    w, *, world: int, layout: str, strategy: str, seq: int = 29, family: str = "mistral"
) -> dict:
    """Mistral with a sliding window of 5 over a sequence of ``seq`` (Qwen2: a full layer
    and a sliding one; gpt-oss: sinks, a window of 5 and full layers alternating):
    logits, loss and every gradient (summed over the group; the sinks' included)
    against the same model on one process; ``layer_kinds``: how many kinds of layer the
    model has (full, sliding)."""
    group = w.group(world)
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(0, 101, (2, seq), generator=g)
    batch = {"input_ids": ids, "labels": ids.clone()}
    config = WINDOWED[family]
    reference = tiny_causal_lm(family, **config)
    kinds = set(getattr(reference.config, "layer_types", None) or ["sliding_attention"])
    ref = reference(**batch)
    ref.loss.backward()
    model = tiny_causal_lm(family, **config)
    logits, loss, grads, _ = _sharded_training_step(model, batch, group, strategy, layout)
    return {
        "logits": rel_err(logits, tr.shard(ref.logits.detach(), layout=layout, group=group)),
        "loss": abs(loss.item() - ref.loss.item()) / abs(ref.loss.item()),
        "grads": max(rel_err(a, p.grad) for a, p in zip(grads, reference.parameters())),
        "layer_kinds": len(kinds),
    }


def unsharded_call_case(w, *, world: int) -> dict:
    """After ``enable`` on several ranks, a call on whole sequences (not ``shard_batch``
    parts) and ``generate``: the error each raises on this rank ("" if none), and whether
    ``generate`` after ``disable()`` gives the tokens it gave before ``enable``."""
    from tokenring.integrations.transformers import enable

    group = w.group(world)
    model = tiny_causal_lm("llama")
    ids = torch.randint(0, 101, (1, 12), generator=torch.Generator().manual_seed(5))
    settings = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    before = model.generate(ids, **settings)
    handle = enable(model, group=group)
    found = {}
    for name, call in (("forward", lambda: model(input_ids=ids)),
                       ("generate", lambda: model.generate(ids, **settings))):  # fmt: skip
        try:
            call()
            found[name] = ""
        except ValueError as err:
            found[name] = str(err)
    handle.disable()
    after = model.generate(ids, **settings)
    return {**found, "same_after_disable": bool(torch.equal(after, before))}


def generate_case(w, *, world: int, family: str, padded: bool) -> dict:
    """``generate`` with a ``ShardedKVCache`` after ``enable`` against the same model's
    ``generate`` on one process: greedy tokens and scores, then sampling with a fixed
    seed; a batch of two prompts, the first padded on the left when ``padded``."""
    from tokenring.integrations.transformers import ShardedKVCache, enable

    group = w.group(world)
    model = tiny_causal_lm(family)
    ids = torch.randint(1, 101, (2, 13), generator=torch.Generator().manual_seed(11))
    mask = torch.ones_like(ids)
    if padded:
        ids[0, :4], mask[0, :4] = 0, 0
    greedy = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                  output_scores=True, return_dict_in_generate=True)  # fmt: skip
    sampled = dict(attention_mask=mask, max_new_tokens=6, do_sample=True, top_k=0,
                   pad_token_id=0)  # fmt: skip

    def runs(cache_of):
        first = model.generate(ids, past_key_values=cache_of(), **greedy)
        torch.manual_seed(3)
        second = model.generate(ids, past_key_values=cache_of(), **sampled)
        return first, second

    ref_greedy, ref_sampled = runs(lambda: None)
    handle = enable(model, group=group)
    got_greedy, got_sampled = runs(
        lambda: ShardedKVCache(config=model.config, max_cache_len=24, group=group)
    )
    refused = ""
    try:
        model.generate(ids, past_key_values=ShardedKVCache(config=model.config, max_cache_len=24,
                       group=group), num_beams=2, max_new_tokens=2, pad_token_id=0)  # fmt: skip
    except ValueError as err:
        refused = str(err)
    handle.disable()
    scores = max(rel_err(a, b) for a, b in zip(got_greedy.scores, ref_greedy.scores))
    return {
        "greedy": bool(torch.equal(got_greedy.sequences, ref_greedy.sequences)),
        "scores": scores,
        "sampled": bool(torch.equal(got_sampled, ref_sampled)),
        "tokens": got_sampled,
        "beams": refused,
    }
