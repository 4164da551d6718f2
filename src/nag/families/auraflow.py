"""AuraFlow: register tokens, joint blocks, then single blocks over [registers, text, image]."""

from __future__ import annotations

from typing import Any

import torch

from ..attention import JOINT_ROWS, SINGLE_PROJECTED
from ..settings import FamilyDefaults
from ..spec import TEXT, Family, ModuleKind, PipelineSpec, TextPath


def _auraflow_single_text_start(
    block: torch.nn.Module, text: torch.Tensor, temb: torch.Tensor
) -> tuple[torch.Tensor, dict[str, Any]]:
    """AuraFlow single block, negative ``[register tokens, text]`` rows, before attention: the modulated norm."""
    normed, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(text, emb=temb)
    return normed, {"residual": text, "gates": (gate_msa, shift_mlp, scale_mlp, gate_mlp)}


def _auraflow_single_text_finish(
    block: torch.nn.Module, saved: dict[str, Any], attention: torch.Tensor
) -> torch.Tensor:
    """... after attention (its output projection included): as ``AuraFlowSingleTransformerBlock`` finishes."""
    gate_msa, shift_mlp, scale_mlp, gate_mlp = saved["gates"]
    x = block.norm2(saved["residual"] + gate_msa.unsqueeze(1) * attention)
    x = x * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    return saved["residual"] + gate_mlp.unsqueeze(1) * block.ff(x)


FAMILIES = (
    # AuraFlow: register tokens before the text, joint blocks, then single blocks over the
    # [registers, text, image] the model joins itself; timestep-only modulation, no mask.
    Family(
        name="auraflow",
        denoisers=("AuraFlowTransformer2DModel",),
        attention=(
            (r"joint_transformer_blocks\.\d+\.attn", JOINT_ROWS),
            (r"single_transformer_blocks\.\d+\.attn", SINGLE_PROJECTED),
        ),
        layout="concat",
        row_kwargs=("timestep",),
        text_prefix=lambda denoiser: int(denoiser.register_tokens.shape[1]),
        stock_image_kwargs=("latent", "x", "conditioning_embedding", "input"),
        # fast path: the joint blocks run the image stream at the stock batch (their image-side norm takes the
        # stock rows of the timestep embedding; the text keeps its rows), the single blocks run on the stock rows
        # with the negative [registers, text] beside them, the patch embedding and the final layers on the stock
        # rows: the negative rows' image tokens are never processed
        modules={
            ModuleKind.IMAGE_NORM: r"joint_transformer_blocks\.\d+\.norm1",
            ModuleKind.STOCK_ROW_MODULE: r"pos_embed|joint_transformer_blocks\.\d+|norm_out|proj_out",
            ModuleKind.JOINED_BLOCK: r"single_transformer_blocks\.\d+",
            ModuleKind.TEXT_PROJECTION: r"context_embedder",
        },
        text_path=TextPath(_auraflow_single_text_start, _auraflow_single_text_finish),
    ),
)


PIPELINES = (
    # AuraFlow: no published NAG defaults; SD3.5's (the closest published MMDiT) are used.
    # (its encode_prompt's mask has already zeroed the padding of the embeddings; the transformer takes no mask)
    PipelineSpec(
        "AuraFlowPipeline",
        "auraflow",
        "AuraFlow",
        FamilyDefaults(5.0, 2.5, 0.125),
        (TEXT, None, None, None),
        unused_negative_names=("negative_prompt_attention_mask",),
    ),
)
