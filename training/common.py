"""Shared pieces of the toy model's training scripts: components, data, schedules, saving.

The model is a stock ``StableDiffusionPipeline``:

- tokenizer: ``CLIPTokenizer`` whose vocabulary is the dataset's caption words (each one token)
  plus single characters, so any prompt tokenizes;
- text encoder: a frozen 1-layer ``CLIPTextModel`` (width 64) with closed-form weights: a bag of
  nearly orthogonal word vectors;
- VAE: an ``AutoencoderKL`` that is the identity map (closed-form weights): the model works in
  pixel space, 32x32 RGB in [-1, 1];
- denoiser: a small ``UNet2DConditionModel`` with cross-attention at 8x8 and 4x4, trained as a
  rectified flow (velocity ``noise - x0`` at ``x_sigma = (1 - sigma) x0 + sigma noise``);
- scheduler: ``DPMSolverMultistepScheduler`` with flow sigmas (DPM-Solver++ 2M for the
  multi-step model, first order, i.e. Euler, for the few-step one).
"""

from __future__ import annotations

import copy
import json
import os
import random
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nag.toy.dataset import VOCABULARY, ToyDataset
from nag.toy.tokenizer import bpe_merges
from nag.toy.vocabulary import MODEL_BACKGROUNDS

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO / "src" / "nag" / "toy" / "weights"
WORK = REPO / "training" / "work"  # intermediate artefacts (git-ignored)

IMAGE_SIZE = 32
#: Backgrounds the model is trained on: the solid ones (the model's vocabulary, ``nag.toy.vocabulary``).
#: Textured backgrounds are in the dataset and the probe, but rendering them costs the small UNet
#: capacity that the CPU budget cannot pay.
TRAIN_BACKGROUNDS = MODEL_BACKGROUNDS
MAX_TOKENS = 20
TEXT_WIDTH = 64

_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"


# --------------------------------------------------------------------------------------------------
# Reproducibility and timing
# --------------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_threads(threads: int) -> None:
    """Use ``threads`` CPU threads for torch's kernels."""
    torch.set_num_threads(max(1, int(threads)))


class Timer:
    """Wall time of named stages, written to ``training/work/timings.json``."""

    def __init__(self, name: str):
        self.name = name
        self.start = time.perf_counter()

    def done(self, **extra: Any) -> float:
        seconds = time.perf_counter() - self.start
        path = WORK / "timings.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        data = json.loads(path.read_text()) if path.exists() else {}
        data[self.name] = {"seconds": round(seconds, 1), "threads": torch.get_num_threads(), **extra}
        path.write_text(json.dumps(data, indent=2) + "\n")
        print(f"[{self.name}] {seconds / 60:.1f} min")
        return seconds


# --------------------------------------------------------------------------------------------------
# Tokenizer (a deterministic byte-level BPE over the caption vocabulary)
# --------------------------------------------------------------------------------------------------




def build_tokenizer():
    """A ``CLIPTokenizer`` in which every caption word is one token (bos 0, eos = pad 1)."""
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}
    for token in ["<|startoftext|>", "<|endoftext|>"] + [t for c in _CHARS for t in (c, c + "</w>")]:
        vocab.setdefault(token, len(vocab))
    words = [list(w[:-1]) + [w[-1] + "</w>"] for w in VOCABULARY if len(w) > 1]
    merges = bpe_merges(words)
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TOKENS)
    for word in VOCABULARY:
        ids = tokenizer(word, add_special_tokens=False).input_ids
        assert len(ids) == 1, f"{word!r} tokenizes to {ids}"
    return tokenizer


# --------------------------------------------------------------------------------------------------
# Components
# --------------------------------------------------------------------------------------------------


def build_text_encoder(tokenizer, seed: int = 0):
    """A frozen ``CLIPTextModel`` with closed-form weights: a bag of word vectors.

    Token embeddings are seeded Gaussian vectors (nearly orthogonal in 64 dimensions), position
    embeddings are small, and every attention and MLP output projection is zero, so each output
    token is ``LayerNorm(word vector + position vector)``. Every caption word is one token, and
    the attribute words are unambiguous (object colours are never background colours), so the
    word set carries the whole caption. The UNet learns to read it through cross-attention, which
    is exactly where NAG acts. Nothing here is trained.
    """
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_WIDTH,
        intermediate_size=2 * TEXT_WIDTH,
        num_hidden_layers=1,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        projection_dim=TEXT_WIDTH,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        attention_dropout=0.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = CLIPTextModel(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        inner = getattr(model, "text_model", model)  # transformers 5 flattened CLIPTextModel
        embeddings = inner.embeddings
        token_shape = embeddings.token_embedding.weight.shape
        embeddings.token_embedding.weight.copy_(torch.randn(token_shape, generator=generator))
        embeddings.position_embedding.weight.copy_(
            0.1 * torch.randn(embeddings.position_embedding.weight.shape, generator=generator)
        )
        for layer in inner.encoder.layers:
            layer.self_attn.out_proj.weight.zero_()
            layer.self_attn.out_proj.bias.zero_()
            layer.mlp.fc2.weight.zero_()
            layer.mlp.fc2.bias.zero_()
    return model.eval().requires_grad_(False)


def build_identity_vae():
    """An ``AutoencoderKL`` whose encoder and decoder are the identity map (pixel space).

    The weights are set in closed form, no training: one block, every residual branch zeroed, and
    the final ``GroupNorm -> SiLU -> conv`` of the encoder and of the decoder made exact by
    carrying each colour channel ``x`` as a group ``[x, -x, K, -K]`` (the group mean is 0 and its
    variance ``(mean(x^2) + K^2) / 2`` is constant to ``1e-6`` for ``K = 1000``), shifting it by
    20 before the SiLU (which is then linear to ``1e-7``) and shifting it back in the last conv.
    Latents are the image in ``[-1, 1]``: ``vae_scale_factor`` is 1 and ``scaling_factor`` 1.
    """
    from diffusers import AutoencoderKL

    big, shift = 1000.0, 20.0
    width = 4 * 3
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(width,),
        layers_per_block=1,
        latent_channels=3,
        norm_num_groups=3,
        sample_size=IMAGE_SIZE,
        mid_block_add_attention=False,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=1.0,
        force_upcast=False,
    )
    with torch.no_grad():
        for p in vae.parameters():
            p.zero_()
        for half in (vae.encoder, vae.decoder):
            # conv_in: channel 4c = x_c, 4c+1 = -x_c, 4c+2 = K, 4c+3 = -K (center tap + bias).
            for c in range(3):
                half.conv_in.weight[4 * c, c, 1, 1] = 1.0
                half.conv_in.weight[4 * c + 1, c, 1, 1] = -1.0
                half.conv_in.bias[4 * c + 2] = big
                half.conv_in.bias[4 * c + 3] = -big
            # Every resnet: zero conv2 makes it the identity; its norms need unit scales only to
            # stay finite.
            for module in half.modules():
                if isinstance(module, torch.nn.GroupNorm):
                    module.weight.fill_(1.0)
            norm = half.conv_norm_out
            norm.weight.fill_(1.0)
            norm.bias.zero_()
            for c in range(3):
                norm.weight[4 * c] = big / 2**0.5
                norm.bias[4 * c] = shift
        # Encoder conv_out: mean = x (channels 0..2), log-variance = -30 (channels 3..5).
        vae.encoder.conv_out.weight[[0, 1, 2], [0, 4, 8], 1, 1] = 1.0
        vae.encoder.conv_out.bias[:3] = -shift
        vae.encoder.conv_out.bias[3:] = -30.0
        vae.decoder.conv_out.weight[[0, 1, 2], [0, 4, 8], 1, 1] = 1.0
        vae.decoder.conv_out.bias[:] = -shift
    return vae.eval()


def build_unet():
    """The denoiser: a pixel-space UNet, 32 -> 16 -> 8 -> 4, cross-attention at 8x8 and 4x4.

    32 channels at full resolution (16 drew blobs with ragged edges: shapes read by the probe at
    29%), 16 channels per attention head.
    """
    from diffusers import UNet2DConditionModel

    down = ("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE,
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 48, 80, 112),
        down_block_types=down,
        up_block_types=tuple(t.replace("Down", "Up") for t in reversed(down)),
        layers_per_block=1,
        attention_head_dim=(2, 3, 5, 7),  # number of heads (diffusers' legacy name): 16 channels each
        cross_attention_dim=TEXT_WIDTH,
        norm_num_groups=1,  # GroupNorm over all channels: a per-group norm before conv_out loses colour
    )


def build_scheduler(order: int):
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=1.0,
        solver_order=order,
        final_sigmas_type="zero",
        lower_order_final=True,
        steps_offset=1,  # unused with flow sigmas; 1 keeps StableDiffusionPipeline from warning
    )


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def dataset_arrays(seed: int, count: int, desc: str = "data", **options: Any):
    """``count`` samples of ``ToyDataset(seed, **options)``: uint8 images, captions, attributes."""
    from tqdm import tqdm

    data = ToyDataset(seed=seed, image_size=IMAGE_SIZE, **options)
    images = np.empty((count, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    captions: list[str] = []
    attributes = []
    for i in tqdm(range(count), desc=desc, mininterval=5):
        sample = data[i]
        images[i] = np.asarray(sample.image)
        captions.append(sample.caption)
        attributes.append(sample.attributes)
    return images, captions, attributes


def tokenize(tokenizer, captions: Iterable[str]) -> torch.Tensor:
    return tokenizer(
        list(captions), padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt"
    ).input_ids


def batches(n: int, batch_size: int, generator: torch.Generator) -> Iterable[torch.Tensor]:
    """Endless shuffled index batches."""
    while True:
        order = torch.randperm(n, generator=generator)
        for i in range(0, n - batch_size + 1, batch_size):
            yield order[i : i + batch_size]


def flow_sigmas(batch: int, generator: torch.Generator) -> torch.Tensor:
    """Training noise levels: logit-normal shifted towards noise (where the caption matters
    most), mixed with uniform for the ends."""
    logit = torch.sigmoid(torch.randn(batch, generator=generator) + 0.5)
    uniform = torch.rand(batch, generator=generator)
    pick = torch.rand(batch, generator=generator) < 0.3
    return torch.where(pick, uniform, logit).clamp(1e-3, 1.0)


class EMA:
    """Exponential moving average of a module's parameters."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module, decay: float | None = None) -> None:
        d = self.decay if decay is None else decay
        for k, v in module.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].mul_(d).add_(v.detach(), alpha=1 - d)
            else:
                self.shadow[k].copy_(v)

    def copy_to(self, module: torch.nn.Module) -> None:
        module.load_state_dict(self.shadow)


# --------------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------------


def save_pipeline(directory: Path, tokenizer, text_encoder, vae, unet, scheduler) -> None:
    """Save a ``StableDiffusionPipeline`` in diffusers format (safetensors).

    The text encoder and the UNet are stored in float16 (half the size; load them with
    ``torch_dtype=torch.float32`` on CPU), the identity VAE in float32 (its weights are exact).
    """
    from diffusers import StableDiffusionPipeline

    text_encoder = copy.deepcopy(text_encoder).to(torch.float16)
    unet = copy.deepcopy(unet).to(torch.float16)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    directory.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(directory, safe_serialization=True)


def environment() -> dict[str, str]:
    import diffusers
    import transformers

    return {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "threads": str(torch.get_num_threads()),
        "cpu": os.uname().machine,
    }
