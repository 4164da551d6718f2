"""Further text-conditioned families: CogView4, CogVideoX, HunyuanVideo (and the families below them in this file).

Every configuration runs the invariant checks of ``test_pipelines`` (tiny random-weight pipelines, batch 2
with prompts of different lengths where the pipeline allows it, CFG on) and agrees with the naive
block-by-block reference in ``naive_nag`` for negatives shorter and longer than the positive, with partial
masks where the family has masks. Image conditioning (control images) is left as the pipeline sets it.
"""

from __future__ import annotations

import pytest
import torch

import naive_nag
import nag
import test_pipelines as tpl
import tiny_pipelines as tp

NAMES = ["cogview4", "cogvideox", "hunyuanvideo"]
# No NAG-aware fast path for these: `fast=True` runs the straightforward wrappers (each stock processor once
# per branch), and the negative rows carry a copy of the image tokens through the blocks' MLPs.
STRAIGHTFORWARD_ONLY = {
    "cogview4": "CogView4AttnProcessor on whole negative rows: straightforward wrappers only",
    "cogvideox": "CogVideoXAttnProcessor2_0 on whole negative rows: straightforward wrappers only",
    "hunyuanvideo": "HunyuanVideoAttnProcessor2_0 on whole negative rows: straightforward wrappers only",
}
# Families whose denoiser takes a text mask (checked on the denoiser where the pipeline passes none).
MASKED = {"cogview4", "hunyuanvideo"}
SETTINGS = tpl.SETTINGS


@pytest.mark.parametrize("name", NAMES)
def test_invariants(name):
    tpl.check_invariants(name)


@pytest.mark.parametrize("name", NAMES)
def test_cfg_unconditional_branch_is_untouched(name):
    tpl.check_cfg_unconditional_branch_is_untouched(name)


@pytest.mark.parametrize("name", NAMES)
def test_guided_without_cfg_on_its_attention_path(name):
    tpl.check_fast_path_never_calls_the_stock_processor(name, fast_path=name not in STRAIGHTFORWARD_ONLY)


# ---------------------------------------------------------------------------------------------
# agreement with the naive reference
# ---------------------------------------------------------------------------------------------


def random_negative(name, inputs, length_delta, rows=None):
    """Negative embeddings of another token length, with a partial mask where the family has masks."""
    g = torch.Generator().manual_seed(7)
    text = inputs["encoder_hidden_states"]
    rows = text.shape[0] if rows is None else rows
    length = text.shape[1] + length_delta
    negative = {"negative_prompt_embeds": torch.randn(rows, length, text.shape[2], generator=g)}
    if "pooled_projections" in inputs:
        pooled = inputs["pooled_projections"]
        negative["negative_pooled_prompt_embeds"] = torch.randn(rows, pooled.shape[1], generator=g)
    if name in MASKED:
        mask = torch.ones(rows, length)
        mask[0, -3:] = 0
        if name == "hunyuanvideo":  # the model takes the valid tokens to be a prefix
            mask[-1, -1:] = 0
        else:
            mask[-1, :1] = 0
        negative["negative_prompt_attention_mask"] = mask
    return negative


def naive_output(name, model, inputs, negative, cond_rows=None):
    neg_text = None if negative is None else negative["negative_prompt_embeds"]
    neg_mask = None if negative is None else negative.get("negative_prompt_attention_mask")
    nag_settings = {**SETTINGS, "p": 1}
    if name.startswith("cogview4"):
        return naive_nag.naive_cogview4_forward(
            model, inputs["hidden_states"], inputs["encoder_hidden_states"], inputs["timestep"], inputs["original_size"],
            inputs["target_size"], inputs["crop_coords"], inputs.get("attention_mask"), neg_text, neg_mask,
            cond_rows=cond_rows, **nag_settings,
        )
    if name == "hunyuanvideo":
        neg_pooled = None if negative is None else negative["negative_pooled_prompt_embeds"]
        return naive_nag.naive_hunyuanvideo_forward(
            model, inputs["hidden_states"], inputs["timestep"], inputs["encoder_hidden_states"],
            inputs["encoder_attention_mask"], inputs["pooled_projections"], inputs.get("guidance"), neg_text, neg_mask,
            neg_pooled, cond_rows=cond_rows, **nag_settings,
        )
    if name.startswith("cogvideox"):
        return naive_nag.naive_cogvideox_forward(
            model, inputs["hidden_states"], inputs["encoder_hidden_states"], inputs["timestep"],
            inputs.get("image_rotary_emb"), neg_text, cond_rows=cond_rows, ofs=inputs.get("ofs"), **nag_settings,
        )
    raise KeyError(name)


def cond_rows_of(name, call_index, batch):
    """The guided rows of a recorded guided call, or None for a stock (unconditional) call."""
    mode = tp.CFG_INFO[name]["mode"]
    rows = tpl.batch_rows(name)
    if mode == "sequential":
        return None if call_index % 2 else list(range(batch))
    return list(range(batch - rows, batch))


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "straightforward"])
@pytest.mark.parametrize("name", NAMES)
def test_agrees_with_naive_implementation(name, fast):
    check_agrees_with_naive_implementation(name, fast, naive_output, random_negative)


def check_agrees_with_naive_implementation(name, fast, naive_output, random_negative):
    """Through the pipeline with CFG: conditional rows guided, unconditional rows or calls stock.

    ``naive_output(name, model, inputs, negative, cond_rows)`` is the family's naive forward and
    ``random_negative(name, cond_inputs, length_delta)`` draws precomputed negative embeddings."""
    pipe = tpl.pipeline(name)
    model = tp.denoiser(pipe)
    _, stock_calls = tpl.record(pipe, name)
    with torch.no_grad():  # the reference itself reproduces the stock model
        torch.testing.assert_close(naive_output(name, model, stock_calls[0]["inputs"], None),
                                   stock_calls[0]["output"], rtol=1e-4, atol=1e-5)
    rows = tpl.batch_rows(name)
    cond_inputs = {k: (v[-rows:] if k == "encoder_hidden_states" else v) for k, v in stock_calls[0]["inputs"].items()}
    for length_delta in (-3, 5):
        negative = random_negative(name, cond_inputs, length_delta)
        with nag.apply(pipe, **negative, **SETTINGS, fast=fast):
            _, calls = tpl.record(pipe, name)
        assert len(calls) == (4 if tp.CFG_INFO[name]["mode"] == "sequential" else 2)  # 2 steps, CFG on
        with torch.no_grad():
            for index, call in enumerate(calls):
                cond_rows = cond_rows_of(name, index, call["output"].shape[0])
                expected = naive_output(name, model, call["inputs"], None if cond_rows is None else negative, cond_rows)
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
    batch = calls[0]["output"].shape[0]
    for key, value in cond.items():
        if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == batch:
            inputs[key] = pick(key)
    if name == "cogview4":  # the pipeline passes no mask: a partial positive mask, different per row
        mask = torch.ones(inputs["encoder_hidden_states"].shape[:2])
        mask[0, :2] = 0
        mask[1, :5] = 0
        inputs["attention_mask"] = mask
    return tp.denoiser(pipe), inputs


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "straightforward"])
@pytest.mark.parametrize("name", NAMES)
def test_batch_with_one_guided_row_agrees_with_naive_implementation(name, fast):
    """On the denoiser: row 0 unconditional (stock), row 1 guided, different texts and masks per row."""
    model, inputs = denoiser_batch(name)
    keys = {"negative_prompt_embeds": "encoder_hidden_states", "negative_prompt_attention_mask": "encoder_attention_mask",
            "negative_pooled_prompt_embeds": "pooled_projections"}
    for length_delta in (-3, 5):
        negative = random_negative(name, inputs, length_delta, rows=1)
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


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "straightforward"])
def test_cogvideox_with_text_positions_pads_the_negative_to_the_model_text_length(fast):
    """CogVideoX 2b style: sincos positions over [max_text_seq_length text, video] (zero on the text part). A
    shorter negative is padded to the model's text length; each branch attends over its own tokens only."""
    _, inputs = denoiser_batch("cogvideox")
    model = tp._tiny_cogvideox_transformer(rotary=False, seed=4)
    inputs = {**inputs, "image_rotary_emb": None}
    negative = random_negative("cogvideox", inputs, -5, rows=1)
    with nag.denoiser.apply_to_denoiser(model, {"encoder_hidden_states": negative["negative_prompt_embeds"]}, fast=fast,
                                        positive_reference=inputs["encoder_hidden_states"][1:], **SETTINGS):
        with torch.no_grad():
            out = model(**inputs, return_dict=False)[0]
    with torch.no_grad():
        stock = model(**inputs, return_dict=False)[0]
        expected = naive_output("cogvideox", model, inputs, negative, cond_rows=[1])
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[0], stock[0], rtol=0, atol=1e-6)
    assert (out[1] - stock[1]).abs().max() > 1e-4
