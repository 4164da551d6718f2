"""Video families beyond text-to-video: LTX-Video image-to-video and frame conditions, Wan VACE.

Every configuration runs the invariant checks of ``test_pipelines`` (tiny random-weight pipelines,
CFG on, negatives shorter and longer than the positive, masks where the family has them) and agrees
with the naive reference. The image or video conditioning is never treated as text: LTX's
conditioning frame stays as the pipeline set it, VACE's control video enters the VACE blocks as
their own stream, unchanged.
"""

from __future__ import annotations

import naive_nag
import pytest
import test_pipelines as tpl
import torch

import nag

NAMES = ["ltx_i2v", "ltx_condition", "wan_vace"]
SETTINGS = tpl.SETTINGS


test_invariants = tpl.each_configuration(tpl.check_invariants, NAMES)
test_cfg_unconditional_branch_is_untouched = tpl.each_configuration(
    tpl.check_cfg_unconditional_branch_is_untouched, NAMES
)
test_agrees_with_naive_implementation = tpl.each_configuration_and_path(
    tpl.check_agrees_with_naive_implementation, NAMES
)
test_fast_path_never_calls_the_stock_processor = tpl.each_configuration(
    tpl.check_fast_path_never_calls_the_stock_processor, NAMES
)


@pytest.mark.parametrize("name", ["ltx_i2v", "ltx_condition"])
def test_conditioning_frame_is_left_as_the_pipeline_sets_it(name):
    """The encoded image is the first latent frame; NAG guides the denoised frames only."""
    pipe = tpl.pipeline(name)
    tokens_per_frame = (32 // pipe.vae_spatial_compression_ratio) ** 2
    stock = tpl.generate(pipe, name, output_type="latent")
    with nag.apply(pipe, tpl.NEGATIVE, **SETTINGS):
        guided = tpl.generate(pipe, name, output_type="latent")
    if stock.ndim == 5:  # (B, C, F, H, W) latents
        first, rest = (slice(None), slice(None), slice(0, 1)), (slice(None), slice(None), slice(1, None))
    else:  # packed (B, tokens, C), frame-major
        first, rest = (slice(None), slice(0, tokens_per_frame)), (slice(None), slice(tokens_per_frame, None))
    assert torch.equal(guided[first], stock[first])
    assert (guided[rest] - stock[rest]).abs().max() > 1e-4


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "straightforward"])
def test_wan_vace_batch_of_two_agrees_with_naive_implementation(fast):
    """WanVACEPipeline generates one video per call: check a batch of two on the denoiser itself,
    two different texts and control streams, rows [uncond, cond] with only the cond row guided."""
    pipe = tpl.pipeline("wan_vace")
    model = pipe.transformer
    _, calls = tpl.record(pipe, "wan_vace")
    cond, uncond = calls[0]["inputs"], calls[1]["inputs"]  # one call per branch: cond first
    g = torch.Generator().manual_seed(5)
    inputs = {
        "hidden_states": torch.cat(
            [cond["hidden_states"], cond["hidden_states"] + 0.1 * torch.randn_like(cond["hidden_states"])]
        ),
        "timestep": torch.cat([cond["timestep"], cond["timestep"]]),
        "encoder_hidden_states": torch.cat([uncond["encoder_hidden_states"], cond["encoder_hidden_states"]]),
        "control_hidden_states": torch.cat([cond["control_hidden_states"], cond["control_hidden_states"].flip(0)]),
    }
    inputs["control_hidden_states"][1] += torch.randn(inputs["control_hidden_states"].shape[1:], generator=g)
    negative = torch.randn(1, 11, cond["encoder_hidden_states"].shape[-1], generator=g)
    with nag.denoiser.apply_to_denoiser(
        model,
        {"encoder_hidden_states": negative},
        fast=fast,
        positive_reference=cond["encoder_hidden_states"],
        **SETTINGS,
    ):
        with torch.no_grad():
            out = model(**inputs, return_dict=False)[0]
    with torch.no_grad():
        expected = naive_nag.naive_cross_attention_forward(
            model, "wan_vace", inputs, negative, None, cond_rows=[1], p=1, **SETTINGS
        )
        stock = model(**inputs, return_dict=False)[0]
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[0], stock[0], rtol=0, atol=1e-6)
    assert (out[1] - stock[1]).abs().max() > 1e-4
