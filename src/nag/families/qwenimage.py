"""Qwen-Image (text-to-image, inpainting, editing): joint attention over [text, image]."""

from __future__ import annotations

import torch

from ..attention import JOINT
from ..settings import FamilyDefaults
from ..spec import MASK, TEXT, Family, ModuleKind, PipelineSpec


def _refuse_qwen_zero_cond_t(denoiser: torch.nn.Module) -> str | None:
    if getattr(denoiser.config, "zero_cond_t", False):
        return (
            "zero_cond_t models (Qwen-Image-Edit-2511) stack a timestep-0 copy of every row in the "
            "conditioning batch, which the negative text rows cannot join yet"
        )
    return None


FAMILIES = (
    # Qwen-Image: [text, image] joint attention with separate text projections; the text stream is
    # modulated by the timestep alone (`txt_mod(temb)`), the image stream by `img_mod(temb)`.
    Family(
        name="qwenimage",
        denoisers=("QwenImageTransformer2DModel",),
        attention=((r"transformer_blocks\.\d+\.attn", JOINT),),
        layout="joint",
        mask_kwarg="encoder_hidden_states_mask",
        negative_keys=("encoder_hidden_states", "encoder_attention_mask"),
        row_kwargs=("timestep", "guidance", "additional_t_cond"),
        refuse=_refuse_qwen_zero_cond_t,
        context_parallel_refusal=(
            "(its plan splits the text rotary table the model computes for the padded text, one table for all "
            "rows, whose positions count along the text: a shard of a branch shorter or longer than the padded "
            "text would get another branch's positions, and its pipelines trim the text to the longest prompt, so "
            "the negative prompt's length differs from the prompt's; prompts of different lengths also bring a "
            "text mask, which stock diffusers' ring attention applies per rank to every rank's keys)"
        ),
        modules={
            ModuleKind.IMAGE_NORM: r"norm_out",
            ModuleKind.IMAGE_MODULATION: r"transformer_blocks\.\d+\.img_mod",
            ModuleKind.TEXT_PROJECTION: r"txt_norm|txt_in",
        },
    ),
)


PIPELINES = (
    # Qwen-Image: no published NAG defaults; Flux's (the closest published joint-attention
    # flow-matching model) are used.
    PipelineSpec("QwenImagePipeline", "qwenimage", "Qwen-Image", FamilyDefaults(5.0, 2.5, 0.25), (TEXT, MASK)),
    PipelineSpec(
        "QwenImageInpaintPipeline", "qwenimage", "Qwen-Image inpainting", FamilyDefaults(5.0, 2.5, 0.25), (TEXT, MASK)
    ),
    # Qwen-Image-Edit / -Edit-2509 (Plus): the reference images' latents join the image stream (image tokens,
    # never guided text) and enter the prompt encoding as vision tokens, so the negative prompt is encoded with
    # the same images. Qwen-Image-Edit-2511 (zero_cond_t) is refused by the family.
    PipelineSpec("QwenImageEditPipeline", "qwenimage", "Qwen-Image-Edit", FamilyDefaults(5.0, 2.5, 0.25), (TEXT, MASK)),
    PipelineSpec(
        "QwenImageEditPlusPipeline",
        "qwenimage",
        "Qwen-Image-Edit-2509 (multiple reference images)",
        FamilyDefaults(5.0, 2.5, 0.25),
        (TEXT, MASK),
    ),
)
