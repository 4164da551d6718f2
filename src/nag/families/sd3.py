"""Stable Diffusion 3 / 3.5: joint attention over [image, text] (MMDiT)."""

from __future__ import annotations

from ..attention import JOINT
from ..settings import FamilyDefaults
from ..spec import POOLED, TEXT, Family, ModuleKind, PipelineSpec

FAMILIES = (
    Family(
        name="sd3",
        denoisers=("SD3Transformer2DModel",),
        attention=((r"transformer_blocks\.\d+\.attn", JOINT),),
        layout="joint",
        negative_keys=("encoder_hidden_states", "pooled_projections"),
        row_kwargs=("timestep",),
        modules={
            ModuleKind.IMAGE_NORM: r"transformer_blocks\.\d+\.norm1|norm_out",
            ModuleKind.TEXT_PROJECTION: r"context_embedder",
        },
    ),
)


PIPELINES = (
    PipelineSpec(
        "StableDiffusion3Pipeline",
        "sd3",
        "Stable Diffusion 3 / 3.5",
        FamilyDefaults(5.0, 2.5, 0.125),
        (TEXT, None, POOLED, None),
    ),
)
