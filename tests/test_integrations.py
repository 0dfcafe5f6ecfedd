"""Integrations: a transformers model and a diffusers MM-DiT made sequence-parallel
equal the same model on one process (outputs, loss, every parameter gradient; float64),
and what they cannot do is refused with a clear error."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffusers_cases import (
    dit_case,
    tiny_cogvideox,
    tiny_flux,
    tiny_hunyuan,
    tiny_ltx,
    tiny_qwen,
    tiny_wan,
)
from integration_cases import (
    GPT_OSS,
    generate_case,
    llm_case,
    packed_llm_case,
    tiny_causal_lm,
    unsharded_call_case,
    windowed_llm_case,
)
from tokenring.integrations.transformers import enable, shard_batch


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_a_sequence_parallel_transformers_model_equals_the_model_on_one_process(pool, family):
    """GQA (4/2 heads), 2 and 4 processes, both layouts, TokenRing, ring, all-gather and
    auto; the loss summed over the group and the gradients summed over the group are the
    unsharded model's (an ignored label included), and disable() restores sdpa."""
    cases = [
        dict(world=w, family=family, layout=layout, strategy=s)
        for w in (2, 4)
        for layout in ("zigzag", "contiguous")
        for s in ("tokenring", "ring", "allgather") + (("auto",) if w == 4 else ())
    ]
    # sequences that divide by nothing: shards of unequal length (shard_batch says how long)
    cases += [
        dict(world=3, family=family, layout="zigzag", strategy="tokenring", seq=29),
        dict(world=4, family=family, layout="contiguous", strategy="ring", seq=30),
    ]
    for case, per_rank in zip(cases, pool.run(llm_case, cases, timeout=600)):
        for r in per_rank:
            assert r["logits"] <= 1e-12 and r["grads"] <= 1e-12, (case, r)
            assert r["loss"] <= 1e-6, (case, r)  # transformers' loss is float32
            assert r["restored"], (case, r)


def test_packed_batches_and_sliding_windows_train_like_the_model_on_one_process(pool):
    """Llama on a DataCollatorWithFlattening batch: each document's logits equal the
    document run alone; loss and gradients summed over the group equal the unsharded
    model's on the packed batch. Mistral with a window of 5 tokens over 29, Qwen2 with a
    full and a sliding layer, and gpt-oss (sinks; sliding and full layers alternating):
    logits, loss and every gradient (the sinks' too) equal the unsharded model's. 2, 3
    and 4 processes, both layouts."""
    packed = [
        dict(world=w, layout=layout, strategy=s)
        for w, layout, s in [(2, "zigzag", "tokenring"), (3, "contiguous", "ring"),
                             (2, "contiguous", "allgather"), (2, "zigzag", "ulysses")]
    ]  # fmt: skip
    for case, per_rank in zip(packed, pool.run(packed_llm_case, packed, timeout=600)):
        for r in per_rank:
            assert r["reference_packed"] <= 1e-12, r  # the one-process reference itself
            assert r["logits_vs_alone"] <= 1e-12 and r["grads"] <= 1e-12, (case, r)
            assert r["loss"] <= 1e-6 and r["documents_found"] == 1.0, (case, r)
    windowed = [
        dict(world=w, layout=layout, strategy=s)
        for w, layout, s in [(2, "contiguous", "tokenring"), (3, "zigzag", "ring"),
                             (2, "zigzag", "allgather")]
    ]  # fmt: skip
    # Qwen2: a full layer, then a sliding one
    windowed += [dict(world=2, layout="zigzag", strategy="tokenring", family="qwen2")]
    # gpt-oss: sinks, sliding (5) and full layers alternating, experts
    windowed += [
        dict(world=w, layout=layout, strategy=s, family="gpt_oss")
        for w, layout, s in [(2, "zigzag", "tokenring"), (4, "contiguous", "ring")]
    ]  # fmt: skip
    for case, per_rank in zip(windowed, pool.run(windowed_llm_case, windowed, timeout=600)):
        for r in per_rank:
            assert r["logits"] <= 1e-12 and r["grads"] <= 1e-12, (case, r)
            assert r["loss"] <= 1e-6, (case, r)
            if case.get("family") in ("qwen2", "gpt_oss"):
                assert r["layer_kinds"] == 2, (case, r)  # full and sliding layers


def test_calls_that_did_not_come_from_shard_batch_raise_on_every_rank(pool):
    """``enable`` on 2 ranks, then the model on whole sequences and ``generate``: the same
    ``ValueError`` on every rank (each rank would otherwise take its whole sequence for a
    shard of a longer one, wrong without an error); ``disable()`` gives ``generate``
    back, token for token."""
    from tokenring.integrations.transformers import UNSHARDED_CALL

    for r in pool.run(unsharded_call_case, [dict(world=2)], timeout=300)[0]:
        assert r["forward"] == UNSHARDED_CALL and r["generate"] == UNSHARDED_CALL, r
        assert r["same_after_disable"], r


def test_enable_and_shard_batch_refuse_what_they_cannot_do():
    import transformers

    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2))
    with pytest.raises(ValueError, match="supports model families llama, mistral, qwen2, qwen3"):
        enable(gpt2)
    routed = tiny_causal_lm("gpt_oss", **GPT_OSS, output_router_logits=True)
    with pytest.raises(ValueError, match="output_router_logits=True"):
        enable(routed)
    ids = torch.randint(0, 101, (2, 16))
    with pytest.raises(ValueError, match="padding"):
        shard_batch(
            {
                "input_ids": ids,
                "attention_mask": torch.ones(2, 16).index_fill(1, torch.tensor([15]), 0),
            }
        )
    packed = torch.stack([torch.cat([torch.arange(8), torch.arange(8)]), torch.arange(16)])
    with pytest.raises(ValueError, match="the rows of the batch are packed differently"):
        shard_batch({"input_ids": ids, "position_ids": packed})
    with pytest.raises(ValueError, match="shard_batch takes"):
        shard_batch({"input_ids": ids, "pixel_values": ids})


def test_enable_is_undone_by_disable_and_leaves_one_process_results_unchanged():
    model = tiny_causal_lm("llama")
    ids = torch.randint(0, 101, (2, 16), generator=torch.Generator().manual_seed(3))
    before = model(input_ids=ids, labels=ids).loss
    handle = enable(model)
    assert model.config._attn_implementation == handle.name != "sdpa"
    part = shard_batch({"input_ids": ids, "labels": ids})
    assert torch.equal(part["input_ids"], ids)  # one process: its part is the batch
    during = model(**part).loss
    handle.disable()
    handle.disable()  # twice is harmless
    assert model.config._attn_implementation == "sdpa"
    assert torch.allclose(before, during, rtol=1e-12)


@pytest.mark.timeout(300)
def test_the_training_example_runs_under_torchrun_and_the_loss_falls():
    """examples/train_llama.py on 4 CPU processes: sequence parallel 2 x data parallel 2."""
    example = Path(__file__).resolve().parent.parent / "examples" / "train_llama.py"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "4", str(example), "--sp", "2", "--seq", "256",
               "--steps", "4"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"loss ([0-9.]+)", done.stdout)]
    assert len(losses) == 4 and losses[-1] < losses[0], done.stdout


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_a_sequence_parallel_mm_dit_equals_the_model_on_one_process(pool, kind):
    """Full inputs and the full output on every rank, image tokens sharded and text
    tokens joint: TokenRing over 2 and 4 processes, ring, Ulysses, all-gather and USP
    2 x 2; the output to float64 rounding, and every parameter's gradient summed over
    the group equal to the model's; after disable() the model is itself again. Flux's
    text-stream gradients agree to 1e-7 only: its RMSNorms of the text queries and keys
    compute their variance in float32, and each rank backpropagates its own share of
    those replicated tokens' gradient through that float32 step, so the shares' rounding
    differs from the whole's (SD3, with no such norm here, agrees to 1e-14)."""
    cases = [
        dict(world=w, kind=kind, strategy=s)
        for w, s in ((2, "tokenring"), (4, "tokenring"), (2, "ring"), (4, "ulysses"),
                     (4, "allgather"), (4, "usp"))
    ]  # fmt: skip
    # 15 image tokens: shards of unequal length
    cases += [dict(world=4, kind=kind, strategy=s, odd=True) for s in ("tokenring", "usp")]
    grads_tol = 1e-6 if kind == "flux" else 1e-12
    for case, per_rank in zip(cases, pool.run(dit_case, cases, timeout=600)):
        for r in per_rank:
            assert r["out"] <= 1e-12 and r["undone"] == 0.0, (case, r)
            assert r["grads"] <= grads_tol, (case, r)


def test_the_diffusers_integration_refuses_what_it_cannot_do():
    from tokenring.integrations.diffusers import enable as enable_dit

    with pytest.raises(ValueError, match="supports FluxTransformer2DModel, SD3Transformer2DModel, "
                       "WanTransformer3DModel, LTXVideoTransformer3DModel, "
                       "CogVideoXTransformer3DModel, QwenImageTransformer2DModel, "
                       "HunyuanVideoTransformer3DModel"):  # fmt: skip
        enable_dit(torch.nn.Linear(2, 2), strategy="ring")
    model = tiny_flux()
    with pytest.raises(ValueError, match="strategy='usp' needs mesh="):
        enable_dit(model)
    previous = dict(model.attn_processors)
    handle = enable_dit(model, strategy="ring")
    assert all(type(p).__name__ == "JointAttention" for p in model.attn_processors.values())
    with pytest.raises(
        ValueError, match="mesh= is for strategy='usp'; strategy 'ring' takes group="
    ):
        enable_dit(model, strategy="ring", mesh=object())
    handle.disable()
    assert {k: type(v) for k, v in model.attn_processors.items()} == {
        k: type(v) for k, v in previous.items()
    }


@pytest.mark.timeout(300)
def test_the_flux_example_runs_under_torchrun_and_matches_the_unsharded_model():
    """examples/flux_sp.py on 4 CPU processes: a denoising loop with USP 2 x 2 inside
    the transformer, against the same loop unsharded."""
    example = Path(__file__).resolve().parent.parent / "examples" / "flux_sp.py"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "4", str(example), "--ulysses", "2", "--ring", "2",
               "--size", "8"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr[-3000:]
    (err,) = re.findall(r"relative difference ([0-9.e+-]+);", done.stdout)
    assert float(err) <= 1e-5, done.stdout


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_generate_over_a_sharded_kv_cache_equals_generate_on_one_process(pool, family):
    """``generate`` with ``ShardedKVCache`` after ``enable`` on 2 and 3 processes: greedy
    tokens and scores (float64) and sampled tokens (a fixed seed) equal one process's
    ``generate``, with and without a left-padded prompt; beam search is refused; every
    rank holds the same tokens."""
    cases = [dict(world=w, family=family, padded=p) for w in (2, 3) for p in (False, True)]
    for case, per_rank in zip(cases, pool.run(generate_case, cases, timeout=300)):
        for r in per_rank:
            assert r["greedy"] and r["sampled"] and r["scores"] < 1e-10, (case, r)
            assert "beam search" in r["beams"], (case, r)
        assert all(torch.equal(r["tokens"], per_rank[0]["tokens"]) for r in per_rank), case


@pytest.mark.timeout(200)
def test_the_generate_example_runs_under_torchrun():
    """examples/generate_llama.py on 2 CPU processes: a prompt of 384 tokens, each rank
    caching 200 of the 400; the tokens equal generate on one process."""
    example = Path(__file__).resolve().parent.parent / "examples" / "generate_llama.py"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", str(example), "--prompt", "384", "--new", "16"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "each rank caches 200 tokens of a sequence (of 400)" in done.stdout, done.stdout
    assert "same tokens as generate on one process: True" in done.stdout, done.stdout


def _dit_cases(kind: str, allgather: bool = True) -> list[dict]:
    """The sampled DiT matrix: TokenRing on 2 and 3 processes, ring and Ulysses on 4,
    all-gather on 3, USP 2 x 2, token counts that divide and that do not."""
    combos = [(2, "tokenring", False), (3, "tokenring", True), (4, "ring", True),
              (4, "ulysses", False), (4, "usp", True)]  # fmt: skip
    if allgather:
        combos.append((3, "allgather", True))
    return [dict(world=w, kind=kind, strategy=s, odd=odd) for w, s, odd in combos]


def _check_dits(cases: list[dict], results) -> None:
    """Output to float64 rounding, the model given back, every gradient summed over the
    group the model's (to 1e-6: the models' norms that compute in float32)."""
    for case, per_rank in zip(cases, results):
        for r in per_rank:
            assert r["out"] <= 1e-12 and r["undone"] == 0.0, (case, r)
            assert r["grads"] <= 1e-6, (case, r)


def test_a_sequence_parallel_wan_equals_the_model_on_one_process(pool):
    """Wan (video DiT) from its own context-parallel plan: video tokens sharded, text
    whole, self-attention through tokenring and cross-attention left to the model's own
    processor; 2, 3 and 4 processes, TokenRing, ring, Ulysses, all-gather and USP 2 x 2,
    token counts of 32 and 45 (dividing by nothing), a timestep per token (Wan 2.2);
    the output to float64 rounding, every gradient summed over the group the model's,
    and disable() gives the model back. Gradients agree to 1e-6, not 1e-14: Wan's
    cross-attention norms (FP32LayerNorm) compute in float32 inside a float64 model, so
    their weight and bias gradients (and the time projection's, after float32
    timestep embeddings) are float32 sums, taken per rank here and whole there."""
    cases = _dit_cases("wan", allgather=True)
    cases.append(dict(world=2, kind="wan", strategy="tokenring", odd=True, per_token=True))
    _check_dits(cases, pool.run(dit_case, cases, timeout=600))


@pytest.mark.timeout(300)
def test_the_wan_example_runs_under_torchrun_and_matches_the_unsharded_model():
    """examples/wan_sp.py on 2 CPU processes: a text-to-video denoising loop over 75
    video tokens (odd), the transformer sequence parallel inside, against the same loop
    unsharded."""
    example = Path(__file__).resolve().parent.parent / "examples" / "wan_sp.py"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", str(example), "--frames", "3", "--size", "10"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr[-3000:]
    found = re.search(r"75 video \+ 16 text tokens .* relative difference ([0-9.e+-]+)",
                      done.stdout)  # fmt: skip
    assert found and float(found.group(1)) < 1e-5, done.stdout


def test_a_sequence_parallel_ltx_video_equals_the_model_on_one_process(pool):
    """LTX-Video from its own plan, less the entries that would split the text: video
    tokens and rotary tables sharded, self-attention through tokenring, cross-attention
    to the text under its padding mask (a padded row) left local; 2, 3 and 4 processes,
    TokenRing, ring, Ulysses and USP 2 x 2, 32 and 45 tokens; output to float64 rounding
    and every gradient (its rotary embedding rounds through float32, as LTX computes it,
    alike on both sides)."""
    cases = _dit_cases("ltx", allgather=False)
    _check_dits(cases, pool.run(dit_case, cases, timeout=600))


def test_a_sequence_parallel_cogvideox_equals_the_model_on_one_process(pool):
    """CogVideoX from the project's plan (it has none, and splits its patch embedding's
    [text; video] inside its forward): video tokens split entering the first block,
    the rotary tables at every block, text joint in front with its own queries; 2, 3 and
    4 processes, TokenRing, ring, Ulysses, all-gather and USP 2 x 2, 32 and 45 tokens;
    output to float64 rounding, every gradient summed over the group the model's."""
    cases = _dit_cases("cogvideox", allgather=True)
    _check_dits(cases, pool.run(dit_case, cases, timeout=600))


def test_a_sequence_parallel_qwen_image_equals_the_model_on_one_process(pool):
    """Qwen-Image from its own plan less the text (its embeddings, its mask, its rotary
    table): image tokens and their table split, text joint in front under a padding mask
    with holes (a padded row, tokens 3 and 6), 2, 3 and 4 processes, TokenRing, ring,
    Ulysses, all-gather and USP 2 x 2, 32 and 15 tokens; output to float64 rounding and
    every gradient."""
    cases = _dit_cases("qwen", allgather=True)
    _check_dits(cases, pool.run(dit_case, cases, timeout=600))


def test_a_sequence_parallel_hunyuan_video_equals_the_model_on_one_process(pool):
    """HunyuanVideo from the project's plan (it has none): video tokens split leaving the
    patch embedding, rotary tables leaving the rope; dual- and single-stream blocks with
    the text joint at the rear under its padding (a padded row: the model builds the mask
    from the latent length, local once sharded); the text refiner left alone; 2, 3 and 4
    processes, every strategy and USP 2 x 2, 32 and 45 tokens; output and gradients."""
    cases = _dit_cases("hunyuan")
    _check_dits(cases, pool.run(dit_case, cases, timeout=600))


def test_what_the_wan_adapter_relies_on_in_diffusers():
    """Fails loudly when a diffusers upgrade changes what the Wan path reads: the model's
    context-parallel plan (rotary tables split from its output, hidden states split into
    the first block, the output projection gathered, a per-token timestep split), its
    processor's call (attention module, hidden states, encoder states, mask, rotary
    tables) and the attention module's parts."""
    import inspect

    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    model = tiny_wan()
    plan = model._cp_plan
    assert {name for name in plan} == {"rope", "blocks.0", "proj_out", ""}, plan
    assert [e.split_output for e in plan["rope"].values()] == [True, True]
    assert plan["blocks.0"]["hidden_states"].split_dim == 1
    assert plan["proj_out"].gather_dim == 1 and plan[""]["timestep"].expected_dims == 2
    params = list(inspect.signature(WanAttnProcessor.__call__).parameters)
    assert params[:6] == ["self", "attn", "hidden_states", "encoder_hidden_states",
                          "attention_mask", "rotary_emb"], params  # fmt: skip
    attn = model.blocks[0].attn1
    for part in ("to_q", "to_k", "to_v", "norm_q", "norm_k", "heads", "to_out",
                 "is_cross_attention", "fused_projections"):  # fmt: skip
        assert hasattr(attn, part), part
    assert not attn.is_cross_attention and model.blocks[0].attn2.is_cross_attention


def test_what_the_ltx_adapter_relies_on_in_diffusers():
    """As for Wan: LTX-Video's plan (video tokens split at the model's input, with the
    text entries tokenring drops; rotary tables split from the rope's output; the output
    projection gathered), its processor's call and its blocks' attention modules."""
    import inspect

    from diffusers.models.transformers.transformer_ltx import LTXVideoAttnProcessor

    from tokenring.integrations.context_plans import without_text

    model = tiny_ltx()
    plan = without_text(model._cp_plan)
    assert set(plan) == {"", "rope", "proj_out"} and set(plan[""]) == {"hidden_states"}, plan
    assert set(model._cp_plan[""]) - set(plan[""]) == {"encoder_hidden_states",
                                                      "encoder_attention_mask"}  # fmt: skip
    assert [e.split_output for e in plan["rope"].values()] == [True, True]
    params = list(inspect.signature(LTXVideoAttnProcessor.__call__).parameters)
    assert params[:6] == ["self", "attn", "hidden_states", "encoder_hidden_states",
                          "attention_mask", "image_rotary_emb"], params  # fmt: skip
    block = model.transformer_blocks[0]
    for part in ("to_q", "to_k", "to_v", "norm_q", "norm_k", "heads", "to_out"):
        assert hasattr(block.attn1, part), part
    assert isinstance(block.attn2.processor, LTXVideoAttnProcessor)


def test_what_the_cogvideox_adapter_relies_on_in_diffusers():
    """CogVideoX: its blocks take the video tokens and the rotary tables by these names
    (the project's plan splits them there), its processor's call, and its attention
    module's parts."""
    import inspect

    from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0

    model = tiny_cogvideox()
    block = model.transformer_blocks[0]
    params = list(inspect.signature(block.forward).parameters)
    assert params[:4] == ["hidden_states", "encoder_hidden_states", "temb",
                          "image_rotary_emb"], params  # fmt: skip
    params = list(inspect.signature(CogVideoXAttnProcessor2_0.__call__).parameters)
    assert params[:6] == ["self", "attn", "hidden_states", "encoder_hidden_states",
                          "attention_mask", "image_rotary_emb"], params  # fmt: skip
    for part in ("to_q", "to_k", "to_v", "norm_q", "norm_k", "heads", "to_out",
                 "is_cross_attention"):  # fmt: skip
        assert hasattr(block.attn1, part), part
    # a plan of its own in a later diffusers: use it (less its text entries) instead
    assert hasattr(model, "proj_out") and getattr(model, "_cp_plan", None) is None


@pytest.mark.slow
def test_every_dit_every_strategy_every_world_size(pool):
    """The whole matrix the CI samples: Flux, SD3, Wan, LTX-Video, CogVideoX, Qwen-Image
    and HunyuanVideo on 2, 3
    and 4 processes with TokenRing, ring, Ulysses (where the 4 heads divide) and
    all-gather, and USP 2 x 2, token counts that divide and that do not."""
    cases = []
    for kind in ("flux", "sd3", "wan", "ltx", "cogvideox", "qwen", "hunyuan"):
        for odd in (False, True):
            cases.append(dict(world=4, kind=kind, strategy="usp", odd=odd))
            for world in (2, 3, 4):
                for strategy in ("tokenring", "ring", "ulysses", "allgather"):
                    if strategy == "ulysses" and 4 % world:
                        continue
                    cases.append(dict(world=world, kind=kind, strategy=strategy, odd=odd))
    for case, per_rank in zip(cases, pool.run(dit_case, cases, timeout=1800)):
        for r in per_rank:
            assert r["out"] <= 1e-12 and r["undone"] == 0.0, (case, r)
            assert r["grads"] <= 1e-6, (case, r)


def test_what_the_qwen_image_adapter_relies_on_in_diffusers():
    """Qwen-Image: its plan (the image split entering the first block; the rotary
    embedding's two outputs, image then text; the text and its mask split per block,
    which tokenring drops), its processor's call, its rotary function, the attention
    module's parts."""
    import inspect

    from diffusers.models.transformers.transformer_qwenimage import (
        QwenDoubleStreamAttnProcessor2_0,
        apply_rotary_emb_qwen,
    )

    from tokenring.integrations.diffusers import PLANS

    model = tiny_qwen()
    plan = PLANS["QwenImageTransformer2DModel"](model)
    assert set(plan["transformer_blocks.0"]) == {"hidden_states"}, plan
    assert set(plan["pos_embed"]) == {0} and set(model._cp_plan["pos_embed"]) == {0, 1}
    params = list(inspect.signature(QwenDoubleStreamAttnProcessor2_0.__call__).parameters)
    assert params[:7] == ["self", "attn", "hidden_states", "encoder_hidden_states",
                          "encoder_hidden_states_mask", "attention_mask",
                          "image_rotary_emb"], params  # fmt: skip
    assert "use_real" in inspect.signature(apply_rotary_emb_qwen).parameters
    attn = model.transformer_blocks[0].attn
    for part in ("to_q", "add_q_proj", "norm_added_q", "inner_dim", "heads", "to_out",
                 "to_add_out"):  # fmt: skip
        assert hasattr(attn, part), part


def test_what_the_hunyuan_video_adapter_relies_on_in_diffusers():
    """HunyuanVideo: the modules its plan names (patch embedding, rope with two outputs,
    output projection), its processor's call, the blocks' attention modules and the text
    refiner's other processor (left alone), and no plan of its own yet."""
    import inspect

    from diffusers.models.transformers.transformer_hunyuan_video import (
        HunyuanVideoAttnProcessor2_0,
    )

    model = tiny_hunyuan()
    for name in ("x_embedder", "rope", "proj_out"):
        assert hasattr(model, name), name
    params = list(inspect.signature(HunyuanVideoAttnProcessor2_0.__call__).parameters)
    assert params[:6] == ["self", "attn", "hidden_states", "encoder_hidden_states",
                          "attention_mask", "image_rotary_emb"], params  # fmt: skip
    kinds = {n: type(p).__name__ for n, p in model.attn_processors.items()}
    refiner = [n for n in kinds if n.startswith("context_embedder")]
    assert refiner and all(kinds[n] != "HunyuanVideoAttnProcessor2_0" for n in refiner)
    assert model.single_transformer_blocks[0].attn.add_q_proj is None
    assert model.transformer_blocks[0].attn.add_q_proj is not None
    assert getattr(model, "_cp_plan", None) is None  # a later diffusers' own: use it
