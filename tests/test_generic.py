"""Pipelines without a spec of their own: the generic cross-attention path."""

from __future__ import annotations

import logging

import pytest
import torch

import naive_nag
import nag
import tiny_pipelines as tp
from test_pipelines import Recorder, state_of

PROMPTS = ["a red circle on a blue background", "a small green square"]
SETTINGS = dict(scale=3.0, tau=2.5, alpha=0.5)


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

    negative = torch.randn(2, 9, pipe.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(3))
    with nag.apply(pipe, negative_prompt_embeds=negative, **SETTINGS):
        recorder = Recorder(pipe.unet)
        try:
            generate(pipe)
        finally:
            recorder.close()
    with torch.no_grad():
        for call in recorder.calls:
            expected = naive_nag.naive_cross_attention_forward(
                pipe.unet, "unet", {k: v for k, v in call["inputs"].items() if k != "return_dict"}, negative, None,
                cond_rows=[2, 3], p=1, **SETTINGS,
            )
            torch.testing.assert_close(call["output"], expected, rtol=1e-4, atol=1e-5)


def test_pipeline_without_cross_attention_is_refused():
    class NoText:
        transformer = torch.nn.Linear(2, 2)

        def encode_prompt(self, prompt):
            return torch.zeros(1, 2, 2)

    with pytest.raises(NotImplementedError, match="Supported pipelines"):
        nag.apply(NoText(), "blurry")
