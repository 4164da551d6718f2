"""LTX-2 (LTX2Pipeline): the denoiser's text is the output of the pipeline's `connectors`.

The pipeline encodes the prompts, runs ``[negative, positive]`` (under CFG) through its ``connectors``
component, and gives the denoiser the connector outputs: a video text, an audio text and one mask. NAG
recognises the conditional rows in that output and runs its own negative through the same connectors.
It guides the video stream's text cross-attention (``attn2``); the audio stream's text cross-attention
(``audio_attn2``) is left stock, so the audio changes only through the audio-video cross-attention with the
guided video (bit-identical when the two modalities are isolated).

Two tiny configurations: ``ltx2`` (LTX-2.0 style) and ``ltx2_adaln`` (cross-attention AdaLN: the text is
modulated per block and per step). Batch 2 with prompts of different lengths (the connectors' mask has
left padding), CFG on.
"""

from __future__ import annotations

import naive_nag
import pytest
import test_pipelines as tpl
import tiny_pipelines as tp
import torch

import nag

NAMES = ["ltx2", "ltx2_adaln"]
SETTINGS = tpl.SETTINGS
STRAIGHTFORWARD_ONLY: dict[str, str] = {}  # (LTX-2's text cross-attention has the cross-attention fast path)


def latents(pipe, name, **overrides):
    kwargs = {**tp.call_kwargs(name), "output_type": "latent", **overrides}
    out = pipe(prompt=list(tpl.PROMPTS), generator=torch.Generator("cpu").manual_seed(0), **kwargs)
    return out.frames, out.audio


def connector_output(pipe, text, mask):
    with torch.no_grad():
        video, _, video_mask = pipe.connectors(text, mask, padding_side="left")
    return video, video_mask


test_invariants = tpl.each_configuration(tpl.check_invariants, NAMES)
test_cfg_unconditional_branch_is_untouched = tpl.each_configuration(
    tpl.check_cfg_unconditional_branch_is_untouched, NAMES
)
test_fast_path_never_calls_the_stock_processor = tpl.each_configuration(
    tpl.check_fast_path_never_calls_the_stock_processor, NAMES, straightforward_only=STRAIGHTFORWARD_ONLY
)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "straightforward"])
@pytest.mark.parametrize("name", NAMES)
def test_agrees_with_naive_implementation(name, fast):
    check_agrees_with_naive_implementation(name, fast)


def check_agrees_with_naive_implementation(name, fast):
    """Precomputed negative embeddings (the connectors' input) shorter and longer than the prompts', with
    partial masks: every guided call agrees with the naive reference fed the connectors' output for them."""
    pipe = tpl.pipeline(name)
    model = pipe.transformer
    encoded, mask = pipe.encode_prompt(list(tpl.PROMPTS), do_classifier_free_guidance=False, max_sequence_length=16)[:2]
    g = torch.Generator().manual_seed(7)
    for length_delta in (-3, 5):
        length = encoded.shape[1] + length_delta
        negative = torch.randn(2, length, encoded.shape[2], generator=g)
        negative_mask = torch.ones(2, length, dtype=mask.dtype)
        negative_mask[0, :3] = 0  # left padding, as the pipeline's tokenizer pads
        negative_mask[1, :1] = 0
        with nag.apply(
            pipe, negative_prompt_embeds=negative, negative_prompt_attention_mask=negative_mask, **SETTINGS, fast=fast
        ) as handle:
            _, calls = tpl.record(pipe, name)
            assert handle.guided_calls == len(calls) == 2
        video_text, video_mask = connector_output(pipe, negative, negative_mask)
        with torch.no_grad():
            for call in calls:
                inputs = {k: v for k, v in call["inputs"].items() if k != "return_dict"}
                batch = inputs["hidden_states"].shape[0]
                expected, _ = naive_nag.naive_ltx2_forward(
                    model, inputs, video_text, video_mask, cond_rows=[batch - 2, batch - 1], p=1, **SETTINGS
                )
                torch.testing.assert_close(call["output"], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_negative_prompts_per_prompt_and_without_cfg(name):
    """A list of negatives (one per prompt) and a string agree where they should; without CFG every row is guided."""
    pipe = tpl.pipeline(name)
    stock = latents(pipe, name)
    with nag.apply(pipe, ["blurry", "watermark text"], **SETTINGS):
        per_prompt = latents(pipe, name)
    with nag.apply(pipe, "blurry", **SETTINGS):
        single = latents(pipe, name)
    assert torch.equal(per_prompt[0][0], single[0][0])
    assert not torch.allclose(per_prompt[0][1], single[0][1])
    assert (per_prompt[0] - stock[0]).abs().amax(dim=(1, 2, 3, 4)).min() > 1e-4
    no_cfg = tp.no_cfg_kwargs(name)
    with nag.apply(pipe, tpl.NEGATIVE, **SETTINGS) as handle:
        _, calls = tpl.record(pipe, name, guidance_scale=no_cfg["guidance_scale"])
        assert handle.guided_calls == len(calls) == 2 and calls[0]["output"].shape[0] == 2


@pytest.mark.parametrize("name", NAMES)
def test_audio_text_attention_is_stock(name):
    """Only ``attn2`` is wrapped; with the modalities isolated the audio output is bit-identical to stock
    while the video output is guided."""
    pipe = tpl.pipeline(name)
    model = pipe.transformer
    _, calls = tpl.record(pipe, name)
    inputs = {k: v for k, v in calls[0]["inputs"].items() if k != "return_dict"}
    inputs["isolate_modalities"] = True
    batch = inputs["hidden_states"].shape[0]
    g = torch.Generator().manual_seed(3)
    negative = torch.randn(1, 9, inputs["encoder_hidden_states"].shape[-1], generator=g)
    with torch.no_grad():
        stock_video, stock_audio = model(**inputs, return_dict=False)
    with nag.denoiser.apply_to_denoiser(
        model,
        {"encoder_hidden_states": negative},
        positive_reference=inputs["encoder_hidden_states"][batch // 2 :],
        **SETTINGS,
    ):
        wrapped = {
            n for n, m in model.named_modules() if isinstance(getattr(m, "processor", None), nag.attention.NAGProcessor)
        }
        assert wrapped == {f"transformer_blocks.{i}.attn2" for i in range(len(model.transformer_blocks))}
        with torch.no_grad():
            video, audio = model(**inputs, return_dict=False)
    assert torch.equal(audio, stock_audio)
    assert torch.equal(video[: batch // 2], stock_video[: batch // 2])
    assert (video[batch // 2 :] - stock_video[batch // 2 :]).abs().max() > 1e-4


def test_connector_hook_is_removed_and_other_ltx2_pipelines_are_refused():
    pipe = tpl.pipeline("ltx2")
    hooks = len(pipe.connectors._forward_hooks)
    with nag.apply(pipe, tpl.NEGATIVE, **SETTINGS):
        assert len(pipe.connectors._forward_hooks) == hooks + 1
    assert len(pipe.connectors._forward_hooks) == hooks
    from diffusers import LTX2InContextPipeline

    other = LTX2InContextPipeline(
        **{
            k: v
            for k, v in pipe.components.items()
            if k in LTX2InContextPipeline._get_signature_keys(LTX2InContextPipeline)[0]
        }
    )
    with pytest.raises(NotImplementedError, match="LTX2InContextPipeline.*LTX2Pipeline, LTX2ImageToVideoPipeline"):
        nag.apply(other, tpl.NEGATIVE)
