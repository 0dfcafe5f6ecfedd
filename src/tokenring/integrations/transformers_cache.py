"""``ShardedKVCache``: transformers' ``generate`` over keys and values sharded across ranks.

Each attention layer keeps a ``tokenring.KVCache``: every rank holds about
``max_cache_len / P`` tokens of each sequence, and a step's attention is each rank's
partial over its own tokens merged in rank order (bitwise the same on every rank, so
ranks that sample agree). transformers runs ``past_key_values.update()`` before the
attention function and hands that function only keys and values, never the cache;
``update`` therefore stores nothing: it returns the new keys and values tagged with
their layer's cache (``CACHE_TAG``), and the attention function that ``enable``
registered, seeing the tag, calls ``cache.attend`` (which appends them). Lengths are
answered for the whole sequence, padding included (``get_seq_length``,
``get_mask_sizes``: what positions and masks are made from); a left-padded prompt's
padding is neither cached nor attended (``attend``'s ``new_lengths``). Beam search
(reordering the cache) is refused. Imported by ``transformers.py`` once it has found
transformers installed.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from transformers.cache_utils import Cache, CacheLayerMixin

from ..api.cache import KVCache

__all__ = ["CACHE_TAG", "ShardedKVCache", "attend_cached"]

CACHE_TAG = "tokenring_cache"
"""The attribute ``update`` sets on the keys it returns: their layer's ``ShardedLayer``."""

NOT_WITH_A_SHARDED_CACHE = (
    "is not supported with tokenring's ShardedKVCache (its layers keep keys and values "
    "sharded over the ranks): generate without beam search, one sequence per prompt"
)


class ShardedLayer(CacheLayerMixin):
    """One attention layer's keys and values, in a ``tokenring.KVCache`` made at the
    first ``update`` (which knows the batch, heads, dtype and device)."""

    is_sliding = False

    def __init__(self, max_cache_len: int, group: dist.ProcessGroup | None) -> None:
        super().__init__()
        self.max_cache_len = max_cache_len
        self.group = group
        self.cache: KVCache | None = None
        self.seen = 0  # tokens of the whole sequence so far, padding included

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads_kv, _, head_dim = key_states.shape
        self.cache = KVCache(
            batch=batch, capacity=self.max_cache_len, heads_kv=heads_kv, head_dim=head_dim,
            dtype=key_states.dtype, device=key_states.device, group=self.group,
        )  # fmt: skip
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """The new keys and values, tagged with this layer (``CACHE_TAG``): the attention
        function attends them to the cache and appends them."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        setattr(key_states, CACHE_TAG, self)
        self.seen += key_states.shape[-2]
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return self.max_cache_len

    def reset(self) -> None:
        if self.cache is not None:
            self.cache.reset()
        self.seen = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise ValueError(f"beam search (reorder_cache) {NOT_WITH_A_SHARDED_CACHE}")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise ValueError(
            f"expanding the batch (batch_repeat_interleave) {NOT_WITH_A_SHARDED_CACHE}"
        )

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise ValueError(f"selecting rows (batch_select_indices) {NOT_WITH_A_SHARDED_CACHE}")

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError(f"cropping (crop) {NOT_WITH_A_SHARDED_CACHE}")


class ShardedKVCache(Cache):
    """A transformers cache whose layers keep keys and values sharded over ``group``
    (default: the world): pass it to ``model.generate(..., past_key_values=...)`` on
    every rank with the same inputs, after ``tokenring.integrations.transformers.enable``.
    ``max_cache_len``: the most tokens a sequence may hold, prompt included."""

    def __init__(self, config: Any, max_cache_len: int,
                 group: dist.ProcessGroup | None = None) -> None:  # fmt: skip
        text = (
            config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        )
        types = getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers
        odd = sorted({t for t in types if t != "full_attention"})
        if odd:
            raise ValueError(
                f"ShardedKVCache holds full-attention layers; this model has {odd} layers "
                "(sliding windows are not supported by the sharded cache yet)"
            )
        if not isinstance(max_cache_len, int) or max_cache_len < 1:
            raise ValueError(f"max_cache_len must be a positive int, got {max_cache_len!r}")
        # (not stored on the cache: transformers 5.17 reads max_cache_len from its layers)
        super().__init__(layers=[ShardedLayer(max_cache_len, group) for _ in types])


def attend_cached(layer: ShardedLayer, query, key, value, attention_mask, scaling, kwargs: dict):
    """The attention function's work for keys tagged by a ``ShardedLayer``: ``query``,
    ``key``, ``value`` as transformers hands them (``[batch, heads, L, head_dim]``, the
    same on every rank); a padding ``attention_mask`` (2-D, from ``enable``'s mask
    function) may pad the new tokens on the left only (what ``generate`` does). Returns
    ``[batch, L, heads, head_dim]``, zeros where a row is padding."""
    for name in ("sliding_window", "s_aux"):
        if kwargs.get(name) is not None:
            raise ValueError(f"{name} {NOT_WITH_A_SHARDED_CACHE}")
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    length = q.shape[1]
    if attention_mask is None:
        return layer.cache.attend(q, k, v, causal=True, softmax_scale=scaling)
    new = attention_mask[:, -length:].bool()
    real = new.sum(dim=1)
    pads = length - real
    columns = torch.arange(length, device=new.device)
    if not bool((new == (columns[None, :] >= pads[:, None])).all()):
        raise ValueError(
            "padding on the right of new tokens: the sharded cache takes prompts padded on "
            "the left (tokenizer.padding_side = 'left', as generate expects)"
        )
    # real tokens first (what attend's new_lengths takes), then back where they were
    take = (columns[None, :] + pads[:, None]) % length
    index = take[:, :, None, None]
    q, k, v = (t.gather(1, index.expand(-1, -1, *t.shape[2:])) for t in (q, k, v))
    out = layer.cache.attend(q, k, v, causal=True, softmax_scale=scaling, new_lengths=real)
    back = ((columns[None, :] - pads[:, None]) % length)[:, :, None, None]
    return out.gather(1, back.expand(-1, -1, *out.shape[2:]))
