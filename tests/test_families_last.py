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

import nag
import test_families_more as tfm
import test_pipelines as tpl
import tiny_pipelines as tp

NAMES = ["cogvideox_i2v"]
STRAIGHTFORWARD_ONLY = {
    "cogvideox_i2v": "CogVideoXAttnProcessor2_0 on whole negative rows: straightforward wrappers only",
}
SETTINGS = tpl.SETTINGS


@pytest.mark.parametrize("name", NAMES)
def test_invariants(name):
    tpl.check_off_is_bit_identical(name)
    tpl.check_negative_equal_to_positive_is_unguided(name)
    tpl.check_negative_prompt_changes_the_output(name)
    tpl.check_removal_restores_everything(name)
    tfm.check_exception_inside_a_generation_leaves_nothing_behind(name)
    tpl.check_steps_outside_the_window_are_stock(name)


@pytest.mark.parametrize("name", NAMES)
def test_cfg_unconditional_branch_is_untouched(name):
    tpl.check_cfg_unconditional_branch_is_untouched(name)


@pytest.mark.parametrize("name", NAMES)
def test_guided_without_cfg_on_its_attention_path(name):
    tpl.check_fast_path_never_calls_the_stock_processor(name, fast_path=name not in STRAIGHTFORWARD_ONLY)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "straightforward"])
@pytest.mark.parametrize("name", NAMES)
def test_agrees_with_naive_implementation(name, fast):
    tfm.test_agrees_with_naive_implementation(name, fast)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "straightforward"])
@pytest.mark.parametrize("name", NAMES)
def test_batch_with_one_guided_row_agrees_with_naive_implementation(name, fast):
    tfm.test_batch_with_one_guided_row_agrees_with_naive_implementation(name, fast)


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
    """The conditioning reaches every guided call exactly as the pipeline sets it (as in the stock run),
    the negative rows see the guided rows' conditioning (a negative equal to the positive prompt gives
    the stock output on the denoiser), and only the text tells the branches apart."""
    pipe = tpl.pipeline(name)
    model = tp.denoiser(pipe)
    _, stock_calls = tpl.record(pipe, name)
    with nag.apply(pipe, tpl.NEGATIVE, **SETTINGS) as handle:
        _, guided_calls = tpl.record(pipe, name)
        assert handle.guided_calls == 2
    key, index = CONDITIONING[name]
    assert len(stock_calls) == len(guided_calls)
    for stock, guided in zip(stock_calls, guided_calls):
        assert torch.equal(guided["inputs"][key][index], stock["inputs"][key][index])
    assert (guided_calls[-1]["output"] - stock_calls[-1]["output"]).abs().max() > 1e-4
    # On the denoiser: different conditioning per row, the negative text equal to the conditional row's
    # text -> the stock output (the negative rows carry the guided rows' conditioning, not their own).
    inputs = {k: v for k, v in stock_calls[0]["inputs"].items() if k not in ("return_dict", "attention_kwargs")}
    assert not torch.equal(inputs[key][index][0], inputs[key][index][-1])
    rows = tpl.batch_rows(name)
    text = inputs["encoder_hidden_states"]
    with torch.no_grad():
        stock = model(**inputs, return_dict=False)[0]
        with nag.denoiser.apply_to_denoiser(model, {"encoder_hidden_states": text[-rows:]}, fast=False,
                                            positive_reference=text[-rows:], **SETTINGS):
            same = model(**inputs, return_dict=False)[0]
    torch.testing.assert_close(same, stock, rtol=0, atol=1e-5)
