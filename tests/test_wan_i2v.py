"""Wan 2.1-style image-to-video: the transformer attends to CLIP image features before the text.
NAG guides the text branch only; the image branch is added unguided."""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest
import test_pipelines as tpl
import tiny_pipelines as tp
import torch
from PIL import Image
from test_pipelines import PROMPTS, SETTINGS, state_of

import nag


@cache
def pipeline():
    return tp.wan_i2v()


def generate(pipe, cfg=True):
    image = Image.fromarray((np.random.RandomState(0).rand(32, 32, 3) * 255).astype("uint8"))
    out = pipe(image=image, prompt=PROMPTS, height=32, width=32, num_frames=5, num_inference_steps=2,
               guidance_scale=4.0 if cfg else 1.0, max_sequence_length=512, output_type="pt",
               generator=torch.Generator().manual_seed(0))
    return out.frames


def test_invariants():
    pipe = pipeline()
    stock = generate(pipe)
    before = state_of(pipe)
    with nag.apply(pipe, "blurry, watermark", scale=1.0):
        assert torch.equal(generate(pipe), stock)
    with nag.apply(pipe, PROMPTS, **SETTINGS):
        torch.testing.assert_close(generate(pipe), stock, rtol=0, atol=1e-5)
    with nag.apply(pipe, "blurry, watermark", **SETTINGS) as handle:
        guided = generate(pipe)
        assert handle.guided_calls == 2
    assert (guided - stock).abs().max() > 1e-3
    assert state_of(pipe) == before
    assert torch.equal(generate(pipe), stock)


def test_agrees_with_naive_implementation():
    pipe = pipeline()
    model = pipe.transformer
    negative = {"negative_prompt_embeds": torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(7))}
    with nag.apply(pipe, **negative, **SETTINGS):
        _, calls = tpl.record_calls(model, generate, pipe)
    with torch.no_grad():
        for index, call in enumerate(calls):
            guided = index % 2 == 0  # cond call first, then uncond
            expected = tpl.naive_output("wan", model, call["inputs"], negative if guided else None,
                                        cond_rows=[0, 1] if guided else None)
            torch.testing.assert_close(call["output"], expected, rtol=1e-4, atol=1e-5)


def test_straightforward_path_refuses_image_context():
    pipe = pipeline()
    before = state_of(pipe)
    with nag.apply(pipe, "blurry", fast=False, **SETTINGS):
        with pytest.raises(NotImplementedError, match="fast=True"):
            generate(pipe)
    assert state_of(pipe) == before
