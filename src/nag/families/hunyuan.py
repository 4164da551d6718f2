"""HunyuanVideo, HunyuanImage 2.1 and HunyuanVideo 1.5: [image, text] double and single blocks."""

from __future__ import annotations

from typing import Any

import torch

from ..attention import JOINT_ROWS_IMAGE_FIRST
from ..settings import FamilyDefaults
from ..spec import MASK, POOLED, TEXT, Family, ModuleKind, PipelineSpec, TextPath


def _hunyuanvideo_single_text_start(
    block: torch.nn.Module, text: torch.Tensor, temb: torch.Tensor
) -> tuple[torch.Tensor, dict[str, Any]]:
    """HunyuanVideo single-stream block, negative text rows, before attention: the modulated norm and the MLP branch.
    The text is modulated by its row's embedding in the token-replace blocks too (their timestep-0 modulation is the
    first latent frame's)."""
    norm = block.norm
    shift, scale, gate = norm.linear(norm.silu(temb)).chunk(3, dim=1)
    normed = norm.norm(text) * (1 + scale[:, None]) + shift[:, None]
    return normed, {"residual": text, "gate": gate, "mlp": block.act_mlp(block.proj_mlp(normed))}


def _hunyuanvideo_single_text_finish(
    block: torch.nn.Module, saved: dict[str, Any], attention: torch.Tensor
) -> torch.Tensor:
    """... after attention: the block's output projection, gate and residual."""
    out = block.proj_out(torch.cat([attention, saved["mlp"]], dim=2))
    return saved["gate"].unsqueeze(1) * out + saved["residual"]


# HunyuanVideo's block arrangement (HunyuanVideo, HunyuanImage 2.1): whole negative rows through [image, text] blocks.
_HUNYUAN_ROWS: dict[str, Any] = dict(
    attention=((r"(single_)?transformer_blocks\.\d+\.attn", JOINT_ROWS_IMAGE_FIRST),),
    layout="concat",
    mask_kwarg="encoder_attention_mask",
    static_text=False,  # (the token refiner depends on the timestep)
)
# The fast path of HunyuanVideo's block arrangement (HunyuanVideo, HunyuanImage 2.1): the video or image stream at the
# stock batch from the patch embedding to the output projection (the double blocks' and the final layer's image-side
# modulation take the stock rows of the conditioning, token-replace embedding included); the single blocks run on the
# stock rows, the negative text beside them; the negative rows get copies of the guided rows' output only after the
# output projection.
_HUNYUAN_FAST_PATH: dict[str, Any] = dict(
    modules={
        ModuleKind.IMAGE_NORM: r"transformer_blocks\.\d+\.norm1|norm_out",
        ModuleKind.STOCK_IMAGE_ENTRY: r"x_embedder",
        ModuleKind.IMAGE_FIRST_BLOCK: r"single_transformer_blocks\.\d+",
        ModuleKind.STOCK_ROW_MODULE: r"proj_out",
    },
    text_path=TextPath(_hunyuanvideo_single_text_start, _hunyuanvideo_single_text_finish),
)


FAMILIES = (
    # HunyuanVideo: [video, text] attention in double blocks (separate text projections) and single
    # blocks (shared projections); the token refiner makes the text depend on the timestep and on
    # its mask, and the modulation includes the pooled CLIP embedding: whole negative rows (text,
    # mask, pooled embedding) from the model input on; the model's [video, text] mask is cut per branch.
    Family(
        name="hunyuanvideo",
        denoisers=("HunyuanVideoTransformer3DModel",),
        negative_keys=("encoder_hidden_states", "pooled_projections", "encoder_attention_mask"),
        row_kwargs=("timestep", "guidance"),
        **_HUNYUAN_ROWS,
        **_HUNYUAN_FAST_PATH,
    ),
    # HunyuanImage 2.1: HunyuanVideo's [image, text] double and single blocks and timestep-dependent token
    # refiner (masked), modulation from the timestep (and guidance / meanflow timestep) alone, and a second
    # text stream (byT5 glyph text, its own mask) that the model joins per sample with the first as
    # [valid byT5, valid text, padding] before the blocks: whole negative rows carry both negative streams;
    # the padding NAG adds to the shorter first stream ends up last, where the blocks' wrapper cuts it off.
    Family(
        name="hunyuanimage",
        denoisers=("HunyuanImageTransformer2DModel",),
        negative_keys=(
            "encoder_hidden_states",
            "encoder_attention_mask",
            "encoder_hidden_states_2",
            "encoder_attention_mask_2",
        ),
        row_kwargs=("timestep", "timestep_r", "guidance"),
        **_HUNYUAN_ROWS,
        **_HUNYUAN_FAST_PATH,
    ),
    # HunyuanVideo 1.5: HunyuanImage's arrangement on video: [video, text] double blocks only (separate text
    # projections), a timestep-dependent token refiner (masked), modulation from the timestep (and the meanflow
    # timestep) alone, and the model joins per sample [valid image-embedding tokens (image-to-video; zeros and
    # masked in text-to-video), valid byT5, valid text, then the invalid ones] before the blocks. Whole negative
    # rows carry both negative text streams and the guided rows' image embedding; the processor takes a
    # text-only key mask, cut per branch.
    Family(
        name="hunyuanvideo15",
        denoisers=("HunyuanVideo15Transformer3DModel",),
        attention=((r"transformer_blocks\.\d+\.attn", JOINT_ROWS_IMAGE_FIRST),),
        layout="concat",
        mask_kwarg="encoder_attention_mask",
        negative_keys=(
            "encoder_hidden_states",
            "encoder_attention_mask",
            "encoder_hidden_states_2",
            "encoder_attention_mask_2",
        ),
        row_kwargs=("timestep", "timestep_r", "image_embeds"),
        static_text=False,
        # fast path: the video stream at the stock batch from the patch embedding to the output projection (the
        # blocks' and the final layer's video-side modulation take the stock rows of the timestep embedding)
        modules={
            ModuleKind.IMAGE_NORM: r"transformer_blocks\.\d+\.norm1|norm_out",
            ModuleKind.STOCK_IMAGE_ENTRY: r"x_embedder",
            ModuleKind.STOCK_ROW_MODULE: r"proj_out",
        },
    ),
)


PIPELINES = (
    PipelineSpec(
        "HunyuanVideoPipeline",
        "hunyuanvideo",
        "HunyuanVideo text-to-video",
        FamilyDefaults(9.0, 2.5, 0.12),
        (TEXT, POOLED, MASK),
    ),
    # HunyuanVideo image-to-video (`latent_concat`: the encoded image as latent channels; `token_replace`: as the
    # first latent frame, modulated as at timestep 0): the negative rows carry copies of the guided rows' image
    # tokens. The image also enters the Llava prompt encoding (its vision tokens before the text), so the negative
    # prompt is encoded with the same image. HunyuanVideo's defaults.
    PipelineSpec(
        "HunyuanVideoImageToVideoPipeline",
        "hunyuanvideo",
        "HunyuanVideo image-to-video",
        FamilyDefaults(9.0, 2.5, 0.12),
        (TEXT, POOLED, MASK),
    ),
    # HunyuanImage 2.1 (CFG through its guider component, one call per branch; the distilled model without):
    # no published NAG defaults; FLUX.1's (the closest published flow-matching image DiT) are used. The
    # negative prompt is encoded by the pipeline's encode_prompt into both streams (its quoted text into byT5).
    PipelineSpec(
        "HunyuanImagePipeline",
        "hunyuanimage",
        "HunyuanImage 2.1",
        FamilyDefaults(5.0, 2.5, 0.25),
        (TEXT, MASK, "encoder_hidden_states_2", "encoder_attention_mask_2"),
    ),
    # HunyuanVideo 1.5 (CFG through its guider component, one call per branch, conditional first): no published
    # NAG defaults; HunyuanVideo's (the same makers' previous video model) are used. The negative prompt is
    # encoded by the pipeline's encode_prompt into both streams (its quoted text into byT5).
    PipelineSpec(
        "HunyuanVideo15Pipeline",
        "hunyuanvideo15",
        "HunyuanVideo 1.5 text-to-video",
        FamilyDefaults(9.0, 2.5, 0.12),
        (TEXT, MASK, "encoder_hidden_states_2", "encoder_attention_mask_2"),
    ),
    # HunyuanVideo 1.5 image-to-video: the image enters as latent channels and as SigLIP image embeddings the model
    # joins before the text; the negative rows carry the guided rows' copies of both. The prompt encoding is text
    # only. The text-to-video pipeline's defaults.
    PipelineSpec(
        "HunyuanVideo15ImageToVideoPipeline",
        "hunyuanvideo15",
        "HunyuanVideo 1.5 image-to-video",
        FamilyDefaults(9.0, 2.5, 0.12),
        (TEXT, MASK, "encoder_hidden_states_2", "encoder_attention_mask_2"),
    ),
)
