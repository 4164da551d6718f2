"""Qwen-Image 2.1 (QwenImage21Pipeline) on the ``"prefix"`` layout.

One block-causal single-stream transformer over ``[text with condition-image slots, target image]``: the text never
attends to the target image. NAG runs the negative prompt's prefix in a denoiser call of its own (laid out as the
pipeline lays out its CFG call: its own length, its own condition-image slots) and, in every layer, lets the guided
rows' target-image queries attend to ``[negative prefix, target image]`` as well. The stock rows run as stock.

Tiny random-weight pipelines (32x32 pixels, 16x VAE: 4 target tokens), a batch of two prompts of different lengths:
``qwenimage21`` (text modulated from t = 0, ``causal_condition``: the pipeline caches the text prefix's keys/values
across steps, and so does NAG), ``qwenimage21_timestep_text`` (text modulated by the timestep: no cache, the negative
prefix is run again every step) and ``qwenimage21_condition_image`` (a condition image in every prompt, for the
negative prompt too).
"""

from __future__ import annotations

import math

import naive_nag
import pytest
import test_pipelines as tpl
import tiny_pipelines as tp
import torch

import nag

NAMES = ["qwenimage21", "qwenimage21_timestep_text", "qwenimage21_condition_image"]
TARGET_TOKENS = 4


# the invariants, CFG's unconditional branch, NAG alone on its attention path (test_pipelines' checks); the stock
# processor does all attention math, also for the negative pass (target queries only)
test_invariants = tpl.each_configuration(tpl.check_invariants, NAMES)
test_cfg_unconditional_branch_is_untouched = tpl.each_configuration(
    tpl.check_cfg_unconditional_branch_is_untouched, NAMES
)
test_guided_without_cfg_on_its_attention_path = tpl.each_configuration(
    tpl.check_fast_path_never_calls_the_stock_processor, NAMES, fast_path=False
)


def _naive_target(model, inputs, negative, cond_rows):
    """The naive model's target-image tokens for one recorded call (the model returns only those in the pipeline's
    cached steps, the whole sequence in the others)."""
    kwargs = {k: v for k, v in inputs.items() if k not in ("kv_cache", "kv_cache_mode", "return_dict")}
    if negative is None:
        out = naive_nag.naive_qwenimage21_forward(model, kwargs, None)
    else:
        out = naive_nag.naive_qwenimage21_forward(
            model,
            kwargs,
            negative["encoder_hidden_states"],
            negative.get("encoder_attention_mask"),
            negative.get("img_mask"),
            cond_rows=cond_rows,
            **{**tpl.SETTINGS, "p": 1},
        )
    return out[:, -TARGET_TOKENS:]


def _check_recorded_calls_agree(name, pipe, calls, negative):
    """Conditional calls (even) against the naive NAG reference, unconditional ones (odd) against the naive stock
    model; each call's output is its target-image tokens' prediction."""
    model = tp.denoiser(pipe)
    assert len(calls) == 4
    with torch.no_grad():
        for index, call in enumerate(calls):
            rows = call["output"].shape[0]
            expected = _naive_target(model, call["inputs"], None if index % 2 else negative, list(range(rows)))
            torch.testing.assert_close(call["output"][:, -TARGET_TOKENS:], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "straightforward"])
@pytest.mark.parametrize("name", NAMES)
def test_agrees_with_naive_implementation(name, fast):
    """Precomputed negatives 3 tokens shorter and 5 longer than the prompts, a different one per row with partial
    masks (text only: no condition image in the negative), and the encoded negative prompt (with the condition
    image where the pipeline has one), through the pipeline path with CFG on."""
    pipe = tpl.pipeline(name)
    _, stock_calls = tpl.record(pipe, name)
    text = stock_calls[0]["inputs"]["encoder_hidden_states"]
    g = torch.Generator().manual_seed(7)
    for length_delta in (-3, 5):
        length = text.shape[1] + length_delta
        mask = torch.ones(2, length, dtype=torch.long)
        mask[0, -3:] = 0
        embeds = {
            "negative_prompt_embeds": torch.randn(2, length, text.shape[2], generator=g),
            "negative_prompt_embeds_mask": mask,
        }
        with nag.apply(pipe, **embeds, **tpl.SETTINGS, fast=fast):
            _, calls = tpl.record(pipe, name)
        negative = {"encoder_hidden_states": embeds["negative_prompt_embeds"], "encoder_attention_mask": mask}
        _check_recorded_calls_agree(name, pipe, calls, negative)
    with nag.apply(pipe, ["blurry", "a low quality watermark"], **tpl.SETTINGS, fast=fast) as handle:
        _, calls = tpl.record(pipe, name)
        negative = dict(handle.runtime.negative)
    assert negative["encoder_hidden_states"].shape[1] != text.shape[1]
    _check_recorded_calls_agree(name, pipe, calls, negative)


def test_negative_prefix_runs_once_per_generation_when_the_text_ignores_the_timestep():
    """With ``causal_condition`` the negative prefix is one extra denoiser pass per generation (with the smallest
    target image the model takes); with the text modulated by the timestep one per guided step. The pipeline's own
    calls are unchanged (4: 2 steps x 2 CFG branches)."""
    for name, extra in (("qwenimage21", 1), ("qwenimage21_timestep_text", 2)):
        pipe = tpl.pipeline(name)
        model = tp.denoiser(pipe)
        passes = []
        original = model.forward

        def counting_forward(*args, _passes=passes, _original=original, **kwargs):
            _passes.append((kwargs.get("kv_cache"), kwargs["hidden_states"].shape[1]))
            return _original(*args, **kwargs)

        with nag.apply(pipe, tpl.NEGATIVE, **tpl.SETTINGS) as handle:
            model.forward = counting_forward
            try:
                _, calls = tpl.record(pipe, name, height=64, width=64)  # 4x4 latent: 16 target tokens
            finally:
                del model.forward
            assert handle.guided_calls == 2
            assert handle.runtime.negative_prefix is None  # the keys/values are freed after the loop
        assert len(calls) == 4
        assert len(passes) == 4 + extra, (name, passes)
        # the negative prefix's own passes (no cache of the pipeline's) carry the smallest target image: 2x2 tokens
        prefills = [tokens for cache, tokens in passes if cache is None]
        pipeline_passes = [tokens for cache, tokens in passes if cache is not None]
        if name == "qwenimage21":
            assert prefills == [4] and pipeline_passes == [16] * 4


def test_without_the_pipelines_cache_the_guided_output_is_the_same():
    """``use_kv_cache=False`` (every step a full pass over the prompt) gives the guided result of the cached run."""
    name = "qwenimage21"
    pipe = tpl.pipeline(name)
    with nag.apply(pipe, tpl.NEGATIVE, **tpl.SETTINGS):
        cached = tpl.generate(pipe, name)
        uncached = tpl.generate(pipe, name, use_kv_cache=False)
    torch.testing.assert_close(uncached, cached, rtol=0, atol=1e-6)
    assert (cached - tpl.stock(name)).abs().max() > 1e-3


def test_conditioning_is_left_unguided():
    """The condition image's latents reach the denoiser exactly as stock at every step; the negative prompt is
    encoded with the same condition image (one vision slot in its text), and a negative equal to the positive
    gives the stock output."""
    name = "qwenimage21_condition_image"
    pipe = tpl.pipeline(name)
    _, stock_calls = tpl.record(pipe, name)
    with nag.apply(pipe, tpl.NEGATIVE, **tpl.SETTINGS) as handle:
        guided_out, guided_calls = tpl.record(pipe, name)
        negative_slots = handle.runtime.negative["img_mask"]
        assert handle.guided_calls == 2
    assert negative_slots.shape[0] == 2 and bool((negative_slots.sum(dim=1) == 1).all())
    assert len(guided_calls) == len(stock_calls) == 4
    condition_tokens = stock_calls[0]["inputs"]["hidden_states"][:, :-TARGET_TOKENS]
    assert condition_tokens.shape[1] == 4
    for stock_call, guided_call in zip(stock_calls, guided_calls):
        assert torch.equal(guided_call["inputs"]["hidden_states"][:, :-TARGET_TOKENS], condition_tokens)
        assert torch.equal(guided_call["inputs"]["img_mask"], stock_call["inputs"]["img_mask"])
    reference = tpl.stock(name)
    with nag.apply(pipe, tpl.PROMPTS, **tpl.SETTINGS):
        out = tpl.generate(pipe, name)
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-6)
    assert (guided_out - reference).abs().max() > 1e-3


def test_images_per_prompt_with_one_negative_per_prompt():
    """``num_images_per_prompt=2``: four rows, each guided by its prompt's negative (the encoded condition-slot
    masks come one per prompt and are repeated per image)."""
    name = "qwenimage21"
    pipe = tpl.pipeline(name)
    negatives = ["blurry", "a low quality watermark"]
    with nag.apply(pipe, negatives, **tpl.SETTINGS) as handle:
        _, calls = tpl.record(pipe, name, num_images_per_prompt=2, negative_prompt=["deformed"] * 2)
        negative = dict(handle.runtime.negative)
        assert handle.guided_calls == 2
    rows = calls[0]["output"].shape[0]
    assert rows == 4
    expanded = {key: value.repeat_interleave(rows // value.shape[0], dim=0) for key, value in negative.items()}
    model = tp.denoiser(pipe)
    with torch.no_grad():
        expected = _naive_target(model, calls[2]["inputs"], expanded, list(range(rows)))
    torch.testing.assert_close(calls[2]["output"][:, -TARGET_TOKENS:], expected, rtol=1e-4, atol=1e-5)


def test_flex_attention_processor_is_refused():
    """The flex processor reads a block mask the model builds only for processors it recognises as flex: refused
    with the fix, and nothing is left installed."""
    from diffusers.models.transformers.transformer_qwenimage21 import (
        QwenImage21AttnProcessor,
        QwenImage21FlexAttnProcessor,
    )

    pipe = tp.FAMILY_FACTORIES["qwenimage21"]()
    model = tp.denoiser(pipe)
    model.set_attn_processor(QwenImage21FlexAttnProcessor())
    before = tpl.state_of(pipe)
    with pytest.raises(NotImplementedError, match="QwenImage21AttnProcessor"):
        nag.apply(pipe, tpl.NEGATIVE)
    assert tpl.state_of(pipe) == before
    model.set_attn_processor(QwenImage21AttnProcessor())
    with nag.apply(pipe, tpl.NEGATIVE) as handle:
        tpl.generate(pipe, "qwenimage21", cfg=False)
        assert handle.guided_calls == 2
    assert math.isclose(handle.settings.scale, 5.0)


def test_precomputed_slot_mask_is_checked_against_the_embeddings():
    """``negative_image_pad_mask`` (encode_prompt's slot mask, passed with precomputed negative embeddings) needs one
    entry per text token and a mask dtype; a wrong one is refused at ``nag.apply``, naming it; nothing is installed."""
    name = "qwenimage21_condition_image"
    pipe = tpl.pipeline(name)
    text = torch.randn(2, 7, pipe.transformer.config.context_in_dim)
    processors = dict(pipe.transformer.attn_processors)
    with pytest.raises(ValueError, match=r"`negative_image_pad_mask` has shape \(2, 5\).*expected \(2, 7\)"):
        nag.apply(pipe, negative_prompt_embeds=text, negative_image_pad_mask=torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="`negative_image_pad_mask` must be a bool"):
        nag.apply(pipe, negative_prompt_embeds=text, negative_image_pad_mask=torch.zeros(2, 7, dtype=torch.complex64))
    assert pipe.transformer.attn_processors == processors
    # text-only embeddings need no slot mask
    with nag.apply(pipe, negative_prompt_embeds=text, negative_image_pad_mask=None):
        pass
