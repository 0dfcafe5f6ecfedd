"""tokenring inside Hugging Face transformers models: sequence-parallel attention for
training decoder LLMs, through transformers' own registries, and undoable.

    handle = enable(model)                  # every rank, same model and options
    part = shard_batch(batch)               # this rank's tokens, global positions, labels
    loss = model(**part).loss               # this rank's share of the loss
    loss.backward()                         # then sum gradients over the group
    handle.disable()                        # the model's previous attention again

    model.generate(ids, past_key_values=ShardedKVCache(config=model.config,
                   max_cache_len=N))            # generate, the KV cache sharded (every rank)

``enable`` registers an attention function and a mask function under a name of
its own (``AttentionInterface.register``, ``AttentionMaskInterface.register``)
and switches the model to it (``set_attn_implementation``): nothing of
transformers is patched. Masks are applied by the attention itself, over global
positions: causal; a layer's sliding window (transformers' ``sliding_window=W``,
which reaches the attention function as a keyword, is ``window_size=(W - 1, 0)``);
and packed documents, which ``shard_batch`` finds in the global ``position_ids`` by
transformers' own rule (a new document wherever consecutive positions do not
differ by one) and hands down as ``cu_seqlens``. The mask function builds nothing
and refuses padding, so no mask is silently lost.

Loss and gradients: ``shard_batch`` shifts the labels for next-token prediction
*before* sharding (``shift_labels``, which transformers' causal-LM loss takes as
they are) and passes ``num_items_in_batch``, the number of labelled tokens of
the whole batch, so each rank's ``loss`` is its tokens' summed loss divided by
the global count: summed over the group (``all_reduce``) it is the unsharded
model's token-weighted mean, and the gradients each rank's backward gives,
summed over the group, are the unsharded model's gradients (every rank holds
the whole model; sum with ``all_reduce``, or average over data-parallel ranks
as usual on top).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from ..api.attention import run
from ..api.sharding import shard
from ..call.description import Options

if TYPE_CHECKING:  # at run time: __getattr__ below, which needs transformers
    from .transformers_cache import ShardedKVCache

__all__ = ["SUPPORTED_FAMILIES", "ShardedKVCache", "TransformersHandle", "enable", "shard_batch"]

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gpt_oss")
"""``config.model_type`` of the decoder families tested (tests/test_integrations.py)."""

_NAMES = itertools.count()

SEQ_LEN_KEY = "tokenring_seq_len"
"""The keyword ``shard_batch`` adds to a batch: the sequence's global length, which the
model hands down to the attention function with its other keyword arguments."""

DOCUMENTS_KEY = "tokenring_cu_seqlens"
"""The keyword ``shard_batch`` adds to a packed batch: the documents' global offsets."""

COLLATOR_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")
"""What ``DataCollatorWithFlattening`` may add for flash-attention: offsets of the
*unsharded* batch, which must never reach a rank as if they were its own; ``shard_batch``
drops them and derives the documents from ``position_ids``."""


UNSHARDED_CALL = (
    "this model's attention is sequence-parallel (tokenring.integrations.transformers."
    "enable) but the call did not come from shard_batch: every rank would take its whole "
    "sequence for a shard of a longer one. Feed the model shard_batch(batch) parts; for "
    "evaluation on whole sequences call handle.disable() first; for generate pass "
    "past_key_values=ShardedKVCache(config=model.config, max_cache_len=N) "
    "(tokenring.integrations.transformers)"
)
"""What a call of an enabled model on more than one rank raises when its inputs did not
come from ``shard_batch`` (``generate``, evaluation on whole sequences): it would
otherwise be wrong without an error."""


def _group_size(group: dist.ProcessGroup | None, mesh: object) -> int:
    """How many ranks the model's attention is spread over (1 without a process group)."""
    if mesh is not None:
        return mesh.size()
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _transformers():
    try:
        import transformers
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError(
            "tokenring.integrations.transformers needs transformers: "
            "pip install 'tokenring-attention[transformers]'"
        ) from None
    return transformers, AttentionInterface, AttentionMaskInterface


@dataclass
class TransformersHandle:
    """What ``enable`` did to one model; ``disable()`` undoes it."""

    model: Any
    name: str
    previous: str
    options: Options
    active: bool = True

    def disable(self) -> None:
        """Give the model back the attention implementation it had before ``enable``."""
        if self.active:
            self.model.set_attn_implementation(self.previous)
            self.active = False


def _check_model(model) -> None:
    config = getattr(model, "config", None)
    family = getattr(config, "model_type", None)
    if family not in SUPPORTED_FAMILIES:
        raise ValueError(
            f"tokenring.integrations.transformers supports model families "
            f"{', '.join(SUPPORTED_FAMILIES)}; this model is {family!r}"
        )
    if getattr(config, "output_router_logits", False):
        raise ValueError(
            "output_router_logits=True: the router's auxiliary loss would be computed over "
            "this rank's tokens only, not the batch's; set config.output_router_logits = False"
        )
    if getattr(config, "attention_dropout", 0.0):
        raise ValueError(
            f"attention_dropout={config.attention_dropout}: tokenring computes attention "
            "without dropout; set config.attention_dropout = 0.0"
        )


def enable(
    model,
    *,
    group: dist.ProcessGroup | None = None,
    mesh: object = None,
    strategy: str = "auto",
    layout: str = "zigzag",
    ring_impl: str = "tokenring",
) -> TransformersHandle:
    """Make ``model``'s attention sequence-parallel over ``group`` (default: the world)
    or, with ``strategy="usp"``, over ``mesh``; returns a handle whose ``disable()``
    restores the previous implementation. Feed it ``shard_batch`` parts with the same
    ``layout`` and ``group``/``mesh``."""
    _, interface, mask_interface = _transformers()
    from .transformers_cache import CACHE_TAG, attend_cached  # subclasses transformers' Cache

    _check_model(model)
    usp = strategy == "usp" or (strategy == "auto" and mesh is not None)
    where = {"mesh": mesh, "group": None} if usp else {"mesh": None, "group": group}
    chosen = Options.checked(strategy=strategy, layout=layout, ring_impl=ring_impl)

    ranks = _group_size(group, mesh if usp else None)

    def sequence_parallel_attention(
        module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs
    ):
        if dropout:
            raise ValueError(f"attention dropout {dropout}: tokenring computes no dropout")
        layer = getattr(key, CACHE_TAG, None)
        if layer is not None:  # generate over a ShardedKVCache: replicated new tokens
            return attend_cached(layer, query, key, value, attention_mask, scaling, kwargs), None
        if attention_mask is not None:
            raise ValueError("padding: tokenring's layouts cannot skip padded tokens")
        if ranks > 1 and SEQ_LEN_KEY not in kwargs:
            raise ValueError(UNSHARDED_CALL)
        window = kwargs.get("sliding_window")
        # transformers hands [batch, heads, seq, head_dim]; tokenring takes [batch, seq, ...]
        options = replace(
            chosen, causal=bool(getattr(module, "is_causal", True)), softmax_scale=scaling,
            seq_len=kwargs.get(SEQ_LEN_KEY),
            window_size=(window - 1, 0) if window is not None else (-1, -1),
            cu_seqlens=kwargs.get(DOCUMENTS_KEY, ()),
        )  # fmt: skip
        out = run(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
            (None, None, None), options.values(), recorder=None, return_lse=False,
            sinks=kwargs.get("s_aux"), **where,
        )  # fmt: skip
        return out, None

    def no_mask(
        batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
        attention_mask=None, **kwargs,
    ):  # fmt: skip
        # the supported families ask for the causal mask or the sliding-window causal
        # mask only, and the attention applies both (the window from its keyword);
        # padding goes on as the 2-D mask, which the attention takes (a ShardedKVCache's
        # left-padded prompts) or refuses
        if attention_mask is not None and not bool(attention_mask.all()):
            return attention_mask
        return None

    name = f"tokenring_{next(_NAMES)}"
    interface.register(name, sequence_parallel_attention)
    mask_interface.register(name, no_mask)
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    return TransformersHandle(model, name, previous, chosen)


def shard_batch(
    batch: dict[str, torch.Tensor],
    *,
    layout: str = "zigzag",
    group: dist.ProcessGroup | None = None,
    mesh: object = None,
    ignore_index: int = -100,
) -> dict[str, Any]:
    """This rank's part of a causal-LM batch (the same full batch on every rank), ready
    for ``model(**part)``: ``input_ids`` (or ``inputs_embeds``), global ``position_ids``,
    labels shifted before sharding (``labels`` and ``shift_labels``) and
    ``num_items_in_batch`` (see the module docstring for the loss). A padding
    ``attention_mask`` must be all ones. A packed batch (``position_ids`` that restart,
    as ``DataCollatorWithFlattening`` makes them; every row packed alike) is sharded
    per document exactly as ``tokenring.shard(x, layout=..., dim=1, cu_seqlens=cu)``
    does, ``cu`` found from the positions (transformers' rule), and no document
    attends another; the collator's own ``cu_seq_lens_*``/``max_length_*`` describe
    the unsharded batch and are dropped."""
    batch = {k: v for k, v in batch.items() if k not in COLLATOR_KEYS}
    known = {"input_ids", "inputs_embeds", "labels", "position_ids", "attention_mask"}
    unknown = set(batch) - known
    if unknown:
        raise ValueError(f"shard_batch takes {sorted(known)}; got also {sorted(unknown)}")
    tokens = batch.get("input_ids", batch.get("inputs_embeds"))
    if tokens is None:
        raise ValueError("shard_batch needs input_ids or inputs_embeds")
    rows, seq = tokens.shape[0], tokens.shape[1]
    mask = batch.get("attention_mask")
    if mask is not None and not bool(mask.all()):
        raise ValueError(
            "padding (attention_mask with zeros): tokenring's layouts shard whole sequences; "
            "pack or trim the batch to equal lengths without padding"
        )
    given = batch.get("position_ids")
    positions = torch.arange(seq, device=tokens.device).expand(rows, seq)
    documents: tuple[int, ...] = ()
    if given is not None:
        positions = given.expand(rows, seq)
        documents = _documents(positions)
    where = {"mesh": mesh} if mesh is not None else {"group": group}

    def mine(x: torch.Tensor) -> torch.Tensor:
        return shard(x, layout=layout, dim=1, cu_seqlens=documents or None, **where)

    positions = mine(positions.contiguous())
    part: dict[str, Any] = {
        "position_ids": positions,
        # all ones: keeps transformers from reading the jumps of a zigzag shard's
        # positions as packed sequences
        "attention_mask": torch.ones(positions.shape, dtype=torch.long, device=tokens.device),
        # reaches the attention function (transformers passes its keyword arguments down):
        # the global length, for shards of unequal length
        SEQ_LEN_KEY: seq,
    }
    if len(documents) > 2:
        part[DOCUMENTS_KEY] = documents
    part["input_ids" if "input_ids" in batch else "inputs_embeds"] = mine(tokens)
    labels = batch.get("labels")
    if labels is not None:
        shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=ignore_index)
        local = mine(shifted.contiguous())
        part["labels"] = part["shift_labels"] = local
        part["num_items_in_batch"] = int((shifted != ignore_index).sum())
    return part


def _documents(positions: torch.Tensor) -> tuple[int, ...]:
    """Document offsets ``[0, ..., seq]`` from global ``position_ids`` ``[rows, seq]`` by
    transformers' rule (``masking_utils.find_packed_sequence_indices``: a document starts
    wherever a position is not the previous one plus one); every row must agree."""
    starts = positions[:, 1:] != positions[:, :-1] + 1
    if not bool((starts == starts[:1]).all()):
        raise ValueError(
            "position_ids: the rows of the batch are packed differently; tokenring shards "
            "every row alike (one packing per batch: DataCollatorWithFlattening makes one row)"
        )
    seq = positions.shape[1]
    cuts = (torch.nonzero(starts[0]).flatten() + 1).tolist()
    return (0, *cuts, seq)


def __getattr__(name: str):
    """``ShardedKVCache`` (``transformers_cache.py``), imported when asked for: it
    subclasses transformers' ``Cache``, and importing this module needs no transformers."""
    if name == "ShardedKVCache":
        _transformers()
        from .transformers_cache import ShardedKVCache

        return ShardedKVCache
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
