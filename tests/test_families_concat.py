"""Families whose model forward joins text and image itself: Chroma (and further ones below).

The negative prompt travels as whole extra batch rows ``[negative text, image]`` from the model input on;
every text-attention layer gives those rows the guided rows' image tokens and the model output drops them,
so the image stream stays single. Every configuration runs the invariant checks of ``test_pipelines``
(tiny random-weight pipelines, batch 2 with prompts of different lengths, CFG on) and agrees with the
naive block-by-block reference for negatives shorter and longer than the positive, with partial masks
where the family has masks.
"""

from __future__ import annotations

import pytest
import test_pipelines as tpl
import torch
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

import nag

# (ChromaInpaintPipeline is left out: in diffusers 0.42.1 it reads `transformer.config.guidance_embeds`,
# which ChromaTransformer2DModel's config lacks, and fails before the first step without NAG too.)
NAMES = ["chroma", "chroma_img2img", "auraflow"]
# No NAG-aware fast path for these yet: `fast=True` runs the straightforward wrappers (each stock processor
# once per branch), and the negative rows carry a copy of the image tokens through the blocks' MLPs.
# (Chroma has a fast path: double blocks at the stock image batch, single blocks on the stock rows with the negative
# text beside them, both under the pipeline's float mask.)
# (AuraFlow has a fast path: joint blocks at the stock image batch, single blocks on the stock rows with the negative
# [registers, text] beside them.)
STRAIGHTFORWARD_ONLY: dict[str, str] = {}
SETTINGS = tpl.SETTINGS


# test_invariants, CFG, NAG alone on its attention path, agreement with the naive reference through the pipeline
# and on the denoiser with one guided row of two (test_pipelines.family_tests)
(test_invariants, test_cfg_unconditional_branch_is_untouched, test_guided_without_cfg_on_its_attention_path,
 test_agrees_with_naive_implementation, test_batch_with_one_guided_row_agrees_with_naive_implementation) = \
    tpl.family_tests(NAMES, STRAIGHTFORWARD_ONLY)


# ---------------------------------------------------------------------------------------------
# Chroma's mask on the fast path (on the denoiser)
# ---------------------------------------------------------------------------------------------
# Every Chroma block hands attention the outer product mask[:, None, None, :] * mask[:, None, :, None] of the model's
# (rows, text + image) mask. The pipeline's mask is float 0/1, which SDPA adds to the scores (+1 on valid-valid
# pairs); a boolean one masks. The fast path takes both whenever the image part is all ones (True); other masks take
# the straightforward wrappers.


def chroma_mask(mask, form, text_len):
    """The pipeline's float 0/1 ``(rows, text + image)`` mask (valid tokens first, a different count per row) in
    another form: ``holes`` also masks tokens inside the valid ones (and, for floats, gives values other than 0 and
    1, more runs of equal values than the kernel path takes); ``bool`` is the boolean mask of the same tokens;
    ``image_part_not_one`` masks one image token (a form the fast path does not take)."""
    mask = mask.clone()
    if form.endswith("holes"):
        mask[1, 1] = 0
        mask[0, text_len - 1] = 1
        if form.startswith("float"):
            mask[0, 3:text_len:2] = 0.5
            mask[1, 2] = 2.0
    if form == "image_part_not_one":
        mask[:, -1] = 0
    return mask.bool() if form.startswith("bool") else mask


MASK_FORMS = ["float", "float_holes", "bool", "bool_holes", "image_part_not_one"]


@pytest.mark.parametrize("guided", [[1], [0, 1]], ids=["row_1", "both_rows"])
@pytest.mark.parametrize("form", MASK_FORMS)
def test_chroma_mask_forms_agree_with_naive_implementation(form, guided):
    """Two rows of different texts and masks, guided rows ``guided`` (the others stock), negatives shorter and longer
    with partial masks: the fast path (never calling the stock processor where it takes the mask) and the
    straightforward one agree with the naive reference; the caller's inputs are left as they were."""
    model, inputs = tpl.denoiser_batch("chroma")
    text_len = inputs["encoder_hidden_states"].shape[1]
    inputs["attention_mask"] = chroma_mask(inputs["attention_mask"], form, text_len)
    given = tpl.snapshot(inputs)
    fast_path = form != "image_part_not_one"
    with torch.no_grad():
        stock = model(**inputs, return_dict=False)[0]
        assert torch.isfinite(stock).all()
        torch.testing.assert_close(tpl.naive_output("chroma", model, inputs, None), stock, rtol=1e-4, atol=1e-5)
    for length_delta in (-3, 5):
        negative = tpl.random_negative("chroma", inputs, length_delta, rows=len(guided))
        outputs = {}
        for fast in (True, False):
            with nag.denoiser.apply_to_denoiser(
                model,
                {tpl.NEGATIVE_KEYS[k]: v for k, v in negative.items()},
                fast=fast,
                positive_reference=inputs["encoder_hidden_states"][guided],
                **SETTINGS,
            ):
                counts = tpl.count_stock_calls(model)
                with torch.no_grad():
                    outputs[fast] = model(**inputs, return_dict=False)[0]
            assert (len(counts) == 0) == (fast and fast_path), (fast, len(counts))
        with torch.no_grad():
            expected = tpl.naive_output("chroma", model, inputs, negative, cond_rows=guided)
        for out in outputs.values():
            torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
            for row in range(2):
                if row in guided:
                    assert (out[row] - stock[row]).abs().max() > 1e-4
                else:
                    torch.testing.assert_close(out[row], stock[row], rtol=0, atol=1e-6)
    for key, value in given.items():
        assert not isinstance(value, torch.Tensor) or torch.equal(inputs[key], value), key


@pytest.mark.parametrize("change", ["processor", "backend"])
def test_chroma_other_processor_or_backend_takes_the_straightforward_path(change):
    """fast=True falls back to the straightforward wrappers (whole negative rows through the single blocks, each
    stock processor called per branch) when the processor is not the stock one or the attention backend is not the
    default, and still agrees with the naive implementation."""
    model, inputs = tpl.denoiser_batch("chroma")
    stock = {name: module.processor for name, module in model.named_modules() if hasattr(module, "processor")}
    for name, module in model.named_modules():
        if name in stock and name.endswith(".attn"):
            if change == "processor":
                module.set_processor(tpl.own_processor(FluxAttnProcessor))
            else:
                module.processor._attention_backend = "_native_math"
    try:
        negative = tpl.random_negative("chroma", inputs, 5, rows=1)
        with nag.denoiser.apply_to_denoiser(
            model,
            {tpl.NEGATIVE_KEYS[k]: v for k, v in negative.items()},
            positive_reference=inputs["encoder_hidden_states"][1:],
            **SETTINGS,
        ):
            counts = tpl.count_stock_calls(model)
            with torch.no_grad():
                out = model(**inputs, return_dict=False)[0]
        blocks = len(model.transformer_blocks) + len(model.single_transformer_blocks)
        assert len(counts) == 2 * blocks  # a negative and a positive pass per block
        with torch.no_grad():
            expected = tpl.naive_output("chroma", model, inputs, negative, cond_rows=[1])
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    finally:
        for name, module in model.named_modules():
            if name in stock:
                module.set_processor(stock[name])
                vars(module.processor).pop("_attention_backend", None)
