"""Cross-attention families: the UNets (SD 1.x/2.x, SDXL), PixArt, Sana, LTX-Video, LTX-2, Wan and SkyReels-V2."""

from __future__ import annotations

import re
from dataclasses import replace

import torch

from ..attention import CROSS
from ..attention.cross import IP_ADAPTER_PROCESSORS
from ..settings import FamilyDefaults
from ..spec import MASK, TEXT, Family, ModuleKind, PipelineSpec

_UNET_TEXT_ATTENTION = r".*\.attn2"
# the token-wise projections of the text into the width the cross-attention reads (PixArtAlphaTextProjection)
_CAPTION_PROJECTION = {ModuleKind.TEXT_PROJECTION: r"caption_projection"}
_TEXT_EMBEDDER = {ModuleKind.TEXT_PROJECTION: r"condition_embedder\.text_embedder"}


def unet_refusal(unet: torch.nn.Module) -> str | None:
    """An IP-Adapter makes the UNet pass its cross-attention ``(text, [image embeddings])``: NAG separates the two
    for diffusers' IP-Adapter processors only (any other processor there would get a tuple it cannot read)."""
    if getattr(unet.config, "encoder_hid_dim_type", None) != "ip_image_proj":
        return None
    for name, module in unet.named_modules():
        kind = type(getattr(module, "processor", None)).__name__
        if (
            re.fullmatch(_UNET_TEXT_ATTENTION, name)
            and hasattr(module, "processor")
            and kind not in IP_ADAPTER_PROCESSORS
        ):
            return (
                f"it carries an IP-Adapter (config.encoder_hid_dim_type 'ip_image_proj'), so its cross-attention gets "
                f"`(text, [image embeddings])`, but `unet.{name}` has a {kind}; NAG guides the text of diffusers' "
                f"IP-Adapter processors ({', '.join(sorted(IP_ADAPTER_PROCESSORS))}) only. Load the IP-Adapter again "
                "(pipe.load_ip_adapter) to restore its processors, or unload it (pipe.unload_ip_adapter())"
            )
    return None


FAMILIES = (
    Family(
        name="unet",
        denoisers=("UNet2DConditionModel",),
        attention=((_UNET_TEXT_ATTENTION, CROSS),),
        layout="cross",
        mask_kwarg="encoder_attention_mask",
        refuse=unet_refusal,
    ),
    Family(
        name="pixart",
        denoisers=("PixArtTransformer2DModel",),
        attention=((r"transformer_blocks\.\d+\.attn2", CROSS),),
        layout="cross",
        mask_kwarg="encoder_attention_mask",
        negative_keys=("encoder_hidden_states", "encoder_attention_mask"),
        modules=_CAPTION_PROJECTION,
    ),
    Family(
        name="sana",
        denoisers=("SanaTransformer2DModel", "SanaVideoTransformer3DModel"),
        attention=((r"transformer_blocks\.\d+\.attn2", CROSS),),
        layout="cross",
        mask_kwarg="encoder_attention_mask",
        negative_keys=("encoder_hidden_states", "encoder_attention_mask"),
        modules=_CAPTION_PROJECTION,
    ),
    Family(
        name="ltx",
        denoisers=("LTXVideoTransformer3DModel",),
        attention=((r"transformer_blocks\.\d+\.attn2", CROSS),),
        layout="cross",
        mask_kwarg="encoder_attention_mask",
        negative_keys=("encoder_hidden_states", "encoder_attention_mask"),
        modules=_CAPTION_PROJECTION,
        context_parallel=True,
    ),
    # LTX-2 (LTX2VideoTransformer3DModel): video and audio streams, each with cross-attention to its own
    # text (the pipeline's `connectors` output, one mask for both). NAG guides the video stream's text
    # cross-attention (`attn2`) only; the audio stream's text cross-attention (`audio_attn2`) is left stock
    # (its negative text is not passed), so the audio changes only through the audio-video cross-attention
    # with the guided video. The text may be modulated per block and step (cross-attention AdaLN): the
    # projected negative keys/values are not reused across steps.
    Family(
        name="ltx2",
        denoisers=("LTX2VideoTransformer3DModel",),
        attention=((r"transformer_blocks\.\d+\.attn2", CROSS),),
        layout="cross",
        mask_kwarg="encoder_attention_mask",
        negative_keys=("encoder_hidden_states", "encoder_attention_mask"),
        static_text=False,
        context_parallel_refusal=(
            "(its pipelines always pass the connectors' text mask, which stock diffusers cannot attend with under "
            "context parallelism: its processors shape the mask to all heads, which Ulysses splits, and ring "
            "attention applies each rank's mask shard to every rank's keys; without a mask it is not checked yet)"
        ),
    ),
    Family(
        name="skyreels_v2",
        denoisers=("SkyReelsV2Transformer3DModel",),
        attention=((r"blocks\.\d+\.attn2", CROSS),),
        layout="cross",
        modules=_TEXT_EMBEDDER,
    ),
    Family(
        name="wan",
        denoisers=("WanTransformer3DModel",),
        attention=((r"blocks\.\d+\.attn2", CROSS),),
        layout="cross",
        modules=_TEXT_EMBEDDER,
        # under context parallelism the text reaches every rank whole (the model's plan splits only the video)
        context_parallel=True,
    ),
    # VACE: the control video enters through `control_hidden_states` (the VACE blocks' own stream),
    # not as text; the text cross-attention of both the main and the VACE blocks is guided.
    Family(
        name="wan_vace",
        denoisers=("WanVACETransformer3DModel",),
        attention=((r"(vace_)?blocks\.\d+\.attn2", CROSS),),
        layout="cross",
        modules=_TEXT_EMBEDDER,
    ),
)


PIPELINES = (
    PipelineSpec(
        "StableDiffusionXLPipeline",
        "unet",
        "Stable Diffusion XL",
        FamilyDefaults(3.0, 2.5, 0.5),
        (TEXT, None, None, None),
        denoiser_attr="unet",
        # (the pooled embedding enters the UNet's added time embedding, not its cross-attention: it stays the prompt's)
        unused_negative_names=("negative_pooled_prompt_embeds",),
    ),
    PipelineSpec(
        "StableDiffusionPipeline",
        "unet",
        "Stable Diffusion 1.x / 2.x",
        FamilyDefaults(2.0, 2.5, 0.5),
        (TEXT, None),
        denoiser_attr="unet",
    ),
    PipelineSpec(
        "PixArtSigmaPipeline", "pixart", "PixArt-Sigma", FamilyDefaults(3.0, 2.5, 0.5), (TEXT, MASK, None, None)
    ),
    PipelineSpec(
        "PixArtAlphaPipeline", "pixart", "PixArt-Alpha", FamilyDefaults(3.0, 2.5, 0.5), (TEXT, MASK, None, None)
    ),
    PipelineSpec(
        "SanaPipeline",
        "sana",
        "Sana",
        FamilyDefaults(3.0, 2.5, 0.5),
        (TEXT, MASK, None, None),
        negative_overrides={"complex_human_instruction": None},
    ),
    PipelineSpec(
        "SanaSprintPipeline",
        "sana",
        "Sana-Sprint",
        FamilyDefaults(3.0, 2.5, 0.5),
        (TEXT, MASK),
        few_step=True,
        negative_overrides={"complex_human_instruction": None},
    ),
    PipelineSpec(
        "SanaVideoPipeline",
        "sana",
        "Sana-Video",
        FamilyDefaults(3.0, 2.5, 0.5),
        (TEXT, MASK, None, None),
        negative_overrides={"complex_human_instruction": None},
    ),
    PipelineSpec(
        "LTXPipeline", "ltx", "LTX-Video text-to-video", FamilyDefaults(3.0, 2.5, 0.5), (TEXT, MASK, None, None)
    ),
    PipelineSpec(
        "LTXImageToVideoPipeline",
        "ltx",
        "LTX-Video image-to-video",
        FamilyDefaults(3.0, 2.5, 0.5),
        (TEXT, MASK, None, None),
    ),
    PipelineSpec(
        "LTXConditionPipeline",
        "ltx",
        "LTX-Video 0.9.5+ frame conditions",
        FamilyDefaults(3.0, 2.5, 0.5),
        (TEXT, MASK, None, None),
    ),
    # LTX-2: no published NAG defaults; LTX-Video's are used. The denoiser's text is the `connectors` output.
    PipelineSpec(
        "LTX2Pipeline",
        "ltx2",
        "LTX-2 text-to-video+audio (video stream guided)",
        FamilyDefaults(3.0, 2.5, 0.5),
        (TEXT, MASK, None, None),
        text_connector="connectors",
    ),
    # LTX-2 image-to-video / frame conditions: the images enter as clean latent tokens (timestep 0 there, keyframes
    # appended), never as text; the text path is LTX2Pipeline's. LTX2Pipeline's defaults.
    PipelineSpec(
        "LTX2ImageToVideoPipeline",
        "ltx2",
        "LTX-2 image-to-video+audio (video stream guided)",
        FamilyDefaults(3.0, 2.5, 0.5),
        (TEXT, MASK, None, None),
        text_connector="connectors",
    ),
    PipelineSpec(
        "LTX2ConditionPipeline",
        "ltx2",
        "LTX-2 frame conditions, video+audio (video stream guided)",
        FamilyDefaults(3.0, 2.5, 0.5),
        (TEXT, MASK, None, None),
        text_connector="connectors",
    ),
    PipelineSpec(
        "SkyReelsV2Pipeline", "skyreels_v2", "SkyReels-V2 text-to-video", FamilyDefaults(9.0, 2.5, 0.25), (TEXT, None)
    ),
    PipelineSpec(
        "WanImageToVideoPipeline",
        "wan",
        "Wan 2.1 / 2.2 image-to-video",
        FamilyDefaults(9.0, 2.5, 0.25),
        (TEXT, None),
        expert_attrs=("transformer_2",),
    ),
    PipelineSpec(
        "WanPipeline",
        "wan",
        "Wan 2.1 / 2.2 text-to-video",
        FamilyDefaults(9.0, 2.5, 0.25),
        (TEXT, None),
        expert_attrs=("transformer_2",),
    ),
    PipelineSpec(
        "WanVACEPipeline",
        "wan_vace",
        "Wan 2.1 VACE (control / reference video)",
        FamilyDefaults(9.0, 2.5, 0.25),
        (TEXT, None),
        expert_attrs=("transformer_2",),
    ),
)

# ControlNet and T2I-Adapter pipelines call the same UNet with the same text (encode_prompt returns what SD's / SDXL's
# does); the control model's residuals come from the positive prompt and are added as the stock call adds them, so
# the base pipelines' defaults and precomputed-negative names hold.
_SD, _SDXL = PIPELINES[1], PIPELINES[0]
PIPELINES += (
    replace(_SD, pipeline="StableDiffusionControlNetPipeline", label="Stable Diffusion 1.x / 2.x with ControlNet"),
    replace(_SD, pipeline="StableDiffusionAdapterPipeline", label="Stable Diffusion 1.x / 2.x with T2I-Adapter"),
    replace(_SDXL, pipeline="StableDiffusionXLControlNetPipeline", label="Stable Diffusion XL with ControlNet"),
    replace(_SDXL, pipeline="StableDiffusionXLAdapterPipeline", label="Stable Diffusion XL with T2I-Adapter"),
)
