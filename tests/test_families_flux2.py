"""FLUX.2 dev (Flux2Pipeline) on the flux2 family.

FLUX.2 dev is guidance-distilled: its pipeline has no CFG and no negative prompt, so NAG is its only negative
prompt. The tiny pipeline (``tiny_pipelines.flux2``: a random-weight Mistral3 text encoder, the Flux2 transformer
with a guidance embedding) runs the invariant checks of ``test_pipelines`` (batch 2, prompts of different lengths)
and agrees with the naive block-by-block reference ``naive_nag.naive_flux2_forward`` for negatives shorter and
longer than the positive, through the pipeline (every call guided), on the denoiser with one guided row of two, and
with reference images (their latents enter as extra image tokens after the noisy ones).
"""

from __future__ import annotations

import pytest
import test_pipelines as tpl
import tiny_pipelines as tp
import torch

import nag

NAMES = ["flux2"]
STRAIGHTFORWARD_ONLY: dict[str, str] = {}  # (FLUX.2 has a fast path: double blocks at the stock image batch,
# single blocks on the stock rows with the negative text beside them)
SETTINGS = tpl.SETTINGS


test_invariants = tpl.each_configuration(tpl.check_invariants, NAMES)
test_guided_without_cfg_on_its_attention_path = tpl.each_configuration(
    tpl.check_fast_path_never_calls_the_stock_processor, NAMES, straightforward_only=STRAIGHTFORWARD_ONLY)


def test_spec_and_defaults():
    pipe = tpl.pipeline("flux2")
    spec = nag.families.pipeline_spec(pipe)
    assert (spec.pipeline, spec.family, spec.few_step) == ("Flux2Pipeline", "flux2", False)
    assert (spec.defaults.scale, spec.defaults.tau, spec.defaults.alpha) == (5.0, 2.5, 0.25)
    assert tp.CFG_INFO["flux2"]["mode"] is None  # no CFG: every denoiser call is a guided one


def _reference_images():
    return [tp._pil_frame(21, size=64), tp._pil_frame(22, size=64)]  # the pipeline needs at least 64 px


@pytest.mark.parametrize("with_images", [False, True], ids=["text", "reference_images"])
@pytest.mark.parametrize("fast", [True, False], ids=["fast", "straightforward"])
@pytest.mark.parametrize("name", NAMES)
def test_agrees_with_naive_implementation(name, fast, with_images):
    """Through the pipeline: every call guided (no CFG), the guidance embedding as the pipeline sets it."""
    pipe = tpl.pipeline("flux2")
    model = tp.denoiser(pipe)
    extra = {"image": _reference_images()} if with_images else {}
    _, stock_calls = tpl.record(pipe, "flux2", **extra)
    first = stock_calls[0]["inputs"]
    assert first["guidance"] is not None and torch.all(first["guidance"] == 4.0)
    if with_images:  # the reference images' tokens follow the noisy latents' (16 of them)
        assert first["hidden_states"].shape[1] > 16
    with torch.no_grad():  # the reference itself reproduces the stock model
        torch.testing.assert_close(tpl.naive_output(name, model, first, None), stock_calls[0]["output"],
                                   rtol=1e-4, atol=1e-5)
    for length_delta in (-3, 5):
        negative = tpl.random_negative(name, first, length_delta)
        with nag.apply(pipe, **negative, **SETTINGS, fast=fast) as handle:
            _, calls = tpl.record(pipe, "flux2", **extra)
            assert handle.guided_calls == 2
        assert len(calls) == 2  # 2 steps, one call each
        with torch.no_grad():
            for call in calls:
                expected = tpl.naive_output(name, model, call["inputs"], negative, list(range(call["output"].shape[0])))
                torch.testing.assert_close(call["output"], expected, rtol=1e-4, atol=1e-5)
        if with_images:  # the reference image tokens reach every guided call as the pipeline sets them
            for stock, guided in zip(stock_calls, calls):
                torch.testing.assert_close(guided["inputs"]["img_ids"], stock["inputs"]["img_ids"], rtol=0, atol=0)
            torch.testing.assert_close(calls[0]["inputs"]["hidden_states"], first["hidden_states"], rtol=0, atol=0)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "straightforward"])
@pytest.mark.parametrize("name", NAMES)
def test_batch_with_one_guided_row_agrees_with_naive_implementation(name, fast):
    """On the denoiser: two rows of different texts, only row 1 guided (row 0 stock)."""
    tpl.check_batch_with_one_guided_row_agrees_with_naive_implementation(name, fast)


@pytest.mark.parametrize("name", NAMES)
def test_conditioning_is_left_unguided(name):
    """Reference images: the negative rows carry the guided rows' image tokens, reference images included (a
    negative equal to the positive gives the stock result), and only the text tells the branches apart."""
    pipe = tpl.pipeline("flux2")
    images = _reference_images()
    reference, stock_calls = tpl.record(pipe, "flux2", image=images)
    with nag.apply(pipe, tpl.PROMPTS, **SETTINGS) as handle:
        same = tpl.generate(pipe, "flux2", image=images)
        assert handle.guided_calls == 2
    torch.testing.assert_close(same, reference, rtol=0, atol=1e-5)
    with nag.apply(pipe, tpl.NEGATIVE, **SETTINGS):
        _, guided_calls = tpl.record(pipe, "flux2", image=images)
    # the first step's inputs are the same in both runs: only the guidance tells the outputs apart
    assert (guided_calls[0]["output"] - stock_calls[0]["output"]).abs().max() > 1e-3
