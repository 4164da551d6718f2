"""Pipelines without a spec of their own: the generic cross-attention path."""

from __future__ import annotations

import logging

import pytest
import test_pipelines as tpl
import tiny_pipelines as tp
import torch
from test_pipelines import PROMPTS, SETTINGS, state_of

import nag


def img2img(custom_denoiser: bool):
    from diffusers import StableDiffusionImg2ImgPipeline, UNet2DConditionModel

    components = tp.FACTORIES["sd"]().components
    if custom_denoiser:  # a denoiser class no adapter names
        class CustomUNet(UNet2DConditionModel):
            pass

        unet = components["unet"]
        custom = CustomUNet.from_config(unet.config)
        custom.load_state_dict(unet.state_dict())
        components["unet"] = custom.eval()
    pipe = StableDiffusionImg2ImgPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, **kwargs):
    image = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    out = pipe(prompt=PROMPTS, image=image, strength=0.75, num_inference_steps=4, guidance_scale=4.0,
               output_type="pt", generator=torch.Generator().manual_seed(0), **kwargs)
    return out.images


@pytest.mark.parametrize("custom_denoiser", [False, True], ids=["known-denoiser", "unknown-denoiser"])
def test_generic_cross_attention_path(custom_denoiser, caplog):
    pipe = img2img(custom_denoiser)
    stock = generate(pipe)
    before = state_of(pipe)
    with caplog.at_level(logging.WARNING, logger="nag"):
        handle = nag.apply(pipe, "blurry, watermark", **SETTINGS)
    assert any("no tuned defaults" in r.getMessage() for r in caplog.records)
    expected_family = "generic:CustomUNet" if custom_denoiser else "unet"
    assert handle.family == expected_family
    with handle:
        guided = generate(pipe)
        assert handle.guided_calls == 3  # strength 0.75 of 4 steps
    assert (guided - stock).abs().max() > 1e-3
    assert state_of(pipe) == before
    with nag.apply(pipe, PROMPTS, **SETTINGS):
        torch.testing.assert_close(generate(pipe), stock, rtol=0, atol=1e-5)

    g = torch.Generator().manual_seed(3)
    negative = {"negative_prompt_embeds": torch.randn(2, 9, pipe.unet.config.cross_attention_dim, generator=g)}
    with nag.apply(pipe, **negative, **SETTINGS):
        _, calls = tpl.record_calls(pipe.unet, generate, pipe)
    with torch.no_grad():
        for call in calls:
            expected = tpl.naive_output("unet", pipe.unet, call["inputs"], negative, cond_rows=[2, 3])
            torch.testing.assert_close(call["output"], expected, rtol=1e-4, atol=1e-5)


def test_pipeline_without_cross_attention_is_refused():
    class NoText:
        transformer = torch.nn.Linear(2, 2)

        def encode_prompt(self, prompt):
            return torch.zeros(1, 2, 2)

    with pytest.raises(NotImplementedError, match="Supported pipelines"):
        nag.apply(NoText(), "blurry")
