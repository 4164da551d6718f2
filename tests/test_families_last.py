"""Image-to-video pipelines of supported families, and the last text-conditioned families.

Every configuration runs the invariant checks of ``test_pipelines`` (tiny random-weight pipelines, batch 2 with
prompts of different lengths, CFG on) and agrees with the naive block-by-block reference in ``naive_nag`` for
negatives shorter and longer than the positive. ``test_conditioning_is_left_unguided`` shows, per image-to-video,
edit or inpainting pipeline, that the image/video conditioning reaches the denoiser exactly as the pipeline sets it in
guided calls and that only the text differs between the guided branches.
"""

from __future__ import annotations

import pytest
import test_pipelines as tpl

NAMES = ["cogvideox_i2v", "flux2_klein", "flux2_klein_inpaint", "lumina2"]
STRAIGHTFORWARD_ONLY: dict[str, str] = {}  # (every family here has a fast path)
SETTINGS = tpl.SETTINGS


# test_invariants, CFG, NAG alone on its attention path, agreement with the naive reference through the pipeline
# and on the denoiser with one guided row of two (test_pipelines.family_tests)
(test_invariants, test_cfg_unconditional_branch_is_untouched, test_guided_without_cfg_on_its_attention_path,
 test_agrees_with_naive_implementation, test_batch_with_one_guided_row_agrees_with_naive_implementation) = \
    tpl.family_tests(NAMES, STRAIGHTFORWARD_ONLY)


# ---------------------------------------------------------------------------------------------
# image / video conditioning
# ---------------------------------------------------------------------------------------------

# The part of each denoiser call that carries the image conditioning: (argument, index into it).
CONDITIONING = {
    # the encoded image: latent channels 4: of the (B, F, C, H, W) input
    "cogvideox_i2v": ("hidden_states", (slice(None), slice(None), slice(4, None))),
    # the encoded (masked) image: the 16 condition tokens after the 16 noisy ones of the packed (B, tokens, C) input
    "flux2_klein_inpaint": ("hidden_states", (slice(None), slice(16, None))),
}


@pytest.mark.parametrize("name", list(CONDITIONING))
def test_conditioning_is_left_unguided(name):
    tpl.check_conditioning_is_left_unguided(name, [CONDITIONING[name]])


def test_inpainting_keeps_the_kept_region():
    """FLUX.2 klein inpainting: the region the mask keeps is the encoded image's in the result, as stock; the
    repainted region is guided."""
    import tiny_pipelines as tp
    import torch

    import nag

    name = "flux2_klein_inpaint"
    pipe = tpl.pipeline(name)
    stock = tpl.generate(pipe, name, output_type="latent")
    with nag.apply(pipe, tpl.NEGATIVE, **SETTINGS) as handle:
        guided = tpl.generate(pipe, name, output_type="latent")
        assert handle.guided_calls == 2
    # the mask repaints the right half (the pipeline resizes it to the 4x4 packed grid, 2x2 latent pixels each)
    assert (
        tp.call_kwargs(name)["mask_image"][..., :8].max() == 0
        and tp.call_kwargs(name)["mask_image"][..., 8:].min() == 1
    )
    repainted = torch.zeros_like(stock, dtype=torch.bool)
    repainted[..., stock.shape[-1] // 2 :] = True
    assert torch.equal(guided[~repainted], stock[~repainted])
    assert (guided[repainted] - stock[repainted]).abs().max() > 1e-4
