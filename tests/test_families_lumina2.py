"""Lumina-Image 2.0 (Lumina2Pipeline): the fast path's shape.

The agreement with the naive reference (fast and straightforward, through the pipeline with CFG and on the denoiser
with one guided row of two; negatives shorter and longer than the prompts, with partial masks) is in
``test_families_last``. Here: the fast path never processes the negative rows' image tokens (the patch embedding,
the image refiner and the final norm see the stock rows only; the joint layers the stock rows cut to their longest
valid length plus one negative caption per guided row), and another processor or attention backend takes the
straightforward path (whole negative rows, each stock processor called per branch), still agreeing with the
reference.
"""

from __future__ import annotations

import pytest
import test_pipelines as tpl
import tiny_pipelines as tp
import torch
from diffusers.models.transformers.transformer_lumina2 import Lumina2AttnProcessor2_0

import nag

NAME = "lumina2"
SETTINGS = tpl.SETTINGS
IMAGE = 4  # 32px -> 4x4 latent -> 2x2 patches


class TokenCounter(tpl.InputShapes):
    """Rows and tokens the patch embedding, every image refiner layer, joint-layer feed-forward and the final norm
    of a model process."""

    def __init__(self, model):
        modules = [("x_embedder", model.x_embedder), ("norm_out", model.norm_out)]
        modules += [("noise_refiner", m) for m in model.noise_refiner]
        modules += [("feed_forward", layer.feed_forward) for layer in model.layers]
        super().__init__(modules)


@pytest.mark.parametrize("length_delta", [-3, 5])
def test_fast_path_never_processes_the_negative_rows_image_tokens(length_delta):
    pipe = tpl.pipeline(NAME)
    model = tp.denoiser(pipe)
    negative = tpl.random_negative_for_call(NAME, length_delta, rows=2)
    negatives = [int(n) for n in negative["negative_prompt_attention_mask"].sum(1).tolist()]
    assert len(set(negatives)) == 2  # (partial masks: the negative captions' valid lengths differ)
    for fast in (True, False):
        with nag.apply(pipe, **negative, **SETTINGS, fast=fast) as handle:
            counter = TokenCounter(model)  # (after NAG's hooks: what the modules themselves get)
            try:
                _, calls = tpl.record(pipe, NAME, cfg=False)
            finally:
                counter.close()
            assert handle.guided_calls == 2
        captions = [int(n) for n in calls[0]["inputs"]["encoder_attention_mask"].sum(1).tolist()]
        assert len(set(captions)) == 2  # (the prompts' valid lengths differ: the image offsets differ per row)
        full = max(IMAGE + n for n in captions + negatives)
        layers, steps = len(model.layers), len(calls)
        if fast:
            stock = max(IMAGE + n for n in captions)
            assert counter.seen["x_embedder"] == [(2, IMAGE)] * steps
            assert counter.seen["noise_refiner"] == [(2, IMAGE)] * len(model.noise_refiner) * steps
            assert counter.seen["norm_out"] == [(2, full)] * steps
            assert sorted(counter.seen["feed_forward"]) == sorted([(2, stock), (2, max(negatives))] * layers * steps)
        else:
            assert counter.seen["x_embedder"] == [(4, IMAGE)] * steps
            assert counter.seen["noise_refiner"] == [(4, IMAGE)] * len(model.noise_refiner) * steps
            assert counter.seen["norm_out"] == [(4, full)] * steps
            assert counter.seen["feed_forward"] == [(4, full)] * layers * steps


@pytest.mark.parametrize("change", ["processor", "backend"])
def test_other_processor_or_backend_takes_the_straightforward_path(change):
    pipe = tpl.pipeline(NAME)
    model = tp.denoiser(pipe)
    stock = {name: module.processor for name, module in model.named_modules() if hasattr(module, "processor")}
    for name, module in model.named_modules():
        if name.startswith("layers.") and name.endswith(".attn"):
            if change == "processor":
                module.set_processor(tpl.own_processor(Lumina2AttnProcessor2_0))
            else:
                module.processor._attention_backend = "_native_math"
    try:
        negative = tpl.random_negative_for_call(NAME, 5, rows=2)
        with nag.apply(pipe, **negative, **SETTINGS) as handle:
            counts = tpl.count_stock_calls(model)
            counter = TokenCounter(model)
            try:
                _, calls = tpl.record(pipe, NAME, cfg=False)
            finally:
                counter.close()
            assert handle.guided_calls == 2
        assert len(counts) == 2 * len(model.layers) * len(calls)  # negative and positive pass per layer and call
        assert all(rows == 4 for rows, _ in counter.seen["feed_forward"])  # whole negative rows through the layers
        with torch.no_grad():
            for call in calls:
                expected = tpl.naive_output(NAME, model, call["inputs"], negative, [0, 1])
                torch.testing.assert_close(call["output"], expected, rtol=1e-4, atol=1e-5)
    finally:
        for name, module in model.named_modules():
            if name in stock:
                module.set_processor(stock[name])
                vars(module.processor).pop("_attention_backend", None)
