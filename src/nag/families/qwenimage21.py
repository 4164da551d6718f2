"""Qwen-Image 2.1: one block-causal sequence, the negative prefix in a call of its own."""

from __future__ import annotations

import math
from typing import Any

import torch

from ..attention import CAUSAL_PREFIX
from ..settings import FamilyDefaults
from ..spec import MASK, TEXT, CausalPrefix, Family, PipelineSpec

_QWEN21_TOKENS_PER_SLOT = 4  # each vision slot of Qwen-Image 2.1's text stands for 2x2 latent tokens


def _qwen21_target_tokens(arguments: dict[str, Any]) -> int:
    """Qwen-Image 2.1: the target image's tokens, the last block of ``img_shapes`` (the sequence's last tokens)."""
    return math.prod(arguments["img_shapes"][0][-1])


def _qwen21_negative_layout(arguments: dict[str, Any], negative: dict[str, torch.Tensor], cond_rows: torch.Tensor):
    """Qwen-Image 2.1: the negative prompt's own call for the guided rows, laid out as the pipeline lays out a
    classifier-free-guidance call (its own text length, its own condition-image slots): ``(condition-image latents,
    img_shapes without the target, the text's slot mask)``. Text-only negative embeddings (no slots) give a prefix
    without the condition images."""
    text = arguments["encoder_hidden_states"]
    slots = negative.get("img_mask")
    if slots is None:  # precomputed text-only embeddings: no position holds an image
        slots = torch.zeros(negative["encoder_hidden_states"].shape[:2], dtype=torch.bool)
    slots = slots.to(text.device, torch.bool)
    # (the model reads the layout of sample 0: the pipeline gives one entry per prompt, not per generated image)
    conditions = list(arguments["img_shapes"][0][:-1])
    condition_tokens = arguments["hidden_states"].shape[1] - _qwen21_target_tokens(arguments)
    negative_condition_tokens = _QWEN21_TOKENS_PER_SLOT * int(slots[0].sum())
    if negative_condition_tokens not in (0, condition_tokens):
        raise ValueError(
            f"the negative conditioning has image slots for {negative_condition_tokens} condition-image tokens but the "
            f"call's condition images have {condition_tokens}; encode the negative prompt with the same images"
        )
    if negative_condition_tokens == 0:
        conditions = []
    return arguments["hidden_states"][cond_rows, :negative_condition_tokens], conditions, slots


def _qwen21_prefill_call(
    arguments: dict[str, Any], negative: dict[str, torch.Tensor], cond_rows: torch.Tensor
) -> dict[str, Any]:
    """Qwen-Image 2.1: the negative prompt's own call with the smallest target image (one vision slot, 2x2 tokens):
    the prefix never attends to the target, so its keys/values are those of the full-size call."""
    condition_latents, conditions, slots = _qwen21_negative_layout(arguments, negative, cond_rows)
    rows = len(cond_rows)
    text = arguments["encoder_hidden_states"]
    timestep = arguments["timestep"]
    if isinstance(timestep, torch.Tensor) and timestep.ndim and timestep.shape[0] == text.shape[0]:
        timestep = timestep[cond_rows]
    target = condition_latents.new_zeros(rows, _QWEN21_TOKENS_PER_SLOT, condition_latents.shape[2])
    return {
        "hidden_states": torch.cat([condition_latents, target], dim=1),
        "encoder_hidden_states": negative["encoder_hidden_states"].to(text.dtype),
        "encoder_hidden_states_mask": negative.get("encoder_attention_mask"),
        "timestep": timestep,
        "img_shapes": [conditions + [(1, 2, 2)]] * rows,
        "img_mask": torch.cat([slots, slots.new_ones(slots.shape[0], 1)], dim=1),
        "attention_kwargs": arguments.get("attention_kwargs"),
        "return_dict": False,
    }


def _qwen21_target_rotary(
    denoiser: torch.nn.Module, arguments: dict[str, Any], negative: dict[str, torch.Tensor], cond_rows: torch.Tensor
) -> torch.Tensor:
    """Qwen-Image 2.1: the target image's rotary table in the negative prompt's layout (the model's own rotary
    embedding of ``[negative text with its slots, target image]``, its last rows)."""
    _, conditions, slots = _qwen21_negative_layout(arguments, negative, cond_rows)
    target_shape = arguments["img_shapes"][0][-1]
    target = math.prod(target_shape)
    layout = torch.cat([slots[0], slots.new_ones(target // _QWEN21_TOKENS_PER_SLOT)])
    is_image = torch.repeat_interleave(layout, torch.where(layout, _QWEN21_TOKENS_PER_SLOT, 1))
    return denoiser.pos_embed(conditions + [target_shape], is_image, device=arguments["hidden_states"].device)[-target:]


def _refuse_qwen21_flex(denoiser: torch.nn.Module) -> str | None:
    flex = [
        name
        for name, module in denoiser.named_modules()
        if type(getattr(module, "processor", None)).__name__ == "QwenImage21FlexAttnProcessor"
    ]
    if flex:
        return (
            f"`{flex[0]}` has QwenImage21FlexAttnProcessor, whose block mask the model builds only for processors "
            "it recognises; NAG drives the default QwenImage21AttnProcessor (set it with "
            "transformer.set_attn_processor(QwenImage21AttnProcessor()) before nag.apply)"
        )
    return None


FAMILIES = (
    # Qwen-Image 2.1: one block-causal sequence [text with condition-image slots, target image]; the text never
    # sees the target, so the negative prompt's prefix runs in a call of its own (once per generation when the
    # text is modulated from t = 0, `causal_condition`) and each layer's target queries attend to its keys/values.
    Family(
        name="qwenimage21",
        denoisers=("QwenImage21Transformer2DModel",),
        attention=((r"transformer_blocks\.\d+\.attn", CAUSAL_PREFIX),),
        layout="prefix",
        mask_kwarg="encoder_hidden_states_mask",
        negative_keys=("encoder_hidden_states", "encoder_attention_mask"),
        causal_prefix=CausalPrefix(
            prefill_call=_qwen21_prefill_call,
            target_rotary=_qwen21_target_rotary,
            target_tokens=_qwen21_target_tokens,
            step_independent=lambda denoiser: bool(getattr(denoiser.config, "causal_condition", False)),
        ),
        refuse=_refuse_qwen21_flex,
    ),
)


PIPELINES = (
    # Qwen-Image 2.1 (text-to-image and image-conditioned): no published NAG defaults; FLUX.1's (the closest published
    # flow-matching image DiT) are used. encode_prompt's third output marks the condition images' slots in the text.
    PipelineSpec(
        "QwenImage21Pipeline",
        "qwenimage21",
        "Qwen-Image 2.1 (text-to-image, image-conditioned)",
        FamilyDefaults(5.0, 2.5, 0.25),
        (TEXT, MASK, "img_mask"),
        # encode_prompt's outputs under the names its call gives them; the slot mask (its `image_pad_mask`) is needed
        # with negative embeddings encoded with condition images, optional for text-only ones
        negative_embed_names={
            "negative_prompt_embeds": TEXT,
            "negative_prompt_embeds_mask": MASK,
            "negative_prompt_attention_mask": MASK,
            "negative_image_pad_mask": "img_mask",
        },
    ),
)
