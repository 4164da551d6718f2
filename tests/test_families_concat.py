"""Families whose model forward joins text and image itself: Chroma (and further ones below).

The negative prompt travels as whole extra batch rows ``[negative text, image]`` from the model input on;
every text-attention layer gives those rows the guided rows' image tokens and the model output drops them,
so the image stream stays single. Every configuration runs the invariant checks of ``test_pipelines``
(tiny random-weight pipelines, batch 2 with prompts of different lengths, CFG on) and agrees with the
naive block-by-block reference for negatives shorter and longer than the positive, with partial masks
where the family has masks.
"""

from __future__ import annotations

import test_pipelines as tpl

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


# test_invariants, CFG, NAG alone on its attention path, agreement with the naive reference through the pipeline
# and on the denoiser with one guided row of two (test_pipelines.family_tests)
(test_invariants, test_cfg_unconditional_branch_is_untouched, test_guided_without_cfg_on_its_attention_path,
 test_agrees_with_naive_implementation, test_batch_with_one_guided_row_agrees_with_naive_implementation) = \
    tpl.family_tests(NAMES, STRAIGHTFORWARD_ONLY)
