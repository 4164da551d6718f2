"""Z-Image (and its image-to-image, inpainting and ControlNet pipelines): per-sample [image, caption, padding] rows."""

from __future__ import annotations

from typing import Any

import torch

from ..attention import JOINT_ROWS_PER_SAMPLE_IMAGE_FIRST
from ..settings import FamilyDefaults
from ..spec import TEXT, Family, ModuleKind, PipelineSpec, TextPath


def _zimage_image_lengths(arguments: dict[str, Any]) -> list[int]:
    """Z-Image: each row's image tokens, padded by the model to a multiple of 32 (the padding is part of the
    image span, at offset 0 of every row)."""
    patch, frame_patch = int(arguments.get("patch_size", 2)), int(arguments.get("f_patch_size", 1))
    lengths = []
    for image in arguments["x"]:
        _, frames, height, width = image.shape
        tokens = (frames // frame_patch) * (height // patch) * (width // patch)
        lengths.append(tokens + (-tokens) % 32)
    return lengths


def _zimage_text_lengths(arguments: dict[str, Any]) -> list[int]:
    """Z-Image: each row's caption tokens, padded by the model to a multiple of 32 (the span after the image)."""
    return [len(caption) + (-len(caption)) % 32 for caption in arguments["cap_feats"]]


def _zimage_text_start(
    block: torch.nn.Module, text: torch.Tensor, modulation: torch.Tensor | None
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Z-Image main block, negative caption tokens, before attention: the modulated norm (the block's scale and
    gates from its per-row modulation, as ``ZImageTransformerBlock`` computes them)."""
    if not block.modulation:
        return block.attention_norm1(text), {"residual": text, "gates": None}
    scale_msa, gate_msa, scale_mlp, gate_mlp = block.adaLN_modulation(modulation).unsqueeze(1).chunk(4, dim=2)
    return block.attention_norm1(text) * (1.0 + scale_msa), {
        "residual": text,
        "gates": (gate_msa.tanh(), gate_mlp.tanh()),
        "scale_mlp": 1.0 + scale_mlp,
    }


def _zimage_text_finish(block: torch.nn.Module, saved: dict[str, Any], attention: torch.Tensor) -> torch.Tensor:
    """... after attention (its output projection included): the gated residuals of attention and feed-forward."""
    x, gates = saved["residual"], saved["gates"]
    if gates is None:
        x = x + block.attention_norm2(attention)
        return x + block.ffn_norm2(block.feed_forward(block.ffn_norm1(x)))
    gate_msa, gate_mlp = gates
    x = x + gate_msa * block.attention_norm2(attention)
    return x + gate_mlp * block.ffn_norm2(block.feed_forward(block.ffn_norm1(x) * saved["scale_mlp"]))


FAMILIES = (
    # Z-Image: the model takes lists (per-sample latents `x`, captions `cap_feats` with the padding
    # removed), refines image and caption separately, then joins each sample as [image, caption, padding]
    # (image and caption each padded to a multiple of 32); the image's rotary positions follow each
    # sample's padded caption length; a bool (batch, tokens) mask when lengths differ. Whole negative rows
    # appended to the lists; the main blocks' wrapper gives them the guided rows' image tokens and tables.
    # With the fast path the main blocks run on the stock rows with each negative caption beside them (its own
    # row's rotary tables: positions 1.. along the first axis, whatever the image), and the image refiner and
    # the final layer run on the stock rows: the negative rows' image tokens are never processed.
    Family(
        name="zimage",
        denoisers=("ZImageTransformer2DModel",),
        attention=((r"layers\.\d+\.attention", JOINT_ROWS_PER_SAMPLE_IMAGE_FIRST),),
        layout="concat",
        text_kwarg="cap_feats",
        image_kwarg="x",
        timestep_kwarg="t",
        row_kwargs=("t",),
        control_hints_kwarg="controlnet_block_samples",
        row_image_lengths=_zimage_image_lengths,
        row_text_lengths=_zimage_text_lengths,
        stock_image_kwargs=("attn_mask", "freqs_cis", "adaln_input", "c"),
        # (the blocks' and the final layer's image argument is `x`, like the model's own)
        modules={
            ModuleKind.SAMPLE_BLOCK: r"layers\.\d+",
            ModuleKind.STOCK_ROW_MODULE: r"noise_refiner\.\d+|all_final_layer\.[^.]+",
        },
        text_path=TextPath(_zimage_text_start, _zimage_text_finish, rotary="freqs_cis", modulation="adaln_input"),
    ),
)


PIPELINES = (
    # Z-Image (Turbo: few-step distilled, no CFG; base: CFG with the conditional rows first): no published
    # NAG defaults; FLUX.1's (the closest published flow-matching DiT, also distilled) are used.
    PipelineSpec(
        "ZImagePipeline",
        "zimage",
        "Z-Image (Turbo / base)",
        FamilyDefaults(5.0, 2.5, 0.25),
        (TEXT, None),
        per_prompt_lists=True,
    ),
    # Z-Image image-to-image / inpainting: the image enters as the starting latents (and, inpainting, the kept region
    # blended back by the pipeline), never as text. Z-Image's defaults.
    PipelineSpec(
        "ZImageImg2ImgPipeline",
        "zimage",
        "Z-Image image-to-image",
        FamilyDefaults(5.0, 2.5, 0.25),
        (TEXT, None),
        per_prompt_lists=True,
    ),
    PipelineSpec(
        "ZImageInpaintPipeline",
        "zimage",
        "Z-Image inpainting",
        FamilyDefaults(5.0, 2.5, 0.25),
        (TEXT, None),
        per_prompt_lists=True,
    ),
    # Z-Image ControlNet (also inpainting): the control image enters the ControlNet, whose hints the transformer adds
    # to its [image, caption] sequence; the negative rows get the ControlNet's hints for their own caption (with the
    # guided rows' latents and control), the stock rows the stock hints. Z-Image's defaults.
    PipelineSpec(
        "ZImageControlNetPipeline",
        "zimage",
        "Z-Image ControlNet",
        FamilyDefaults(5.0, 2.5, 0.25),
        (TEXT, None),
        control_model="controlnet",
        per_prompt_lists=True,
    ),
    PipelineSpec(
        "ZImageControlNetInpaintPipeline",
        "zimage",
        "Z-Image ControlNet inpainting",
        FamilyDefaults(5.0, 2.5, 0.25),
        (TEXT, None),
        control_model="controlnet",
        per_prompt_lists=True,
    ),
)
