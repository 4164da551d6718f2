"""Image-to-video pipelines of supported families, and the last text-conditioned families.

Every configuration runs the invariant checks of ``test_pipelines`` (tiny random-weight pipelines, batch 2 with
prompts of different lengths, CFG on) and agrees with the naive block-by-block reference in ``naive_nag`` for
negatives shorter and longer than the positive. ``test_conditioning_is_left_unguided`` shows, per image-to-video
or edit pipeline, that the image/video conditioning reaches the denoiser exactly as the pipeline sets it in
guided calls and that only the text differs between the guided branches.
"""

from __future__ import annotations

import pytest
import torch

import naive_nag
import nag
import test_families_more as tfm
import test_pipelines as tpl
import tiny_pipelines as tp

NAMES = ["cogvideox_i2v", "flux2_klein", "lumina2"]
STRAIGHTFORWARD_ONLY = {
    "cogvideox_i2v": "CogVideoXAttnProcessor2_0 on whole negative rows: straightforward wrappers only",
    "lumina2": "Lumina2AttnProcessor2_0 on whole negative rows of per-sample lengths: straightforward wrappers only",
    "flux2_klein": "Flux2AttnProcessor / Flux2ParallelSelfAttnProcessor on whole negative rows: straightforward wrappers only",
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
    tpl.check_fast_path_never_calls_the_stock_processor(name, fast_path=name not in STRAIGHTFORWARD_ONLY)


# Families whose text mask marks the valid tokens as a prefix (the negative masks here keep that form).
PREFIX_MASKED = {"lumina2"}


def random_negative(name, inputs, length_delta, rows=None):
    """Negative embeddings of another token length, with a partial (prefix) mask where the family has masks."""
    negative = tfm.random_negative(name, inputs, length_delta, rows)
    if name in PREFIX_MASKED:
        text = negative["negative_prompt_embeds"]
        mask = torch.ones(text.shape[:2])
        mask[0, -3:] = 0
        mask[-1, -1:] = 0
        negative["negative_prompt_attention_mask"] = mask
    return negative


def naive_output(name, model, inputs, negative, cond_rows=None):
    neg_text = None if negative is None else negative["negative_prompt_embeds"]
    nag_settings = {**SETTINGS, "p": 1}
    if name.startswith("flux2"):
        return naive_nag.naive_flux2_forward(
            model, inputs["hidden_states"], inputs["encoder_hidden_states"], inputs["timestep"], inputs["img_ids"],
            inputs["txt_ids"], inputs.get("guidance"), neg_text, cond_rows=cond_rows, **nag_settings,
        )
    if name == "lumina2":
        return naive_nag.naive_lumina2_forward(
            model, inputs["hidden_states"], inputs["timestep"], inputs["encoder_hidden_states"],
            inputs["encoder_attention_mask"], neg_text, negative.get("negative_prompt_attention_mask") if negative else None,
            cond_rows=cond_rows, **nag_settings,
        )
    return tfm.naive_output(name, model, inputs, negative, cond_rows)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "straightforward"])
@pytest.mark.parametrize("name", NAMES)
def test_agrees_with_naive_implementation(name, fast):
    """Through the pipeline with CFG: conditional rows guided, unconditional rows or calls stock."""
    tfm.check_agrees_with_naive_implementation(name, fast, naive_output, random_negative)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "straightforward"])
@pytest.mark.parametrize("name", NAMES)
def test_batch_with_one_guided_row_agrees_with_naive_implementation(name, fast):
    """On the denoiser: row 0 unconditional (stock), row 1 guided, different texts per row."""
    model, inputs = tfm.denoiser_batch(name)
    for length_delta in (-3, 5):
        negative = random_negative(name, inputs, length_delta, rows=1)
        keys = {"negative_prompt_embeds": "encoder_hidden_states", "negative_prompt_attention_mask": "encoder_attention_mask"}
        with nag.denoiser.apply_to_denoiser(model, {keys[k]: v for k, v in negative.items()}, fast=fast, positive_reference=inputs["encoder_hidden_states"][1:],
                                            **SETTINGS):
            with torch.no_grad():
                out = model(**inputs, return_dict=False)[0]
        with torch.no_grad():
            stock = model(**inputs, return_dict=False)[0]
            expected = naive_output(name, model, inputs, negative, cond_rows=[1])
        assert out.shape == stock.shape
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out[0], stock[0], rtol=0, atol=1e-6)
        assert (out[1] - stock[1]).abs().max() > 1e-4


# ---------------------------------------------------------------------------------------------
# image / video conditioning
# ---------------------------------------------------------------------------------------------

# The part of each denoiser call that carries the image conditioning: (argument, index into it).
CONDITIONING = {
    # the encoded image: latent channels 4: of the (B, F, C, H, W) input
    "cogvideox_i2v": ("hidden_states", (slice(None), slice(None), slice(4, None))),
}


@pytest.mark.parametrize("name", list(CONDITIONING))
def test_conditioning_is_left_unguided(name):
    check_conditioning_is_left_unguided(name, [CONDITIONING[name]])


def check_conditioning_is_left_unguided(name, parts, **overrides):
    """The conditioning reaches every guided call exactly as the pipeline sets it (as in the stock run),
    the negative rows see the guided rows' conditioning (a negative equal to the positive prompt gives
    the stock output on the denoiser), and only the text tells the branches apart.

    ``parts``: ``(argument, index into it)`` of the denoiser calls that carry the conditioning; the first one
    is made to differ between the rows for the denoiser check where the pipeline gives every row the same.
    ``overrides``: call arguments (see ``tpl.generate``)."""
    pipe = tpl.pipeline(name)
    model = tp.denoiser(pipe)
    _, stock_calls = tpl.record(pipe, name, **overrides)
    with nag.apply(pipe, tpl.NEGATIVE, **SETTINGS) as handle:
        _, guided_calls = tpl.record(pipe, name, **overrides)
        assert handle.guided_calls == 2
    assert len(stock_calls) == len(guided_calls)
    for stock, guided in zip(stock_calls, guided_calls):
        for key, index in parts:
            assert torch.equal(guided["inputs"][key][index], stock["inputs"][key][index]), key
    assert (guided_calls[-1]["output"] - stock_calls[-1]["output"]).abs().max() > 1e-4
    # On the denoiser: different conditioning per row, the negative text equal to the conditional row's
    # text -> the stock output (the negative rows carry the guided rows' conditioning, not their own).
    inputs = {k: v for k, v in stock_calls[0]["inputs"].items() if k not in ("return_dict", "attention_kwargs")}
    key, index = parts[0]
    if torch.equal(inputs[key][index][0], inputs[key][index][-1]):
        inputs[key] = inputs[key].clone()
        inputs[key][index][-1] = inputs[key][index][-1].flip(-1) + 0.5
    assert not torch.equal(inputs[key][index][0], inputs[key][index][-1])
    rows = tpl.batch_rows(name)
    family = nag.families.FAMILIES[nag.families.pipeline_spec(pipe).family]
    negative = {k: inputs[k][-rows:] for k in family.negative_keys if inputs.get(k) is not None}
    with torch.no_grad():
        stock = model(**inputs, return_dict=False)[0]
        with nag.denoiser.apply_to_denoiser(model, negative, fast=False,
                                            positive_reference=inputs["encoder_hidden_states"][-rows:], **SETTINGS):
            same = model(**inputs, return_dict=False)[0]
    torch.testing.assert_close(same, stock, rtol=0, atol=1e-5)
