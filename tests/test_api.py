"""The public API: errors that name the fix, defaults, direct denoiser use."""

from __future__ import annotations

import naive_nag
import pytest
import tiny_pipelines as tp
import torch
from test_pipelines import pipeline, state_of

import nag


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(tau=0.0), ValueError, "tau"),
        (dict(tau=-1.0), ValueError, "tau"),
        (dict(alpha=1.2), ValueError, "alpha"),
        (dict(alpha=-0.1), ValueError, "alpha"),
        (dict(start=0.6, end=0.4), ValueError, "start"),
        (dict(scale=0.5), ValueError, "phi"),
        (dict(norm=3), ValueError, "norm"),
        (dict(negative_prompt=3), TypeError, "negative_prompt"),
        (dict(negative_prompt="x", negative_prompt_embeds=torch.zeros(1, 4, 32)), ValueError, "either"),
        (dict(negative_prompt_embeds=torch.zeros(4, 32)), ValueError, "3 dimensions"),
        (dict(negative_prompt_embeds=torch.zeros(1, 4, 32)), ValueError, "negative_pooled_prompt_embeds"),
        (dict(negative_prompt_attention_mask=torch.ones(1, 4)), TypeError, "accepts"),
    ],
)
def test_bad_input_is_rejected_and_nothing_is_left(kwargs, error, match):
    pipe = pipeline("flux")
    before = state_of(pipe)
    with pytest.raises(error, match=match):
        nag.apply(pipe, **kwargs)
    assert state_of(pipe) == before


def test_applying_twice_is_an_error():
    pipe = pipeline("sd")
    with nag.apply(pipe, "blurry"):
        with pytest.raises(RuntimeError, match="already carries NAG"):
            nag.apply(pipe, "blurry")
    nag.apply(pipe, "blurry").remove()  # after removal it can be applied again


def test_unsupported_pipeline_names_the_supported_ones():
    class NotAPipeline:
        pass

    with pytest.raises(NotImplementedError, match="FluxPipeline"):
        nag.apply(NotAPipeline(), "blurry")


def test_family_defaults_and_overrides():
    pipe = pipeline("sd3")
    with nag.apply(pipe, "blurry") as handle:
        assert (handle.settings.scale, handle.settings.tau, handle.settings.alpha) == (5.0, 2.5, 0.125)
        handle.update(scale=7.0)
        assert handle.settings.scale == 7.0
        with pytest.raises(ValueError, match="tau"):
            handle.update(tau=0)
    with nag.apply(pipe, "blurry", scale=2.0, alpha=0.3) as handle:
        assert (handle.settings.scale, handle.settings.tau, handle.settings.alpha) == (2.0, 2.5, 0.3)
    table = nag.supported_pipelines()
    assert table["FluxPipeline"]["scale"] == 5.0 and table["SanaSprintPipeline"]["few_step"]


def test_direct_denoiser_call_with_negative_embeddings_of_another_length():
    """Denoiser level, no pipeline call: every row is guided by the given negative."""
    pipe = pipeline("flux")
    model = tp.denoiser(pipe)
    g = torch.Generator().manual_seed(0)
    rows, text_len, neg_len = 2, 6, 9
    width = model.config.joint_attention_dim
    inputs = dict(
        hidden_states=torch.randn(rows, 16, model.config.in_channels, generator=g),
        encoder_hidden_states=torch.randn(rows, text_len, width, generator=g),
        pooled_projections=torch.randn(rows, model.config.pooled_projection_dim, generator=g),
        timestep=torch.tensor([0.7, 0.7]),
        img_ids=torch.randn(16, 3, generator=g),
        txt_ids=torch.zeros(text_len, 3),
    )
    negative = torch.randn(rows, neg_len, width, generator=g)
    negative_pooled = torch.randn(rows, model.config.pooled_projection_dim, generator=g)
    with torch.no_grad():
        stock = model(**inputs).sample
        with nag.apply(pipe, negative_prompt_embeds=negative, negative_pooled_prompt_embeds=negative_pooled,
                       scale=4.0, tau=2.5, alpha=0.5):
            guided = model(**inputs).sample
        expected = naive_nag.naive_flux_forward(
            model, inputs["hidden_states"], inputs["encoder_hidden_states"], inputs["pooled_projections"],
            inputs["timestep"], inputs["img_ids"], inputs["txt_ids"], None, negative, negative_pooled, None,
            scale=4.0, tau=2.5, alpha=0.5,
        )
        after = model(**inputs).sample
    torch.testing.assert_close(guided, expected, rtol=1e-4, atol=1e-5)
    assert (guided - stock).abs().max() > 1e-3
    assert torch.equal(after, stock)
