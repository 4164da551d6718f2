"""Qwen-Image editing: QwenImageEditPipeline and QwenImageEditPlusPipeline on the qwenimage family.

The reference images' latents join the image stream (``[target, reference...]`` image tokens, the model
output cut back to the target by the pipeline): they are image, never guided text, so the guided image
stream carries them exactly as stock. The reference images also enter the Qwen2.5-VL prompt encoding, and
the negative prompt is encoded with the same images by the pipeline's own ``encode_prompt``.

Tiny random-weight pipelines: a 7-level VAE (64x) keeps the reference images, resized by the pipelines to
about 1024x1024 pixels, at 64 tokens each; the vision tower sees 56x56 pixels (4 tokens). Edit runs a batch
of two prompts with one reference image each; Edit Plus one prompt with two reference images (its prompt
template puts every image into every prompt, so the processor refuses a batch of prompts) and also two
images per prompt (``num_images_per_prompt=2``) against the naive reference.
"""

from __future__ import annotations

import pytest
import test_pipelines as tpl
import tiny_pipelines as tp
import torch

import nag

NAMES = ["qwenimage_edit", "qwenimage_edit_plus"]
TARGET_TOKENS = 4  # 256x256 output, 64x VAE, 2x2 patches
# (Qwen-Image has a fast path: masked joint attention with every token projected once.)
STRAIGHTFORWARD_ONLY: dict[str, str] = {}


test_invariants = tpl.each_configuration(tpl.check_invariants, NAMES)
test_cfg_unconditional_branch_is_untouched = tpl.each_configuration(
    tpl.check_cfg_unconditional_branch_is_untouched, NAMES
)
test_agrees_with_naive_implementation = tpl.each_configuration_and_path(
    tpl.check_agrees_with_naive_implementation, NAMES
)
test_guided_without_cfg_on_its_attention_path = tpl.each_configuration(
    tpl.check_fast_path_never_calls_the_stock_processor, NAMES, straightforward_only=STRAIGHTFORWARD_ONLY
)


@pytest.mark.parametrize("name", NAMES)
def test_conditioning_is_left_unguided(name):
    """The reference-image tokens reach the denoiser exactly as stock (same image stream, same rotary
    shapes), at every step and also with a negative prompt that changes the output; a negative equal to
    the positive gives the stock output."""
    pipe = tpl.pipeline(name)
    _, stock_calls = tpl.record(pipe, name)
    with nag.apply(pipe, tpl.NEGATIVE, **tpl.SETTINGS) as handle:
        guided_out, guided_calls = tpl.record(pipe, name)
        assert handle.guided_calls == 2
    assert len(guided_calls) == len(stock_calls) == 4
    # the first call of the first step has identical inputs in both runs: the reference tokens match exactly
    stock_in, guided_in = stock_calls[0]["inputs"], guided_calls[0]["inputs"]
    reference_tokens = stock_in["hidden_states"][:, TARGET_TOKENS:]
    assert reference_tokens.shape[1] == 64 * (2 if name == "qwenimage_edit_plus" else 1)
    assert torch.equal(guided_in["hidden_states"], stock_in["hidden_states"])
    assert guided_in["img_shapes"] == stock_in["img_shapes"]
    for stock_call, guided_call in zip(stock_calls, guided_calls):  # later steps: the reference part never moves
        assert torch.equal(
            guided_call["inputs"]["hidden_states"][:, TARGET_TOKENS:],
            stock_call["inputs"]["hidden_states"][:, TARGET_TOKENS:],
        )
        assert guided_call["output"].shape == stock_call["output"].shape
    # the image tokens include the reference ones, the negative text rows none of them
    assert stock_in["encoder_hidden_states"].shape[0] == stock_in["hidden_states"].shape[0]

    reference = tpl.stock(name)
    positive = tpl.PROMPTS[0] if name in tp.SINGLE_PROMPT else tpl.PROMPTS
    with nag.apply(pipe, positive, **tpl.SETTINGS):
        out = tpl.generate(pipe, name)
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-5)
    assert (guided_out - reference).abs().max() > 1e-3


def test_negative_prompt_is_encoded_with_the_reference_image():
    """The negative prompt's encoding sees the reference image (its vision tokens): encoded without the
    image it would be a different, shorter embedding."""
    name = "qwenimage_edit"
    pipe = tpl.pipeline(name)
    seen = []
    original = type(pipe)._get_qwen_prompt_embeds

    def spy(self, prompt=None, image=None, device=None, dtype=None):
        seen.append((list(prompt) if isinstance(prompt, (list, tuple)) else [prompt], image))
        return original(self, prompt, image, device, dtype)

    pipe._get_qwen_prompt_embeds = spy.__get__(pipe)
    try:
        with nag.apply(pipe, tpl.NEGATIVE, **tpl.SETTINGS):
            tpl.generate(pipe, name, cfg=False)
    finally:
        del pipe._get_qwen_prompt_embeds
    assert [texts for texts, _ in seen] == [tpl.PROMPTS, [tpl.NEGATIVE] * 2]
    assert seen[0][1] is not None and seen[1][1] is seen[0][1]


def test_edit_plus_two_images_per_prompt_agrees_with_naive_implementation():
    """Batch of two rows (``num_images_per_prompt=2``) with a different precomputed negative per row (one
    longer than the prompt, partial masks), CFG on: the reference images are shared by both rows."""
    name = "qwenimage_edit_plus"
    pipe = tpl.pipeline(name)
    model = tp.denoiser(pipe)
    _, stock_calls = tpl.record(pipe, name, num_images_per_prompt=2)
    assert stock_calls[0]["inputs"]["encoder_hidden_states"].shape[0] == 2
    negative = tpl.random_negative(name, stock_calls[0]["inputs"], 4, seed=8)
    with nag.apply(pipe, **negative, **tpl.SETTINGS):
        _, calls = tpl.record(pipe, name, num_images_per_prompt=2)
    assert len(calls) == 4
    with torch.no_grad():
        for index, call in enumerate(calls):
            if index % 2 == 1:  # unconditional call: stock
                expected = tpl.naive_output(name, model, call["inputs"], None, None)
            else:
                expected = tpl.naive_output(name, model, call["inputs"], negative, [0, 1])
            torch.testing.assert_close(call["output"], expected, rtol=1e-4, atol=1e-5)
