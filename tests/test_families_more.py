"""Further text-conditioned families: CogView4, CogVideoX, HunyuanVideo (and the families below them in this file).

Every configuration runs the invariant checks of ``test_pipelines`` (tiny random-weight pipelines, batch 2
with prompts of different lengths where the pipeline allows it, CFG on) and agrees with the naive
block-by-block reference in ``naive_nag`` for negatives shorter and longer than the positive, with partial
masks where the family has masks. Image conditioning (control images) is left as the pipeline sets it.
"""

from __future__ import annotations

import pytest
import torch

import nag
import test_pipelines as tpl
import tiny_pipelines as tp

NAMES = ["cogview4", "cogvideox", "hunyuanvideo"]
# No NAG-aware fast path for these: `fast=True` runs the straightforward wrappers (each stock processor once
# per branch), and the negative rows carry a copy of the image tokens through the blocks' MLPs.
STRAIGHTFORWARD_ONLY = {
    "cogview4": "CogView4AttnProcessor on whole negative rows: straightforward wrappers only",
    "cogvideox": "CogVideoXAttnProcessor2_0 on whole negative rows: straightforward wrappers only",
}  # (HunyuanVideo has a fast path: the video stream at the stock batch, the negative text beside it)
SETTINGS = tpl.SETTINGS


# test_invariants, CFG, NAG alone on its attention path, agreement with the naive reference through the pipeline
# and on the denoiser with one guided row of two (test_pipelines.family_tests)
(test_invariants, test_cfg_unconditional_branch_is_untouched, test_guided_without_cfg_on_its_attention_path,
 test_agrees_with_naive_implementation, test_batch_with_one_guided_row_agrees_with_naive_implementation) = \
    tpl.family_tests(NAMES, STRAIGHTFORWARD_ONLY)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "straightforward"])
def test_cogvideox_with_text_positions_pads_the_negative_to_the_model_text_length(fast):
    """CogVideoX 2b style: sincos positions over [max_text_seq_length text, video] (zero on the text part). A
    shorter negative is padded to the model's text length; each branch attends over its own tokens only."""
    _, inputs = tpl.denoiser_batch("cogvideox")
    model = tp._tiny_cogvideox_transformer(rotary=False, seed=4)
    inputs = {**inputs, "image_rotary_emb": None}
    negative = tpl.random_negative("cogvideox", inputs, -5, rows=1)
    with nag.denoiser.apply_to_denoiser(model, {"encoder_hidden_states": negative["negative_prompt_embeds"]}, fast=fast,
                                        positive_reference=inputs["encoder_hidden_states"][1:], **SETTINGS):
        with torch.no_grad():
            out = model(**inputs, return_dict=False)[0]
    with torch.no_grad():
        stock = model(**inputs, return_dict=False)[0]
        expected = tpl.naive_output("cogvideox", model, inputs, negative, cond_rows=[1])
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[0], stock[0], rtol=0, atol=1e-6)
    assert (out[1] - stock[1]).abs().max() > 1e-4
