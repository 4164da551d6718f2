"""Lumina-Image 2.0: per-sample [caption, image, padding] rows."""

from __future__ import annotations

from typing import Any

import torch

from ..attention import JOINT_ROWS_PER_SAMPLE
from ..settings import FamilyDefaults
from ..spec import MASK, TEXT, Family, ModuleKind, PipelineSpec, TextPath


def _lumina2_text_start(
    block: torch.nn.Module, text: torch.Tensor, temb: torch.Tensor
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Lumina2 joint block, negative caption tokens, before attention: the modulated norm (``LuminaRMSNormZero``,
    from the row's timestep embedding) and the gates and scale of the rest of the block."""
    normed, gate_msa, scale_mlp, gate_mlp = block.norm1(text, temb)
    return normed, {
        "residual": text,
        "gates": (gate_msa.unsqueeze(1).tanh(), gate_mlp.unsqueeze(1).tanh()),
        "scale_mlp": 1 + scale_mlp.unsqueeze(1),
    }


def _lumina2_text_finish(block: torch.nn.Module, saved: dict[str, Any], attention: torch.Tensor) -> torch.Tensor:
    """... after attention (its output projection included): the gated residuals of attention and feed-forward, as
    ``Lumina2TransformerBlock`` computes them."""
    gate_msa, gate_mlp = saved["gates"]
    x = saved["residual"] + gate_msa * block.norm2(attention)
    return x + gate_mlp * block.ffn_norm2(block.feed_forward(block.ffn_norm1(x) * saved["scale_mlp"]))


FAMILIES = (
    # Lumina2: the caption (embedded without the timestep, refined by its own unmodulated blocks) and the
    # image are joined per sample as [caption (its valid length), image, padding]; the image's offset and
    # its rotary positions depend on each sample's caption length; a (batch, text) mask with the valid
    # tokens first. Whole negative rows; the joint blocks' wrapper works per sample.
    Family(
        name="lumina2",
        denoisers=("Lumina2Transformer2DModel",),
        attention=((r"layers\.\d+\.attn", JOINT_ROWS_PER_SAMPLE),),
        layout="concat",
        mask_kwarg="encoder_attention_mask",
        negative_keys=("encoder_hidden_states", "encoder_attention_mask"),
        row_kwargs=("timestep",),
        row_text_lengths=lambda arguments: [int(n) for n in arguments["encoder_attention_mask"].sum(1).tolist()],
        stock_image_kwargs=("input", "image_rotary_emb", "temb", "x", "conditioning_embedding"),
        # fast path: the joint layers run on the stock rows with each negative caption beside them (its own rotary
        # positions and mask; the guided image's tokens and tables as keys), the patch embedding, the image refiner
        # and the final norm on the stock rows: the negative rows' image tokens are never processed
        modules={
            ModuleKind.SAMPLE_BLOCK: r"layers\.\d+",
            ModuleKind.STOCK_ROW_MODULE: r"x_embedder|noise_refiner\.\d+|norm_out",
        },
        text_path=TextPath(_lumina2_text_start, _lumina2_text_finish, text_first=True, rotary="image_rotary_emb"),
    ),
)


PIPELINES = (
    # Lumina-Image 2.0: no published NAG defaults; SD3.5's (the closest published multi-step DiT with CFG).
    PipelineSpec(
        "Lumina2Pipeline", "lumina2", "Lumina-Image 2.0", FamilyDefaults(5.0, 2.5, 0.125), (TEXT, MASK, None, None)
    ),
)
