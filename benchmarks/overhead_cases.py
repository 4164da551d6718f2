"""The architectures benchmarks/overhead.py times: one ``Case`` per model and size, with random weights.

``cases(preset, families)`` builds them. Presets: ``cpu`` (each architecture with fewer layers and heads at a lower
resolution), ``real`` (the published widths and text encoders' widths with fewer blocks and about 1024 image
tokens, for a CPU), ``published`` (PixArt-Sigma and Wan at their published widths and resolutions with one block,
for a CPU), ``full`` (the published sizes, for a GPU).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Case:
    family: str
    label: str
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[int, torch.device, torch.dtype], dict[str, Any]]
    negative: Callable[[dict[str, Any]], dict[str, torch.Tensor]]
    # the stock inputs with the negative's text appended (joint/concat families) or the text twice (cross-attention
    # families): NAG's cost floor; None where the benchmark has no such input
    floor: Callable[[dict[str, Any], dict[str, torch.Tensor]], dict[str, Any]] | None = None


def _randn(*shape, device, dtype, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)


def _text_negative(inputs: dict[str, Any], keys=("encoder_hidden_states",)) -> dict[str, torch.Tensor]:
    """A negative of the same shape as the conditional row's conditioning, different values."""
    return {k: (inputs[k][-1:] * -0.5 + 0.1) if inputs[k].is_floating_point() else inputs[k][-1:] for k in keys}


def floor_inputs(single: dict[str, Any], negative: dict[str, torch.Tensor]) -> dict[str, Any]:
    """One image's inputs with the negative's text tokens appended to its own: the stock forward that attends to as
    many text tokens as NAG does. Text masks ``(B, text)`` are extended with the negative's (or repeated), Flux-style
    text position ids ``(text, axes)`` repeated."""
    text = single["encoder_hidden_states"]
    length = text.shape[1]
    out = dict(single, encoder_hidden_states=torch.cat([text, negative["encoder_hidden_states"]], dim=1))
    for key, value in single.items():
        if key == "encoder_hidden_states" or not isinstance(value, torch.Tensor):
            continue
        if "mask" in key and value.ndim == 2 and value.shape[1] == length:
            extra = negative.get(key, negative.get("encoder_attention_mask", value))
            out[key] = torch.cat([value, extra.to(value.dtype)], dim=1)
        elif key == "txt_ids":
            out[key] = torch.cat([value, value], dim=0)
    return out


def _blocks(real: bool, config: dict[str, Any]) -> str:
    """The label's note of the layers kept at the ``real`` preset."""
    if not real:
        return ""
    names = (("num_layers", "layers"), ("num_single_layers", "single layers"), ("layers_per_block", "layers per block"))
    return "".join(f", {config[key]} {name}" for key, name in names if key in config) + ", real width"


def _image_ids(side: int, axes: int) -> torch.Tensor:
    """Flux-style position ids of a ``side`` x ``side`` token grid: ``(tokens, axes)``, row and column on axes 1 and
    2."""
    ids = torch.zeros(side, side, axes)
    ids[..., 1] = torch.arange(side)[:, None]
    ids[..., 2] = torch.arange(side)[None, :]
    return ids.reshape(-1, axes)


def flux_case(full: bool, text_len: int, real: bool = False) -> Case:
    from diffusers import FluxTransformer2DModel

    if full or real:
        config = dict(
            num_layers=19,
            num_single_layers=38,
            attention_head_dim=128,
            num_attention_heads=24,
            joint_attention_dim=4096,
            pooled_projection_dim=768,
            in_channels=64,
            axes_dims_rope=(16, 56, 56),
        )
        side = 64  # 1024 px -> 128 latent -> 64x64 tokens
        if real:
            config.update(num_layers=1, num_single_layers=1)
            side = 32
    else:
        config = dict(
            num_layers=2,
            num_single_layers=4,
            attention_head_dim=128,
            num_attention_heads=4,
            joint_attention_dim=1024,
            pooled_projection_dim=768,
            in_channels=64,
            axes_dims_rope=(16, 56, 56),
        )
        side = 32  # 512 px
    tokens = side * side

    def inputs(batch, device, dtype):
        return dict(
            hidden_states=_randn(batch, tokens, 64, device=device, dtype=dtype),
            encoder_hidden_states=_randn(
                batch, text_len, config["joint_attention_dim"], device=device, dtype=dtype, seed=1
            ),
            pooled_projections=_randn(batch, 768, device=device, dtype=dtype, seed=2),
            timestep=torch.full((batch,), 0.5, device=device, dtype=dtype),
            img_ids=_image_ids(side, 3).to(device),
            txt_ids=torch.zeros(text_len, 3, device=device),
        )

    return Case(
        "flux",
        f"FLUX.1 ({tokens} image + {text_len} text tokens{_blocks(real, config)})",
        lambda: FluxTransformer2DModel(**config),
        inputs,
        lambda i: _text_negative(i, ("encoder_hidden_states", "pooled_projections")),
        floor_inputs,
    )


def chroma_case(full: bool, text_len: int) -> Case:
    """Chroma: Flux-like blocks that NAG guides on the concatenating layout (whole negative rows from the model input
    on; with the fast path the double blocks run the image stream at the stock batch and the single blocks the stock
    rows, the negative text beside them), with the (rows, text + image) float 0/1 mask the pipeline passes (a quarter
    of the text valid for the prompt, an eighth for the negative)."""
    from diffusers import ChromaTransformer2DModel

    if full:
        config = dict(
            num_layers=19,
            num_single_layers=38,
            attention_head_dim=128,
            num_attention_heads=24,
            joint_attention_dim=4096,
            in_channels=64,
            axes_dims_rope=(16, 56, 56),
        )
        side = 64
    else:
        config = dict(
            num_layers=2,
            num_single_layers=4,
            attention_head_dim=128,
            num_attention_heads=4,
            joint_attention_dim=1024,
            in_channels=64,
            axes_dims_rope=(16, 56, 56),
            approximator_hidden_dim=1024,
            approximator_layers=2,
        )
        side = 32
    tokens = side * side

    def inputs(batch, device, dtype):
        return dict(
            hidden_states=_randn(batch, tokens, 64, device=device, dtype=dtype),
            encoder_hidden_states=_randn(
                batch, text_len, config["joint_attention_dim"], device=device, dtype=dtype, seed=1
            ),
            timestep=torch.full((batch,), 0.5, device=device, dtype=dtype),
            img_ids=_image_ids(side, 3).to(device),
            txt_ids=torch.zeros(text_len, 3, device=device),
            attention_mask=_chroma_mask(batch, text_len // 4, text_len, tokens, device, dtype),
        )

    def negative(inputs):
        mask = _chroma_mask(
            1, text_len // 8, text_len, 0, inputs["attention_mask"].device, inputs["attention_mask"].dtype
        )
        return {**_text_negative(inputs), "encoder_attention_mask": mask}

    return Case(
        "chroma",
        f"Chroma ({tokens} image + {text_len} text tokens)",
        lambda: ChromaTransformer2DModel(**config),
        inputs,
        negative,
    )


def _chroma_mask(batch: int, valid: int, text_len: int, image_len: int, device, dtype) -> torch.Tensor:
    """The Chroma pipeline's mask: float 1 on the prompt's tokens and one padding token, 0 on the rest of the text,
    1 on every image token."""
    mask = torch.ones(batch, text_len + image_len, device=device, dtype=dtype)
    mask[:, valid + 1 : text_len] = 0
    return mask


def flux2_case(full: bool, text_len: int, real: bool = False) -> Case:
    """FLUX.2: double blocks with the image stream at the stock batch, parallel single blocks whose negative text
    runs beside the stock rows (the fast path); ``fast=False`` carries whole negative rows through the single
    blocks. ``full``: the diffusers defaults (FLUX.2 dev); ``real``: its width, one block of each kind."""
    from diffusers import Flux2Transformer2DModel

    if full or real:
        config = dict(
            num_layers=8,
            num_single_layers=48,
            attention_head_dim=128,
            num_attention_heads=48,
            joint_attention_dim=15360,
            in_channels=128,
            guidance_embeds=False,
        )
        side = 64
        if real:
            config.update(num_layers=1, num_single_layers=1)
            side = 32
    else:
        config = dict(
            num_layers=2,
            num_single_layers=4,
            attention_head_dim=128,
            num_attention_heads=4,
            joint_attention_dim=1024,
            in_channels=128,
            timestep_guidance_channels=256,
            guidance_embeds=False,
        )
        side = 32
    tokens = side * side

    def inputs(batch, device, dtype):
        text_ids = torch.zeros(text_len, 4)
        text_ids[:, 3] = torch.arange(text_len)
        return dict(
            hidden_states=_randn(batch, tokens, 128, device=device, dtype=dtype),
            encoder_hidden_states=_randn(
                batch, text_len, config["joint_attention_dim"], device=device, dtype=dtype, seed=1
            ),
            timestep=torch.full((batch,), 0.5, device=device, dtype=dtype),
            img_ids=_image_ids(side, 4).to(device),
            txt_ids=text_ids.to(device),
        )

    return Case(
        "flux2",
        f"FLUX.2 ({tokens} image + {text_len} text tokens{_blocks(real, config)})",
        lambda: Flux2Transformer2DModel(**config),
        inputs,
        _text_negative,
        floor_inputs,
    )


def zimage_case(full: bool, text_len: int) -> Case:
    """Z-Image (Turbo): per-sample lists in, each sample joined as [image, caption] by the model; the fast path runs the
    main layers on the stock rows with the negative caption beside them and the image refiner and final layer on the
    stock rows; ``fast=False`` carries whole negative rows [image copy, negative caption] through the model.
    ``full``: the diffusers defaults (6B) at 1024x1024."""
    from diffusers import ZImageTransformer2DModel

    if full:
        config = dict()
        latent = 128  # 1024 px -> 128 latent -> 64x64 patches
    else:
        config = dict(dim=512, n_layers=4, n_refiner_layers=2, n_heads=4, n_kv_heads=4)
        latent = 64  # 512 px
    tokens = (latent // 2) ** 2

    def inputs(batch, device, dtype):
        return dict(
            x=[_randn(16, 1, latent, latent, device=device, dtype=dtype, seed=i) for i in range(batch)],
            cap_feats=[_randn(text_len, 2560, device=device, dtype=dtype, seed=10 + i) for i in range(batch)],
            t=torch.full((batch,), 0.5, device=device, dtype=dtype),
        )

    def negative(inputs):
        return {"encoder_hidden_states": [inputs["cap_feats"][-1] * -0.5 + 0.1]}

    return Case(
        "zimage",
        f"Z-Image ({tokens} image + {text_len} caption tokens)",
        lambda: ZImageTransformer2DModel(**config),
        inputs,
        negative,
    )


def lumina2_case(full: bool, text_len: int, valid: int) -> Case:
    """Lumina-Image 2.0: each sample joined as [caption (its valid tokens), image] by the model; the fast path runs the
    joint layers on the stock rows with the negative caption beside them and the patch embedding, image refiner and
    final norm on the stock rows; ``fast=False`` carries whole negative rows [negative caption, image copy] through
    the model. Captions of ``text_len`` tokens, the first ``valid`` of them valid (the mask). ``full``: diffusers'
    defaults with Gemma-2's 2304-wide captions (the published 2.6B configuration) at 1024x1024."""
    from diffusers import Lumina2Transformer2DModel

    if full:
        config = dict(cap_feat_dim=2304)
        latent = 128  # 1024 px -> 128 latent -> 64x64 patches
    else:
        config = dict(
            hidden_size=512,
            num_layers=4,
            num_refiner_layers=2,
            num_attention_heads=4,
            num_kv_heads=2,
            axes_dim_rope=(32, 48, 48),
            cap_feat_dim=2304,
        )
        latent = 64  # 512 px
    tokens = (latent // 2) ** 2

    def inputs(batch, device, dtype):
        mask = torch.zeros(batch, text_len, dtype=torch.bool, device=device)
        mask[:, :valid] = True
        return dict(
            hidden_states=_randn(batch, 16, latent, latent, device=device, dtype=dtype),
            timestep=torch.full((batch,), 0.5, device=device, dtype=dtype),
            encoder_hidden_states=_randn(batch, text_len, 2304, device=device, dtype=dtype, seed=1),
            encoder_attention_mask=mask,
        )

    return Case(
        "lumina2",
        f"Lumina-Image 2.0 ({tokens} image + {valid} of {text_len} caption tokens)",
        lambda: Lumina2Transformer2DModel(**config),
        inputs,
        lambda inputs: _text_negative(inputs, ("encoder_hidden_states", "encoder_attention_mask")),
    )


def auraflow_case(full: bool, text_len: int) -> Case:
    """AuraFlow: register tokens before the text, joint (MMDiT) blocks, then single blocks over the [registers, text,
    image] the model joins; the fast path runs the joint blocks' image stream at the stock batch and the single blocks
    on the stock rows with the negative [registers, text] beside them; ``fast=False`` carries whole negative rows
    through the single blocks. ``full``: diffusers' defaults with the published position table (AuraFlow v0.3,
    ``pos_embed_max_size=9216``) at 1024x1024."""
    from diffusers import AuraFlowTransformer2DModel

    if full:
        config = dict(pos_embed_max_size=9216)
        latent = 128  # 1024 px -> 128 latent -> 64x64 patches
    else:
        config = dict(
            num_mmdit_layers=2,
            num_single_dit_layers=4,
            attention_head_dim=128,
            num_attention_heads=4,
            caption_projection_dim=512,
        )
        latent = 64  # 512 px
    tokens = (latent // 2) ** 2

    def inputs(batch, device, dtype):
        return dict(
            hidden_states=_randn(batch, 4, latent, latent, device=device, dtype=dtype),
            encoder_hidden_states=_randn(batch, text_len, 2048, device=device, dtype=dtype, seed=1),
            timestep=torch.full((batch,), 0.5, device=device, dtype=dtype),
        )

    return Case(
        "auraflow",
        f"AuraFlow ({tokens} image + 8 register + {text_len} text tokens)",
        lambda: AuraFlowTransformer2DModel(**config),
        inputs,
        _text_negative,
    )


def qwenimage_case(full: bool, text_len: int, real: bool = False) -> Case:
    """Qwen-Image: joint attention with split complex rotary tables and a text mask (a few padding tokens masked);
    one image stream, the negative text rows beside it. ``full``: the diffusers defaults (20B) at 1024x1024."""
    from diffusers import QwenImageTransformer2DModel

    if real:
        config = dict(num_layers=1)
        side = 32
    elif full:
        config = dict()
        side = 64  # 1024 px -> 128 latent -> 64x64 patches
    else:
        config = dict(num_layers=2, attention_head_dim=128, num_attention_heads=4, joint_attention_dim=1024)
        side = 32
    tokens = side * side

    def inputs(batch, device, dtype):
        mask = torch.ones(batch, text_len, dtype=torch.long, device=device)
        mask[:, -8:] = 0  # the tokenizer's padding
        return dict(
            hidden_states=_randn(batch, tokens, 64, device=device, dtype=dtype),
            encoder_hidden_states=_randn(
                batch, text_len, config.get("joint_attention_dim", 3584), device=device, dtype=dtype, seed=1
            ),
            encoder_hidden_states_mask=mask,
            timestep=torch.full((batch,), 0.5, device=device, dtype=dtype),
            img_shapes=[[(1, side, side)]] * batch,
        )

    return Case(
        "qwenimage",
        f"Qwen-Image ({tokens} image + {text_len} text tokens{_blocks(real, config)})",
        lambda: QwenImageTransformer2DModel(**config),
        inputs,
        lambda i: {**_text_negative(i), "encoder_attention_mask": i["encoder_hidden_states_mask"][-1:]},
        floor_inputs,
    )


def hunyuanvideo_case(full: bool, text_len: int, real: bool = False) -> Case:
    """HunyuanVideo: [video, text] double and single blocks, a masked text (a few padding tokens), the pooled CLIP
    embedding in the modulation. The fast path keeps the video at the stock batch through every block (the negative
    text beside it); ``fast=False`` carries whole negative rows [video copy, negative text] through the model.
    ``full``: the diffusers defaults (13B) at 720x1280, 129 frames."""
    from diffusers import HunyuanVideoTransformer3DModel

    if real:
        config = dict(num_layers=1, num_single_layers=1)
        frames, height, width = 5, 32, 32
    elif full:
        config = dict()
        frames, height, width = 33, 90, 160  # 129 frames at 720x1280 -> 33 latent frames of 45x80 patches
    else:
        config = dict(
            num_attention_heads=4, attention_head_dim=128, num_layers=2, num_single_layers=4, text_embed_dim=1024
        )
        frames, height, width = 5, 32, 32  # 5 latent frames of 16x16 patches
    tokens = frames * (height // 2) * (width // 2)

    def inputs(batch, device, dtype):
        mask = torch.ones(batch, text_len, dtype=torch.long, device=device)
        mask[:, -24:] = 0  # the tokenizer's padding
        return dict(
            hidden_states=_randn(batch, 16, frames, height, width, device=device, dtype=dtype),
            timestep=torch.full((batch,), 500.0, device=device, dtype=dtype),
            encoder_hidden_states=_randn(
                batch, text_len, config.get("text_embed_dim", 4096), device=device, dtype=dtype, seed=1
            ),
            encoder_attention_mask=mask,
            pooled_projections=_randn(batch, 768, device=device, dtype=dtype, seed=2),
            guidance=torch.full((batch,), 6000.0, device=device, dtype=dtype),
        )

    return Case(
        "hunyuanvideo",
        f"HunyuanVideo ({tokens} video + {text_len} text tokens{_blocks(real, config)})",
        lambda: HunyuanVideoTransformer3DModel(**config),
        inputs,
        lambda i: {
            **_text_negative(i, ("encoder_hidden_states", "pooled_projections")),
            "encoder_attention_mask": i["encoder_attention_mask"][-1:],
        },
        floor_inputs,
    )


def cogview4_case(full: bool, text_len: int) -> Case:
    """CogView4: one stream of blocks whose processor joins [text, image] with shared projections (output projection
    included), modulation from the timestep and size conditions, no text mask (the pipeline passes none). The fast
    path keeps the image at the stock batch through every block (the negative text beside it); ``fast=False``
    carries whole negative rows [negative text, image copy] through the model. ``full``: the diffusers defaults (2.8B)
    at 1024x1024."""
    from diffusers import CogView4Transformer2DModel

    if full:
        config = dict()
        side = 128  # 1024 px -> 128x128 latents -> 64x64 patches
    else:
        config = dict(num_layers=4, num_attention_heads=4, attention_head_dim=128, text_embed_dim=1024)
        side = 64  # 32x32 patches
    tokens = (side // 2) ** 2

    def inputs(batch, device, dtype):
        size = torch.tensor([[side * 8, side * 8]] * batch, device=device, dtype=dtype)
        return dict(
            hidden_states=_randn(batch, 16, side, side, device=device, dtype=dtype),
            encoder_hidden_states=_randn(
                batch, text_len, config.get("text_embed_dim", 4096), device=device, dtype=dtype, seed=1
            ),
            timestep=torch.full((batch,), 500.0, device=device, dtype=dtype),
            original_size=size,
            target_size=size,
            crop_coords=torch.zeros_like(size),
        )

    return Case(
        "cogview4",
        f"CogView4 ({tokens} image + {text_len} text tokens)",
        lambda: CogView4Transformer2DModel(**config),
        inputs,
        _text_negative,
    )


def cogvideox_case(full: bool) -> Case:
    """CogVideoX (2b layout, the diffusers defaults): the model joins [text, video] for its patch embedding (sincos
    positions over both: the text is ``max_text_seq_length`` = 226 tokens long) and every block's processor joins them
    again with shared projections; timestep-only modulation, no mask. The fast path runs the blocks on the stock rows
    (the negative text beside them); ``fast=False`` carries whole negative rows [negative text, video copy] through
    every block. ``full``: the diffusers defaults (2b) at 480x720, 49 frames."""
    from diffusers import CogVideoXTransformer3DModel

    if full:
        config = dict()
        frames, height, width = 13, 60, 90  # 49 frames at 480x720 -> 13 latent frames of 30x45 patches
    else:
        config = dict(num_attention_heads=4, attention_head_dim=128, num_layers=4, text_embed_dim=1024)
        frames, height, width = 4, 32, 32  # 4 latent frames of 16x16 patches
    tokens = frames * (height // 2) * (width // 2)
    text_len = 226

    def inputs(batch, device, dtype):
        return dict(
            hidden_states=_randn(batch, frames, 16, height, width, device=device, dtype=dtype),
            encoder_hidden_states=_randn(
                batch, text_len, config.get("text_embed_dim", 4096), device=device, dtype=dtype, seed=1
            ),
            timestep=torch.full((batch,), 500, device=device, dtype=torch.long),
        )

    return Case(
        "cogvideox",
        f"CogVideoX ({tokens} video + {text_len} text tokens)",
        lambda: CogVideoXTransformer3DModel(**config),
        inputs,
        _text_negative,
    )


def hidream_case(full: bool) -> Case:
    """HiDream-I1: double-stream blocks over [image, text] (separate text projections), single-stream blocks over
    the [image, text] stream the model joins, mixture-of-experts feed-forwards; every block's text is [T5, last
    Llama-3 layer, the block's own Llama-3 layer]. The fast path runs both kinds of blocks on the stock rows with the
    negative text beside them and the final layer on the stock rows; ``fast=False`` carries whole negative rows
    [image copy, negative text] through the model. ``full``: the published configuration (17B) at 1024x1024 with the
    pipeline's 128 T5 and 128 Llama-3 tokens; ``cpu``: a few blocks at a reduced width, 1024 image tokens and the
    text lengths scaled by the same factor (32 + 32)."""
    from diffusers import HiDreamImageTransformer2DModel

    if full:
        config = dict(
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=16,
            num_single_layers=32,
            attention_head_dim=128,
            num_attention_heads=20,
            caption_channels=[4096, 4096],
            text_emb_dim=2048,
            num_routed_experts=4,
            num_activated_experts=2,
            axes_dims_rope=(64, 32, 32),
            max_resolution=(128, 128),
            llama_layers=list(range(32)) + [31] * 16,
        )
        latent, text_len, llama_states = 128, 128, 32  # 1024 px -> 128 latent -> 64x64 patches
    else:
        config = dict(
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=2,
            num_single_layers=4,
            attention_head_dim=128,
            num_attention_heads=4,
            caption_channels=[1024, 1024],
            text_emb_dim=2048,
            num_routed_experts=4,
            num_activated_experts=2,
            axes_dims_rope=(64, 32, 32),
            max_resolution=(128, 128),
            llama_layers=[0, 1, 2, 3, 3, 3],
        )
        latent, text_len, llama_states = 64, 32, 4  # 512 px -> 64 latent -> 32x32 patches
    tokens = (latent // 2) ** 2
    t5_width, llama_width = config["caption_channels"]

    def inputs(batch, device, dtype):
        return dict(
            hidden_states=_randn(batch, 16, latent, latent, device=device, dtype=dtype),
            timesteps=torch.full((batch,), 500.0, device=device, dtype=dtype),
            encoder_hidden_states_t5=_randn(batch, text_len, t5_width, device=device, dtype=dtype, seed=1),
            encoder_hidden_states_llama3=_randn(
                llama_states, batch, text_len, llama_width, device=device, dtype=dtype, seed=2
            ),
            pooled_embeds=_randn(batch, 2048, device=device, dtype=dtype, seed=3),
        )

    def negative(inputs):  # (the Llama-3 states have their batch on axis 1)
        return {
            "encoder_hidden_states": inputs["encoder_hidden_states_t5"][-1:] * -0.5 + 0.1,
            "encoder_hidden_states_llama3": inputs["encoder_hidden_states_llama3"][:, -1:] * -0.5 + 0.1,
            "pooled_embeds": inputs["pooled_embeds"][-1:] * -0.5 + 0.1,
        }

    return Case(
        "hidream",
        f"HiDream-I1 ({tokens} image + {3 * text_len} text tokens)",
        lambda: HiDreamImageTransformer2DModel(**config),
        inputs,
        negative,
    )


def sd3_case(full: bool, real: bool = False) -> Case:
    from diffusers import SD3Transformer2DModel

    if full or real:  # SD3.5-Large
        config = dict(
            sample_size=128,
            patch_size=2,
            in_channels=16,
            num_layers=38,
            attention_head_dim=64,
            num_attention_heads=38,
            joint_attention_dim=4096,
            caption_projection_dim=2432,
            pooled_projection_dim=2048,
            out_channels=16,
            pos_embed_max_size=192,
            qk_norm="rms_norm",
        )
        latent, text_len = 128, 333
        if real:
            config.update(num_layers=2)
            latent, text_len = 64, 83
    else:
        config = dict(
            sample_size=64,
            patch_size=2,
            in_channels=16,
            num_layers=4,
            attention_head_dim=64,
            num_attention_heads=12,
            joint_attention_dim=1024,
            caption_projection_dim=768,
            pooled_projection_dim=2048,
            out_channels=16,
            pos_embed_max_size=96,
            qk_norm="rms_norm",
        )
        latent, text_len = 64, 333

    def inputs(batch, device, dtype):
        return dict(
            hidden_states=_randn(batch, 16, latent, latent, device=device, dtype=dtype),
            encoder_hidden_states=_randn(
                batch, text_len, config["joint_attention_dim"], device=device, dtype=dtype, seed=1
            ),
            pooled_projections=_randn(batch, 2048, device=device, dtype=dtype, seed=2),
            timestep=torch.full((batch,), 500.0, device=device, dtype=dtype),
        )

    tokens = (latent // 2) ** 2
    return Case(
        "sd3",
        f"SD3.5-Large ({tokens} image + {text_len} text tokens{_blocks(real, config)})",
        lambda: SD3Transformer2DModel(**config),
        inputs,
        lambda i: _text_negative(i, ("encoder_hidden_states", "pooled_projections")),
        floor_inputs,
    )


def sdxl_case(full: bool, real: bool = False) -> Case:
    from diffusers import UNet2DConditionModel

    config = dict(
        sample_size=128,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )
    latent = 128
    if real:
        config.update(layers_per_block=1, transformer_layers_per_block=(1, 1, 2))
        latent = 64
    elif not full:
        config.update(
            block_out_channels=(160, 320, 640), transformer_layers_per_block=(1, 1, 2), attention_head_dim=(5, 10, 20)
        )
        latent = 64

    def inputs(batch, device, dtype):
        return dict(
            sample=_randn(batch, 4, latent, latent, device=device, dtype=dtype),
            timestep=torch.tensor(500.0, device=device),
            encoder_hidden_states=_randn(batch, 77, 2048, device=device, dtype=dtype, seed=1),
            added_cond_kwargs={
                "text_embeds": _randn(batch, 1280, device=device, dtype=dtype, seed=2),
                "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * batch, device=device, dtype=dtype),
            },
        )

    return Case(
        "sdxl",
        f"SDXL ({latent * 8}x{latent * 8}, 77 text tokens{_blocks(real, config)})",
        lambda: UNet2DConditionModel(**config),
        inputs,
        _text_negative,
        floor_inputs,
    )


def pixart_case(full: bool, real: bool = False, published: bool = False) -> Case:
    """``published``: the published width and resolution (1024x1024: 4096 image tokens) with one block."""
    from diffusers import PixArtTransformer2DModel

    config = dict(
        sample_size=128,
        num_layers=28,
        num_attention_heads=16,
        attention_head_dim=72,
        in_channels=4,
        out_channels=8,
        cross_attention_dim=1152,
        caption_channels=4096,
        patch_size=2,
        norm_type="ada_norm_single",
        use_additional_conditions=False,
        interpolation_scale=2,
    )
    latent = 128
    if published:
        config.update(num_layers=1)
        real = True
    elif not full:
        config.update(num_layers=2 if real else 4, sample_size=64)
        latent = 64

    def inputs(batch, device, dtype):
        mask = torch.ones(batch, 300, device=device)
        mask[:, 120:] = 0
        return dict(
            hidden_states=_randn(batch, 4, latent, latent, device=device, dtype=dtype),
            encoder_hidden_states=_randn(batch, 300, 4096, device=device, dtype=dtype, seed=1),
            encoder_attention_mask=mask,
            timestep=torch.full((batch,), 500.0, device=device),
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        )

    return Case(
        "pixart",
        f"PixArt-Sigma ({(latent // 2) ** 2} image + 300 text tokens{_blocks(real, config)})",
        lambda: PixArtTransformer2DModel(**config),
        inputs,
        lambda i: _text_negative(i, ("encoder_hidden_states", "encoder_attention_mask")),
        floor_inputs,
    )


def sana_case(full: bool, real: bool = False) -> Case:
    from diffusers import SanaTransformer2DModel

    config = dict(
        in_channels=32,
        out_channels=32,
        num_attention_heads=70,
        attention_head_dim=32,
        num_layers=20,
        num_cross_attention_heads=20,
        cross_attention_head_dim=112,
        cross_attention_dim=2240,
        caption_channels=2304,
        mlp_ratio=2.5,
        sample_size=32,
        patch_size=1,
    )
    latent = 32
    if not full:
        config.update(num_layers=2 if real else 4)

    def inputs(batch, device, dtype):
        mask = torch.ones(batch, 300, device=device)
        mask[:, 150:] = 0
        return dict(
            hidden_states=_randn(batch, 32, latent, latent, device=device, dtype=dtype),
            encoder_hidden_states=_randn(batch, 300, 2304, device=device, dtype=dtype, seed=1),
            encoder_attention_mask=mask,
            timestep=torch.full((batch,), 500.0, device=device),
        )

    return Case(
        "sana",
        f"Sana 1.6B ({latent * latent} image + 300 text tokens{_blocks(real, config)})",
        lambda: SanaTransformer2DModel(**config),
        inputs,
        lambda i: _text_negative(i, ("encoder_hidden_states", "encoder_attention_mask")),
        floor_inputs,
    )


#: The Wan cases' prompt length in tokens; the rest of the 512 are the zero padding Wan's pipelines add.
WAN_PROMPT_TOKENS = 120


def wan_case(full: bool, size: str, real: bool = False, published: bool = False) -> Case:
    """``published``: the published width at 480x832 with 33 frames (9 latent frames, 14,040 video tokens; the
    published 81 frames take minutes per forward on one CPU thread) and one block."""
    from diffusers import WanTransformer3DModel

    if size == "14B":
        config = dict(num_layers=40, num_attention_heads=40, attention_head_dim=128, ffn_dim=13824)
    else:
        config = dict(num_layers=30, num_attention_heads=12, attention_head_dim=128, ffn_dim=8960)
    config.update(
        patch_size=(1, 2, 2),
        in_channels=16,
        out_channels=16,
        text_dim=4096,
        freq_dim=256,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        rope_max_seq_len=1024,
    )
    frames, height, width = 21, 60, 104  # 81 frames at 480x832
    if published:
        config.update(num_layers=1)
        frames, real = 9, True
    elif not full:
        config.update(num_layers=2, num_attention_heads=min(config["num_attention_heads"], 12))
        frames, height, width = 5, 30, 52

    def inputs(batch, device, dtype):
        # Wan's pipelines pad each prompt's embeddings with zeros to 512 tokens (no mask): a prompt of WAN_PROMPT_TOKENS
        text = _randn(batch, 512, 4096, device=device, dtype=dtype, seed=1)
        text[:, WAN_PROMPT_TOKENS:] = 0
        return dict(
            hidden_states=_randn(batch, 16, frames, height, width, device=device, dtype=dtype),
            encoder_hidden_states=text,
            timestep=torch.full((batch,), 500.0, device=device),
        )

    tokens = frames * (height // 2) * (width // 2)
    return Case(
        f"wan-{size}",
        f"Wan 2.1 {size} ({tokens} video + 512 text tokens, {WAN_PROMPT_TOKENS} the prompt's{_blocks(real, config)})",
        lambda: WanTransformer3DModel(**config),
        inputs,
        _text_negative,
        floor_inputs,
    )


REAL = {  # preset "real": published widths, fewer layers, about 1024 image tokens (CPU)
    "flux": lambda: [flux_case(False, 128, real=True)],
    "flux2": lambda: [flux2_case(False, 512, real=True)],
    "sd3": lambda: [sd3_case(False, real=True)],
    "sdxl": lambda: [sdxl_case(False, real=True)],
    "pixart": lambda: [pixart_case(False, real=True)],
    "sana": lambda: [sana_case(False, real=True)],
    "wan": lambda: [wan_case(False, "1.3B", real=True)],
    "qwenimage": lambda: [qwenimage_case(False, 256, real=True)],
    "hunyuanvideo": lambda: [hunyuanvideo_case(False, 256, real=True)],
}


PUBLISHED = {  # preset "published": published widths and resolutions, one block (CPU; the cross-attention families)
    "pixart": lambda: [pixart_case(False, published=True)],
    "wan": lambda: [wan_case(False, "1.3B", published=True)],
}


def cases(preset: str, families: list[str]) -> list[Case]:
    if preset in ("real", "published"):
        table = REAL if preset == "real" else PUBLISHED
        return [case for family in families if family in table for case in table[family]()]
    full = preset == "full"
    makers = {
        "flux": lambda: [flux_case(full, 256), flux_case(full, 512)],
        "sd3": lambda: [sd3_case(full)],
        "sdxl": lambda: [sdxl_case(full)],
        "pixart": lambda: [pixart_case(full)],
        "sana": lambda: [sana_case(full)],
        "wan": lambda: [wan_case(full, "1.3B"), wan_case(full, "14B")],
        "chroma": lambda: [chroma_case(full, 512)],
        "flux2": lambda: [flux2_case(full, 512)],
        "zimage": lambda: [zimage_case(full, 200)],
        "qwenimage": lambda: [qwenimage_case(full, 256)],
        "hunyuanvideo": lambda: [hunyuanvideo_case(full, 256)],
        "hidream": lambda: [hidream_case(full)],
        "lumina2": lambda: [lumina2_case(full, 256, 200)],
        "auraflow": lambda: [auraflow_case(full, 256)],
        "cogview4": lambda: [cogview4_case(full, 256)],
        "cogvideox": lambda: [cogvideox_case(full)],
    }
    return [case for family in families for case in makers[family]()]
