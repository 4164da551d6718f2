"""FLUX.1 (and its Kontext, Fill, control variants) and Chroma: Flux's double- and single-stream blocks."""

from __future__ import annotations

from typing import Any

import torch

from ..attention import JOINT, JOINT_ROWS_OUTER_MASK, SINGLE, SINGLE_OUTER_MASK
from ..settings import FamilyDefaults
from ..spec import MASK, POOLED, TEXT, Family, InSequence, ModuleKind, PipelineSpec, TextPath


def _flux_single_text_norm(
    block: torch.nn.Module, text: torch.Tensor, temb: torch.Tensor
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Flux single-stream block, negative text rows, before attention: their modulation."""
    normed, gate = block.norm(text, emb=temb)
    return normed, {"residual": text, "gate": gate}


def _flux_single_text_gate(block: torch.nn.Module, saved: dict[str, Any], projected: torch.Tensor) -> torch.Tensor:
    """... after the block's output projection: gate and residual."""
    out = saved["residual"] + saved["gate"].unsqueeze(1) * projected
    return out.clip(-65504, 65504) if out.dtype == torch.float16 else out


def _flux_single_text_start(
    block: torch.nn.Module, text: torch.Tensor, temb: torch.Tensor
) -> tuple[torch.Tensor, dict[str, Any]]:
    """... beside the block: modulation and MLP branch."""
    normed, saved = _flux_single_text_norm(block, text, temb)
    return normed, {**saved, "mlp": block.act_mlp(block.proj_mlp(normed))}


def _flux_single_text_finish(block: torch.nn.Module, saved: dict[str, Any], attention: torch.Tensor) -> torch.Tensor:
    """... beside the block, after attention: the block's output projection, gate and residual."""
    projected = block.proj_out(torch.cat([attention.to(saved["mlp"].dtype), saved["mlp"]], dim=2))
    return _flux_single_text_gate(block, saved, projected)


FAMILIES = (
    Family(
        name="flux",
        denoisers=("FluxTransformer2DModel",),
        attention=((r"transformer_blocks\.\d+\.attn", JOINT), (r"single_transformer_blocks\.\d+\.attn", SINGLE)),
        layout="joint",
        negative_keys=("encoder_hidden_states", "pooled_projections"),
        row_kwargs=("timestep", "guidance"),
        text_ids_kwarg="txt_ids",
        modules={
            ModuleKind.IMAGE_NORM: r"transformer_blocks\.\d+\.norm1|norm_out",
            ModuleKind.CONCATENATING_BLOCK: r"single_transformer_blocks\.\d+",
            ModuleKind.TEXT_PROJECTION: r"context_embedder",
            ModuleKind.SEQUENCE_NORM: r"single_transformer_blocks\.\d+\.norm",
            ModuleKind.SEQUENCE_PROJECTION: r"single_transformer_blocks\.\d+\.proj_out",
        },
        text_path=TextPath(
            _flux_single_text_start,
            _flux_single_text_finish,
            in_sequence=InSequence(_flux_single_text_norm, _flux_single_text_gate),
        ),
        context_parallel=True,
    ),
    # Chroma: Flux-like blocks whose modulation comes from the timestep alone (a distilled
    # approximator, no pooled text); the model itself joins [text, image] before the single
    # blocks and its mask spans [text, image]: whole negative rows, mask per branch; the double
    # blocks carry the negative text rows only. Every block hands attention the outer product
    # mask[:, None, None, :] * mask[:, None, :, None] (the pipeline's float 0/1 mask: a +1 bias on
    # valid-valid pairs). With the fast path the single blocks run on the stock rows and the negative
    # text takes the block's text path beside them (Flux's single-block structure, `norm(x, emb=temb)`).
    Family(
        name="chroma",
        denoisers=("ChromaTransformer2DModel",),
        attention=(
            (r"transformer_blocks\.\d+\.attn", JOINT_ROWS_OUTER_MASK),
            (r"single_transformer_blocks\.\d+\.attn", SINGLE_OUTER_MASK),
        ),
        layout="concat",
        mask_kwarg="attention_mask",
        mask_covers_image=True,
        negative_keys=("encoder_hidden_states", "encoder_attention_mask"),
        row_kwargs=("timestep",),
        text_ids_kwarg="txt_ids",
        # double blocks: the image stream at the stock batch (its modulation norm takes the stock rows)
        modules={
            ModuleKind.STOCK_IMAGE_BLOCK: r"transformer_blocks\.\d+",
            ModuleKind.IMAGE_NORM: r"transformer_blocks\.\d+\.norm1",
            ModuleKind.JOINED_BLOCK: r"single_transformer_blocks\.\d+",
            ModuleKind.TEXT_PROJECTION: r"context_embedder",
        },
        text_path=TextPath(_flux_single_text_start, _flux_single_text_finish, mask="attention_mask"),
    ),
)


PIPELINES = (
    PipelineSpec(
        "FluxPipeline", "flux", "FLUX.1 (schnell / dev)", FamilyDefaults(5.0, 2.5, 0.25), (TEXT, POOLED, None)
    ),
    PipelineSpec(
        "FluxImg2ImgPipeline", "flux", "FLUX.1 image-to-image", FamilyDefaults(5.0, 2.5, 0.25), (TEXT, POOLED, None)
    ),
    PipelineSpec(
        "FluxInpaintPipeline", "flux", "FLUX.1 inpainting", FamilyDefaults(5.0, 2.5, 0.25), (TEXT, POOLED, None)
    ),
    PipelineSpec(
        "FluxControlPipeline",
        "flux",
        "FLUX.1 Canny/Depth control",
        FamilyDefaults(5.0, 2.5, 0.25),
        (TEXT, POOLED, None),
    ),
    # (the ControlNet's residuals are added to the image tokens of the guided and the stock rows alike)
    PipelineSpec(
        "FluxControlNetPipeline", "flux", "FLUX.1 with ControlNet", FamilyDefaults(5.0, 2.5, 0.25), (TEXT, POOLED, None)
    ),
    PipelineSpec(
        "FluxKontextPipeline", "flux", "FLUX.1 Kontext (editing)", FamilyDefaults(4.0, 2.5, 0.25), (TEXT, POOLED, None)
    ),
    PipelineSpec(
        "FluxKontextInpaintPipeline",
        "flux",
        "FLUX.1 Kontext inpainting",
        FamilyDefaults(4.0, 2.5, 0.25),
        (TEXT, POOLED, None),
    ),
    PipelineSpec(
        "FluxFillPipeline",
        "flux",
        "FLUX.1 Fill (inpainting / outpainting)",
        FamilyDefaults(5.0, 2.5, 0.25),
        (TEXT, POOLED, None),
    ),
    # Chroma: the published Chroma range (scale 3-5, tau 2.5, alpha 0.25); Flux's 5 within it.
    PipelineSpec(
        "ChromaPipeline", "chroma", "Chroma", FamilyDefaults(5.0, 2.5, 0.25), (TEXT, None, MASK, None, None, None)
    ),
    PipelineSpec(
        "ChromaImg2ImgPipeline",
        "chroma",
        "Chroma image-to-image",
        FamilyDefaults(5.0, 2.5, 0.25),
        (TEXT, None, MASK, None, None, None),
    ),
)
