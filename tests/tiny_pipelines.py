"""Tiny, random-weight, fully offline builds of stock diffusers pipelines for tests.

Every factory returns an instance of the *real* diffusers pipeline class (no subclass), built from
configs only (no ``from_pretrained``, no hub access, no files), on CPU in float32.  Every module is
constructed right after a ``torch.manual_seed`` call, inside ``torch.random.fork_rng`` so building a
pipeline does not disturb the caller's global RNG state.  Two builds of the same factory therefore
have bit-identical weights.

Usage::

    import tiny_pipelines as tp   # tests/ is on sys.path (tests/conftest.py)

    pipe = tp.FACTORIES["sd3"]()
    out = pipe(
        prompt=["a red circle on a blue background", "a cat"],
        generator=torch.Generator("cpu").manual_seed(0),
        **tp.negative_kwargs("sd3", "blurry, low quality", 2),   # {} for sana_sprint
        **tp.call_kwargs("sd3"),        # CFG on; tp.no_cfg_kwargs("sd3") for CFG off
    )
    images = tp.output_tensor(out)      # (B, C, H, W), or (B, F, C, H, W) for wan

Tokenizers
----------
All tokenizers are built from in-memory vocabularies: a word list (``WORDS``) plus single-character
fallback pieces, so *any* English prompt tokenizes; known words become one token, unknown words fall
back to (mostly) characters.  Different prompts give different ids; longer prompts give more
non-padding tokens.

* ``CLIPTokenizer(vocab=..., merges=...)``: byte-level BPE; merges come from a small deterministic BPE
  training on ``WORDS`` (pure Python, ~10 ms), so every word of ``WORDS`` is one token
  (bos ``<|startoftext|>`` = 0, eos = pad = unk = ``<|endoftext|>`` = 1). Lower-cases its input.
  ``model_max_length`` = ``CLIP_MAX_LENGTH`` (32, not 77).
* ``T5Tokenizer(vocab=[(piece, score), ...], extra_ids=0)``: Unigram (pad 0, eos 1, unk 2). Case
  sensitive (upper-case letters are in the vocab as single chars).
* ``GemmaTokenizer(vocab=..., merges=...)``: BPE with "▁" word prefix, adds ``<bos>``; pad 0.

Output type
-----------
``call_kwargs`` uses ``output_type="pt"`` for every pipeline: decoding with the tiny VAEs is cheap.
Image pipelines then return ``.images`` as a float tensor (B, 3, H, W) in [0, 1]; ``wan`` returns
``.frames`` as a float tensor (B, F, 3, H, W) in [0, 1].  ``output_tensor(out)`` fetches either.
Pass ``output_type="latent"`` to skip decoding (then values are unclamped latents).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from nag.toy.tokenizer import bpe_merges

# --------------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------------

WORDS: tuple[str, ...] = tuple(
    """
    a an the of on in at to with and or by for from over under near behind front top bottom left right
    red green blue yellow orange purple pink white black gray grey brown gold silver colorful dark light
    bright circle square triangle star heart line dot shape background foreground sky sea ocean water
    river lake mountain mountains forest tree trees flower flowers grass field garden city street house
    building castle room table chair window door road car bus train boat ship plane bird birds cat cats
    dog dogs horse fish animal person people man woman girl boy child face eyes hair hand portrait
    photo photograph painting drawing sketch illustration render art style cartoon anime realistic
    detailed high quality low blurry blur noisy noise ugly bad worst best beautiful cute small large big
    tiny huge old new happy sad sun moon night day morning evening sunset sunrise light shadow snow rain
    cloud clouds fire smoke glass metal wood stone wooden golden sitting standing running flying walking
    eating wearing holding hat dress shirt apple banana pizza cake coffee cup book computer robot
    astronaut space planet galaxy futuristic vintage watermark text signature jpeg artifacts deformed
    distorted extra missing fingers limbs cropped out frame lowres is are very with dance monkey
    squirrel burger cactus desert
    """.split()
)

_LOWER = "abcdefghijklmnopqrstuvwxyz"
_UPPER = _LOWER.upper()
_DIGITS = "0123456789"
_PUNCT = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"

CLIP_MAX_LENGTH = 32


def _bpe_tables(
    specials: list[str], chars: list[str], words: list[list[str]]
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    vocab: dict[str, int] = {}
    for tok in list(specials) + list(chars) + [s for w in words for s in w]:
        vocab.setdefault(tok, len(vocab))
    merges = bpe_merges(words)
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    return vocab, merges


def make_clip_tokenizer(model_max_length: int = CLIP_MAX_LENGTH):
    from transformers import CLIPTokenizer

    # CLIP lower-cases, splits on whitespace/letters/digits/punctuation runs, appends "</w>" to the last
    # symbol of every pre-token. ASCII printable chars map to themselves in the byte-level alphabet.
    chars = []
    for c in _LOWER + _DIGITS + _PUNCT:
        chars += [c, c + "</w>"]
    words = [list(w[:-1]) + [w[-1] + "</w>"] for w in WORDS if len(w) > 1]
    vocab, merges = _bpe_tables(["<|startoftext|>", "<|endoftext|>"], chars, words)
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        model_max_length=model_max_length,
    )


def make_t5_tokenizer(model_max_length: int = 64):
    from transformers import T5Tokenizer

    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -4.0)]
    for w in WORDS:
        pieces.append(("▁" + w, -2.0))
    for c in _LOWER + _UPPER + _DIGITS + _PUNCT:
        pieces.append(("▁" + c, -8.0))
        pieces.append((c, -8.0))
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


def make_gemma_tokenizer(model_max_length: int = 64):
    from transformers import GemmaTokenizer

    chars = list(_LOWER + _UPPER + _DIGITS + _PUNCT) + ["▁"]
    words = []
    for w in WORDS:
        words.append(["▁"] + list(w))  # word preceded by a space
        if len(w) > 1:
            words.append(list(w))  # first word of a prompt (no leading space)
    vocab, merges = _bpe_tables(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"], chars, words)
    return GemmaTokenizer(
        vocab=vocab, merges=merges, model_max_length=model_max_length, add_bos_token=True, add_eos_token=False
    )


# --------------------------------------------------------------------------------------------------
# Text encoders
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _seeded(seed: int = 0):
    """Fork the CPU RNG (caller's global RNG state is restored on exit) and seed it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _clip_config(tokenizer, hidden_size: int = 32, projection_dim: int = 32):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=projection_dim,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,  # != 2, so pooling takes the first eos position
        pad_token_id=tokenizer.pad_token_id,
    )


def make_clip(seed: int = 0, hidden_size: int = 32, projection_dim: int = 32, with_projection: bool = False):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tok = make_clip_tokenizer()
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    with _seeded(seed):
        model = cls(_clip_config(tok, hidden_size, projection_dim))
    return tok, model.eval()


def make_t5(seed: int = 0, d_model: int = 32, umt5: bool = False):
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    tok = make_t5_tokenizer()
    cfg_cls, model_cls = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    cfg = cfg_cls(
        vocab_size=len(tok),
        d_model=d_model,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        dropout_rate=0.0,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.pad_token_id,
    )
    with _seeded(seed):
        model = model_cls(cfg)
    return tok, model.eval()


def make_gemma2(seed: int = 0, hidden_size: int = 32):
    from transformers import Gemma2Config, Gemma2Model

    tok = make_gemma_tokenizer()
    cfg = Gemma2Config(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        query_pre_attn_scalar=8,
        max_position_embeddings=256,
        sliding_window=64,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    with _seeded(seed):
        model = Gemma2Model(cfg)
    return tok, model.eval()


# --------------------------------------------------------------------------------------------------
# VAEs
# --------------------------------------------------------------------------------------------------


def make_vae_kl(seed: int = 0, latent_channels: int = 4, **kw):
    """AutoencoderKL with 2 blocks -> vae_scale_factor 2."""
    from diffusers import AutoencoderKL

    cfg = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=32,
    )
    cfg.update(kw)
    with _seeded(seed):
        vae = AutoencoderKL(**cfg)
    return vae.eval()


def make_vae_dc(seed: int = 0, latent_channels: int = 4):
    """AutoencoderDC with 2 blocks -> vae_scale_factor 2."""
    from diffusers import AutoencoderDC

    with _seeded(seed):
        vae = AutoencoderDC(
            in_channels=3,
            latent_channels=latent_channels,
            attention_head_dim=2,
            encoder_block_types=("ResBlock", "EfficientViTBlock"),
            decoder_block_types=("ResBlock", "EfficientViTBlock"),
            encoder_block_out_channels=(8, 8),
            decoder_block_out_channels=(8, 8),
            encoder_qkv_multiscales=((), (5,)),
            decoder_qkv_multiscales=((), (5,)),
            encoder_layers_per_block=(1, 1),
            decoder_layers_per_block=(1, 1),
            downsample_block_type="conv",
            upsample_block_type="interpolate",
            decoder_norm_types="rms_norm",
            decoder_act_fns="silu",
            scaling_factor=0.41407,
        )
    return vae.eval()


# --------------------------------------------------------------------------------------------------
# Pipelines
# --------------------------------------------------------------------------------------------------


def _finish(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe.to("cpu")


def flux(guidance_embeds: bool = False):
    """FluxPipeline. ``guidance_embeds=False``: schnell-style; ``True``: dev-style (guidance embedding)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tokenizer, text_encoder = make_clip(seed=0, hidden_size=32)
    tokenizer_2, text_encoder_2 = make_t5(seed=1, d_model=32)
    with _seeded(2):
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=16,  # 4 * vae latent_channels (2x2 packing)
            num_layers=2,
            num_single_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,  # T5 d_model
            pooled_projection_dim=32,  # CLIP hidden size (pooler_output)
            guidance_embeds=guidance_embeds,
            axes_dims_rope=(4, 4, 8),  # sums to attention_head_dim
        ).eval()
    vae = make_vae_kl(
        seed=3,
        latent_channels=4,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )
    scheduler = FlowMatchEulerDiscreteScheduler()
    return _finish(
        FluxPipeline(
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            transformer=transformer,
        )
    )


def flux_dev():
    return flux(guidance_embeds=True)


def sd3(dual_attention: bool = False, qk_norm: str | None = None):
    """StableDiffusion3Pipeline. ``dual_attention=True``: SD3.5-Medium-style (dual attention in layer 0, RMS qk-norm);
    ``qk_norm="rms_norm"`` alone: SD3.5-Large-style."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tokenizer, text_encoder = make_clip(seed=0, hidden_size=16, projection_dim=16, with_projection=True)
    tokenizer_2, text_encoder_2 = make_clip(seed=1, hidden_size=16, projection_dim=16, with_projection=True)
    # The pipeline concatenates the two CLIP hidden states on features (16 + 16) and zero-pads them to the
    # T5 width; here 16 + 16 == 32 == T5 d_model, so the padding is empty.
    tokenizer_3, text_encoder_3 = make_t5(seed=2, d_model=32)
    extra = dict(dual_attention_layers=(0,), qk_norm="rms_norm") if dual_attention else {}
    if qk_norm is not None:
        extra["qk_norm"] = qk_norm
    with _seeded(3):
        transformer = SD3Transformer2DModel(
            sample_size=16,
            patch_size=2,
            in_channels=4,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=4,
            joint_attention_dim=32,
            caption_projection_dim=32,
            pooled_projection_dim=32,  # 16 + 16 (text_embeds of both CLIPs)
            out_channels=4,
            pos_embed_max_size=32,
            **extra,
        ).eval()
    vae = make_vae_kl(
        seed=4, latent_channels=4, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
        scaling_factor=1.5035,
    )
    return _finish(
        StableDiffusion3Pipeline(
            transformer=transformer,
            scheduler=FlowMatchEulerDiscreteScheduler(),
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            text_encoder_3=text_encoder_3,
            tokenizer_3=tokenizer_3,
        )
    )


def sd35():
    return sd3(dual_attention=True)


def _tiny_unet(seed: int, cross_attention_dim: int, **kw):
    from diffusers import UNet2DConditionModel

    with _seeded(seed):
        unet = UNet2DConditionModel(
            block_out_channels=(16, 32),
            layers_per_block=1,
            sample_size=16,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=cross_attention_dim,
            attention_head_dim=(2, 4),
            norm_num_groups=8,
            **kw,
        )
    return unet.eval()


def sdxl():
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    tokenizer, text_encoder = make_clip(seed=0, hidden_size=32)
    tokenizer_2, text_encoder_2 = make_clip(seed=1, hidden_size=32, projection_dim=32, with_projection=True)
    unet = _tiny_unet(
        2,
        cross_attention_dim=64,  # 32 + 32 (penultimate hidden states of both CLIPs)
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=6 * 8 + 32,  # 6 time ids * 8 + pooled text_embeds
    )
    vae = make_vae_kl(seed=3, latent_channels=4, scaling_factor=0.13025)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading",
        steps_offset=1,
    )
    return _finish(
        StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=scheduler,
            force_zeros_for_empty_prompt=True,
            add_watermarker=False,
        )
    )


def sd():
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    tokenizer, text_encoder = make_clip(seed=0, hidden_size=32)
    unet = _tiny_unet(1, cross_attention_dim=32)
    vae = make_vae_kl(seed=2, latent_channels=4)
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
    )
    return _finish(
        StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    )


def _tiny_pixart_transformer(seed: int):
    from diffusers import PixArtTransformer2DModel

    with _seeded(seed):
        transformer = PixArtTransformer2DModel(
            sample_size=8,  # != 128 -> no resolution/aspect-ratio "additional conditions"
            num_layers=2,
            patch_size=2,
            attention_head_dim=8,
            num_attention_heads=3,
            caption_channels=32,  # T5 d_model
            in_channels=4,
            cross_attention_dim=24,
            out_channels=8,  # learned sigma: pipeline keeps the first 4 channels
            attention_bias=True,
            activation_fn="gelu-approximate",
            num_embeds_ada_norm=1000,
            norm_type="ada_norm_single",
            norm_elementwise_affine=False,
            norm_eps=1e-6,
        )
    return transformer.eval()


def _pixart(cls):
    from diffusers import DPMSolverMultistepScheduler

    tokenizer, text_encoder = make_t5(seed=0, d_model=32)
    transformer = _tiny_pixart_transformer(1)
    vae = make_vae_kl(seed=2, latent_channels=4)
    return _finish(
        cls(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            vae=vae,
            transformer=transformer,
            scheduler=DPMSolverMultistepScheduler(),
        )
    )


def pixart_sigma():
    from diffusers import PixArtSigmaPipeline

    return _pixart(PixArtSigmaPipeline)


def pixart_alpha():
    from diffusers import PixArtAlphaPipeline

    return _pixart(PixArtAlphaPipeline)


def _tiny_sana_transformer(seed: int, guidance_embeds: bool):
    from diffusers import SanaTransformer2DModel

    with _seeded(seed):
        transformer = SanaTransformer2DModel(
            patch_size=1,
            in_channels=4,
            out_channels=4,
            num_layers=2,
            num_attention_heads=2,
            attention_head_dim=8,
            num_cross_attention_heads=2,
            cross_attention_head_dim=8,
            cross_attention_dim=16,
            caption_channels=32,  # Gemma2 hidden size
            sample_size=32,
            qk_norm="rms_norm_across_heads" if guidance_embeds else None,
            guidance_embeds=guidance_embeds,
        )
    return transformer.eval()


def sana():
    from diffusers import FlowMatchEulerDiscreteScheduler, SanaPipeline

    tokenizer, text_encoder = make_gemma2(seed=0, hidden_size=32)
    return _finish(
        SanaPipeline(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            vae=make_vae_dc(seed=1, latent_channels=4),
            transformer=_tiny_sana_transformer(2, guidance_embeds=False),
            scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        )
    )


def sana_sprint():
    from diffusers import SanaSprintPipeline, SCMScheduler

    tokenizer, text_encoder = make_gemma2(seed=0, hidden_size=32)
    return _finish(
        SanaSprintPipeline(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            vae=make_vae_dc(seed=1, latent_channels=4),
            transformer=_tiny_sana_transformer(2, guidance_embeds=True),
            scheduler=SCMScheduler(),
        )
    )


def wan():
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    tokenizer, text_encoder = make_t5(seed=0, d_model=32, umt5=True)
    with _seeded(1):
        # 3 spatial downsamples (x8), 2 temporal (x4): matches the config defaults
        # scale_factor_spatial=8 / scale_factor_temporal=4 that WanPipeline reads.
        vae = AutoencoderKLWan(
            base_dim=3,
            z_dim=4,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
            latents_mean=[0.0] * 4,
            latents_std=[1.0] * 4,
        ).eval()
    with _seeded(2):
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=12,
            in_channels=4,
            out_channels=4,
            text_dim=32,  # UMT5 d_model
            freq_dim=32,
            ffn_dim=32,
            num_layers=2,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=32,
        ).eval()
    return _finish(
        WanPipeline(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            vae=vae,
            scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
            transformer=transformer,
        )
    )


def wan_i2v():
    """WanImageToVideoPipeline, Wan 2.1 style: the transformer also attends to CLIP image features
    placed before the text (512 text tokens, as the stock processor assumes)."""
    from diffusers import WanImageToVideoPipeline, WanTransformer3DModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    base = wan()
    with _seeded(6):
        image_encoder = CLIPVisionModel(CLIPVisionConfig(
            hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
            image_size=32, patch_size=8, projection_dim=32,
        )).eval()
    with _seeded(7):
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=12, out_channels=4,
            text_dim=32, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=32, image_dim=32, added_kv_proj_dim=24,
        ).eval()
    processor = CLIPImageProcessor(crop_size=32, size={"shortest_edge": 32}, do_center_crop=True, do_resize=True)
    return _finish(
        WanImageToVideoPipeline(
            tokenizer=base.tokenizer, text_encoder=base.text_encoder, vae=base.vae, scheduler=base.scheduler,
            image_processor=processor, image_encoder=image_encoder, transformer=transformer,
        )
    )


def skyreels_v2():
    """SkyReelsV2Pipeline (text-to-video): a Wan-style transformer and VAE."""
    from diffusers import SkyReelsV2Pipeline, SkyReelsV2Transformer3DModel, UniPCMultistepScheduler

    wan_pipe = wan()
    with _seeded(4):
        transformer = SkyReelsV2Transformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
            text_dim=32, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
        ).eval()
    return _finish(
        SkyReelsV2Pipeline(
            tokenizer=wan_pipe.tokenizer, text_encoder=wan_pipe.text_encoder, vae=wan_pipe.vae,
            scheduler=UniPCMultistepScheduler(flow_shift=8.0, use_flow_sigmas=True, prediction_type="flow_prediction"),
            transformer=transformer,
        )
    )


def sana_video():
    """SanaVideoPipeline: Sana's masked cross-attention in a video transformer, Wan VAE."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SanaVideoPipeline, SanaVideoTransformer3DModel

    tokenizer, text_encoder = make_gemma2(seed=0, hidden_size=32)
    with _seeded(5):
        transformer = SanaVideoTransformer3DModel(
            in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12, num_layers=2,
            num_cross_attention_heads=2, cross_attention_head_dim=12, cross_attention_dim=24, caption_channels=32,
            sample_size=8, patch_size=(1, 2, 2), rope_max_seq_len=32,
        ).eval()
    return _finish(
        SanaVideoPipeline(
            tokenizer=tokenizer, text_encoder=text_encoder, vae=wan().vae, transformer=transformer,
            scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        )
    )


def ltx():
    """LTXPipeline (text-to-video): LTXVideoTransformer3DModel with masked cross-attention."""
    from diffusers import (
        AutoencoderKLLTXVideo,
        FlowMatchEulerDiscreteScheduler,
        LTXPipeline,
        LTXVideoTransformer3DModel,
    )

    tokenizer, text_encoder = make_t5(seed=0, d_model=32)
    with _seeded(1):
        vae = AutoencoderKLLTXVideo(
            in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8),
            decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
            decoder_layers_per_block=(1, 1, 1, 1, 1), spatio_temporal_scaling=(True, True, False, False),
            decoder_spatio_temporal_scaling=(True, True, False, False),
            decoder_inject_noise=(False, False, False, False, False), upsample_residual=(False, False, False, False),
            upsample_factor=(1, 1, 1, 1), timestep_conditioning=False, patch_size=1, patch_size_t=1,
            encoder_causal=True, decoder_causal=False,
        ).eval()
    with _seeded(2):
        transformer = LTXVideoTransformer3DModel(
            in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2,
            attention_head_dim=8, cross_attention_dim=16, num_layers=2, caption_channels=32,
        ).eval()
    return _finish(
        LTXPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder,
            tokenizer=tokenizer, transformer=transformer,
        )
    )


FACTORIES: dict[str, Callable[[], Any]] = {
    "flux": flux,
    "flux_dev": flux_dev,
    "sd3": sd3,
    "sd35": sd35,
    "sdxl": sdxl,
    "sd": sd,
    "pixart_sigma": pixart_sigma,
    "pixart_alpha": pixart_alpha,
    "sana": sana,
    "sana_sprint": sana_sprint,
    "wan": wan,
    "ltx": ltx,
    "skyreels_v2": skyreels_v2,
    "sana_video": sana_video,
}


# --------------------------------------------------------------------------------------------------
# Call arguments and CFG knowledge
# --------------------------------------------------------------------------------------------------

# How each pipeline does classifier-free guidance and passes text to its denoiser (diffusers 0.42.1).
#
# mode:
#   "batched":    CFG ON when guidance_scale > 1; the denoiser is called ONCE per step on a doubled batch
#                 ordered [uncond_0, uncond_1, ..., cond_0, cond_1, ...] (torch.cat([negative, positive]));
#                 the result is split with .chunk(2) -> (uncond, cond).
#   "sequential": CFG ON when the scale > 1; the denoiser is called TWICE per step on the plain batch:
#                 first cond (inside transformer.cache_context("cond")), then uncond ("uncond").
#   None:         no CFG at all (one call per step).
# scale_arg / on / off: the call argument that switches CFG and its ON / OFF values.
# negative_prompt: whether __call__ accepts `negative_prompt` at all.
# text_mask: how the text padding mask reaches the denoiser.
CFG_INFO: dict[str, dict[str, Any]] = {
    # Flux: real CFG only through `true_cfg_scale > 1` AND a negative prompt (or negative_prompt_embeds);
    # with true_cfg_scale > 1 but no negative prompt, CFG is silently off.
    # Schnell-style: `guidance_scale` is ignored (no guidance embedding).
    "flux": dict(
        mode="sequential", scale_arg="true_cfg_scale", on=4.0, off=1.0, negative_prompt=True,
        needs_negative_prompt=True, text_mask="none (T5 padding tokens are attended)",
    ),
    # Flux-dev style: `guidance_scale` feeds the guidance embedding (distilled guidance, NOT CFG; the
    # denoiser gets `guidance=`); real CFG as above through true_cfg_scale.
    "flux_dev": dict(
        mode="sequential", scale_arg="true_cfg_scale", on=4.0, off=1.0, negative_prompt=True,
        needs_negative_prompt=True, embedded_guidance_scale=3.5, text_mask="none",
    ),
    # SD3: CLIP-L and CLIP-G penultimate states concatenated on features, zero-padded to the T5 width, then
    # concatenated with T5 on the sequence axis: encoder_hidden_states (B, CLIP_MAX_LENGTH + max_seq, 32).
    "sd3": dict(mode="batched", scale_arg="guidance_scale", on=4.0, off=1.0, negative_prompt=True,
                text_mask="none"),
    "sd35": dict(mode="batched", scale_arg="guidance_scale", on=4.0, off=1.0, negative_prompt=True,
                 text_mask="none"),
    "sdxl": dict(mode="batched", scale_arg="guidance_scale", on=4.0, off=1.0, negative_prompt=True,
                 text_mask="none (CLIP pads with <|endoftext|>)"),
    # SD: a list `prompt` needs a list `negative_prompt` (a str raises TypeError in encode_prompt).
    "sd": dict(mode="batched", scale_arg="guidance_scale", on=4.0, off=1.0, negative_prompt=True,
               text_mask="none (CLIP pads with <|endoftext|>)"),
    "pixart_sigma": dict(mode="batched", scale_arg="guidance_scale", on=4.0, off=1.0, negative_prompt=True,
                         text_mask="encoder_attention_mask kwarg, (2B, max_seq) int64, 1 = real token"),
    "pixart_alpha": dict(mode="batched", scale_arg="guidance_scale", on=4.0, off=1.0, negative_prompt=True,
                         text_mask="encoder_attention_mask kwarg, (2B, max_seq) int64, 1 = real token"),
    "sana": dict(mode="batched", scale_arg="guidance_scale", on=4.0, off=1.0, negative_prompt=True,
                 text_mask="encoder_attention_mask kwarg, (2B, max_seq) int64, 1 = real token"),
    # Sana Sprint: timestep-distilled, no `negative_prompt` argument, no CFG. `guidance_scale` feeds the
    # guidance embedding (scaled by transformer.config.guidance_embeds_scale = 0.1).
    "sana_sprint": dict(mode=None, scale_arg=None, on=None, off=None, negative_prompt=False,
                        embedded_guidance_scale=4.5,
                        text_mask="encoder_attention_mask kwarg, (B, max_seq) int64, 1 = real token"),
    # Wan: no mask is passed, but the UMT5 states past each prompt's length are zeroed by the pipeline.
    "wan": dict(mode="sequential", scale_arg="guidance_scale", on=4.0, off=1.0, negative_prompt=True,
                text_mask="none (padding positions of encoder_hidden_states are zeros)"),
    # SkyReels-V2: Wan's structure, one call per branch.
    "skyreels_v2": dict(mode="sequential", scale_arg="guidance_scale", on=4.0, off=1.0, negative_prompt=True,
                        text_mask="none (padding positions of encoder_hidden_states are zeros)"),
    # Sana-Video: batched [uncond, cond], with a text mask, like Sana.
    "sana_video": dict(mode="batched", scale_arg="guidance_scale", on=4.0, off=1.0, negative_prompt=True,
                       text_mask="encoder_attention_mask kwarg, (2B, max_seq), 1 = real token"),
    # LTX: batched [uncond, cond] like PixArt, with a text mask.
    "ltx": dict(mode="batched", scale_arg="guidance_scale", on=4.0, off=1.0, negative_prompt=True,
                text_mask="encoder_attention_mask kwarg, (2B, max_seq), 1 = real token"),
}

# Pixel sizes: all image VAEs here have vae_scale_factor 2 (wan: 8 spatial, 4 temporal).
_BASE_KWARGS: dict[str, dict[str, Any]] = {
    # flux: height/width must be divisible by vae_scale_factor * 2 = 4.  16px -> 8x8 latent -> 16 tokens.
    "flux": dict(height=16, width=16, max_sequence_length=16),
    "flux_dev": dict(height=16, width=16, max_sequence_length=16, guidance_scale=3.5),
    "sd3": dict(height=16, width=16, max_sequence_length=16),
    "sd35": dict(height=16, width=16, max_sequence_length=16),
    "sdxl": dict(height=16, width=16),
    "sd": dict(height=16, width=16),
    # clean_caption=True (default) needs bs4+ftfy; binning would resize to ~1024px buckets.
    "pixart_sigma": dict(height=16, width=16, max_sequence_length=16, clean_caption=False,
                         use_resolution_binning=False),
    "pixart_alpha": dict(height=16, width=16, max_sequence_length=16, clean_caption=False,
                         use_resolution_binning=False),
    # Sana checks height/width % 32 == 0.  32px -> 16x16 latent (patch 1) -> 256 tokens.
    "sana": dict(height=32, width=32, max_sequence_length=16, clean_caption=False,
                 use_resolution_binning=False, complex_human_instruction=None),
    "sana_sprint": dict(height=32, width=32, max_sequence_length=16, clean_caption=False,
                        use_resolution_binning=False, complex_human_instruction=None, guidance_scale=4.5),
    # num_frames must be 4k+1; 32px -> 4x4 latent -> 2x2 patches; 5 frames -> 2 latent frames.
    "wan": dict(height=32, width=32, num_frames=5, max_sequence_length=16),
    # LTX: spatial and temporal compression 4 here; num_frames must be 8k+1.
    "ltx": dict(height=32, width=32, num_frames=9, max_sequence_length=16),
    "skyreels_v2": dict(height=32, width=32, num_frames=5, max_sequence_length=16),
    "sana_video": dict(height=32, width=32, frames=5, max_sequence_length=16, complex_human_instruction=None,
                       use_resolution_binning=False),
}


def has_cfg(name: str) -> bool:
    return CFG_INFO[name]["mode"] is not None


def call_kwargs(name: str, output_type: str = "pt", num_inference_steps: int = 2) -> dict[str, Any]:
    """Kwargs (besides prompt / negative_prompt / generator) for a fast call with CFG ON where the
    pipeline has CFG (for flux/flux_dev CFG additionally needs a ``negative_prompt``)."""
    kw = dict(_BASE_KWARGS[name])
    # a base `output_type` stays (hunyuanvideo15: latents only, its tiny VAE cannot decode a batch of two)
    kw.update(num_inference_steps=num_inference_steps, output_type=kw.get("output_type", output_type))
    info = CFG_INFO[name]
    if info["mode"] is not None:
        kw[info["scale_arg"]] = info["on"]
    return kw


def no_cfg_kwargs(name: str, output_type: str = "pt", num_inference_steps: int = 2) -> dict[str, Any]:
    """Like :func:`call_kwargs` but with CFG OFF (identical to call_kwargs for pipelines without CFG)."""
    kw = call_kwargs(name, output_type=output_type, num_inference_steps=num_inference_steps)
    info = CFG_INFO[name]
    if info["mode"] is not None:
        kw[info["scale_arg"]] = info["off"]
    return kw


def negative_kwargs(name: str, negative: str | list[str], batch_size: int) -> dict[str, Any]:
    """``{"negative_prompt": [...]}`` as a list of ``batch_size`` (what every pipeline accepts with a list
    prompt), or ``{}`` for pipelines without a negative prompt (sana_sprint)."""
    if not CFG_INFO[name]["negative_prompt"]:
        return {}
    if isinstance(negative, str):
        negative = [negative] * batch_size
    return {"negative_prompt": list(negative)}


def denoiser(pipe) -> torch.nn.Module:
    """The denoising network: ``pipe.transformer`` or ``pipe.unet``."""
    model = getattr(pipe, "transformer", None)
    if model is None:
        model = pipe.unet
    return model


def output_tensor(out) -> torch.Tensor:
    """The images (B, C, H, W) or video frames (B, F, C, H, W) of a pipeline output as a tensor.

    With ``output_type="latent"``: (B, C, h, w) latents; wan (B, C, f, h, w); flux returns *packed*
    latents (B, h/2 * w/2, 4 * C).
    """
    x = out.frames if hasattr(out, "frames") else out.images
    if not isinstance(x, torch.Tensor):
        import numpy as np

        x = torch.from_numpy(np.asarray(x))
    return x


# --------------------------------------------------------------------------------------------------
# Further families (tests/test_families_*.py): built like the ones above, kept out of FACTORIES so
# the broad pipeline checks stay CI-fast; each family test file runs its own invariant suite.
# --------------------------------------------------------------------------------------------------


def _pil_frame(seed: int, size: int = 32):
    import numpy as np
    from PIL import Image

    return Image.fromarray((np.random.RandomState(seed).rand(size, size, 3) * 255).astype("uint8"))


def _image_batch(seed: int, size: int = 32, rows: int = 2) -> torch.Tensor:
    return torch.rand(rows, 3, size, size, generator=torch.Generator().manual_seed(seed))


def ltx_i2v():
    """LTXImageToVideoPipeline: the first latent frame is the encoded image (timestep 0 there)."""
    from diffusers import LTXImageToVideoPipeline

    return _finish(LTXImageToVideoPipeline(**ltx().components))


def ltx_condition():
    """LTXConditionPipeline: frame conditions (here one image at frame 0) joined to the latent tokens."""
    from diffusers import LTXConditionPipeline

    return _finish(LTXConditionPipeline(**ltx().components))


def wan_vace():
    """WanVACEPipeline: a Wan transformer with VACE blocks that read the control video."""
    from diffusers import WanVACEPipeline, WanVACETransformer3DModel

    base = wan()
    with _seeded(8):
        transformer = WanVACETransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
            text_dim=32, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=32, vace_layers=[0],
            vace_in_channels=4 * 2 + 8 * 8,  # inactive + reactive latents, the 8x8 mask
        ).eval()
    return _finish(
        WanVACEPipeline(tokenizer=base.tokenizer, text_encoder=base.text_encoder, vae=base.vae,
                        scheduler=base.scheduler, transformer=transformer)
    )


FAMILY_FACTORIES: dict[str, Callable[[], Any]] = {
    "ltx_i2v": ltx_i2v,
    "ltx_condition": ltx_condition,
    "wan_vace": wan_vace,
}

CFG_INFO.update(
    ltx_i2v=dict(mode="batched", scale_arg="guidance_scale", on=4.0, off=1.0, negative_prompt=True,
                 text_mask="encoder_attention_mask kwarg, (2B, max_seq), 1 = real token"),
    ltx_condition=dict(mode="batched", scale_arg="guidance_scale", on=4.0, off=1.0, negative_prompt=True,
                       text_mask="encoder_attention_mask kwarg, (2B, max_seq), 1 = real token"),
    wan_vace=dict(mode="sequential", scale_arg="guidance_scale", on=4.0, off=1.0, negative_prompt=True,
                  text_mask="none (padding positions of encoder_hidden_states are zeros)"),
)

_BASE_KWARGS.update(
    ltx_i2v=dict(image=_image_batch(11), height=32, width=32, num_frames=9, max_sequence_length=16),
    ltx_condition=dict(image=_image_batch(11), height=32, width=32, num_frames=9, max_sequence_length=16),
    # a control video (5 frames) with its mask: the VACE context, not text
    wan_vace=dict(video=[_pil_frame(12 + f) for f in range(5)],
                  height=32, width=32, num_frames=5, max_sequence_length=16),
)
# WanVACEPipeline generates one video per call (it refuses a list of prompts and several videos per
# prompt): its pipeline tests run batch 1; test_families_video checks a batch of two on the denoiser.
SINGLE_PROMPT = {"wan_vace"}


def make_qwen_tokenizer():
    """Qwen2Tokenizer (byte-level BPE, "Ġ" marks a leading space) with the chat-template specials."""
    from transformers import Qwen2Tokenizer

    chars = list(_LOWER + _UPPER + _DIGITS + _PUNCT) + ["Ġ", "Ċ"]
    words = [["Ġ"] + list(w) for w in WORDS] + [list(w) for w in WORDS if len(w) > 1]
    vocab, merges = _bpe_tables(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], chars, words)
    return Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=256,
                          additional_special_tokens=["<|im_start|>", "<|im_end|>"])


def make_qwen25_vl(seed: int = 0, hidden_size: int = 32):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tok = make_qwen_tokenizer()
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tok), bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
            eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tok.pad_token_id,
            hidden_size=hidden_size, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]},
        ),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=hidden_size,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[0]),
        image_token_id=len(tok) - 1, video_token_id=len(tok) - 1,
    )
    with _seeded(seed):
        model = Qwen2_5_VLForConditionalGeneration(config)
    return tok, model.eval()


def qwenimage():
    """QwenImagePipeline: dual-stream MMDiT, text modulated by the timestep only, text mask."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )

    tokenizer, text_encoder = make_qwen25_vl(seed=0)
    with _seeded(1):
        vae = AutoencoderKLQwenImage(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                     temperal_downsample=[False, True, True], latents_mean=[0.0] * 4,
                                     latents_std=[1.0] * 4).eval()
    with _seeded(2):
        transformer = QwenImageTransformer2DModel(
            patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=32, axes_dims_rope=(4, 6, 6),
        ).eval()
    return _finish(QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder,
                                     tokenizer=tokenizer, transformer=transformer))


FAMILY_FACTORIES.update(qwenimage=qwenimage)
CFG_INFO.update(
    # Qwen-Image: true CFG (true_cfg_scale > 1 and a negative prompt), one call per branch, cond first.
    qwenimage=dict(mode="sequential", scale_arg="true_cfg_scale", on=4.0, off=1.0, negative_prompt=True,
                   needs_negative_prompt=True, text_mask="encoder_hidden_states_mask, None when every token is valid"),
)
_BASE_KWARGS.update(qwenimage=dict(height=32, width=32, max_sequence_length=64))


def qwenimage_inpaint():
    """QwenImageInpaintPipeline: Qwen-Image's transformer; the kept image region is blended back by the pipeline."""
    from diffusers import QwenImageInpaintPipeline

    return _finish(QwenImageInpaintPipeline(**qwenimage().components))


FAMILY_FACTORIES.update(qwenimage_inpaint=qwenimage_inpaint)
CFG_INFO.update(qwenimage_inpaint=dict(CFG_INFO["qwenimage"]))
# strength 1: every step of the 2-step schedule runs (the window checks count steps from the noisy end)
_BASE_KWARGS.update(qwenimage_inpaint=dict(
    height=32, width=32, max_sequence_length=64, image=_image_batch(13), strength=1.0,
    mask_image=(torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(14)) > 0.5).float(),
))


def _qwen_vl_tokenizer():
    """Qwen2Tokenizer (byte-level BPE) with the chat and vision specials, and the specials' ids."""
    from transformers import Qwen2Tokenizer

    chars = list(_LOWER + _UPPER + _DIGITS + _PUNCT) + ["Ġ", "Ċ"]
    words = [["Ġ"] + list(w) for w in WORDS] + [list(w) for w in WORDS if len(w) > 1]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                "<|video_pad|>"]
    vocab, merges = _bpe_tables(specials, chars, words)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=256, additional_special_tokens=specials[1:])
    return tok, {s: tok.convert_tokens_to_ids(s) for s in specials}


def make_qwen25_vl_processor(seed: int = 0, hidden_size: int = 32):
    """A tiny Qwen2.5-VL with a working vision tower, its tokenizer (with the vision specials) and a
    Qwen2VLProcessor whose image processor shrinks every image to 56x56 pixels (4 merged image tokens)."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
    )

    class TinyQwen2VLProcessor(Qwen2VLProcessor):
        # without torchvision, transformers 5 fails to look up the (unused) video processor class when checking
        # the components; the image processor and tokenizer are built here with the right classes
        def check_argument_for_proper_class(self, argument_name, argument):
            return None

    tok, ids = _qwen_vl_tokenizer()
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tok), bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
            pad_token_id=tok.pad_token_id, hidden_size=hidden_size, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]},
        ),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=hidden_size,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[0]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
    )
    with _seeded(seed):
        model = Qwen2_5_VLForConditionalGeneration(config)
    images = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=56 * 56, patch_size=14, merge_size=2,
                                   temporal_patch_size=2)
    return tok, TinyQwen2VLProcessor(image_processor=images, tokenizer=tok), model.eval()


def _remember_encodings(vae):
    """Test speed only: the VAE encodes each distinct 1024x1024 reference image once (about a second on one
    CPU core) and returns the same deterministic result for it afterwards."""
    encode, memory = vae.encode, {}

    def remembering_encode(x, *args, **kwargs):
        key = (tuple(x.shape), x.dtype, x.device, hash(x.detach().cpu().contiguous().numpy().tobytes()), args,
               tuple(sorted(kwargs.items())))
        if key not in memory:
            memory[key] = encode(x, *args, **kwargs)
        return memory[key]

    vae.encode = remembering_encode


def _qwenimage_edit_components():
    """Qwen-Image-Edit components. The pipelines resize every reference image to about 1024x1024 pixels for the
    VAE; a 7-level VAE (64x spatial compression) makes that 16x16 latents, i.e. 64 packed reference tokens."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel

    tokenizer, processor, text_encoder = make_qwen25_vl_processor(seed=0)
    with _seeded(1):
        vae = AutoencoderKLQwenImage(base_dim=3, z_dim=4, dim_mult=[1] * 7, num_res_blocks=1,
                                     temperal_downsample=[False] * 4 + [True, True], latents_mean=[0.0] * 4,
                                     latents_std=[1.0] * 4).eval()
    _remember_encodings(vae)
    with _seeded(2):
        transformer = QwenImageTransformer2DModel(
            patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=32, axes_dims_rope=(4, 6, 6),
        ).eval()
    return dict(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                processor=processor, transformer=transformer)


def qwenimage_edit():
    """QwenImageEditPipeline: Qwen-Image's transformer; the reference image's latents join the image stream
    (``[target, reference]`` tokens, the model's output cut back to the target) and the reference image also
    enters the Qwen2.5-VL prompt encoding (vision tokens), for the negative prompt too."""
    from diffusers import QwenImageEditPipeline

    return _finish(QwenImageEditPipeline(**_qwenimage_edit_components()))


def qwenimage_edit_plus():
    """QwenImageEditPlusPipeline (Qwen-Image-Edit-2509): several reference images, each resized to about 384x384
    pixels for the prompt encoder and 1024x1024 for the VAE; all of them join the image stream."""
    from diffusers import QwenImageEditPlusPipeline

    return _finish(QwenImageEditPlusPipeline(**_qwenimage_edit_components()))


FAMILY_FACTORIES.update(qwenimage_edit=qwenimage_edit, qwenimage_edit_plus=qwenimage_edit_plus)
CFG_INFO.update(qwenimage_edit=dict(CFG_INFO["qwenimage"]), qwenimage_edit_plus=dict(CFG_INFO["qwenimage"]))
# 256px output -> 4x4 latent -> 4 target tokens; every reference image -> 64 tokens. QwenImageEdit: one reference
# image per prompt (a list of two for the batch of two); QwenImageEditPlus: two reference images shared by the one
# prompt (its prompt template puts every image into every prompt, so a batch of prompts is refused by the processor).
_BASE_KWARGS.update(
    qwenimage_edit=dict(
        height=256, width=256, max_sequence_length=64, output_type="latent", image=[_pil_frame(15), _pil_frame(16)]
    ),
    qwenimage_edit_plus=dict(
        height=256, width=256, max_sequence_length=64, output_type="latent", image=[_pil_frame(17), _pil_frame(18)]
    ),
)
SINGLE_PROMPT.add("qwenimage_edit_plus")


def make_qwen3_vl_processor(seed: int = 0, hidden_size: int = 16):
    """A tiny Qwen3-VL with a working vision tower (one merged vision token per 32x32 pixels, the 2x2 latent tokens
    Qwen-Image 2.1 expands each vision slot into), its tokenizer with the vision specials and a minimal chat
    template (what QwenImage21Pipeline reads to count the system tokens it drops), and a Qwen3VLProcessor."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor

    class TinyQwen3VLProcessor(Qwen3VLProcessor):
        # without torchvision, transformers 5 cannot build or check the (unused) video processor
        def check_argument_for_proper_class(self, argument_name, argument):
            return None

    tok, ids = _qwen_vl_tokenizer()
    template = (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% for part in message['content'] %}{{ part['text'] }}{% endfor %}<|im_end|>\n{% endfor %}"
    )
    config = Qwen3VLConfig(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=hidden_size,
            intermediate_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=8,
            pad_token_id=tok.pad_token_id,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [1, 1, 2]},
        ),
        vision_config=dict(
            depth=2,
            hidden_size=16,
            intermediate_size=16,
            num_heads=2,
            out_hidden_size=hidden_size,
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            num_position_embeddings=64,
            deepstack_visual_indexes=[0],
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    with _seeded(seed):
        model = Qwen3VLForConditionalGeneration(config)
    images = Qwen2VLImageProcessor(
        patch_size=16, merge_size=2, temporal_patch_size=2, min_pixels=32 * 32, max_pixels=64 * 64
    )
    processor = TinyQwen3VLProcessor(
        image_processor=images, tokenizer=tok, video_processor=None, chat_template=template
    )
    return processor, model.eval()


def qwenimage21(causal_condition: bool = True):
    """QwenImage21Pipeline: one block-causal single-stream transformer over ``[text with condition-image slots, target
    image]``; true CFG (one call per branch, cond first); a key/value cache of the text prefix across steps when
    ``causal_condition`` (the text modulated from t = 0). 32x32 pixels -> 2x2 latent -> 4 target tokens."""
    from diffusers import (
        AutoencoderKLQwenImage21,
        FlowMatchEulerDiscreteScheduler,
        QwenImage21Pipeline,
        QwenImage21Transformer2DModel,
    )

    processor, text_encoder = make_qwen3_vl_processor(seed=0)
    with _seeded(1):  # five stages: the 16x spatial compression the pipeline assumes
        vae = AutoencoderKLQwenImage21(
            base_dim=4,
            decoder_base_dim=4,
            z_dim=8,
            dim_mult=[1] * 5,
            num_res_blocks=1,
            attn_scales=[],
            temperal_downsample=[False, True, True, True],
            latents_mean=[0.0] * 8,
            latents_std=[1.0] * 8,
        ).eval()
    with _seeded(2):
        transformer = QwenImage21Transformer2DModel(
            patch_size=1,
            in_channels=8,
            out_channels=8,
            num_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            context_in_dim=16,
            mlp_ratio=2,
            axes_dims_rope=(4, 6, 6),
            causal_condition=causal_condition,
        ).eval()
    return _finish(
        QwenImage21Pipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(),
            vae=vae,
            text_encoder=text_encoder,
            processor=processor,
            transformer=transformer,
        )
    )


def qwenimage21_timestep_text():
    """QwenImage21Pipeline without ``causal_condition``: the text is modulated by the sampled timestep, so its
    prefix changes every step (and the pipeline runs without its key/value cache)."""
    return qwenimage21(causal_condition=False)


def qwenimage21_condition_image():
    """QwenImage21Pipeline with a condition image: its latents (4 tokens) fill the vision slot in the text, for the
    negative prompt's encoding too."""
    return qwenimage21()


FAMILY_FACTORIES.update(
    qwenimage21=qwenimage21,
    qwenimage21_timestep_text=qwenimage21_timestep_text,
    qwenimage21_condition_image=qwenimage21_condition_image,
)
for _name in ("qwenimage21", "qwenimage21_timestep_text", "qwenimage21_condition_image"):
    CFG_INFO[_name] = dict(
        CFG_INFO["qwenimage"], text_mask="encoder_hidden_states_mask, None when every token is valid"
    )
    _BASE_KWARGS[_name] = dict(height=32, width=32, output_type="latent")
# one condition image, shared by the batch (the pipeline puts every image into every prompt)
_BASE_KWARGS["qwenimage21_condition_image"].update(image=_pil_frame(19), output_resolution=32)


# --------------------------------------------------------------------------------------------------
# Models that join text and image themselves (tests/test_families_concat.py)
# --------------------------------------------------------------------------------------------------


def chroma():
    """ChromaPipeline: Flux-like blocks modulated by the timestep alone; a [text, image] mask that keeps one
    padding token of each prompt."""
    from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    tokenizer, text_encoder = make_t5(seed=1, d_model=32)
    with _seeded(2):
        transformer = ChromaTransformer2DModel(
            patch_size=1,
            in_channels=16,
            num_layers=2,
            num_single_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            axes_dims_rope=(4, 4, 8),
            approximator_num_channels=16,
            approximator_hidden_dim=32,
            approximator_layers=1,
        ).eval()
    vae = make_vae_kl(
        seed=3,
        latent_channels=4,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )
    return _finish(
        ChromaPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(),
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            transformer=transformer,
        )
    )


FAMILY_FACTORIES.update(chroma=chroma)
CFG_INFO.update(
    # Chroma: CFG when guidance_scale > 1 (negative prompt "" by default), one call per branch, cond first.
    chroma=dict(
        mode="sequential",
        scale_arg="guidance_scale",
        on=4.0,
        off=1.0,
        negative_prompt=True,
        text_mask="attention_mask over [text, image] (float 0/1, one padding token kept)",
    ),
)
_BASE_KWARGS.update(chroma=dict(height=16, width=16, max_sequence_length=16))


def auraflow():
    """AuraFlowPipeline: register tokens before the text, joint (MMDiT) blocks, then single blocks over the
    [registers, text, image] the model joins itself; batched CFG [uncond, cond]."""
    from diffusers import AuraFlowPipeline, AuraFlowTransformer2DModel, FlowMatchEulerDiscreteScheduler

    tokenizer, text_encoder = make_t5(seed=1, d_model=32, umt5=True)
    with _seeded(2):
        transformer = AuraFlowTransformer2DModel(
            sample_size=8,
            patch_size=2,
            in_channels=4,
            num_mmdit_layers=2,
            num_single_dit_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            caption_projection_dim=32,
            out_channels=4,
            pos_embed_max_size=64,
        ).eval()
        # At random init the attention output reaches the prediction only weakly (through norm2 after the
        # residual): larger output projections make the text's effect visible after decoding.
        with torch.no_grad():
            for block in [*transformer.joint_transformer_blocks, *transformer.single_transformer_blocks]:
                block.attn.to_out[0].weight.mul_(4)
            transformer.proj_out.weight.mul_(8)
    vae = make_vae_kl(seed=3, latent_channels=4)
    return _finish(
        AuraFlowPipeline(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            vae=vae,
            transformer=transformer,
            scheduler=FlowMatchEulerDiscreteScheduler(),
        )
    )


FAMILY_FACTORIES.update(auraflow=auraflow)
CFG_INFO.update(
    auraflow=dict(
        mode="batched",
        scale_arg="guidance_scale",
        on=4.0,
        off=1.0,
        negative_prompt=True,
        text_mask="none (the pipeline zeroes the padding positions of encoder_hidden_states)",
    ),
)
_BASE_KWARGS.update(auraflow=dict(height=16, width=16, max_sequence_length=16))


def chroma_img2img():
    """ChromaImg2ImgPipeline: Chroma's transformer starting from an encoded image."""
    from diffusers import ChromaImg2ImgPipeline

    return _finish(ChromaImg2ImgPipeline(**chroma().components))


FAMILY_FACTORIES.update(chroma_img2img=chroma_img2img)
CFG_INFO.update(chroma_img2img=dict(CFG_INFO["chroma"]))
# strength 1: every step of the 2-step schedule runs (the window checks count steps from the noisy end)
_BASE_KWARGS.update(
    chroma_img2img=dict(height=16, width=16, max_sequence_length=16, image=_image_batch(15, size=16), strength=1.0),
)


# --------------------------------------------------------------------------------------------------
# Further text-conditioned families (tests/test_families_more.py)
# --------------------------------------------------------------------------------------------------


def make_glm(seed: int = 0, hidden_size: int = 32):
    """A tiny GlmModel (CogView4's text encoder) with the T5 word vocabulary (pad 0)."""
    from transformers import GlmConfig, GlmModel

    tok = make_t5_tokenizer()
    cfg = GlmConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=256,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.pad_token_id,
    )
    with _seeded(seed):
        model = GlmModel(cfg)
    return tok, model.eval()


def cogview4():
    """CogView4Pipeline: blocks whose processor joins [text, image] with shared projections; the GLM text is
    left-padded to a multiple of 16 tokens (16 or 32 here); one call per CFG branch."""
    from diffusers import CogView4Pipeline, CogView4Transformer2DModel, FlowMatchEulerDiscreteScheduler

    tokenizer, text_encoder = make_glm(seed=1)
    with _seeded(2):
        transformer = CogView4Transformer2DModel(
            patch_size=2,
            in_channels=4,
            out_channels=4,
            num_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            text_embed_dim=32,
            time_embed_dim=16,
            condition_dim=8,
            pos_embed_max_size=16,
            sample_size=8,
            rope_axes_dim=(8, 8),
        ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_shift=0.25, max_shift=0.75, base_image_seq_len=256, use_dynamic_shifting=True, time_shift_type="linear"
    )
    return _finish(
        CogView4Pipeline(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            vae=make_vae_kl(seed=3),
            transformer=transformer,
            scheduler=scheduler,
        )
    )


FAMILY_FACTORIES.update(cogview4=cogview4)
CFG_INFO.update(
    # CogView4: CFG when guidance_scale > 1, one call per branch, cond first; no text mask reaches the model.
    cogview4=dict(
        mode="sequential",
        scale_arg="guidance_scale",
        on=4.0,
        off=1.0,
        negative_prompt=True,
        text_mask="none (the GLM text is left-padded, padding attended)",
    ),
)
_BASE_KWARGS.update(
    cogview4=dict(height=32, width=32),
)


def _tiny_cogvideox_transformer(rotary: bool, seed: int = 2):
    from diffusers import CogVideoXTransformer3DModel

    with _seeded(seed):
        transformer = CogVideoXTransformer3DModel(
            num_attention_heads=2,
            attention_head_dim=16,
            in_channels=4,
            out_channels=4,
            time_embed_dim=16,
            text_embed_dim=32,
            num_layers=2,
            sample_width=4,
            sample_height=4,
            sample_frames=9,
            patch_size=2,
            temporal_compression_ratio=4,
            max_text_seq_length=16,
            use_rotary_positional_embeddings=rotary,
        ).eval()
    return transformer


def cogvideox():
    """CogVideoXPipeline, 5b style (rotary tables over the video tokens): [text, video] joined by the model and
    by every block's processor; batched CFG [uncond, cond]."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline

    tokenizer, text_encoder = make_t5(seed=1, d_model=32)
    with _seeded(3):
        vae = AutoencoderKLCogVideoX(
            in_channels=3,
            out_channels=3,
            down_block_types=("CogVideoXDownBlock3D",) * 3,
            up_block_types=("CogVideoXUpBlock3D",) * 3,
            block_out_channels=(8, 8, 8),
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=2,
            temporal_compression_ratio=4,
        ).eval()
    return _finish(
        CogVideoXPipeline(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            vae=vae,
            transformer=_tiny_cogvideox_transformer(rotary=True),
            scheduler=CogVideoXDDIMScheduler(),
        )
    )


FAMILY_FACTORIES.update(cogvideox=cogvideox)
CFG_INFO.update(
    cogvideox=dict(
        mode="batched",
        scale_arg="guidance_scale",
        on=4.0,
        off=1.0,
        negative_prompt=True,
        text_mask="none (T5 padding to max_sequence_length attended)",
    ),
)
# 16px -> 4x4 latent -> 2x2 patches; 9 frames -> 3 latent frames: 12 video tokens
_BASE_KWARGS.update(cogvideox=dict(height=16, width=16, num_frames=9, max_sequence_length=16))


# The tiny HunyuanVideo transformer of the text-to-video and image-to-video pipelines (2 double, 2 single blocks).
_HUNYUANVIDEO_TRANSFORMER = dict(
    out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2, num_single_layers=2,
    num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True, text_embed_dim=32,
    pooled_projection_dim=32, rope_axes_dim=(4, 6, 6),
)


def hunyuanvideo():
    """HunyuanVideoPipeline: Llama text (through the model's timestep-dependent token refiner, with a mask),
    pooled CLIP in the modulation, [video, text] double and single blocks; true CFG, one call per branch."""
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )
    from transformers import LlamaConfig, LlamaModel

    tokenizer = make_t5_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.pad_token_id,
    )
    with _seeded(1):
        text_encoder = LlamaModel(config).eval()
    from transformers import CLIPTextModel

    tokenizer_2 = make_clip_tokenizer(model_max_length=77)  # the pipeline pads CLIP text to 77 tokens
    with _seeded(4):
        text_encoder_2 = CLIPTextModel(_clip_config(tokenizer_2)).eval()
    with _seeded(3):
        vae = AutoencoderKLHunyuanVideo(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            down_block_types=("HunyuanVideoDownBlock3D",) * 4,
            up_block_types=("HunyuanVideoUpBlock3D",) * 4,
            block_out_channels=(8, 8, 8, 8),
            layers_per_block=1,
            act_fn="silu",
            norm_num_groups=4,
            scaling_factor=0.476986,
            spatial_compression_ratio=8,
            temporal_compression_ratio=4,
            mid_block_add_attention=True,
        ).eval()
    with _seeded(2):
        transformer = HunyuanVideoTransformer3DModel(in_channels=4, **_HUNYUANVIDEO_TRANSFORMER).eval()
    return _finish(
        HunyuanVideoPipeline(
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            transformer=transformer,
            vae=vae,
            scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
        )
    )


FAMILY_FACTORIES.update(hunyuanvideo=hunyuanvideo)
CFG_INFO.update(
    # HunyuanVideo: true CFG (true_cfg_scale > 1 and a negative prompt), one call per branch, cond first;
    # `guidance_scale` feeds the guidance embedding.
    hunyuanvideo=dict(
        mode="sequential",
        scale_arg="true_cfg_scale",
        on=4.0,
        off=1.0,
        negative_prompt=True,
        needs_negative_prompt=True,
        embedded_guidance_scale=6.0,
        text_mask="encoder_attention_mask, (B, max_seq), 1 = real token",
    ),
)
# 32px -> 4x4 latent; 5 frames -> 2 latent frames: 32 video tokens. The prompt template is the prompt itself.
_BASE_KWARGS.update(
    hunyuanvideo=dict(
        height=32, width=32, num_frames=5, max_sequence_length=16, prompt_template={"template": "{}", "crop_start": 0}
    )
)


# --------------------------------------------------------------------------------------------------
# Image-to-video / edit pipelines and the last families (tests/test_families_last.py)
# --------------------------------------------------------------------------------------------------


def cogvideox_i2v():
    """CogVideoXImageToVideoPipeline (1.5 style: an `ofs` embedding): the encoded image, as the first latent
    frame of a conditioning video, is concatenated to the noisy latents on the channel axis (8 channels in)."""
    from diffusers import CogVideoXImageToVideoPipeline, CogVideoXTransformer3DModel

    base = cogvideox()
    with _seeded(5):
        transformer = CogVideoXTransformer3DModel(
            num_attention_heads=2,
            attention_head_dim=16,
            in_channels=8,
            out_channels=4,
            time_embed_dim=16,
            text_embed_dim=32,
            num_layers=2,
            sample_width=4,
            sample_height=4,
            sample_frames=9,
            patch_size=2,
            temporal_compression_ratio=4,
            max_text_seq_length=16,
            use_rotary_positional_embeddings=True,
            ofs_embed_dim=16,
        ).eval()
    return _finish(
        CogVideoXImageToVideoPipeline(
            tokenizer=base.tokenizer,
            text_encoder=base.text_encoder,
            vae=base.vae,
            transformer=transformer,
            scheduler=base.scheduler,
        )
    )


FAMILY_FACTORIES.update(cogvideox_i2v=cogvideox_i2v)
CFG_INFO.update(cogvideox_i2v=dict(CFG_INFO["cogvideox"]))
_BASE_KWARGS.update(
    cogvideox_i2v=dict(image=_image_batch(16, size=16), height=16, width=16, num_frames=9, max_sequence_length=16)
)


_QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_qwen3(seed: int = 0, hidden_size: int = 16, layers: int = 3):
    """A tiny Qwen3ForCausalLM with the byte-level BPE tokenizer above and a minimal chat template."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tok = make_qwen_tokenizer()
    tok.chat_template = _QWEN_CHAT_TEMPLATE
    config = Qwen3Config(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=24,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=256,
        pad_token_id=tok.pad_token_id,
    )
    with _seeded(seed):
        model = Qwen3ForCausalLM(config)
    return tok, model.eval()


def flux2_klein():
    """Flux2KleinPipeline (base, not distilled: CFG with an empty negative, one call per branch): Qwen3 hidden
    states of three layers stacked on the features, Flux-like double blocks, then parallel single blocks over the
    [text, image] the model joins itself."""
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )

    tokenizer, text_encoder = make_qwen3(seed=1)
    with _seeded(2):
        transformer = Flux2Transformer2DModel(
            patch_size=1,
            in_channels=16,
            num_layers=2,
            num_single_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=48,
            timestep_guidance_channels=16,
            mlp_ratio=2.0,
            axes_dims_rope=(4, 4, 4, 4),
            guidance_embeds=False,
        ).eval()
    with _seeded(3):
        vae = AutoencoderKLFlux2(
            block_out_channels=(8, 8),
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=4,
        ).eval()
    return _finish(
        Flux2KleinPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(),
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            transformer=transformer,
            is_distilled=False,
        )
    )


FAMILY_FACTORIES.update(flux2_klein=flux2_klein)
CFG_INFO.update(
    # Flux2 klein (base): CFG when guidance_scale > 1 and not distilled, one call per branch (cond first); the
    # negative branch always encodes "" (no negative_prompt argument); text padded to max_sequence_length, no mask.
    flux2_klein=dict(
        mode="sequential",
        scale_arg="guidance_scale",
        on=4.0,
        off=1.0,
        negative_prompt=False,
        text_mask="none (padding to max_sequence_length attended)",
    ),
)
# 16px -> 8x8 latent (vae scale 2) -> 4x4 packed tokens of 16 channels; three text-encoder layers stacked.
_BASE_KWARGS.update(flux2_klein=dict(height=16, width=16, max_sequence_length=24, text_encoder_out_layers=(1, 2, 3)))


def flux2_klein_inpaint():
    """Flux2KleinInpaintPipeline: FLUX.2 klein's components; the kept image region is blended back by the pipeline."""
    from diffusers import Flux2KleinInpaintPipeline

    return _finish(Flux2KleinInpaintPipeline(**flux2_klein().components))


FAMILY_FACTORIES.update(flux2_klein_inpaint=flux2_klein_inpaint)
CFG_INFO.update(flux2_klein_inpaint=dict(CFG_INFO["flux2_klein"]))
# strength 1: every step of the 2-step schedule runs (the window checks count steps from the noisy end)
_BASE_KWARGS.update(
    flux2_klein_inpaint=dict(
        _BASE_KWARGS["flux2_klein"],
        image=_image_batch(23, size=16),
        strength=1.0,
        mask_image=torch.cat([torch.zeros(2, 1, 16, 8), torch.ones(2, 1, 16, 8)], dim=3),  # repaint the right half
    )
)


def lumina2():
    """Lumina2Pipeline: Gemma2 text (its second-to-last hidden states, a right-padded mask), per-sample
    [caption, image] sequences whose image offset is each caption's valid length; CFG one call per branch."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Pipeline, Lumina2Transformer2DModel

    tokenizer, text_encoder = make_gemma2(seed=1, hidden_size=32)
    with _seeded(2):
        transformer = Lumina2Transformer2DModel(
            sample_size=4,
            patch_size=2,
            in_channels=4,
            hidden_size=32,
            num_layers=2,
            num_refiner_layers=2,
            num_attention_heads=4,
            num_kv_heads=2,
            multiple_of=16,
            norm_eps=1e-5,
            axes_dim_rope=(4, 2, 2),
            axes_lens=(256, 16, 16),
            cap_feat_dim=32,
        ).eval()
    # the pipeline assumes vae_scale_factor 8: four blocks
    vae = make_vae_kl(
        seed=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )
    return _finish(
        Lumina2Pipeline(
            transformer=transformer,
            scheduler=FlowMatchEulerDiscreteScheduler(),
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
        )
    )


FAMILY_FACTORIES.update(lumina2=lumina2)
CFG_INFO.update(
    lumina2=dict(
        mode="sequential",
        scale_arg="guidance_scale",
        on=4.0,
        off=1.0,
        negative_prompt=True,
        text_mask="encoder_attention_mask, (B, max_seq), valid tokens first",
    ),
)
# 32px -> 4x4 latent -> 2x2 patches; a short system prompt keeps the captions' valid lengths apart
_BASE_KWARGS.update(lumina2=dict(height=32, width=32, max_sequence_length=32, system_prompt="draw:"))


_MISTRAL_SPECIALS = [
    "<pad>",
    "<s>",
    "</s>",
    "[IMG]",
    "[IMG_BREAK]",
    "[IMG_END]",
    "[SYSTEM_PROMPT]",
    "[/SYSTEM_PROMPT]",
    "[INST]",
    "[/INST]",
]
# Mistral-Small-3's text-only format; content is a list of {"type": "text", ...} parts as Flux2Pipeline sends it
_MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
    "[SYSTEM_PROMPT]{{ m['content'][0]['text'] }}[/SYSTEM_PROMPT]"
    "{% else %}[INST]{{ m['content'][0]['text'] }}[/INST]{% endif %}{% endfor %}"
)


def make_mistral3(seed: int = 0, hidden_size: int = 16, layers: int = 3):
    """A tiny Mistral3ForConditionalGeneration (Mistral text model, one-layer Pixtral vision tower) with a
    byte-level BPE tokenizer carrying Mistral's special tokens and a text-only chat template.

    FLUX.2 dev ships a PixtralProcessor as its ``tokenizer``; building one needs torchvision, which this
    environment lacks. Flux2Pipeline's text path only calls ``tokenizer.apply_chat_template(messages_batch,
    tokenize=True, return_dict=True, padding="max_length", ...)``, which a tokenizer with a chat template
    answers the same way for text-only messages (the processor's extra work concerns images)."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, Qwen2Tokenizer

    chars = list(_LOWER + _UPPER + _DIGITS + _PUNCT) + ["Ġ", "Ċ"]
    words = [["Ġ"] + list(w) for w in WORDS] + [list(w) for w in WORDS if len(w) > 1]
    vocab, merges = _bpe_tables(_MISTRAL_SPECIALS, chars, words)
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        model_max_length=256,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token=None,
        additional_special_tokens=_MISTRAL_SPECIALS[3:],
    )
    tok.chat_template = _MISTRAL_CHAT_TEMPLATE
    config = Mistral3Config(
        text_config=dict(
            model_type="mistral",
            vocab_size=len(tok),
            hidden_size=hidden_size,
            intermediate_size=24,
            num_hidden_layers=layers,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            max_position_embeddings=256,
            pad_token_id=tok.pad_token_id,
        ),
        vision_config=dict(
            model_type="pixtral",
            hidden_size=16,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            head_dim=8,
            patch_size=14,
            image_size=56,
        ),
        image_token_index=tok.convert_tokens_to_ids("[IMG]"),
        spatial_merge_size=1,
    )
    with _seeded(seed):
        model = Mistral3ForConditionalGeneration(config)
    return tok, model.eval()


def flux2():
    """Flux2Pipeline (FLUX.2 dev): Mistral3 hidden states of three layers stacked on the features, the Flux2
    transformer with a guidance embedding (guidance-distilled: no CFG, no negative prompt); optional reference
    images enter as extra image tokens after the noisy latents."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Pipeline, Flux2Transformer2DModel

    tokenizer, text_encoder = make_mistral3(seed=1)
    with _seeded(2):
        transformer = Flux2Transformer2DModel(
            patch_size=1,
            in_channels=16,
            num_layers=2,
            num_single_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=48,
            timestep_guidance_channels=16,
            mlp_ratio=2.0,
            axes_dims_rope=(4, 4, 4, 4),
            guidance_embeds=True,
        ).eval()
    with _seeded(3):
        vae = AutoencoderKLFlux2(
            block_out_channels=(8, 8),
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=4,
        ).eval()
    pipe = Flux2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
    # the stock system message is longer than the tiny max_sequence_length: every prompt would be cut to it
    pipe.system_message = "draw:"
    return _finish(pipe)


FAMILY_FACTORIES.update(flux2=flux2)
CFG_INFO.update(
    # FLUX.2 dev: guidance-distilled; `guidance_scale` feeds the guidance embedding (the denoiser gets
    # `guidance=`), no CFG and no negative_prompt argument; text padded to max_sequence_length, no mask.
    flux2=dict(
        mode=None,
        scale_arg=None,
        on=None,
        off=None,
        negative_prompt=False,
        embedded_guidance_scale=4.0,
        text_mask="none (padding to max_sequence_length attended)",
    ),
)
_BASE_KWARGS.update(
    flux2=dict(height=16, width=16, max_sequence_length=24, text_encoder_out_layers=(1, 2, 3), guidance_scale=4.0)
)


def zimage():
    """ZImagePipeline: Qwen3 text (second-to-last hidden states, padding removed: a list of per-prompt tensors of
    their own lengths), a transformer taking lists of latents and captions that joins each sample as [image,
    caption, padding] (each padded to a multiple of 32); CFG one call on [conditional, unconditional] lists."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

    tokenizer, text_encoder = make_qwen3(seed=1, hidden_size=16)
    with _seeded(2):
        transformer = ZImageTransformer2DModel(
            all_patch_size=(2,),
            all_f_patch_size=(1,),
            in_channels=4,
            dim=32,
            n_layers=2,
            n_refiner_layers=1,
            n_heads=2,
            n_kv_heads=2,
            cap_feat_dim=16,
            axes_dims=[8, 4, 4],
            axes_lens=[256, 16, 16],
        ).eval()
        # zero-initialised pad tokens in the stock model: random ones make the image padding visible
        transformer.x_pad_token.data.normal_()
        transformer.cap_pad_token.data.normal_()
    vae = make_vae_kl(seed=3, shift_factor=0.1159, scaling_factor=0.3611)
    return _finish(
        ZImagePipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(),
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            transformer=transformer,
        )
    )


FAMILY_FACTORIES.update(zimage=zimage)
CFG_INFO.update(
    # Z-Image: CFG when guidance_scale > 0, ONE call per step on the lists prompt_embeds + negative_prompt_embeds:
    # the conditional rows FIRST ("batched_cond_first"); the denoiser returns a list of per-sample outputs.
    zimage=dict(
        mode="batched_cond_first",
        scale_arg="guidance_scale",
        on=4.0,
        off=0.0,
        negative_prompt=True,
        text_mask="none (padding removed: per-sample caption lengths)",
    ),
)
# 16px -> 8x8 latent (vae scale 2) -> 4x4 patches: 16 image tokens, padded by the model to 32
_BASE_KWARGS.update(zimage=dict(height=16, width=16, max_sequence_length=48))


# --------------------------------------------------------------------------------------------------
# HunyuanImage 2.1 (tests/test_families_hunyuan.py)
# --------------------------------------------------------------------------------------------------


def _byt5_text_encoder():
    """The byT5 glyph-text encoder of the Hunyuan 2.1 / 1.5 tiny pipelines: a 2-layer T5 encoder, seeded."""
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    tokenizer = ByT5Tokenizer()
    with _seeded(1):
        encoder = T5EncoderModel(
            T5Config(
                vocab_size=len(tokenizer),
                d_model=16,
                d_kv=8,
                d_ff=37,
                num_layers=2,
                num_heads=2,
                relative_attention_num_buckets=8,
                relative_attention_max_distance=32,
                dropout_rate=0.0,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                decoder_start_token_id=tokenizer.pad_token_id,
            )
        ).eval()
    return tokenizer, encoder


def hunyuanimage(guider=None, distilled=True):
    """HunyuanImagePipeline (HunyuanImage 2.1): Qwen2.5-VL text (through the model's timestep-dependent token
    refiner, with a mask) and a byT5 stream for quoted text (its own mask), joined by the model per sample as
    [valid byT5, valid text, padding]; [image, text] double and single blocks; modulation from the timestep
    alone. CFG comes from the `guider` component (one call per branch, cond first); none: no CFG. `distilled`: a
    guidance embedding and a meanflow second timestep (`timestep_r`), as in HunyuanImage-2.1-Distilled."""
    from diffusers import (
        AutoencoderKLHunyuanImage,
        FlowMatchEulerDiscreteScheduler,
        HunyuanImagePipeline,
        HunyuanImageTransformer2DModel,
    )

    tokenizer, text_encoder = make_qwen25_vl(seed=0)
    tokenizer_2, text_encoder_2 = _byt5_text_encoder()
    with _seeded(3):
        vae = AutoencoderKLHunyuanImage(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            block_out_channels=(32, 32),
            layers_per_block=1,
            spatial_compression_ratio=2,
            sample_size=32,
            scaling_factor=0.75,
        ).eval()
    with _seeded(2):
        transformer = HunyuanImageTransformer2DModel(
            in_channels=4,
            out_channels=4,
            num_attention_heads=2,
            attention_head_dim=16,
            num_layers=2,
            num_single_layers=2,
            num_refiner_layers=1,
            patch_size=(1, 1),
            text_embed_dim=32,
            text_embed_2_dim=16,
            rope_axes_dim=(8, 8),
            guidance_embeds=distilled,
            use_meanflow=distilled,
        ).eval()
    pipe = HunyuanImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
        guider=guider,
    )
    # the real template and lengths (1000 + 34 Qwen tokens, 128 byT5 bytes) made small
    pipe.prompt_template_encode, pipe.prompt_template_encode_start_idx = "{}", 0
    pipe.tokenizer_max_length, pipe.tokenizer_2_max_length = 24, 16
    return _finish(pipe)


FAMILY_FACTORIES.update(hunyuanimage=hunyuanimage)
CFG_INFO.update(
    # HunyuanImage 2.1: CFG is the `guider` component's (no call argument switches it); this configuration has
    # none (the distilled model's setting). tests/test_families_hunyuan.py builds the same components with a
    # ClassifierFreeGuidance guider for its CFG checks (one call per branch, cond first).
    hunyuanimage=dict(
        mode=None,
        scale_arg=None,
        on=None,
        off=None,
        negative_prompt=True,
        cfg_by_guider=True,
        embedded_guidance_scale=3.25,
        text_mask="encoder_attention_mask and encoder_attention_mask_2 (byT5), (B, max_seq), 1 = real token",
    ),
)
# 32px -> 16x16 latent (patch 1): 256 image tokens; 24 Qwen + 16 byT5 text tokens.
_BASE_KWARGS.update(hunyuanimage=dict(height=32, width=32, distilled_guidance_scale=3.25))


# --------------------------------------------------------------------------------------------------
# HunyuanVideo 1.5 (tests/test_families_video2.py)
# --------------------------------------------------------------------------------------------------


def _tiny_hunyuanvideo15_transformer(seed: int, task_type: str):
    from diffusers import HunyuanVideo15Transformer3DModel

    with _seeded(seed):
        return HunyuanVideo15Transformer3DModel(
            in_channels=9,
            out_channels=4,
            num_attention_heads=2,
            attention_head_dim=16,
            num_layers=2,
            num_refiner_layers=1,
            patch_size=1,
            patch_size_t=1,
            text_embed_dim=32,
            text_embed_2_dim=16,
            image_embed_dim=16,
            rope_axes_dim=(4, 6, 6),
            target_size=32,
            task_type=task_type,
        ).eval()


def hunyuanvideo15(guider=None):
    """HunyuanVideo15Pipeline (HunyuanVideo 1.5 text-to-video): Qwen2.5-VL text-model states (through the model's
    timestep-dependent token refiner, with a mask) and a byT5 stream for quoted text (its own mask); the model joins
    per sample [valid image embedding (all zero in text-to-video: masked), valid byT5, valid text, the rest] in front
    of which its [video, text] double blocks put the video. CFG comes from the `guider` component (one call per
    branch, conditional first); the default guider here has scale 1 (no CFG: one call per step)."""
    from diffusers import (
        AutoencoderKLHunyuanVideo15,
        ClassifierFreeGuidance,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideo15Pipeline,
    )
    from transformers import Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel

    tokenizer = make_qwen_tokenizer()
    tokenizer.chat_template = _QWEN_CHAT_TEMPLATE
    config = Qwen2_5_VLTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        eos_token_id=None,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]},
    )
    with _seeded(0):
        text_encoder = Qwen2_5_VLTextModel(config).eval()
    tokenizer_2, text_encoder_2 = _byt5_text_encoder()
    with _seeded(3):
        vae = AutoencoderKLHunyuanVideo15(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            block_out_channels=(8, 8, 8),
            layers_per_block=1,
            spatial_compression_ratio=4,
            temporal_compression_ratio=4,
        ).eval()
    transformer = _tiny_hunyuanvideo15_transformer(seed=2, task_type="t2v")
    pipe = HunyuanVideo15Pipeline(
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        guider=guider if guider is not None else ClassifierFreeGuidance(guidance_scale=1.0),
    )
    # the real system message and lengths (108 cropped template tokens + 1000 Qwen tokens, 256 byT5 bytes,
    # 729 image-embedding tokens) made small; nothing is cropped here (the short template stays in the text)
    pipe.system_message = "draw:"
    pipe.prompt_template_encode_start_idx = 0
    pipe.tokenizer_max_length, pipe.tokenizer_2_max_length = 64, 16
    pipe.vision_num_semantic_tokens = 4
    return _finish(pipe)


FAMILY_FACTORIES.update(hunyuanvideo15=hunyuanvideo15)
CFG_INFO.update(
    # HunyuanVideo 1.5: CFG is the `guider` component's (no call argument switches it); this configuration's guider
    # has scale 1 (off). tests/test_families_video2.py builds the same components with a scale-4 guider for its CFG
    # checks (one call per branch, cond first).
    hunyuanvideo15=dict(
        mode=None,
        scale_arg=None,
        on=None,
        off=None,
        negative_prompt=True,
        cfg_by_guider=True,
        text_mask="encoder_attention_mask and encoder_attention_mask_2 (byT5), (B, max_seq), 1 = real token",
    ),
)
# The tiny VAE's decoder fails on batches of two in diffusers 0.42.1 (its causal attention mask has one row):
# the checks compare latents. 32px -> 8x8 latent (patch 1), 5 frames -> 2 latent frames: 128 video tokens.
_BASE_KWARGS.update(hunyuanvideo15=dict(height=32, width=32, num_frames=5, output_type="latent"))


def _ltx2(cross_attn_mod: bool):
    from diffusers import (
        AutoencoderKLLTX2Audio,
        FlowMatchEulerDiscreteScheduler,
        LTX2Pipeline,
        LTX2VideoTransformer3DModel,
    )
    from diffusers.pipelines.ltx2 import LTX2TextConnectors
    from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder

    # The real text encoder is Gemma 3 (all hidden states stacked); a tiny Gemma2 model gives the same kind of
    # output (hidden_states of 2 layers + embeddings: text_proj_in_factor 3), left padded by the pipeline.
    tokenizer, text_encoder = make_gemma2(seed=0, hidden_size=32)
    with _seeded(21):
        transformer = LTX2VideoTransformer3DModel(
            in_channels=4,
            out_channels=4,
            patch_size=1,
            patch_size_t=1,
            num_attention_heads=2,
            attention_head_dim=8,
            cross_attention_dim=16,
            audio_in_channels=4,
            audio_out_channels=4,
            audio_num_attention_heads=2,
            audio_attention_head_dim=4,
            audio_cross_attention_dim=8,
            num_layers=2,
            qk_norm="rms_norm_across_heads",
            caption_channels=32,
            rope_double_precision=False,
            rope_type="split",
            cross_attn_mod=cross_attn_mod,
            gated_attn=cross_attn_mod,
            audio_gated_attn=cross_attn_mod,
        ).eval()
    with _seeded(22):
        connectors = LTX2TextConnectors(
            caption_channels=32,
            text_proj_in_factor=3,
            video_connector_num_attention_heads=4,
            video_connector_attention_head_dim=8,
            video_connector_num_layers=1,
            video_connector_num_learnable_registers=None,
            audio_connector_num_attention_heads=4,
            audio_connector_attention_head_dim=8,
            audio_connector_num_layers=1,
            audio_connector_num_learnable_registers=None,
            connector_rope_base_seq_len=32,
            rope_theta=10000.0,
            rope_double_precision=False,
            causal_temporal_positioning=False,
            rope_type="split",
        ).eval()
    vae = _ltx2_video_vae(patch_size=1)
    with _seeded(24):
        audio_vae = AutoencoderKLLTX2Audio(
            base_channels=4,
            output_channels=2,
            ch_mult=(1,),
            num_res_blocks=1,
            attn_resolutions=None,
            in_channels=2,
            resolution=32,
            latent_channels=2,
            norm_type="pixel",
            causality_axis="height",
            dropout=0.0,
            mid_block_add_attention=False,
            sample_rate=16000,
            mel_hop_length=160,
            is_causal=True,
            mel_bins=8,
        ).eval()
    with _seeded(25):
        vocoder = LTX2Vocoder(
            in_channels=2 * 8,
            hidden_channels=32,
            out_channels=2,
            upsample_kernel_sizes=[4, 4],
            upsample_factors=[2, 2],
            resnet_kernel_sizes=[3],
            resnet_dilations=[[1, 3, 5]],
            leaky_relu_negative_slope=0.1,
            output_sampling_rate=16000,
        ).eval()
    return _finish(
        LTX2Pipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(),
            vae=vae,
            audio_vae=audio_vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            connectors=connectors,
            transformer=transformer,
            vocoder=vocoder,
        )
    )


def _ltx2_video_vae(patch_size: int):
    """LTX-2's video VAE, one block: spatial compression 2 * ``patch_size``, temporal 2."""
    from diffusers import AutoencoderKLLTX2Video

    with _seeded(23):
        vae = AutoencoderKLLTX2Video(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            block_out_channels=(8,),
            decoder_block_out_channels=(8,),
            layers_per_block=(1,),
            decoder_layers_per_block=(1, 1),
            spatio_temporal_scaling=(True,),
            decoder_spatio_temporal_scaling=(True,),
            decoder_inject_noise=(False, False),
            downsample_type=("spatial",),
            upsample_residual=(False,),
            upsample_factor=(1,),
            timestep_conditioning=False,
            patch_size=patch_size,
            patch_size_t=1,
            encoder_causal=True,
            decoder_causal=False,
        ).eval()
        vae.use_framewise_encoding = vae.use_framewise_decoding = False
    return vae


def ltx2():
    """LTX2Pipeline (LTX-2.0 style): video and audio streams, each with text cross-attention to the output of the
    pipeline's `connectors` (run on [negative, positive] under CFG)."""
    return _ltx2(cross_attn_mod=False)


def ltx2_adaln():
    """LTX2Pipeline with cross-attention AdaLN (LTX-2.3 style: the text is modulated per block and per step), and the
    model's per-head gated attention switched on (each head's output scaled by a gate from the queries' input)."""
    return _ltx2(cross_attn_mod=True)


FAMILY_FACTORIES.update(ltx2=ltx2, ltx2_adaln=ltx2_adaln)
# LTX2: batched [uncond, cond]; the denoiser gets the connectors' outputs (video text, audio text, one mask for both).
# The pipeline's other guidance terms (STG, modality isolation, rescale) are off here: plain CFG on the video and
# audio predictions (audio_guidance_scale follows guidance_scale so that scale 1 switches CFG off).
for _name in ("ltx2", "ltx2_adaln"):
    CFG_INFO[_name] = dict(
        mode="batched",
        scale_arg="guidance_scale",
        on=4.0,
        off=1.0,
        negative_prompt=True,
        text_mask="encoder_attention_mask (connectors' mask, (2B, max_seq), 1 = valid)",
    )
    _BASE_KWARGS[_name] = dict(
        height=32,
        width=32,
        num_frames=5,
        frame_rate=25.0,
        max_sequence_length=16,
        stg_scale=0.0,
        modality_scale=1.0,
        guidance_rescale=0.0,
        audio_guidance_scale=1.0,
        audio_stg_scale=0.0,
        audio_modality_scale=1.0,
        audio_guidance_rescale=0.0,
        spatio_temporal_guidance_blocks=None,
        use_cross_timestep=False,
    )


# --------------------------------------------------------------------------------------------------
# HiDream-I1 (tests/test_families_hidream.py)
# --------------------------------------------------------------------------------------------------


def make_llama_tokenizer(model_max_length: int = 64):
    """LlamaTokenizer (BPE with the "▁" word prefix); the HiDream pipeline pads with its eos ``</s>``."""
    from transformers import LlamaTokenizer

    chars = list(_LOWER + _UPPER + _DIGITS + _PUNCT) + ["▁"]
    words = [["▁"] + list(w) for w in WORDS] + [list(w) for w in WORDS if len(w) > 1]
    vocab, merges = _bpe_tables(["<unk>", "<s>", "</s>"], chars, words)
    return LlamaTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def make_llama(seed: int = 0, hidden_size: int = 16, layers: int = 3):
    """A tiny LlamaForCausalLM: HiDream reads the hidden states of every layer (with ``output_attentions=True``,
    which only the eager attention answers without a notice)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_llama_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=24,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        attn_implementation="eager",
    )
    with _seeded(seed):
        model = LlamaForCausalLM(config)
    return tok, model.eval()


def hidream(max_resolution: tuple[int, int] = (8, 8)):
    """HiDreamImagePipeline (HiDream-I1): pooled CLIP-L and CLIP-G embeddings (the modulation), T5 states and the
    hidden states of every Llama-3 layer (stacked: (layers, batch, tokens, width)); double-stream blocks over
    [image, T5 + last Llama layer + this block's Llama layer], then single-stream blocks over the stream the model
    joins the same way; mixture-of-experts feed-forwards. CFG batched as [uncond, cond] in one call."""
    from diffusers import FlowMatchEulerDiscreteScheduler, HiDreamImagePipeline, HiDreamImageTransformer2DModel

    tokenizer, text_encoder = make_clip(seed=0, hidden_size=32, projection_dim=16, with_projection=True)
    tokenizer_2, text_encoder_2 = make_clip(seed=1, hidden_size=32, projection_dim=16, with_projection=True)
    tokenizer_3, text_encoder_3 = make_t5(seed=2, d_model=32)
    tokenizer_4, text_encoder_4 = make_llama(seed=3, hidden_size=16, layers=3)
    with _seeded(4):
        transformer = HiDreamImageTransformer2DModel(
            patch_size=2,
            in_channels=4,
            out_channels=4,
            num_layers=2,
            num_single_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            caption_channels=[32, 16],
            text_emb_dim=32,
            num_routed_experts=3,
            num_activated_experts=2,
            axes_dims_rope=(4, 6, 6),
            max_resolution=max_resolution,
            llama_layers=[0, 1, 2, 1],
        ).eval()
    vae = make_vae_kl(seed=5, latent_channels=4, shift_factor=0.1159, scaling_factor=0.3611)
    pipe = HiDreamImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
        text_encoder_4=text_encoder_4,
        tokenizer_4=tokenizer_4,
        transformer=transformer,
    )
    # the pipeline rescales every request to the area of default_sample_size latents (128: 1024px): 8 -> 16px
    pipe.default_sample_size = 8
    return _finish(pipe)


FAMILY_FACTORIES.update(hidream=hidream)
CFG_INFO.update(
    # HiDream: CFG when guidance_scale > 1, one call on [uncond, cond] (Llama-3 states joined along their batch
    # axis, dim 1); T5 and Llama-3 padded to max_sequence_length and attended (no mask).
    hidream=dict(
        mode="batched",
        scale_arg="guidance_scale",
        on=4.0,
        off=1.0,
        negative_prompt=True,
        text_mask="none (T5 and Llama-3 padding to max_sequence_length attended)",
    ),
)
# 16px (the default area here) -> 8x8 latent -> 4x4 patches: 16 image tokens; 16 T5 + 2 x 16 Llama text tokens.
_BASE_KWARGS.update(hidream=dict(height=16, width=16, max_sequence_length=16))
# Image-conditioned pipelines of supported families (tests/test_families_image_conditioned.py)
# --------------------------------------------------------------------------------------------------

_LLAVA_SPECIALS = ["<pad>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<image>", "assistant"]
# HunyuanVideo-I2V's prompt template made small: the image's vision tokens go where `<image>` stands; the
# pipeline keeps them (every `image_embed_interleave`-th one) before the user text, and cuts the template
# around the text by token counts: exactly four tokens `<|eot_id|><|start_header_id|>assistant<|end_header_id|>`
# after the text, the last `<|end_header_id|>` being the third of the prompt.
_HUNYUAN_I2V_TEMPLATE = (
    "<|start_header_id|>system<|end_header_id|>\n\n<image>\ndraw it:<|eot_id|>\n\n"
    "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|><|start_header_id|>assistant"
    "<|end_header_id|>\n\n"
)
_LLAVA_IMAGE_TOKENS = 4  # 28x28 pixels, 14x14 patches, the CLS token dropped


def make_llava(seed: int = 0, hidden_size: int = 32):
    """A tiny LlavaForConditionalGeneration (CLIP vision tower, Llama text model) with a byte-level BPE tokenizer
    carrying HunyuanVideo-I2V's template specials, and a CLIP image processor that makes every image 28x28 pixels."""
    from transformers import CLIPImageProcessorPil, LlavaConfig, LlavaForConditionalGeneration, Qwen2Tokenizer

    chars = list(_LOWER + _UPPER + _DIGITS + _PUNCT) + ["Ġ", "Ċ"]
    words = [["Ġ"] + list(w) for w in WORDS] + [list(w) for w in WORDS if len(w) > 1]
    vocab, merges = _bpe_tables(_LLAVA_SPECIALS, chars, words)
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        model_max_length=256,
        pad_token="<pad>",
        unk_token=None,
        additional_special_tokens=_LLAVA_SPECIALS[1:],
    )
    config = LlavaConfig(
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=16,
            intermediate_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
            projection_dim=16,
        ),
        text_config=dict(
            model_type="llama",
            vocab_size=len(tok),
            hidden_size=hidden_size,
            intermediate_size=37,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=256,
            pad_token_id=tok.pad_token_id,
        ),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        pad_token_id=tok.pad_token_id,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    with _seeded(seed):
        model = LlavaForConditionalGeneration(config)
    images = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    return tok, images, model.eval()


def _hunyuan_i2v_template(tokenizer) -> dict[str, Any]:
    head = tokenizer(_HUNYUAN_I2V_TEMPLATE.split("{}")[0]).input_ids
    start = head.index(tokenizer.convert_tokens_to_ids("<image>"))
    return {
        "template": _HUNYUAN_I2V_TEMPLATE,
        "crop_start": len(head),
        "image_emb_start": start,
        "image_emb_end": start + _LLAVA_IMAGE_TOKENS,
        "image_emb_len": _LLAVA_IMAGE_TOKENS,
    }


def _hunyuanvideo_i2v(image_condition_type: str):
    from diffusers import HunyuanVideoImageToVideoPipeline, HunyuanVideoTransformer3DModel

    base = hunyuanvideo()
    tokenizer, image_processor, text_encoder = make_llava(seed=1)
    with _seeded(6):
        transformer = HunyuanVideoTransformer3DModel(
            in_channels=4 * 2 + 1 if image_condition_type == "latent_concat" else 4,
            image_condition_type=image_condition_type,
            **_HUNYUANVIDEO_TRANSFORMER,
        ).eval()
    return _finish(
        HunyuanVideoImageToVideoPipeline(
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            transformer=transformer,
            vae=base.vae,
            scheduler=base.scheduler,
            text_encoder_2=base.text_encoder_2,
            tokenizer_2=base.tokenizer_2,
            image_processor=image_processor,
        )
    )


def hunyuanvideo_i2v():
    """HunyuanVideoImageToVideoPipeline, `latent_concat` (HunyuanVideo-I2V-33ch style): the encoded image, as the
    first latent frame of a conditioning video, and its mask are concatenated to the noisy latents on the channel
    axis; the image also enters the Llava prompt encoding (vision tokens kept before the text)."""
    return _hunyuanvideo_i2v("latent_concat")


def hunyuanvideo_i2v_token_replace():
    """HunyuanVideoImageToVideoPipeline, `token_replace` (HunyuanVideo-I2V style): the encoded image replaces the
    first latent frame, whose tokens are modulated as at timestep 0 in every block."""
    return _hunyuanvideo_i2v("token_replace")


FAMILY_FACTORIES.update(
    hunyuanvideo_i2v=hunyuanvideo_i2v, hunyuanvideo_i2v_token_replace=hunyuanvideo_i2v_token_replace
)
for _name in ("hunyuanvideo_i2v", "hunyuanvideo_i2v_token_replace"):
    # True CFG (true_cfg_scale > 1 and a negative prompt, one call per branch, cond first) encodes the negative
    # prompts with ONE black image: with a batch of two prompts the Llava encoder gets 2 x 4 image tokens for 4
    # image features and fails without NAG too (diffusers 0.42.1). The default calls run a batch of two prompts
    # (one image each) without CFG; `cfg_batch_one`: the CFG checks run one prompt.
    CFG_INFO[_name] = dict(
        mode=None,
        scale_arg=None,
        on=None,
        off=None,
        negative_prompt=True,
        cfg_batch_one=True,
        embedded_guidance_scale=6.0,
        text_mask="encoder_attention_mask, (B, image tokens + max_seq), 1 = real token",
    )
    # 32px -> 4x4 latent; 5 frames -> 2 latent frames: 32 video tokens
    _BASE_KWARGS[_name] = dict(
        image=[_pil_frame(30), _pil_frame(31)],
        height=32,
        width=32,
        num_frames=5,
        max_sequence_length=16,
        guidance_scale=6.0,
        prompt_template=_hunyuan_i2v_template(make_llava()[0]),
    )


def hunyuanvideo15_i2v(guider=None):
    """HunyuanVideo15ImageToVideoPipeline: HunyuanVideo 1.5's text streams; the image enters as latent channels (the
    encoded first frame and its mask, concatenated to the noisy latents) and as SigLIP image embeddings the model joins
    before the text (its valid tokens first). The prompt encoding is text only. CFG from the `guider` (scale 1 here)."""
    from diffusers import HunyuanVideo15ImageToVideoPipeline
    from transformers import SiglipImageProcessorPil, SiglipVisionConfig, SiglipVisionModel

    base = hunyuanvideo15(guider)
    with _seeded(7):
        image_encoder = SiglipVisionModel(
            SiglipVisionConfig(
                hidden_size=16,
                intermediate_size=16,
                num_hidden_layers=1,
                num_attention_heads=2,
                image_size=28,
                patch_size=14,
            )
        ).eval()
    feature_extractor = SiglipImageProcessorPil(size={"height": 28, "width": 28})
    transformer = _tiny_hunyuanvideo15_transformer(seed=8, task_type="i2v")
    pipe = HunyuanVideo15ImageToVideoPipeline(
        **{**base.components, "transformer": transformer},
        image_encoder=image_encoder,
        feature_extractor=feature_extractor,
    )
    for attr in (
        "system_message",
        "prompt_template_encode_start_idx",
        "tokenizer_max_length",
        "tokenizer_2_max_length",
    ):
        setattr(pipe, attr, getattr(base, attr))
    pipe.vision_num_semantic_tokens = 4  # 28x28 pixels, 14x14 patches
    return _finish(pipe)


FAMILY_FACTORIES.update(hunyuanvideo15_i2v=hunyuanvideo15_i2v)
CFG_INFO.update(hunyuanvideo15_i2v=dict(CFG_INFO["hunyuanvideo15"]))
# The pipeline takes its size from the image (32x32 pixels: 8x8 latents) and one image for every prompt; latents only
# (the tiny VAE's decoder cannot decode a batch of two, see hunyuanvideo15).
_BASE_KWARGS.update(hunyuanvideo15_i2v=dict(image=_pil_frame(32), num_frames=5, output_type="latent"))


def _ltx2_components():
    """LTX2Pipeline's components with a 4x (not 2x) spatial VAE: the image-conditioned pipelines give every video token
    its own timestep (0 on the clean ones), so the model's modulation runs per token; 8x8 latents keep that fast."""
    return {**{k: v for k, v in ltx2().components.items() if v is not None}, "vae": _ltx2_video_vae(patch_size=2)}


def ltx2_i2v():
    """LTX2ImageToVideoPipeline: LTX-2's transformer and text `connectors`; the encoded image is the first latent
    frame (kept clean: timestep 0 on its tokens)."""
    from diffusers import LTX2ImageToVideoPipeline

    return _finish(LTX2ImageToVideoPipeline(**_ltx2_components()))


def ltx2_condition():
    """LTX2ConditionPipeline: frame conditions; one at frame 0 (overwrites the first latent frame's tokens) and a
    keyframe at the last latent frame (its tokens appended to the video tokens, with their own positions)."""
    from diffusers import LTX2ConditionPipeline

    return _finish(LTX2ConditionPipeline(**_ltx2_components()))


def _ltx2_conditions():
    from diffusers.pipelines.ltx2.pipeline_ltx2_condition import LTX2VideoCondition

    # crf 0: no H.264 re-compression of the condition images (it needs PyAV)
    return [
        LTX2VideoCondition(frames=_pil_frame(33), index=0, crf=0),
        LTX2VideoCondition(frames=_pil_frame(34), index=2, strength=0.8, crf=0),
    ]


FAMILY_FACTORIES.update(ltx2_i2v=ltx2_i2v, ltx2_condition=ltx2_condition)
CFG_INFO.update(ltx2_i2v=dict(CFG_INFO["ltx2"]), ltx2_condition=dict(CFG_INFO["ltx2"]))
# image_crf 0: no H.264 re-compression of the image (it needs PyAV); latents (test speed: no video and audio decoding)
_BASE_KWARGS.update(
    ltx2_i2v=dict(_BASE_KWARGS["ltx2"], image=_pil_frame(33), image_crf=0, output_type="latent"),
    ltx2_condition=dict(_BASE_KWARGS["ltx2"], conditions=_ltx2_conditions(), output_type="latent"),
)


def zimage_img2img():
    """ZImageImg2ImgPipeline: Z-Image's transformer starting from the encoded image."""
    from diffusers import ZImageImg2ImgPipeline

    return _finish(ZImageImg2ImgPipeline(**zimage().components))


def zimage_inpaint():
    """ZImageInpaintPipeline: Z-Image's transformer; the kept region is blended back from the encoded image by the
    pipeline after every step."""
    from diffusers import ZImageInpaintPipeline

    return _finish(ZImageInpaintPipeline(**zimage().components))


def _zimage_mask(size: int = 16, rows: int = 1) -> torch.Tensor:
    """Repaint the right half of the middle rows (and, for a second row, the left half)."""
    mask = torch.zeros(rows, 1, size, size)
    mask[0, :, size // 4 : 3 * size // 4, size // 2 :] = 1.0
    mask[1:, :, size // 4 : 3 * size // 4, : size // 2] = 1.0
    return mask


FAMILY_FACTORIES.update(zimage_img2img=zimage_img2img, zimage_inpaint=zimage_inpaint)
for _name in ("zimage_img2img", "zimage_inpaint"):
    CFG_INFO[_name] = dict(CFG_INFO["zimage"])
# strength 1: every step of the 2-step schedule runs (the window checks count steps from the noisy end); one image
# per prompt
_BASE_KWARGS.update(
    zimage_img2img=dict(_BASE_KWARGS["zimage"], image=_image_batch(35, size=16), strength=1.0),
    zimage_inpaint=dict(
        _BASE_KWARGS["zimage"], image=_image_batch(36, size=16), mask_image=_zimage_mask(), strength=1.0
    ),
)


def _zimage_controlnet(control_in_dim: int):
    from diffusers import ZImageControlNetModel

    with _seeded(9):
        controlnet = ZImageControlNetModel(
            control_layers_places=[0, 1],
            control_in_dim=control_in_dim,
            all_patch_size=(2,),
            all_f_patch_size=(1,),
            dim=32,
            n_refiner_layers=1,
            n_heads=2,
            n_kv_heads=2,
        ).eval()
        # zero-initialised projections in the stock model: random ones make the control visible
        for module in controlnet.modules():
            if isinstance(module, torch.nn.Linear) and not module.weight.any():
                torch.nn.init.normal_(module.weight, std=0.2)
    return controlnet


def zimage_controlnet():
    """ZImageControlNetPipeline: a Z-Image ControlNet (sharing the transformer's embedders and refiners) turns the
    encoded control image, the latents and the captions into hints the transformer adds to its whole [image,
    caption] sequence after main layers 0 and 1; CFG one call on [conditional, unconditional] lists."""
    from diffusers import ZImageControlNetPipeline

    return _finish(ZImageControlNetPipeline(**zimage().components, controlnet=_zimage_controlnet(control_in_dim=4)))


def zimage_controlnet_inpaint():
    """ZImageControlNetInpaintPipeline: the ControlNet's input is [control image latents, mask, masked image
    latents] (9 channels)."""
    from diffusers import ZImageControlNetInpaintPipeline

    return _finish(
        ZImageControlNetInpaintPipeline(**zimage().components, controlnet=_zimage_controlnet(control_in_dim=9))
    )


FAMILY_FACTORIES.update(zimage_controlnet=zimage_controlnet, zimage_controlnet_inpaint=zimage_controlnet_inpaint)
for _name in ("zimage_controlnet", "zimage_controlnet_inpaint"):
    CFG_INFO[_name] = dict(CFG_INFO["zimage"])
# one control image per prompt; the inpainting pipeline joins the control latents with a mask of the mask's own
# batch: one mask per prompt
_BASE_KWARGS.update(
    zimage_controlnet=dict(_BASE_KWARGS["zimage"], control_image=_image_batch(37, size=16)),
    zimage_controlnet_inpaint=dict(
        _BASE_KWARGS["zimage"],
        image=_image_batch(38, size=16),
        mask_image=_zimage_mask(rows=2),
        control_image=_image_batch(39, size=16),
    ),
)
