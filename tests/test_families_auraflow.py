"""AuraFlow (AuraFlowPipeline): the fast path's shape.

The agreement with the naive reference (fast and straightforward, through the pipeline with CFG and on the denoiser
with one guided row of two; negatives shorter and longer than the prompts) is in ``test_families_concat``. Here: the
fast path never processes the negative rows' image tokens (the patch embedding, the joint blocks' image stream and
the final layers see the stock rows only; the single blocks the stock rows plus one negative ``[registers, text]``
per guided row), and another processor or attention backend takes the straightforward path (each stock processor
called per branch), still agreeing with the reference.
"""

from __future__ import annotations

import pytest
import test_pipelines as tpl
import tiny_pipelines as tp
import torch
from diffusers.models.attention_processor import AuraFlowAttnProcessor2_0

import nag

NAME = "auraflow"
SETTINGS = tpl.SETTINGS


class RowCounter(tpl.InputShapes):
    """Rows and tokens the patch embedding, the joint blocks' image and text feed-forwards, the single blocks'
    feed-forward and the final layers of a model process."""

    def __init__(self, model):
        modules = [("pos_embed", model.pos_embed), ("norm_out", model.norm_out), ("proj_out", model.proj_out)]
        modules += [("joint_ff", block.ff) for block in model.joint_transformer_blocks]
        modules += [("joint_ff_context", block.ff_context) for block in model.joint_transformer_blocks]
        modules += [("single_ff", block.ff) for block in model.single_transformer_blocks]
        super().__init__(modules)


@pytest.mark.parametrize("length_delta", [-3, 5])
def test_fast_path_never_processes_the_negative_rows_image_tokens(length_delta):
    pipe = tpl.pipeline(NAME)
    model = tp.denoiser(pipe)
    negative = tpl.random_negative_for_call(NAME, length_delta, rows=2)
    registers = model.register_tokens.shape[1]
    for fast in (True, False):
        with nag.apply(pipe, **negative, **SETTINGS, fast=fast) as handle:
            counter = RowCounter(model)  # (after NAG's hooks: what the modules themselves get)
            try:
                _, calls = tpl.record(pipe, NAME, cfg=False)
            finally:
                counter.close()
            assert handle.guided_calls == 2
        inputs = calls[0]["inputs"]
        image = inputs["hidden_states"].shape[-2] * inputs["hidden_states"].shape[-1] // model.config.patch_size ** 2
        text = registers + max(inputs["encoder_hidden_states"].shape[1], negative["negative_prompt_embeds"].shape[1])
        joint, single, steps = len(model.joint_transformer_blocks), len(model.single_transformer_blocks), len(calls)
        rows = 2 if fast else 4
        assert [r for r, _ in counter.seen["pos_embed"]] == [rows] * steps
        assert counter.seen["joint_ff"] == [(rows, image)] * joint * steps
        assert counter.seen["joint_ff_context"] == [(4, text)] * joint * steps  # (the negative text in both)
        assert counter.seen["norm_out"] == counter.seen["proj_out"] == [(rows, image)] * steps
        if fast:
            assert sorted(counter.seen["single_ff"]) == sorted([(2, text + image), (2, text)] * single * steps)
        else:
            assert counter.seen["single_ff"] == [(4, text + image)] * single * steps


@pytest.mark.parametrize("change", ["processor", "backend"])
def test_other_processor_or_backend_takes_the_straightforward_path(change):
    pipe = tpl.pipeline(NAME)
    model = tp.denoiser(pipe)
    stock = {name: module.processor for name, module in model.named_modules() if hasattr(module, "processor")}
    for name, module in model.named_modules():
        if name.endswith(".attn"):
            if change == "processor":
                module.set_processor(tpl.own_processor(AuraFlowAttnProcessor2_0))
            else:
                module.processor._attention_backend = "_native_math"
    try:
        negative = tpl.random_negative_for_call(NAME, 5, rows=2)
        with nag.apply(pipe, **negative, **SETTINGS) as handle:
            counts = tpl.count_stock_calls(model)
            _, calls = tpl.record(pipe, NAME, cfg=False)
            assert handle.guided_calls == 2
        blocks = len(model.joint_transformer_blocks) + len(model.single_transformer_blocks)
        assert len(counts) == 2 * blocks * len(calls)  # negative and positive pass per block and call
        with torch.no_grad():
            for call in calls:
                expected = tpl.naive_output(NAME, model, call["inputs"], negative, [0, 1])
                torch.testing.assert_close(call["output"], expected, rtol=1e-4, atol=1e-5)
    finally:
        for name, module in model.named_modules():
            if name in stock:
                module.set_processor(stock[name])
                vars(module.processor).pop("_attention_backend", None)
