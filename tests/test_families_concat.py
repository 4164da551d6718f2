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
import torch

import naive_nag
import nag
import test_pipelines as tpl
import tiny_pipelines as tp

# (ChromaInpaintPipeline is left out: in diffusers 0.42.1 it reads `transformer.config.guidance_embeds`,
# which ChromaTransformer2DModel's config lacks, and fails before the first step without NAG too.)
NAMES = ["chroma", "chroma_img2img", "auraflow"]
# No NAG-aware fast path for these yet: `fast=True` runs the straightforward wrappers (each stock processor
# once per branch), and the negative rows carry a copy of the image tokens through the blocks' MLPs.
STRAIGHTFORWARD_ONLY = {
    **{name: "FluxAttnProcessor with a [text, image] mask on whole negative rows: straightforward wrappers only"
       for name in ("chroma", "chroma_img2img")},
    "auraflow": "AuraFlowAttnProcessor2_0 on whole negative rows: straightforward wrappers only",
}
SETTINGS = tpl.SETTINGS


@pytest.mark.parametrize("name", NAMES)
def test_invariants(name):
    tpl.check_invariants(name)


@pytest.mark.parametrize("name", NAMES)
def test_cfg_unconditional_branch_is_untouched(name):
    tpl.check_cfg_unconditional_branch_is_untouched(name)


@pytest.mark.parametrize("name", NAMES)
def test_guided_without_cfg_on_its_attention_path(name):
    """NAG alone guides every step; these families have no fast path: ``fast=True`` falls back to the
    straightforward wrappers (each stock processor called per branch)."""
    tpl.check_fast_path_never_calls_the_stock_processor(name, fast_path=name not in STRAIGHTFORWARD_ONLY)


# ---------------------------------------------------------------------------------------------
# agreement with the naive reference
# ---------------------------------------------------------------------------------------------


def random_negative(name, inputs, length_delta):
    """Negative embeddings of another token length, with a partial mask where the family has masks."""
    g = torch.Generator().manual_seed(7)
    text = inputs["encoder_hidden_states"]
    rows, length = text.shape[0], text.shape[1] + length_delta
    negative = {"negative_prompt_embeds": torch.randn(rows, length, text.shape[2], generator=g)}
    if name.startswith("chroma"):
        mask = torch.ones(rows, length)
        mask[0, -3:] = 0
        mask[1, -1:] = 0
        negative["negative_prompt_attention_mask"] = mask
    return negative


def naive_output(name, model, inputs, negative, cond_rows=None):
    neg_text = None if negative is None else negative["negative_prompt_embeds"]
    neg_mask = None if negative is None else negative.get("negative_prompt_attention_mask")
    nag_settings = {**SETTINGS, "p": 1}
    if name.startswith("chroma"):
        return naive_nag.naive_chroma_forward(
            model, inputs["hidden_states"], inputs["encoder_hidden_states"], inputs["timestep"], inputs["img_ids"],
            inputs["txt_ids"], inputs.get("attention_mask"), neg_text, neg_mask, cond_rows=cond_rows, **nag_settings,
        )
    if name == "auraflow":
        return naive_nag.naive_auraflow_forward(
            model, inputs["hidden_states"], inputs["encoder_hidden_states"], inputs["timestep"], neg_text,
            cond_rows=cond_rows, **nag_settings,
        )
    raise KeyError(name)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "straightforward"])
@pytest.mark.parametrize("name", NAMES)
def test_agrees_with_naive_implementation(name, fast):
    """Through the pipeline with CFG: conditional rows guided, unconditional rows or calls stock."""
    pipe = tpl.pipeline(name)
    model = pipe.transformer
    sequential = tp.CFG_INFO[name]["mode"] == "sequential"
    _, stock_calls = tpl.record(pipe, name)
    with torch.no_grad():  # the reference itself reproduces the stock model
        torch.testing.assert_close(naive_output(name, model, stock_calls[0]["inputs"], None),
                                   stock_calls[0]["output"], rtol=1e-4, atol=1e-5)
    rows = len(tpl.PROMPTS)
    cond_inputs = {k: (v[-rows:] if k == "encoder_hidden_states" else v) for k, v in stock_calls[0]["inputs"].items()}
    for length_delta in (-3, 5):
        negative = random_negative(name, cond_inputs, length_delta)
        with nag.apply(pipe, **negative, **SETTINGS, fast=fast):
            _, calls = tpl.record(pipe, name)
        assert len(calls) == (4 if sequential else 2)  # 2 steps, CFG on
        with torch.no_grad():
            for index, call in enumerate(calls):
                if sequential:  # cond call (guided), then uncond call (stock)
                    expected = naive_output(name, model, call["inputs"], None if index % 2 else negative)
                else:  # [uncond, cond] rows
                    expected = naive_output(name, model, call["inputs"], negative, cond_rows=[2, 3])
                torch.testing.assert_close(call["output"], expected, rtol=1e-4, atol=1e-5)


def denoiser_batch(name):
    """A denoiser call with two rows [uncond, cond] of different texts (and masks) and one guided row."""
    pipe = tpl.pipeline(name)
    _, calls = tpl.record(pipe, name)
    if tp.CFG_INFO[name]["mode"] == "sequential":  # one call per branch: cond first
        cond, uncond = calls[0]["inputs"], calls[1]["inputs"]
        pick = lambda key: torch.cat([uncond[key][:1], cond[key][1:]])  # noqa: E731
    else:  # one call [uncond_0, uncond_1, cond_0, cond_1]: take uncond_0 and cond_1
        cond = calls[0]["inputs"]
        pick = lambda key: cond[key][[0, 3]]  # noqa: E731
    inputs = {k: v for k, v in cond.items() if k not in ("return_dict", "joint_attention_kwargs", "attention_kwargs")}
    for key in ("hidden_states", "encoder_hidden_states", "attention_mask", "timestep"):
        if isinstance(cond.get(key), torch.Tensor) and cond[key].ndim >= 1 and cond[key].shape[0] == calls[0]["output"].shape[0]:
            inputs[key] = pick(key)
    return pipe.transformer, inputs


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "straightforward"])
@pytest.mark.parametrize("name", NAMES)
def test_batch_with_one_guided_row_agrees_with_naive_implementation(name, fast):
    """On the denoiser: row 0 unconditional (stock), row 1 guided, different texts and masks per row."""
    model, inputs = denoiser_batch(name)
    for length_delta in (-3, 5):
        negative = random_negative(name, inputs, length_delta)
        negative = {k: v[1:] for k, v in negative.items()}
        keys = {"negative_prompt_embeds": "encoder_hidden_states", "negative_prompt_attention_mask": "encoder_attention_mask"}
        with nag.denoiser.apply_to_denoiser(model, {keys[k]: v for k, v in negative.items()}, fast=fast,
                                            positive_reference=inputs["encoder_hidden_states"][1:], **SETTINGS):
            with torch.no_grad():
                out = model(**inputs, return_dict=False)[0]
        with torch.no_grad():
            stock = model(**inputs, return_dict=False)[0]
            expected = naive_output(name, model, inputs, negative, cond_rows=[1])
        assert out.shape == stock.shape
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out[0], stock[0], rtol=0, atol=1e-6)
        assert (out[1] - stock[1]).abs().max() > 1e-4
