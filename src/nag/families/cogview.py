"""CogView4 and CogVideoX: blocks whose processor joins [text, image] with shared projections."""

from __future__ import annotations

from typing import Any

import torch

from ..attention import JOINT_ROWS_SHARED
from ..settings import FamilyDefaults
from ..spec import TEXT, Family, ModuleKind, PipelineSpec, TextPath


def _cogview4_text_start(
    block: torch.nn.Module, text: torch.Tensor, temb: torch.Tensor
) -> tuple[torch.Tensor, dict[str, Any]]:
    """CogView4 block, negative text rows, before attention: the text's modulated norm (the text chunks, odd ones, of
    the block's 12 modulation chunks)."""
    norm = block.norm1
    chunks = norm.linear(temb).chunk(12, dim=1)
    shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = chunks[1::2]
    normed = norm.norm_context(text).to(dtype=text.dtype) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)
    return normed, {"residual": text, "gate": gate, "mlp": (shift_mlp, scale_mlp, gate_mlp)}


def _cogview4_text_finish(block: torch.nn.Module, saved: dict[str, Any], attention: torch.Tensor) -> torch.Tensor:
    """... after attention (its output projection included): the gated residuals of attention and feed-forward."""
    text = saved["residual"] + attention * saved["gate"].unsqueeze(1)
    shift, scale, gate = saved["mlp"]
    normed = block.norm2_context(text) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)
    return text + block.ff(normed) * gate.unsqueeze(1)


def _cogvideox_text_start(
    block: torch.nn.Module, text: torch.Tensor, temb: torch.Tensor
) -> tuple[torch.Tensor, dict[str, Any]]:
    """CogVideoX block, negative text rows, before attention: the text's modulated norm (the last three of the block's
    six modulation chunks)."""
    norm = block.norm1
    _, _, _, shift, scale, gate = norm.linear(norm.silu(temb)).chunk(6, dim=1)
    normed = norm.norm(text) * (1 + scale)[:, None, :] + shift[:, None, :]
    return normed, {"residual": text, "gate": gate[:, None, :], "temb": temb}


def _cogvideox_text_finish(block: torch.nn.Module, saved: dict[str, Any], attention: torch.Tensor) -> torch.Tensor:
    """... after attention (its output projection included): the gated residuals of attention and feed-forward (the
    feed-forward acts on every token alone: the text's part of the block's joint feed-forward)."""
    text = saved["residual"] + saved["gate"] * attention
    norm = block.norm2
    _, _, _, shift, scale, gate = norm.linear(norm.silu(saved["temb"])).chunk(6, dim=1)
    normed = norm.norm(text) * (1 + scale)[:, None, :] + shift[:, None, :]
    return text + gate[:, None, :] * block.ff(normed)


def _cogvideox_text_length(denoiser: torch.nn.Module) -> int | None:
    """CogVideoX's patch embedding adds positions over ``[max_text_seq_length text, video]``."""
    embed = getattr(denoiser, "patch_embed", None)
    if getattr(embed, "use_positional_embeddings", False) or getattr(embed, "use_learned_positional_embeddings", False):
        return int(embed.max_text_seq_length)
    return None


FAMILIES = (
    # CogView4: one stream of blocks whose processor joins [text, image], projects both with shared
    # weights (output projection included) and splits them again; modulation from the timestep and
    # the size conditions alone; image-only rotary tables; an optional (batch, text) mask.
    Family(
        name="cogview4",
        denoisers=("CogView4Transformer2DModel",),
        attention=((r"transformer_blocks\.\d+\.attn1", JOINT_ROWS_SHARED),),
        layout="concat",
        mask_kwarg="attention_mask",
        negative_keys=("encoder_hidden_states", "encoder_attention_mask"),
        row_kwargs=("timestep", "original_size", "target_size", "crop_coords"),
        # fast path: the image stream at the stock batch from the patch embedding to the output projection (the
        # final norm's modulation takes the stock rows of the conditioning); the blocks run on the stock rows, the
        # negative text beside them; the negative rows get copies of the guided rows' output only after the
        # output projection
        modules={
            ModuleKind.IMAGE_NORM: r"norm_out",
            ModuleKind.STOCK_IMAGE_ENTRY: r"patch_embed",
            ModuleKind.IMAGE_FIRST_BLOCK: r"transformer_blocks\.\d+",
            ModuleKind.STOCK_ROW_MODULE: r"proj_out",
        },
        text_path=TextPath(_cogview4_text_start, _cogview4_text_finish),
    ),
    # CogVideoX: the model joins [text, video] for its patch embedding (with sincos positions over
    # both in the 2b models: the text must then be `max_text_seq_length` long) and splits them
    # again; every block's processor joins them once more with shared projections (output
    # projection included); video-only rotary tables (5b); timestep-only modulation; no mask.
    Family(
        name="cogvideox",
        denoisers=("CogVideoXTransformer3DModel",),
        attention=((r"transformer_blocks\.\d+\.attn1", JOINT_ROWS_SHARED),),
        layout="concat",
        row_kwargs=("timestep", "timestep_cond", "ofs"),
        text_length=_cogvideox_text_length,
        # fast path: the blocks run on the stock rows, the negative text beside them (the patch embedding joins
        # [text, video]: the negative rows keep their copy of the video between the blocks, no block computes on it)
        modules={ModuleKind.IMAGE_FIRST_BLOCK: r"transformer_blocks\.\d+"},
        text_path=TextPath(_cogvideox_text_start, _cogvideox_text_finish),
    ),
)


PIPELINES = (
    # CogView4: no published NAG defaults; Flux's (the closest published joint-attention
    # flow-matching model) are used.
    PipelineSpec("CogView4Pipeline", "cogview4", "CogView4", FamilyDefaults(5.0, 2.5, 0.25), (TEXT, None)),
    # CogVideoX: no published NAG defaults; Wan 2.1's with CFG (the closest published text-to-video
    # DiT, multi-step with CFG) are used.
    PipelineSpec(
        "CogVideoXPipeline", "cogvideox", "CogVideoX text-to-video", FamilyDefaults(9.0, 2.5, 0.25), (TEXT, None)
    ),
    # CogVideoX image-to-video: the encoded image enters as latent channels concatenated to the noisy
    # video (and, in 1.5, an `ofs` embedding in the modulation); the negative rows carry copies of both,
    # so only the text differs between the branches.
    PipelineSpec(
        "CogVideoXImageToVideoPipeline",
        "cogvideox",
        "CogVideoX image-to-video",
        FamilyDefaults(9.0, 2.5, 0.25),
        (TEXT, None),
    ),
)
