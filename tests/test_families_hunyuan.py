"""HunyuanImage 2.1 and HunyuanVideo 1.5: two text streams joined by the model.

Both pipelines encode each prompt twice: Qwen2.5-VL states (through the model's timestep-dependent token
refiner, with a mask) and, for the quoted text in the prompt, byT5 states with their own mask (zeros when the
prompt quotes nothing). NAG's negative rows carry both negative streams, encoded by the pipeline's own
``encode_prompt``.

- HunyuanImage 2.1 (``hunyuanimage``) joins them per sample as ``[valid byT5, valid Qwen, padding]`` before
  HunyuanVideo-style ``[image, text]`` double and single blocks; the modulation comes from the timestep (and
  the guidance / meanflow timestep of the distilled model) alone. The tiny pipeline is the distilled setting
  (guidance embedding, ``timestep_r``, no CFG).
- HunyuanVideo 1.5 (``hunyuanvideo15``) joins them with the image embedding (all zero and masked in
  text-to-video) as ``[valid image, valid byT5, valid text, the rest]``; its double blocks attend over
  ``[video, text]`` with a text-only key mask. NAG's negative rows also take the guided rows' image embedding.
  The tiny pipeline's guider has scale 1 (no CFG, one call per step).

The CFG checks use the same components with a scale-4 ``ClassifierFreeGuidance`` guider (one call per branch,
conditional first). Batch 2 with prompts of different lengths, one quoting text and one not; negatives shorter
and longer than the prompts. The checks compare latents: the tiny VAEs' decoders shrink differences about
tenfold (HunyuanImage) or cannot decode a batch of two in diffusers 0.42.1 (HunyuanVideo 1.5).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import naive_nag
import pytest
import test_pipelines as tpl
import tiny_pipelines as tp
import torch

import nag

# (both have a fast path: the image stream at the stock batch, the negative text beside it)
STRAIGHTFORWARD_ONLY: dict[str, str] = {}
SETTINGS = tpl.SETTINGS
KEYS = ("encoder_hidden_states", "encoder_attention_mask", "encoder_hidden_states_2", "encoder_attention_mask_2")
EMBED_NAMES = ("negative_prompt_embeds", "negative_prompt_embeds_mask", "negative_prompt_embeds_2",
               "negative_prompt_embeds_mask_2")


@dataclass(frozen=True)
class Case:
    prompts: tuple[str, ...]
    negatives: dict[str, tuple[str, ...]]
    copied: tuple[str, ...]  # pipeline attributes the tiny factory sets, copied onto the CFG pipeline
    naive: Callable[..., torch.Tensor]  # the naive forward: (model, inputs, negative, cond_rows) -> output


def _naive_hunyuanimage(model, inputs, negative, cond_rows):
    return naive_nag.naive_hunyuanimage_forward(
        model, inputs["hidden_states"], inputs["timestep"], inputs["encoder_hidden_states"],
        inputs["encoder_attention_mask"], inputs.get("encoder_hidden_states_2"), inputs.get("encoder_attention_mask_2"),
        *(negative.get(k) for k in KEYS), cond_rows=cond_rows, guidance=inputs.get("guidance"),
        timestep_r=inputs.get("timestep_r"), p=1, **SETTINGS,
    )


def _naive_hunyuanvideo15(model, inputs, negative, cond_rows):
    return naive_nag.naive_hunyuanvideo15_forward(
        model, inputs["hidden_states"], inputs["timestep"], inputs["encoder_hidden_states"],
        inputs["encoder_attention_mask"], inputs["encoder_hidden_states_2"], inputs["encoder_attention_mask_2"],
        inputs["image_embeds"], *(negative.get(k) for k in KEYS), cond_rows=cond_rows,
        timestep_r=inputs.get("timestep_r"), p=1, **SETTINGS,
    )


CASES = {
    "hunyuanimage": Case(
        prompts=('a red sign that says "OPEN" on a blue door in the small town', "a small green square"),
        negatives={
            "shorter": ("ugly", 'blurry "NO"'),
            "longer": (
                'blurry, low quality, ugly watermark text "SALE" with deformed shapes and extra corners',
                "low quality, watermark text, noise, bad colors, deformed",
            ),
        },
        copied=(
            "prompt_template_encode",
            "prompt_template_encode_start_idx",
            "tokenizer_max_length",
            "tokenizer_2_max_length",
        ),
        naive=_naive_hunyuanimage,
    ),
    "hunyuanvideo15": Case(
        prompts=('a red sign that says "OPEN" on a blue door', "a small green square"),
        negatives={
            "shorter": ("ugly", 'blurry "NO"'),
            "longer": (
                'blurry, low quality, ugly watermark text "SALE" with deformed shapes and extra corners and noise',
                "low quality, watermark text, noise, bad colors, deformed, ugly shapes, dark",
            ),
        },
        copied=(
            "system_message",
            "prompt_template_encode_start_idx",
            "tokenizer_max_length",
            "tokenizer_2_max_length",
            "vision_num_semantic_tokens",
        ),
        naive=_naive_hunyuanvideo15,
    ),
}
NAMES = list(CASES)
# HunyuanVideo 1.5 image-to-video: the same text streams (its checks run in test_families_image_conditioned)
CASES["hunyuanvideo15_i2v"] = CASES["hunyuanvideo15"]


@cache
def cfg_pipeline(name):
    """The tiny pipeline's components with a CFG guider (scale 4): one call per branch, conditional first."""
    from diffusers import ClassifierFreeGuidance

    pipe = tpl.pipeline(name)
    cfg = type(pipe)(**{**pipe.components, "guider": ClassifierFreeGuidance(guidance_scale=4.0)})
    for attr in CASES[name].copied:
        setattr(cfg, attr, getattr(pipe, attr))
    return cfg


def generate(name, pipe, prompts=None, negative_prompt=None, **overrides):
    kwargs = {**tp.call_kwargs(name), "output_type": "latent"}
    if negative_prompt is not None:
        kwargs["negative_prompt"] = negative_prompt
    kwargs.update(overrides)
    prompts = CASES[name].prompts if prompts is None else prompts
    return tp.output_tensor(pipe(prompt=list(prompts), generator=torch.Generator("cpu").manual_seed(0), **kwargs))


def record(name, pipe, **kwargs):
    recorder = tpl.Recorder(tp.denoiser(pipe))
    try:
        out = generate(name, pipe, **kwargs)
    finally:
        recorder.close()
    return out, recorder.calls


def encode(pipe, prompts):
    """Both streams of ``prompts``, as the pipeline encodes them: ``{denoiser argument: tensor}``."""
    with torch.no_grad():
        return dict(zip(KEYS, pipe.encode_prompt(list(prompts), batch_size=len(prompts))))


def naive_output(name, model, inputs, negative, cond_rows):
    return CASES[name].naive(model, inputs, negative or {}, cond_rows)


@pytest.mark.parametrize("name", NAMES)
def test_prompts_use_both_streams_at_different_lengths(name):
    streams = encode(tpl.pipeline(name), CASES[name].prompts)
    lengths = streams["encoder_attention_mask"].sum(1)
    assert lengths[0] > lengths[1]  # prompts of different lengths
    assert streams["encoder_attention_mask_2"][0].sum() > 0 and streams["encoder_attention_mask_2"][1].sum() == 0


@pytest.mark.parametrize("name", NAMES)
def test_invariants(name):
    tpl.check_off_is_bit_identical(name)
    tpl.check_negative_equal_to_positive_is_unguided(name)
    check_negative_prompt_changes_the_latents(name)
    tpl.check_removal_restores_everything(name)
    tpl.check_exception_inside_a_generation_leaves_nothing_behind(name)
    tpl.check_steps_outside_the_window_are_stock(name)


def check_negative_prompt_changes_the_latents(name):
    """As ``test_pipelines``'s check, on the latents (see the module docstring)."""
    pipe = tpl.pipeline(name)
    reference = generate(name, pipe, prompts=tpl.PROMPTS)
    with nag.apply(pipe, tpl.NEGATIVE, **SETTINGS) as handle:
        out = generate(name, pipe, prompts=tpl.PROMPTS)
        assert handle.guided_calls == 2  # one guided denoiser call per step
    assert torch.isfinite(out).all()
    assert (out - reference).abs().max() > 1e-3


@pytest.mark.parametrize("name", NAMES)
def test_negative_equal_to_positive_is_unguided_with_quoted_text(name):
    pipe = tpl.pipeline(name)
    reference = generate(name, pipe)
    with nag.apply(pipe, list(CASES[name].prompts), **SETTINGS) as handle:
        out = generate(name, pipe)
        assert handle.guided_calls == 2
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_guided_without_cfg_on_its_attention_path(name):
    tpl.check_fast_path_never_calls_the_stock_processor(name, straightforward_only=STRAIGHTFORWARD_ONLY)


@pytest.mark.parametrize("name", NAMES)
def test_cfg_unconditional_branch_is_untouched(name):
    check_cfg_unconditional_branch_is_untouched(name)


def check_cfg_unconditional_branch_is_untouched(name):
    """CFG through the guider, one call per branch (conditional first): the unconditional calls are stock, the
    conditional ones guided and equal to the naive reference."""
    pipe = cfg_pipeline(name)
    model = tp.denoiser(pipe)
    cfg_negative = ["deformed", "bad"]
    longer = list(CASES[name].negatives["longer"])
    _, stock_calls = record(name, pipe, negative_prompt=cfg_negative)
    negative = encode(pipe, longer)
    with nag.apply(pipe, longer, **SETTINGS) as handle:
        _, guided_calls = record(name, pipe, negative_prompt=cfg_negative)
        assert handle.guided_calls == 2
    assert len(guided_calls) == 4
    torch.testing.assert_close(guided_calls[1]["output"], stock_calls[1]["output"], rtol=0, atol=1e-6)
    assert (guided_calls[0]["output"] - stock_calls[0]["output"]).abs().max() > 1e-4
    with torch.no_grad():
        for index, call in enumerate(guided_calls):
            guided = index % 2 == 0
            expected = naive_output(
                name, model, call["inputs"], negative if guided else None, [0, 1] if guided else None
            )
            torch.testing.assert_close(call["output"], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "straightforward"])
@pytest.mark.parametrize("name", NAMES)
def test_agrees_with_naive_implementation(name, fast):
    check_agrees_with_naive_implementation(name, fast)


def check_agrees_with_naive_implementation(name, fast):
    """Through the pipeline: negatives encoded by the pipeline (both streams; quoted text in one of them), and
    precomputed negatives with Qwen streams of other token lengths (5 shorter, 7 longer, partial masks)."""
    pipe = tpl.pipeline(name)
    model = tp.denoiser(pipe)
    stock_out, stock_calls = record(name, pipe)
    with torch.no_grad():  # the reference itself reproduces the stock model
        torch.testing.assert_close(
            naive_output(name, model, stock_calls[0]["inputs"], None, None),
            stock_calls[0]["output"],
            rtol=1e-4,
            atol=1e-5,
        )
    cases = []
    for kind, negatives in CASES[name].negatives.items():
        cases.append((kind, dict(negative_prompt=list(negatives)), encode(pipe, negatives)))
    encoded = encode(pipe, CASES[name].negatives["longer"])
    g = torch.Generator().manual_seed(7)
    for delta in (-5, 7):
        length = encoded["encoder_hidden_states"].shape[1] + delta
        mask = torch.ones(2, length, dtype=torch.int64)
        mask[0, -3:] = 0
        mask[1, length // 2 :] = 0
        negative = {
            **encoded,
            "encoder_hidden_states": torch.randn(2, length, 32, generator=g),
            "encoder_attention_mask": mask,
        }
        cases.append((f"embeds{delta:+d}", dict(zip(EMBED_NAMES, (negative[k] for k in KEYS))), negative))
    for kind, arguments, negative in cases:
        with nag.apply(pipe, **arguments, **SETTINGS, fast=fast) as handle:
            out, calls = record(name, pipe)
            assert handle.guided_calls == 2, kind
        assert (out - stock_out).abs().max() > 1e-4, kind
        with torch.no_grad():
            for call in calls:
                torch.testing.assert_close(
                    call["output"],
                    naive_output(name, model, call["inputs"], negative, [0, 1]),
                    rtol=1e-4,
                    atol=1e-5,
                    msg=kind,
                )


@pytest.mark.parametrize("name", NAMES)
def test_precomputed_embeddings_act_like_the_negative_prompt_and_are_checked(name):
    pipe = tpl.pipeline(name)
    negatives = list(CASES[name].negatives["shorter"])
    encoded = encode(pipe, negatives)
    with nag.apply(pipe, negatives, **SETTINGS):
        by_text = generate(name, pipe)
    with nag.apply(pipe, **dict(zip(EMBED_NAMES, (encoded[k] for k in KEYS))), **SETTINGS):
        by_embeds = generate(name, pipe)
    torch.testing.assert_close(by_embeds, by_text, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="negative_prompt_embeds_2"):
        nag.apply(
            pipe,
            negative_prompt_embeds=encoded["encoder_hidden_states"],
            negative_prompt_embeds_mask=encoded["encoder_attention_mask"],
        )
    # a byT5 stream of another length than the pipeline's cannot be joined row by row: a clear error
    short_2 = {
        **encoded,
        "encoder_hidden_states_2": encoded["encoder_hidden_states_2"][:, :-2],
        "encoder_attention_mask_2": encoded["encoder_attention_mask_2"][:, :-2],
    }
    with nag.apply(pipe, **dict(zip(EMBED_NAMES, (short_2[k] for k in KEYS))), **SETTINGS):
        with pytest.raises(ValueError, match="encoder_hidden_states_2"):
            generate(name, pipe)
    assert tpl.state_of(pipe) == tpl.state_of(tpl.pipeline(name))
