"""HunyuanVideo 1.5 (HunyuanVideo15Pipeline): two text streams and an image embedding joined by the model.

The pipeline encodes each prompt twice: Qwen2.5-VL text-model states (through the model's timestep-dependent token
refiner, with a mask) and, for the quoted text in the prompt, byT5 states with their own mask (zeros when the
prompt quotes nothing). The model joins them per sample with the image embedding (all zero and masked in
text-to-video) as ``[valid image, valid byT5, valid text, the rest]``; its double blocks attend over ``[video,
text]`` with a text-only key mask; the modulation comes from the timestep alone. NAG's negative rows carry both
negative streams, encoded by the pipeline's own ``encode_prompt``, and the guided rows' image embedding.

The tiny pipeline's guider has scale 1 (no CFG, one call per step); the CFG checks use the same components with a
scale-4 ``ClassifierFreeGuidance`` guider (one call per branch, conditional first). Batch 2 with prompts of
different lengths, one quoting text and one not; negatives shorter and longer than the prompts. The checks compare
latents: the tiny VAE's decoder cannot decode a batch of two in diffusers 0.42.1.
"""

from __future__ import annotations

from functools import lru_cache

import pytest
import torch

import naive_nag
import nag
import test_families_more as tfm
import test_pipelines as tpl
import tiny_pipelines as tp

NAME = "hunyuanvideo15"
STRAIGHTFORWARD_ONLY = {
    "hunyuanvideo15": "HunyuanVideo15AttnProcessor2_0 on whole negative rows: straightforward wrappers only",
}
SETTINGS = tpl.SETTINGS
PROMPTS = ['a red sign that says "OPEN" on a blue door', "a small green square"]
NEGATIVES = {"shorter": ["ugly", 'blurry "NO"'],
             "longer": ['blurry, low quality, ugly watermark text "SALE" with deformed shapes and extra corners and '
                        "noise", "low quality, watermark text, noise, bad colors, deformed, ugly shapes, dark"]}
KEYS = ("encoder_hidden_states", "encoder_attention_mask", "encoder_hidden_states_2", "encoder_attention_mask_2")
EMBED_NAMES = ("negative_prompt_embeds", "negative_prompt_embeds_mask", "negative_prompt_embeds_2",
               "negative_prompt_embeds_mask_2")
_COPIED = ("system_message", "prompt_template_encode_start_idx", "tokenizer_max_length", "tokenizer_2_max_length",
           "vision_num_semantic_tokens")


@lru_cache(maxsize=None)
def cfg_pipeline():
    """The tiny pipeline's components with a CFG guider (scale 4): one call per branch, conditional first."""
    from diffusers import ClassifierFreeGuidance

    pipe = tpl.pipeline(NAME)
    cfg = type(pipe)(**{**pipe.components, "guider": ClassifierFreeGuidance(guidance_scale=4.0)})
    for attr in _COPIED:
        setattr(cfg, attr, getattr(pipe, attr))
    return cfg


def generate(pipe, prompts=PROMPTS, negative_prompt=None, **overrides):
    kwargs = dict(tp.call_kwargs(NAME))
    if negative_prompt is not None:
        kwargs["negative_prompt"] = negative_prompt
    kwargs.update(overrides)
    return tp.output_tensor(pipe(prompt=list(prompts), generator=torch.Generator("cpu").manual_seed(0), **kwargs))


def record(pipe, **kwargs):
    recorder = tpl.Recorder(tp.denoiser(pipe))
    try:
        out = generate(pipe, **kwargs)
    finally:
        recorder.close()
    return out, recorder.calls


def encode(pipe, prompts):
    """Both streams of ``prompts``, as the pipeline encodes them: ``{denoiser argument: tensor}``."""
    with torch.no_grad():
        return dict(zip(KEYS, pipe.encode_prompt(list(prompts), batch_size=len(prompts))))


def naive_output(model, inputs, negative, cond_rows):
    negative = negative or {}
    return naive_nag.naive_hunyuanvideo15_forward(
        model, inputs["hidden_states"], inputs["timestep"], inputs["encoder_hidden_states"],
        inputs["encoder_attention_mask"], inputs["encoder_hidden_states_2"], inputs["encoder_attention_mask_2"],
        inputs["image_embeds"], *(negative.get(k) for k in KEYS), cond_rows=cond_rows,
        timestep_r=inputs.get("timestep_r"), p=1, **SETTINGS,
    )


def test_prompts_use_both_streams_at_different_lengths():
    streams = encode(tpl.pipeline(NAME), PROMPTS)
    lengths = streams["encoder_attention_mask"].sum(1)
    assert lengths[0] > lengths[1] and lengths[0] < streams["encoder_attention_mask"].shape[1]
    assert streams["encoder_attention_mask_2"][0].sum() > 0 and streams["encoder_attention_mask_2"][1].sum() == 0


def test_invariants():
    tpl.check_invariants(NAME)


def test_negative_equal_to_positive_is_unguided_with_quoted_text():
    pipe = tpl.pipeline(NAME)
    reference = generate(pipe)
    with nag.apply(pipe, PROMPTS, **SETTINGS) as handle:
        out = generate(pipe)
        assert handle.guided_calls == 2
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-5)


def test_guided_without_cfg_on_its_attention_path():
    tpl.check_fast_path_never_calls_the_stock_processor(NAME, fast_path=False)


def test_cfg_unconditional_branch_is_untouched():
    """CFG through the guider, one call per branch (conditional first): the unconditional calls are stock, the
    conditional ones guided and equal to the naive reference."""
    pipe = cfg_pipeline()
    model = tp.denoiser(pipe)
    cfg_negative = ["deformed", "bad"]
    _, stock_calls = record(pipe, negative_prompt=cfg_negative)
    negative = encode(pipe, NEGATIVES["longer"])
    with nag.apply(pipe, NEGATIVES["longer"], **SETTINGS) as handle:
        _, guided_calls = record(pipe, negative_prompt=cfg_negative)
        assert handle.guided_calls == 2
    assert len(guided_calls) == 4
    torch.testing.assert_close(guided_calls[1]["output"], stock_calls[1]["output"], rtol=0, atol=1e-6)
    assert (guided_calls[0]["output"] - stock_calls[0]["output"]).abs().max() > 1e-4
    with torch.no_grad():
        for index, call in enumerate(guided_calls):
            guided = index % 2 == 0
            expected = naive_output(model, call["inputs"], negative if guided else None, [0, 1] if guided else None)
            torch.testing.assert_close(call["output"], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "straightforward"])
def test_agrees_with_naive_implementation(fast):
    """Through the pipeline: negatives encoded by the pipeline (both streams; quoted text in one of them), and
    precomputed negatives with Qwen streams of other token lengths (5 shorter, 7 longer, partial masks)."""
    pipe = tpl.pipeline(NAME)
    model = tp.denoiser(pipe)
    stock_out, stock_calls = record(pipe)
    with torch.no_grad():  # the reference itself reproduces the stock model
        torch.testing.assert_close(naive_output(model, stock_calls[0]["inputs"], None, None), stock_calls[0]["output"],
                                   rtol=1e-4, atol=1e-5)
    cases = []
    for kind, negatives in NEGATIVES.items():
        cases.append((kind, dict(negative_prompt=negatives), encode(pipe, negatives)))
    encoded = encode(pipe, NEGATIVES["longer"])
    g = torch.Generator().manual_seed(7)
    for delta in (-5, 7):
        length = encoded["encoder_hidden_states"].shape[1] + delta
        mask = torch.ones(2, length, dtype=torch.int64)
        mask[0, -3:] = 0
        mask[1, length // 2:] = 0
        negative = {**encoded, "encoder_hidden_states": torch.randn(2, length, 32, generator=g),
                    "encoder_attention_mask": mask}
        cases.append((f"embeds{delta:+d}", dict(zip(EMBED_NAMES, (negative[k] for k in KEYS))), negative))
    for kind, arguments, negative in cases:
        with nag.apply(pipe, **arguments, **SETTINGS, fast=fast) as handle:
            out, calls = record(pipe)
            assert handle.guided_calls == 2, kind
        assert (out - stock_out).abs().max() > 1e-4, kind
        with torch.no_grad():
            for call in calls:
                torch.testing.assert_close(call["output"], naive_output(model, call["inputs"], negative, [0, 1]),
                                           rtol=1e-4, atol=1e-5, msg=kind)


def test_precomputed_embeddings_act_like_the_negative_prompt():
    pipe = tpl.pipeline(NAME)
    negatives = NEGATIVES["shorter"]
    encoded = encode(pipe, negatives)
    with nag.apply(pipe, negatives, **SETTINGS):
        by_text = generate(pipe)
    with nag.apply(pipe, **dict(zip(EMBED_NAMES, (encoded[k] for k in KEYS))), **SETTINGS):
        by_embeds = generate(pipe)
    torch.testing.assert_close(by_embeds, by_text, rtol=0, atol=1e-6)
    assert tpl.state_of(pipe) == tpl.state_of(tpl.pipeline(NAME))
