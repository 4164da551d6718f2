"""FLUX.2 (dev, klein): Flux-like double blocks and parallel single blocks."""

from __future__ import annotations

from typing import Any

import torch

from ..attention import JOINT, SINGLE_FUSED
from ..settings import FamilyDefaults
from ..spec import TEXT, Family, ModuleKind, PipelineSpec, TextPath


def _flux2_single_text_start(
    block: torch.nn.Module, text: torch.Tensor, modulation: torch.Tensor
) -> tuple[torch.Tensor, dict[str, Any]]:
    """FLUX.2 single-stream block, negative text rows, before attention: the modulated norm (the block's shift, scale
    and gate are the three chunks of its per-row modulation)."""
    shift, scale, gate = (modulation.unsqueeze(1) if modulation.ndim == 2 else modulation).chunk(3, dim=-1)
    return (1 + scale) * block.norm(text) + shift, {"residual": text, "gate": gate}


def _flux2_single_text_finish(block: torch.nn.Module, saved: dict[str, Any], attention: torch.Tensor) -> torch.Tensor:
    """... after attention (the fused attention + MLP output): gate and residual."""
    out = saved["residual"] + saved["gate"] * attention
    return out.clip(-65504, 65504) if out.dtype == torch.float16 else out


FAMILIES = (
    # Flux2 (FLUX.2 dev / klein): Flux-like double blocks ([text, image], separate text projections),
    # then the model joins [text, image] for parallel single blocks whose one output projection mixes
    # attention and MLP (NAG combines the attention columns before it); all modulation comes from the
    # timestep (and guidance) alone; text positions count along the text (padding never attended); no mask.
    # The double blocks run the image stream at the stock batch (negative text rows only); with the fast path
    # the single blocks run on the stock rows and the negative text takes the block's text path beside them.
    Family(
        name="flux2",
        denoisers=("Flux2Transformer2DModel",),
        attention=((r"transformer_blocks\.\d+\.attn", JOINT), (r"single_transformer_blocks\.\d+\.attn", SINGLE_FUSED)),
        layout="concat",
        row_kwargs=("timestep", "guidance"),
        text_ids_kwarg="txt_ids",
        stock_image_kwargs=("temb_mod_img",),
        modules={
            ModuleKind.STOCK_IMAGE_BLOCK: r"transformer_blocks\.\d+",
            ModuleKind.JOINED_BLOCK: r"single_transformer_blocks\.\d+",
            ModuleKind.TEXT_PROJECTION: r"context_embedder",
        },
        text_path=TextPath(_flux2_single_text_start, _flux2_single_text_finish, modulation="temb_mod"),
        context_parallel=True,
    ),
)


PIPELINES = (
    # FLUX.2 klein: no published NAG defaults; FLUX.1's (the closest published family) are used.
    PipelineSpec("Flux2KleinPipeline", "flux2", "FLUX.2 klein", FamilyDefaults(5.0, 2.5, 0.25), (TEXT, None)),
    PipelineSpec(
        "Flux2KleinInpaintPipeline", "flux2", "FLUX.2 klein inpainting", FamilyDefaults(5.0, 2.5, 0.25), (TEXT, None)
    ),
    # FLUX.2 dev: the same transformer with a guidance embedding, Mistral-Small-3 text (Mistral3); guidance-
    # distilled, so no CFG and no negative prompt in the pipeline: NAG is its only negative prompt. No published
    # NAG defaults; FLUX.1's (the closest published family) are used.
    PipelineSpec("Flux2Pipeline", "flux2", "FLUX.2 dev", FamilyDefaults(5.0, 2.5, 0.25), (TEXT, None)),
)
