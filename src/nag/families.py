"""Model families: small declarative adapters.

A :class:`Family` says, for one denoiser architecture, which attention modules attend to text
and how, and how a guided call's inputs are extended with the negative conditioning. A
:class:`PipelineSpec` says, for one pipeline class, which family its denoiser belongs to, its
tuned defaults, and what its ``encode_prompt`` returns.
"""

from __future__ import annotations

import inspect
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .attention import (
    CausalPrefixAttentionNAG,
    CrossAttentionNAG,
    FastCausalPrefixAttentionNAG,
    FastCrossAttentionNAG,
    FastFusedSingleAttentionNAG,
    FastHiDreamJointAttentionNAG,
    FastHiDreamSingleAttentionNAG,
    FastJointAttentionNAG,
    FastOuterMaskJointAttentionNAG,
    FastOuterMaskSingleAttentionNAG,
    FastRowsImageFirstAttentionNAG,
    FastRowsJointAttentionNAG,
    FastRowsPerSampleAttentionNAG,
    FastRowsPerSampleImageFirstAttentionNAG,
    FastRowsSharedAttentionNAG,
    FastSingleProjectedAttentionNAG,
    FastSingleStreamAttentionNAG,
    FusedSingleAttentionNAG,
    HiDreamJointAttentionNAG,
    HiDreamSingleAttentionNAG,
    JointAttentionNAG,
    NAGProcessor,
    RowsImageFirstAttentionNAG,
    RowsJointAttentionNAG,
    RowsPerSampleAttentionNAG,
    RowsPerSampleImageFirstAttentionNAG,
    RowsSharedAttentionNAG,
    SingleProjectedAttentionNAG,
    SingleStreamAttentionNAG,
    pad_tokens,
)
from .engine import GuidedCall
from .settings import FamilyDefaults

__all__ = ["Family", "CausalPrefix", "PipelineSpec", "FAMILIES", "PIPELINES", "pipeline_spec"]

logger = logging.getLogger("nag")

_ROLE_CLASSES: dict[tuple[str, bool], type[NAGProcessor]] = {
    ("cross", False): CrossAttentionNAG,
    ("joint", False): JointAttentionNAG,
    ("single", False): SingleStreamAttentionNAG,
    ("cross", True): FastCrossAttentionNAG,
    ("joint", True): FastJointAttentionNAG,
    ("single", True): FastSingleStreamAttentionNAG,
    # concatenating models (layout "concat"): where no fast class is named, straightforward wrappers also with fast=True
    ("joint_rows", False): RowsJointAttentionNAG,
    ("joint_rows", True): FastRowsJointAttentionNAG,
    ("single_projected", False): SingleProjectedAttentionNAG,
    ("single_projected", True): FastSingleProjectedAttentionNAG,
    ("joint_rows_shared", False): RowsSharedAttentionNAG,
    # fast path where the family runs the blocks on the stock rows with the negative text beside them (CogView4's and
    # CogVideoX's image_first_blocks); blocks on whole negative rows take the straightforward wrapper
    ("joint_rows_shared", True): FastRowsSharedAttentionNAG,
    ("joint_rows_image_first", False): RowsImageFirstAttentionNAG,
    ("joint_rows_image_first", True): FastRowsImageFirstAttentionNAG,
    ("joint_rows_per_sample", False): RowsPerSampleAttentionNAG,
    ("joint_rows_per_sample", True): FastRowsPerSampleAttentionNAG,
    ("joint_rows_per_sample_image_first", False): RowsPerSampleImageFirstAttentionNAG,
    ("joint_rows_per_sample_image_first", True): FastRowsPerSampleImageFirstAttentionNAG,
    ("single_fused", False): FusedSingleAttentionNAG,
    ("single_fused", True): FastFusedSingleAttentionNAG,
    # blocks whose attention mask is the outer product of the model's (rows, text + image) mask (Chroma): the fast
    # paths take the float and boolean forms whose image part is all ones, else the straightforward wrappers
    ("joint_rows_outer_mask", False): RowsJointAttentionNAG,
    ("joint_rows_outer_mask", True): FastOuterMaskJointAttentionNAG,
    ("single_outer_mask", False): SingleStreamAttentionNAG,
    ("single_outer_mask", True): FastOuterMaskSingleAttentionNAG,
    # causal single-stream models (layout "prefix"): the negative prefix's keys/values are prefilled once, and
    # the target image's queries attend to them in a second, image-only attention call (no duplicated rows)
    ("causal_prefix", False): CausalPrefixAttentionNAG,
    ("causal_prefix", True): FastCausalPrefixAttentionNAG,
    ("hidream_joint", False): HiDreamJointAttentionNAG,
    ("hidream_joint", True): FastHiDreamJointAttentionNAG,
    ("hidream_single", False): HiDreamSingleAttentionNAG,
    ("hidream_single", True): FastHiDreamSingleAttentionNAG,
}


def _flux_single_text_start(block: torch.nn.Module, text: torch.Tensor, temb: torch.Tensor) -> dict[str, Any]:
    """Flux single-stream block, negative text rows, before attention: modulation and MLP branch."""
    normed, gate = block.norm(text, emb=temb)
    return {"residual": text, "normed": normed, "gate": gate, "mlp": block.act_mlp(block.proj_mlp(normed))}


def _flux_single_text_finish(block: torch.nn.Module, state: dict[str, Any]) -> torch.Tensor:
    """... after attention: the block's output projection, gate and residual."""
    out = block.proj_out(torch.cat([state["attention"].to(state["mlp"].dtype), state["mlp"]], dim=2))
    out = state["residual"] + state["gate"].unsqueeze(1) * out
    return out.clip(-65504, 65504) if out.dtype == torch.float16 else out


def _flux2_single_text_start(block: torch.nn.Module, text: torch.Tensor, modulation: torch.Tensor) -> dict[str, Any]:
    """FLUX.2 single-stream block, negative text rows, before attention: the modulated norm (the block's shift, scale
    and gate are the three chunks of its per-row modulation)."""
    shift, scale, gate = (modulation.unsqueeze(1) if modulation.ndim == 2 else modulation).chunk(3, dim=-1)
    return {"residual": text, "normed": (1 + scale) * block.norm(text) + shift, "gate": gate}


def _flux2_single_text_finish(block: torch.nn.Module, state: dict[str, Any]) -> torch.Tensor:
    """... after attention (the fused attention + MLP output): gate and residual."""
    out = state["residual"] + state["gate"] * state["attention"]
    return out.clip(-65504, 65504) if out.dtype == torch.float16 else out


def _hunyuanvideo_single_text_start(block: torch.nn.Module, text: torch.Tensor, temb: torch.Tensor) -> dict[str, Any]:
    """HunyuanVideo single-stream block, negative text rows, before attention: the modulated norm and the MLP branch.
    The text is modulated by its row's embedding in the token-replace blocks too (their timestep-0 modulation is the
    first latent frame's)."""
    norm = block.norm
    shift, scale, gate = norm.linear(norm.silu(temb)).chunk(3, dim=1)
    normed = norm.norm(text) * (1 + scale[:, None]) + shift[:, None]
    return {"residual": text, "normed": normed, "gate": gate, "mlp": block.act_mlp(block.proj_mlp(normed))}


def _hunyuanvideo_single_text_finish(block: torch.nn.Module, state: dict[str, Any]) -> torch.Tensor:
    """... after attention: the block's output projection, gate and residual."""
    out = block.proj_out(torch.cat([state["attention"], state["mlp"]], dim=2))
    return state["gate"].unsqueeze(1) * out + state["residual"]


def _cogview4_text_start(block: torch.nn.Module, text: torch.Tensor, temb: torch.Tensor) -> dict[str, Any]:
    """CogView4 block, negative text rows, before attention: the text's modulated norm (the text chunks, odd ones, of
    the block's 12 modulation chunks)."""
    norm = block.norm1
    chunks = norm.linear(temb).chunk(12, dim=1)
    shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = chunks[1::2]
    normed = norm.norm_context(text).to(dtype=text.dtype) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)
    return {"residual": text, "normed": normed, "gate": gate, "mlp": (shift_mlp, scale_mlp, gate_mlp)}


def _cogview4_text_finish(block: torch.nn.Module, state: dict[str, Any]) -> torch.Tensor:
    """... after attention (its output projection included): the gated residuals of attention and feed-forward."""
    text = state["residual"] + state["attention"] * state["gate"].unsqueeze(1)
    shift, scale, gate = state["mlp"]
    normed = block.norm2_context(text) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)
    return text + block.ff(normed) * gate.unsqueeze(1)


def _cogvideox_text_start(block: torch.nn.Module, text: torch.Tensor, temb: torch.Tensor) -> dict[str, Any]:
    """CogVideoX block, negative text rows, before attention: the text's modulated norm (the last three of the block's
    six modulation chunks)."""
    norm = block.norm1
    _, _, _, shift, scale, gate = norm.linear(norm.silu(temb)).chunk(6, dim=1)
    normed = norm.norm(text) * (1 + scale)[:, None, :] + shift[:, None, :]
    return {"residual": text, "normed": normed, "gate": gate[:, None, :], "temb": temb}


def _cogvideox_text_finish(block: torch.nn.Module, state: dict[str, Any]) -> torch.Tensor:
    """... after attention (its output projection included): the gated residuals of attention and feed-forward (the
    feed-forward acts on every token alone: the text's part of the block's joint feed-forward)."""
    text = state["residual"] + state["gate"] * state["attention"]
    norm = block.norm2
    _, _, _, shift, scale, gate = norm.linear(norm.silu(state["temb"])).chunk(6, dim=1)
    normed = norm.norm(text) * (1 + scale)[:, None, :] + shift[:, None, :]
    return text + gate[:, None, :] * block.ff(normed)


def _pad_text_ids(ids: torch.Tensor, length: int) -> torch.Tensor:
    """Unbatched text position ids for a longer branch: the positions continue with the last step between
    the given ones (Flux: all zero, so zeros; Flux2: ``(0, 0, 0, l)``, so ``l`` counts on)."""
    if ids.ndim == 3:
        ids = ids[0]
    missing = length - ids.shape[0]
    if missing <= 0:
        return ids
    step = ids[-1] - ids[-2] if ids.shape[0] >= 2 else torch.zeros_like(ids[-1])
    counts = torch.arange(1, missing + 1, device=ids.device, dtype=ids.dtype).unsqueeze(1)
    return torch.cat([ids, ids[-1] + counts * step])


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


def _zimage_text_start(block: torch.nn.Module, text: torch.Tensor, modulation: torch.Tensor | None) -> dict[str, Any]:
    """Z-Image main block, negative caption tokens, before attention: the modulated norm (the block's scale and
    gates from its per-row modulation, as ``ZImageTransformerBlock`` computes them)."""
    if not block.modulation:
        return {"residual": text, "normed": block.attention_norm1(text), "gates": None}
    scale_msa, gate_msa, scale_mlp, gate_mlp = block.adaLN_modulation(modulation).unsqueeze(1).chunk(4, dim=2)
    return {"residual": text, "normed": block.attention_norm1(text) * (1.0 + scale_msa),
            "gates": (gate_msa.tanh(), gate_mlp.tanh()), "scale_mlp": 1.0 + scale_mlp}


def _zimage_text_finish(block: torch.nn.Module, state: dict[str, Any]) -> torch.Tensor:
    """... after attention (its output projection included): the gated residuals of attention and feed-forward."""
    x, gates = state["residual"], state["gates"]
    if gates is None:
        x = x + block.attention_norm2(state["attention"])
        return x + block.ffn_norm2(block.feed_forward(block.ffn_norm1(x)))
    gate_msa, gate_mlp = gates
    x = x + gate_msa * block.attention_norm2(state["attention"])
    return x + gate_mlp * block.ffn_norm2(block.feed_forward(block.ffn_norm1(x) * state["scale_mlp"]))


def _lumina2_text_start(block: torch.nn.Module, text: torch.Tensor, temb: torch.Tensor) -> dict[str, Any]:
    """Lumina2 joint block, negative caption tokens, before attention: the modulated norm (``LuminaRMSNormZero``,
    from the row's timestep embedding) and the gates and scale of the rest of the block."""
    normed, gate_msa, scale_mlp, gate_mlp = block.norm1(text, temb)
    return {"residual": text, "normed": normed, "gates": (gate_msa.unsqueeze(1).tanh(), gate_mlp.unsqueeze(1).tanh()),
            "scale_mlp": 1 + scale_mlp.unsqueeze(1)}


def _lumina2_text_finish(block: torch.nn.Module, state: dict[str, Any]) -> torch.Tensor:
    """... after attention (its output projection included): the gated residuals of attention and feed-forward, as
    ``Lumina2TransformerBlock`` computes them."""
    gate_msa, gate_mlp = state["gates"]
    x = state["residual"] + gate_msa * block.norm2(state["attention"])
    return x + gate_mlp * block.ffn_norm2(block.feed_forward(block.ffn_norm1(x) * state["scale_mlp"]))


def _auraflow_single_text_start(block: torch.nn.Module, text: torch.Tensor, temb: torch.Tensor) -> dict[str, Any]:
    """AuraFlow single block, negative ``[register tokens, text]`` rows, before attention: the modulated norm."""
    normed, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(text, emb=temb)
    return {"residual": text, "normed": normed, "gates": (gate_msa, shift_mlp, scale_mlp, gate_mlp)}


def _auraflow_single_text_finish(block: torch.nn.Module, state: dict[str, Any]) -> torch.Tensor:
    """... after attention (its output projection included): as ``AuraFlowSingleTransformerBlock`` finishes."""
    gate_msa, shift_mlp, scale_mlp, gate_mlp = state["gates"]
    x = block.norm2(state["residual"] + gate_msa.unsqueeze(1) * state["attention"])
    x = x * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    return state["residual"] + gate_mlp.unsqueeze(1) * block.ff(x)


def _refuse_qwen_zero_cond_t(denoiser: torch.nn.Module) -> str | None:
    if getattr(denoiser.config, "zero_cond_t", False):
        return ("zero_cond_t models (Qwen-Image-Edit-2511) stack a timestep-0 copy of every row in the "
                "conditioning batch, which the negative text rows cannot join yet")
    return None


def _cogvideox_text_length(denoiser: torch.nn.Module) -> int | None:
    """CogVideoX's patch embedding adds positions over ``[max_text_seq_length text, video]``."""
    embed = getattr(denoiser, "patch_embed", None)
    if getattr(embed, "use_positional_embeddings", False) or getattr(embed, "use_learned_positional_embeddings", False):
        return int(embed.max_text_seq_length)
    return None


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


def _qwen21_prefill_call(arguments: dict[str, Any], negative: dict[str, torch.Tensor], cond_rows: torch.Tensor) -> dict[str, Any]:
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


def _qwen21_target_rotary(denoiser: torch.nn.Module, arguments: dict[str, Any], negative: dict[str, torch.Tensor],
                          cond_rows: torch.Tensor) -> torch.Tensor:
    """Qwen-Image 2.1: the target image's rotary table in the negative prompt's layout (the model's own rotary
    embedding of ``[negative text with its slots, target image]``, its last rows)."""
    _, conditions, slots = _qwen21_negative_layout(arguments, negative, cond_rows)
    target_shape = arguments["img_shapes"][0][-1]
    target = math.prod(target_shape)
    layout = torch.cat([slots[0], slots.new_ones(target // _QWEN21_TOKENS_PER_SLOT)])
    is_image = torch.repeat_interleave(layout, torch.where(layout, _QWEN21_TOKENS_PER_SLOT, 1))
    return denoiser.pos_embed(conditions + [target_shape], is_image, device=arguments["hidden_states"].device)[-target:]


def _refuse_qwen21_flex(denoiser: torch.nn.Module) -> str | None:
    flex = [name for name, module in denoiser.named_modules()
            if type(getattr(module, "processor", None)).__name__ == "QwenImage21FlexAttnProcessor"]
    if flex:
        return (f"`{flex[0]}` has QwenImage21FlexAttnProcessor, whose block mask the model builds only for processors "
                "it recognises; NAG drives the default QwenImage21AttnProcessor (set it with "
                "transformer.set_attn_processor(QwenImage21AttnProcessor()) before nag.apply)")
    return None


@dataclass(frozen=True)
class CausalPrefix:
    """Layout ``"prefix"``: a single-stream model whose sequence is ``[text (with condition images), target image]``
    under a causal mask, so the text never attends to the target image (Qwen-Image 2.1).

    The negative prompt's prefix is run through the model in a call of its own (with the smallest target image:
    the prefix never attends to it), laid out as the pipeline lays out its classifier-free-guidance call; every
    text-attention layer keeps that call's prefix keys/values. In a guided call the stock rows run as stock, and in
    every layer the guided rows' target-image queries also attend to ``[negative prefix, target image]`` (target keys
    from the same image tokens, at the negative layout's positions): that is ``Z-``, combined with the stock ``Z+``
    before the output projection.

    Attributes:
        prefill_call: ``(call arguments, negative conditioning, guided rows) -> arguments`` of the negative prompt's
            own denoiser call for the guided rows (its target image may be the smallest the model takes).
        target_rotary: ``(denoiser, call arguments, negative conditioning, guided rows) -> table``: the target image's
            rotary table at the negative layout's positions.
        target_tokens: ``call arguments -> tokens`` of the target image, the last tokens of the sequence.
        step_independent: ``denoiser -> bool``: the prefix does not depend on the timestep (prefilled once per
            generation) rather than on every step.
    """

    prefill_call: Callable[[dict[str, Any], dict[str, torch.Tensor], torch.Tensor], dict[str, Any]]
    target_rotary: Callable[[torch.nn.Module, dict[str, Any], dict[str, torch.Tensor], torch.Tensor], torch.Tensor]
    target_tokens: Callable[[dict[str, Any]], int]
    step_independent: Callable[[torch.nn.Module], bool]
def _hidream_text_lengths(arguments: dict[str, Any]) -> list[int]:
    """HiDream: the text every block attends to, per row: the T5 tokens, the last Llama-3 layer's tokens (carried
    from block to block) and the block's own Llama-3 layer's tokens."""
    t5, llama = arguments["encoder_hidden_states_t5"], arguments["encoder_hidden_states_llama3"]
    return [t5.shape[1] + 2 * llama.shape[2]] * t5.shape[0]


def _hidream_text_start(block: torch.nn.Module, text: torch.Tensor, temb: torch.Tensor) -> dict[str, Any]:
    """HiDream block (double- or single-stream), negative text rows, before attention: the text's modulated norm.
    A double-stream block's text has its own norms, modulation chunks (6-11 of 12), output projection and
    feed-forward; a single-stream block's text shares the image's (chunks 0-5 of 6, the mixture-of-experts
    feed-forward)."""
    single = block.attn1.single
    chunks = block.adaLN_modulation(temb)[:, None].chunk(6 if single else 12, dim=-1)
    shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = chunks[:6] if single else chunks[6:]
    normed = (block.norm1_i if single else block.norm1_t)(text).to(dtype=text.dtype) * (1 + scale) + shift
    return {"residual": text, "normed": normed, "gate": gate, "mlp": (shift_mlp, scale_mlp, gate_mlp)}


def _hidream_text_finish(block: torch.nn.Module, state: dict[str, Any]) -> torch.Tensor:
    """... after attention (its output projection included): the gated residuals of attention and feed-forward."""
    single = block.attn1.single
    norm3, ff = (block.norm3_i, block.ff_i) if single else (block.norm3_t, block.ff_t)
    text = state["gate"] * state["attention"] + state["residual"]
    shift, scale, gate = state["mlp"]
    normed = norm3(text).to(dtype=text.dtype) * (1 + scale) + shift
    return gate * ff(normed) + text


def _without_dim(shape: torch.Size, dim: int) -> tuple[int, ...]:
    """A tensor's shape without its batch axis ``dim``: the shape of one row."""
    return tuple(size for axis, size in enumerate(shape) if axis != dim)


@dataclass(frozen=True)
class Family:
    """How NAG plugs into one denoiser architecture.

    Attributes:
        name: short family name.
        denoisers: class names of the denoisers this family covers.
        attention: ``(regex on the module's qualified name, role)`` pairs; role is ``"cross"``
            (cross-attention to text), ``"joint"`` (joint attention with separate text
            projections) or ``"single"`` (attention over a block's own ``[text, image]``).
        layout: ``"cross"``: the negative context is appended to the positive one along the
            token axis; ``"joint"``: negative text rows are appended along the batch axis and
            carried through the text stream with their own modulation; ``"concat"``: for models
            whose forward joins text and image itself, whole negative rows ``[negative text,
            image]`` are appended along the batch axis from the model input on (the image part a
            copy of the conditional row's); every text-attention layer substitutes the guided
            rows' image tokens for the copy, and the model output drops the negative rows; ``"prefix"``: for causal
            single-stream models, the negative prompt's prefix runs in a call of its own and the guided rows'
            image queries attend to its keys/values in every layer (see :class:`CausalPrefix`).
        text_kwarg / mask_kwarg / timestep_kwarg / image_kwarg: the denoiser's argument names.
        negative_keys: conditioning a negative prompt supplies (denoiser argument names).
        row_kwargs: joint layout: per-row arguments (timestep, guidance) repeated for the
            negative rows from their conditional rows.
        text_ids_kwarg: joint layout: unbatched text position ids, padded for the longer branch.
        image_norms: regex of image-side modulation norms, which use the stock rows of the
            conditioning embedding (joint layout).
        concatenating_blocks: regex of blocks that concatenate ``[text, image]`` themselves.
        single_block_text: for those blocks, the text-only path of the negative rows as
            ``(start(block, text, temb) -> state, finish(block, state) -> text)``, which lets the
            fast path run the block on the stock rows only (no duplicated image tokens).
        stock_image_blocks: concat layout: regex of blocks with separate text and image streams (double-stream
            blocks) that run the image stream at the stock batch: their ``image_kwarg`` and the per-row
            ``stock_image_kwargs`` (image-side modulation) are cut to the stock rows, the negative text rows attend
            to the guided image (role ``"joint"``), and the block's image output gets the guided rows' copies
            again for the model's later concatenation.
        joined_blocks: concat layout: regex of single-stream blocks whose input the model joined as
            ``[text, image]``; with the fast path the block runs on the stock rows and the negative rows' text
            takes ``single_block_text`` around it (``joined_block_modulation``: the block's per-row modulation
            argument), so no image token is duplicated.
        joined_block_mask: the joined blocks' ``(rows, tokens)`` mask argument (Chroma's ``attention_mask`` over
            ``[text, image]``): with the fast path the block gets its stock rows and the text path its negative rows
            (``state["mask"]``); the rows are split only when the attention wrapper's ``takes_split_mask(call, mask)``
            accepts the mask.
        image_modulations: regex of image-side modules all of whose inputs are per-row
            conditioning (e.g. Qwen-Image's ``img_mod(temb)``): they see the stock rows only.
        static_text: cross layout: the model's text preprocessing does not depend on the
            timestep, so projected negative keys/values can be reused across steps.
        refuse: ``denoiser -> reason or None``: configurations of the architecture NAG cannot
            guide, refused with the reason when attaching.
        mask_covers_image: the mask argument spans ``[text, image]`` (Chroma), not the text only.
        text_prefix: ``denoiser -> tokens`` the model puts before the text inside its blocks
            (AuraFlow's register tokens).
        row_text_lengths: ``extended arguments -> per-row text lengths``, for models that join each
            sample's ``[text, image]`` at its own text length (Lumina2).
        row_image_lengths: ``extended arguments -> per-row image token counts``, for models whose samples
            start with the image (Z-Image).
        text_length: ``denoiser -> tokens or None``: the text length the model requires (CogVideoX
            with positional embeddings over ``[text, image]``); both branches are padded to it.
        causal_prefix: layout ``"prefix"``: how the negative prompt's own call is made (:class:`CausalPrefix`).
        control_hints_kwarg: the denoiser argument taking a control model's per-row output (Z-Image's ControlNet
            hints): the negative rows need it for their own text, which only a pipeline-level control attachment
            (``nag.control``) provides; a guided call carrying it without one is refused with a clear error.
        batch_dims: ``(argument, axis)`` pairs for conditioning whose batch axis is not the first
            (HiDream's stacked Llama-3 states, ``(layers, batch, tokens, width)``): negative rows are
            counted, repeated and appended along that axis.
        equal_text_lengths: the model joins the text with further streams and attends to all of it
            without a mask (HiDream): padding cannot be cut out again, so positive and negative text
            must have the same length (a clear error otherwise).
        sample_blocks: concat layout with per-sample rows ``[image, text, padding]`` (``row_image_lengths`` and
            ``row_text_lengths`` give each row's spans; Z-Image's main layers): with the fast path the block runs
            on the stock rows (every per-row argument cut to them, every per-token one also to their longest valid
            length) and each negative row's text span takes ``single_block_text`` around it
            (``joined_block_modulation``: the block's per-row modulation argument), so no image token is duplicated.
            Without ``row_image_lengths`` each row's text ends it and its image is the rest (HiDream's single-stream
            blocks over ``[image, text]``).
        sample_block_rotary: the rotary-table argument of ``sample_blocks``, whose negative rows' text spans the
            attention wrapper gets with the negative text.
        stock_row_modules: concat layout, fast path: regex of modules that work on each row alone and whose output
            for the negative rows is never read (Z-Image's image refiner and final layer): they run on the stock
            rows (``image_kwarg`` and ``stock_image_kwargs`` cut to them) and their output gets the guided rows'
            copies for the negative rows.
        stock_image_entry: concat layout, fast path: regex of the module that takes the image at the model input
            (HunyuanVideo's patch embedding): when every text-attention wrapper can serve the negative rows beside the
            stock rows, it runs on the stock rows (``image_kwarg`` and ``stock_image_kwargs`` cut to them) and the image
            stream stays at the stock batch from there on (the blocks after it take it so: ``image_norms``,
            ``image_first_blocks``); a ``stock_row_modules`` entry at the end gives the output the guided rows'
            copies for the negative rows again.
        image_first_blocks: concat layout, fast path: regex of single-stream blocks that take the image and the text
            separately and join them as ``[image, text]`` themselves, returning ``(image, text)`` (HunyuanVideo's):
            the block runs on the stock rows (every per-row argument cut to them) and the negative rows' text takes
            ``single_block_text`` beside it (``joined_block_modulation``: the block's per-row modulation argument);
            their other per-row arguments (the attention mask) reach the attention wrapper with that text. Also
            double-stream blocks whose one per-row modulation feeds both streams (HiDream's: the image side then
            takes the stock rows', the negative text its own rows'); without ``stock_image_entry`` the image
            comes to these blocks on whole rows and leaves them so, the guided rows' copies for the negative rows.
        sample_text_first: ``sample_blocks`` over per-sample rows ``[text, image, padding]`` instead (Lumina2's
            joint layers): each row's text starts it, and without ``row_image_lengths`` every row's image is as long
            as the longest row's tokens after its text.
    """

    name: str
    denoisers: tuple[str, ...]
    attention: tuple[tuple[str, str], ...]
    layout: str
    text_kwarg: str = "encoder_hidden_states"
    mask_kwarg: str | None = None
    timestep_kwarg: str = "timestep"
    image_kwarg: str = "hidden_states"
    negative_keys: tuple[str, ...] = ("encoder_hidden_states",)
    row_kwargs: tuple[str, ...] = ()
    text_ids_kwarg: str | None = None
    image_norms: str | None = None
    concatenating_blocks: str | None = None
    single_block_text: tuple[Callable, Callable] | None = None
    stock_image_blocks: str | None = None
    stock_image_kwargs: tuple[str, ...] = ()
    joined_blocks: str | None = None
    joined_block_modulation: str = "temb"
    joined_block_mask: str | None = None
    image_modulations: str | None = None
    static_text: bool = True
    refuse: Callable[[torch.nn.Module], str | None] | None = None
    mask_covers_image: bool = False
    text_prefix: Callable[[torch.nn.Module], int] | None = None
    text_length: Callable[[torch.nn.Module], int | None] | None = None
    row_text_lengths: Callable[[dict[str, Any]], list[int]] | None = None
    row_image_lengths: Callable[[dict[str, Any]], list[int]] | None = None
    causal_prefix: CausalPrefix | None = None
    control_hints_kwarg: str | None = None
    batch_dims: tuple[tuple[str, int], ...] = ()
    equal_text_lengths: bool = False
    sample_blocks: str | None = None
    sample_block_rotary: str | None = None
    stock_row_modules: str | None = None
    stock_image_entry: str | None = None
    image_first_blocks: str | None = None
    sample_text_first: bool = False

    def batch_dim(self, key: str) -> int:
        """The batch axis of the conditioning ``key`` (0 unless ``batch_dims`` says otherwise)."""
        return dict(self.batch_dims).get(key, 0)

    def attention_role(self, name: str, module: torch.nn.Module) -> str | None:
        if not hasattr(module, "processor"):
            return None
        for pattern, role in self.attention:
            if re.fullmatch(pattern, name):
                return role
        return None

    @staticmethod
    def processor_class(role: str, fast: bool = True) -> type[NAGProcessor]:
        return _ROLE_CLASSES[(role, fast)]

    def extend_inputs(
        self, arguments: dict[str, Any], negative: dict[str, torch.Tensor], cond_rows: torch.Tensor, pad_to: int = 0
    ) -> tuple[GuidedCall, dict[str, Any]]:
        """The guided call's inputs; ``pad_to``: joint and concat layouts pad both branches' text to at
        least this length (the model's required text length, see ``text_length``)."""
        if isinstance(arguments.get(self.text_kwarg), (list, tuple)):
            return self._extend_lists(arguments, negative, cond_rows)
        if self.layout == "cross":
            return self._extend_cross(arguments, negative, cond_rows)
        if self.layout == "prefix":  # the stock rows run as stock; the negative prefix has a call of its own
            text = arguments[self.text_kwarg]
            rows, target = text.shape[0], self.causal_prefix.target_tokens(arguments)
            negative_len = negative["encoder_hidden_states"].shape[1]
            call = GuidedCall(rows, cond_rows, text.shape[1], negative_len, text.shape[1], image_lengths=[target] * rows)
            return call, {}
        if self.layout == "concat":
            return self._extend_concat(arguments, negative, cond_rows, pad_to)
        return self._extend_joint(arguments, negative, cond_rows, pad_to)

    def _extend_cross(self, arguments, negative, cond_rows):
        text = arguments[self.text_kwarg]
        rows, positive_len = text.shape[:2]
        negative_text = negative["encoder_hidden_states"].to(text.dtype)
        negative_len = negative_text.shape[1]
        filler = text.new_zeros(rows, negative_len, *text.shape[2:])
        filler[cond_rows] = negative_text
        changes: dict[str, Any] = {self.text_kwarg: torch.cat([text, filler], dim=1)}
        positive_mask = arguments.get(self.mask_kwarg) if self.mask_kwarg else None
        negative_mask = negative.get("encoder_attention_mask")
        if self.mask_kwarg and (positive_mask is not None or negative_mask is not None):
            if positive_mask is not None and positive_mask.ndim != 2:
                raise ValueError(f"NAG expects a (batch, tokens) `{self.mask_kwarg}`, got shape {tuple(positive_mask.shape)}")
            like = positive_mask if positive_mask is not None else negative_mask
            if positive_mask is None:
                positive_mask = like.new_ones(rows, positive_len)
            mask_filler = like.new_ones(rows, negative_len)
            if negative_mask is not None:
                mask_filler[cond_rows] = negative_mask.to(like.dtype)
            changes[self.mask_kwarg] = torch.cat([positive_mask, mask_filler], dim=1)
        call = GuidedCall(rows, cond_rows, positive_len, negative_len, positive_len + negative_len, static_negative=self.static_text)
        return call, changes

    def _extend_joint(self, arguments, negative, cond_rows, pad_to=0):
        text = arguments[self.text_kwarg]
        rows, positive_len = text.shape[:2]
        negative_text = negative["encoder_hidden_states"].to(text.dtype)
        negative_len = negative_text.shape[1]
        if self.equal_text_lengths and negative_len != positive_len:
            raise ValueError(
                f"the negative text has {negative_len} tokens but the call's `{self.text_kwarg}` has {positive_len}; "
                f"{self.name} attends to all of its text without a mask, so NAG needs both at the same length: encode "
                "the negative prompt with the same max_sequence_length as the prompt (or pass the negative prompt as text)"
            )
        padded = max(positive_len, negative_len, pad_to)
        changes: dict[str, Any] = {
            self.text_kwarg: torch.cat([pad_tokens(text, padded), pad_tokens(negative_text, padded)])
        }
        if self.mask_kwarg:
            positive_mask = arguments.get(self.mask_kwarg)
            negative_mask = negative.get("encoder_attention_mask")
            if positive_mask is not None or negative_mask is not None:
                like = positive_mask if positive_mask is not None else negative_mask
                if positive_mask is None:
                    positive_mask = like.new_ones(rows, positive_len)
                if negative_mask is None:
                    negative_mask = like.new_ones(len(cond_rows), negative_len)
                # padding past each branch's own length is never attended (the processors slice it off)
                changes[self.mask_kwarg] = torch.cat(
                    [pad_tokens(positive_mask, padded), pad_tokens(negative_mask.to(like.dtype), padded)]
                )
        for key in self.negative_keys:
            if key in ("encoder_hidden_states", "encoder_attention_mask"):
                continue
            value = arguments.get(key)
            if value is None:
                raise ValueError(f"the denoiser call has no `{key}`; NAG needs it to modulate the negative text")
            dim = self.batch_dim(key)
            row, negative_row = _without_dim(value.shape, dim), _without_dim(negative[key].shape, dim)
            if row != negative_row:
                raise ValueError(f"negative `{key}` has shape {negative_row} per row but the call's has {row}; "
                                 "encode the negative prompt with the pipeline's encode_prompt")
            changes[key] = torch.cat([value, negative[key].to(value.dtype)], dim=dim)
        for key in self.row_kwargs:
            value = arguments.get(key)
            if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == rows:
                changes[key] = torch.cat([value, value[cond_rows]])
            elif isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] != 1:
                raise ValueError(f"`{key}` has {value.shape[0]} rows for a batch of {rows}")
        if self.text_ids_kwarg and arguments.get(self.text_ids_kwarg) is not None:
            changes[self.text_ids_kwarg] = _pad_text_ids(arguments[self.text_ids_kwarg], padded)
        call = GuidedCall(rows, cond_rows, positive_len, negative_len, padded)
        return call, changes

    def _extend_concat(self, arguments, negative, cond_rows, pad_to=0):
        text = arguments[self.text_kwarg]
        rows, positive_len = text.shape[:2]
        negative_len = negative["encoder_hidden_states"].shape[1]
        padded = max(positive_len, negative_len, pad_to)
        call, changes = self._extend_joint({k: v for k, v in arguments.items() if k != self.mask_kwarg},
                                           {k: v for k, v in negative.items() if k != "encoder_attention_mask"}, cond_rows,
                                           pad_to)
        image = arguments[self.image_kwarg]
        changes[self.image_kwarg] = torch.cat([image, image[cond_rows]])
        if self.mask_kwarg:
            positive_mask = arguments.get(self.mask_kwarg)
            negative_mask = negative.get("encoder_attention_mask")
            if positive_mask is not None or negative_mask is not None:
                if positive_mask is not None and positive_mask.ndim != 2:
                    raise ValueError(f"NAG expects a (batch, tokens) `{self.mask_kwarg}`, got shape {tuple(positive_mask.shape)}")
                if positive_mask is None:
                    like = negative_mask
                    image_len = image.shape[1] if self.mask_covers_image else 0
                    positive_mask = like.new_ones(rows, positive_len + image_len)
                image_mask = positive_mask[:, positive_len:]
                if image_mask.shape[0] == 1:
                    image_mask = image_mask.expand(rows, -1)
                positive_text_mask = positive_mask[:, :positive_len]
                if negative_mask is None:
                    negative_mask = positive_mask.new_ones(len(cond_rows), negative_len)
                negative_mask = negative_mask.to(positive_mask.dtype)
                # the padding past each branch's own length is never attended (the processors slice it off)
                changes[self.mask_kwarg] = torch.cat([
                    torch.cat([pad_tokens(positive_text_mask, padded), image_mask], dim=1),
                    torch.cat([pad_tokens(negative_mask, padded), image_mask[cond_rows]], dim=1),
                ])
        return call, changes

    def _extend_lists(self, arguments, negative, cond_rows):
        """Concat layout for models that take per-sample lists (Z-Image: ``x`` and ``cap_feats`` lists of
        tensors of their own lengths, padding removed): the negative rows are appended to both lists, the
        image entries copies of the conditional rows', the per-row arguments repeated from them."""
        if self.layout != "concat":
            raise NotImplementedError(f"NAG takes list inputs on the concat layout only, not {self.layout!r}")
        text, image = list(arguments[self.text_kwarg]), list(arguments[self.image_kwarg])
        if any(not isinstance(t, torch.Tensor) for t in text) or any(not isinstance(i, torch.Tensor) for i in image):
            raise NotImplementedError("NAG guides one image and one caption per sample (nested lists: not supported)")
        rows, picked = len(text), cond_rows.tolist()
        negative_text = negative["encoder_hidden_states"]
        negative_text = [t.to(text[0].dtype) for t in negative_text]  # a list, or a (rows, tokens, width) tensor
        changes: dict[str, Any] = {self.text_kwarg: text + negative_text, self.image_kwarg: image + [image[r] for r in picked]}
        for key in self.row_kwargs:
            value = arguments.get(key)
            if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == rows:
                changes[key] = torch.cat([value, value[cond_rows]])
            elif isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] != 1:
                raise ValueError(f"`{key}` has {value.shape[0]} rows for a batch of {rows}")
        positive_len = max(t.shape[0] for t in text)
        negative_len = max(t.shape[0] for t in negative_text)
        call = GuidedCall(rows, cond_rows, positive_len, negative_len, max(positive_len, negative_len))
        return call, changes

    def drop_image_rows(self, output: Any, rows: int) -> Any:
        """After a concatenating block: keep the stock image rows (output ``(text, image)``)."""
        text, image = output
        return text, image[:rows]


# The fast path of HunyuanVideo's block arrangement (HunyuanVideo, HunyuanImage 2.1): the video or image stream at the
# stock batch from the patch embedding to the output projection (the double blocks' and the final layer's image-side
# modulation take the stock rows of the conditioning, token-replace embedding included); the single blocks run on the
# stock rows, the negative text beside them; the negative rows get copies of the guided rows' output only after the
# output projection.
_HUNYUAN_FAST_PATH: dict[str, Any] = dict(
    image_norms=r"transformer_blocks\.\d+\.norm1|norm_out",
    stock_image_entry=r"x_embedder",
    image_first_blocks=r"single_transformer_blocks\.\d+",
    single_block_text=(_hunyuanvideo_single_text_start, _hunyuanvideo_single_text_finish),
    stock_row_modules=r"proj_out",
)


FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        Family(
            name="flux",
            denoisers=("FluxTransformer2DModel",),
            attention=((r"transformer_blocks\.\d+\.attn", "joint"), (r"single_transformer_blocks\.\d+\.attn", "single")),
            layout="joint",
            negative_keys=("encoder_hidden_states", "pooled_projections"),
            row_kwargs=("timestep", "guidance"),
            text_ids_kwarg="txt_ids",
            image_norms=r"transformer_blocks\.\d+\.norm1|norm_out",
            concatenating_blocks=r"single_transformer_blocks\.\d+",
            single_block_text=(_flux_single_text_start, _flux_single_text_finish),
        ),
        Family(
            name="sd3",
            denoisers=("SD3Transformer2DModel",),
            attention=((r"transformer_blocks\.\d+\.attn", "joint"),),
            layout="joint",
            negative_keys=("encoder_hidden_states", "pooled_projections"),
            row_kwargs=("timestep",),
            image_norms=r"transformer_blocks\.\d+\.norm1|norm_out",
        ),
        # Qwen-Image: [text, image] joint attention with separate text projections; the text stream is
        # modulated by the timestep alone (`txt_mod(temb)`), the image stream by `img_mod(temb)`.
        Family(
            name="qwenimage",
            denoisers=("QwenImageTransformer2DModel",),
            attention=((r"transformer_blocks\.\d+\.attn", "joint"),),
            layout="joint",
            mask_kwarg="encoder_hidden_states_mask",
            negative_keys=("encoder_hidden_states", "encoder_attention_mask"),
            row_kwargs=("timestep", "guidance", "additional_t_cond"),
            image_norms=r"norm_out",
            image_modulations=r"transformer_blocks\.\d+\.img_mod",
            refuse=_refuse_qwen_zero_cond_t,
        ),
        # Chroma: Flux-like blocks whose modulation comes from the timestep alone (a distilled
        # approximator, no pooled text); the model itself joins [text, image] before the single
        # blocks and its mask spans [text, image]: whole negative rows, mask per branch; the double
        # blocks carry the negative text rows only. Every block hands attention the outer product
        # mask[:, None, None, :] * mask[:, None, :, None] (the pipeline's float 0/1 mask: a +1 bias on
        # valid-valid pairs). With the fast path the single blocks run on the stock rows and the negative
        # text takes the block's text path beside them (Flux's single-block structure, `norm(x, emb=temb)`).
        Family(
            name="chroma",
            denoisers=("ChromaTransformer2DModel",),
            attention=((r"transformer_blocks\.\d+\.attn", "joint_rows_outer_mask"),
                       (r"single_transformer_blocks\.\d+\.attn", "single_outer_mask")),
            layout="concat",
            mask_kwarg="attention_mask",
            mask_covers_image=True,
            negative_keys=("encoder_hidden_states", "encoder_attention_mask"),
            row_kwargs=("timestep",),
            text_ids_kwarg="txt_ids",
            # double blocks: the image stream at the stock batch (its modulation norm takes the stock rows)
            stock_image_blocks=r"transformer_blocks\.\d+",
            image_norms=r"transformer_blocks\.\d+\.norm1",
            joined_blocks=r"single_transformer_blocks\.\d+",
            joined_block_mask="attention_mask",
            single_block_text=(_flux_single_text_start, _flux_single_text_finish),
        ),
        # AuraFlow: register tokens before the text, joint blocks, then single blocks over the
        # [registers, text, image] the model joins itself; timestep-only modulation, no mask.
        Family(
            name="auraflow",
            denoisers=("AuraFlowTransformer2DModel",),
            attention=((r"joint_transformer_blocks\.\d+\.attn", "joint_rows"),
                       (r"single_transformer_blocks\.\d+\.attn", "single_projected")),
            layout="concat",
            row_kwargs=("timestep",),
            text_prefix=lambda denoiser: int(denoiser.register_tokens.shape[1]),
            # fast path: the joint blocks run the image stream at the stock batch (their image-side norm takes the
            # stock rows of the timestep embedding; the text keeps its rows), the single blocks run on the stock rows
            # with the negative [registers, text] beside them, the patch embedding and the final layers on the stock
            # rows: the negative rows' image tokens are never processed
            image_norms=r"joint_transformer_blocks\.\d+\.norm1",
            stock_row_modules=r"pos_embed|joint_transformer_blocks\.\d+|norm_out|proj_out",
            stock_image_kwargs=("latent", "x", "conditioning_embedding", "input"),
            joined_blocks=r"single_transformer_blocks\.\d+",
            single_block_text=(_auraflow_single_text_start, _auraflow_single_text_finish),
        ),
        # CogView4: one stream of blocks whose processor joins [text, image], projects both with shared
        # weights (output projection included) and splits them again; modulation from the timestep and
        # the size conditions alone; image-only rotary tables; an optional (batch, text) mask.
        Family(
            name="cogview4",
            denoisers=("CogView4Transformer2DModel",),
            attention=((r"transformer_blocks\.\d+\.attn1", "joint_rows_shared"),),
            layout="concat",
            mask_kwarg="attention_mask",
            negative_keys=("encoder_hidden_states", "encoder_attention_mask"),
            row_kwargs=("timestep", "original_size", "target_size", "crop_coords"),
            # fast path: the image stream at the stock batch from the patch embedding to the output projection (the
            # final norm's modulation takes the stock rows of the conditioning); the blocks run on the stock rows, the
            # negative text beside them; the negative rows get copies of the guided rows' output only after the
            # output projection
            image_norms=r"norm_out",
            stock_image_entry=r"patch_embed",
            image_first_blocks=r"transformer_blocks\.\d+",
            single_block_text=(_cogview4_text_start, _cogview4_text_finish),
            stock_row_modules=r"proj_out",
        ),
        # CogVideoX: the model joins [text, video] for its patch embedding (with sincos positions over
        # both in the 2b models: the text must then be `max_text_seq_length` long) and splits them
        # again; every block's processor joins them once more with shared projections (output
        # projection included); video-only rotary tables (5b); timestep-only modulation; no mask.
        Family(
            name="cogvideox",
            denoisers=("CogVideoXTransformer3DModel",),
            attention=((r"transformer_blocks\.\d+\.attn1", "joint_rows_shared"),),
            layout="concat",
            row_kwargs=("timestep", "timestep_cond", "ofs"),
            text_length=_cogvideox_text_length,
            # fast path: the blocks run on the stock rows, the negative text beside them (the patch embedding joins
            # [text, video]: the negative rows keep their copy of the video between the blocks, no block computes on it)
            image_first_blocks=r"transformer_blocks\.\d+",
            single_block_text=(_cogvideox_text_start, _cogvideox_text_finish),
        ),
        # HunyuanVideo: [video, text] attention in double blocks (separate text projections) and single
        # blocks (shared projections); the token refiner makes the text depend on the timestep and on
        # its mask, and the modulation includes the pooled CLIP embedding: whole negative rows (text,
        # mask, pooled embedding) from the model input on; the model's [video, text] mask is cut per branch.
        Family(
            name="hunyuanvideo",
            denoisers=("HunyuanVideoTransformer3DModel",),
            attention=((r"(single_)?transformer_blocks\.\d+\.attn", "joint_rows_image_first"),),
            layout="concat",
            mask_kwarg="encoder_attention_mask",
            negative_keys=("encoder_hidden_states", "pooled_projections", "encoder_attention_mask"),
            row_kwargs=("timestep", "guidance"),
            static_text=False,
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
            attention=((r"(single_)?transformer_blocks\.\d+\.attn", "joint_rows_image_first"),),
            layout="concat",
            mask_kwarg="encoder_attention_mask",
            negative_keys=("encoder_hidden_states", "encoder_attention_mask", "encoder_hidden_states_2",
                           "encoder_attention_mask_2"),
            row_kwargs=("timestep", "timestep_r", "guidance"),
            static_text=False,
            **_HUNYUAN_FAST_PATH,  # (HunyuanVideo's)
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
            attention=((r"transformer_blocks\.\d+\.attn", "joint_rows_image_first"),),
            layout="concat",
            mask_kwarg="encoder_attention_mask",
            negative_keys=("encoder_hidden_states", "encoder_attention_mask", "encoder_hidden_states_2",
                           "encoder_attention_mask_2"),
            row_kwargs=("timestep", "timestep_r", "image_embeds"),
            static_text=False,
            # fast path: the video stream at the stock batch from the patch embedding to the output projection (the
            # blocks' and the final layer's video-side modulation take the stock rows of the timestep embedding)
            image_norms=r"transformer_blocks\.\d+\.norm1|norm_out",
            stock_image_entry=r"x_embedder",
            stock_row_modules=r"proj_out",
        ),
        # HiDream-I1: double-stream blocks over [image, text] (separate text projections, an image-only output
        # projection), then single-stream blocks over the [image, text] stream the model joins itself (shared
        # projections, one output projection over all tokens); every block's text is [T5, last Llama-3 layer
        # (carried through the blocks), the block's own Llama-3 layer (fresh)]; the modulation includes the pooled
        # CLIP embeddings; mixture-of-experts feed-forwards route every token on its own (extra rows change no
        # other row's routing). Whole negative rows carry the negative T5 states, Llama-3 states (batch axis 1)
        # and pooled embeddings; no text mask, so both branches' texts must have the same length (the pipeline
        # pads both to max_sequence_length).
        Family(
            name="hidream",
            denoisers=("HiDreamImageTransformer2DModel",),
            attention=((r"double_stream_blocks\.\d+\.block\.attn1", "hidream_joint"),
                       (r"single_stream_blocks\.\d+\.block\.attn1", "hidream_single")),
            layout="concat",
            text_kwarg="encoder_hidden_states_t5",
            timestep_kwarg="timesteps",
            negative_keys=("encoder_hidden_states", "encoder_hidden_states_llama3", "pooled_embeds"),
            row_kwargs=("timesteps", "img_ids", "img_sizes", "hidden_states_masks"),
            static_text=False,
            row_text_lengths=_hidream_text_lengths,
            batch_dims=(("encoder_hidden_states_llama3", 1),),
            equal_text_lengths=True,
            # fast path: the double-stream blocks run on the stock rows with the negative text beside them (its own
            # rows' modulation; the image side the stock rows'), the single-stream blocks likewise (the stream ends
            # with the text, so its image is the rest), the final layer on the stock rows
            image_first_blocks=r"double_stream_blocks\.\d+\.block",
            sample_blocks=r"single_stream_blocks\.\d+\.block",
            single_block_text=(_hidream_text_start, _hidream_text_finish),
            stock_row_modules=r"final_layer",
            stock_image_kwargs=("temb",),
        ),
        # Flux2 (FLUX.2 dev / klein): Flux-like double blocks ([text, image], separate text projections),
        # then the model joins [text, image] for parallel single blocks whose one output projection mixes
        # attention and MLP (NAG combines the attention columns before it); all modulation comes from the
        # timestep (and guidance) alone; text positions count along the text (padding never attended); no mask.
        # The double blocks run the image stream at the stock batch (negative text rows only); with the fast path
        # the single blocks run on the stock rows and the negative text takes the block's text path beside them.
        Family(
            name="flux2",
            denoisers=("Flux2Transformer2DModel",),
            attention=((r"transformer_blocks\.\d+\.attn", "joint"),
                       (r"single_transformer_blocks\.\d+\.attn", "single_fused")),
            layout="concat",
            row_kwargs=("timestep", "guidance"),
            text_ids_kwarg="txt_ids",
            stock_image_blocks=r"transformer_blocks\.\d+",
            stock_image_kwargs=("temb_mod_img",),
            joined_blocks=r"single_transformer_blocks\.\d+",
            joined_block_modulation="temb_mod",
            single_block_text=(_flux2_single_text_start, _flux2_single_text_finish),
        ),
        # Lumina2: the caption (embedded without the timestep, refined by its own unmodulated blocks) and the
        # image are joined per sample as [caption (its valid length), image, padding]; the image's offset and
        # its rotary positions depend on each sample's caption length; a (batch, text) mask with the valid
        # tokens first. Whole negative rows; the joint blocks' wrapper works per sample.
        Family(
            name="lumina2",
            denoisers=("Lumina2Transformer2DModel",),
            attention=((r"layers\.\d+\.attn", "joint_rows_per_sample"),),
            layout="concat",
            mask_kwarg="encoder_attention_mask",
            negative_keys=("encoder_hidden_states", "encoder_attention_mask"),
            row_kwargs=("timestep",),
            row_text_lengths=lambda arguments: [int(n) for n in arguments["encoder_attention_mask"].sum(1).tolist()],
            # fast path: the joint layers run on the stock rows with each negative caption beside them (its own rotary
            # positions and mask; the guided image's tokens and tables as keys), the patch embedding, the image refiner
            # and the final norm on the stock rows: the negative rows' image tokens are never processed
            sample_blocks=r"layers\.\d+",
            sample_text_first=True,
            sample_block_rotary="image_rotary_emb",
            single_block_text=(_lumina2_text_start, _lumina2_text_finish),
            stock_row_modules=r"x_embedder|noise_refiner\.\d+|norm_out",
            stock_image_kwargs=("input", "image_rotary_emb", "temb", "x", "conditioning_embedding"),
        ),
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
            attention=((r"layers\.\d+\.attention", "joint_rows_per_sample_image_first"),),
            layout="concat",
            text_kwarg="cap_feats",
            image_kwarg="x",
            timestep_kwarg="t",
            row_kwargs=("t",),
            control_hints_kwarg="controlnet_block_samples",
            row_image_lengths=_zimage_image_lengths,
            row_text_lengths=_zimage_text_lengths,
            sample_blocks=r"layers\.\d+",
            sample_block_rotary="freqs_cis",
            joined_block_modulation="adaln_input",
            single_block_text=(_zimage_text_start, _zimage_text_finish),
            # (the blocks' and the final layer's image argument is `x`, like the model's own)
            stock_row_modules=r"noise_refiner\.\d+|all_final_layer\.[^.]+",
            stock_image_kwargs=("attn_mask", "freqs_cis", "adaln_input", "c"),
        ),
        Family(
            name="unet",
            denoisers=("UNet2DConditionModel",),
            attention=((r".*\.attn2", "cross"),),
            layout="cross",
            mask_kwarg="encoder_attention_mask",
        ),
        Family(
            name="pixart",
            denoisers=("PixArtTransformer2DModel",),
            attention=((r"transformer_blocks\.\d+\.attn2", "cross"),),
            layout="cross",
            mask_kwarg="encoder_attention_mask",
            negative_keys=("encoder_hidden_states", "encoder_attention_mask"),
        ),
        Family(
            name="sana",
            denoisers=("SanaTransformer2DModel", "SanaVideoTransformer3DModel"),
            attention=((r"transformer_blocks\.\d+\.attn2", "cross"),),
            layout="cross",
            mask_kwarg="encoder_attention_mask",
            negative_keys=("encoder_hidden_states", "encoder_attention_mask"),
        ),
        Family(
            name="ltx",
            denoisers=("LTXVideoTransformer3DModel",),
            attention=((r"transformer_blocks\.\d+\.attn2", "cross"),),
            layout="cross",
            mask_kwarg="encoder_attention_mask",
            negative_keys=("encoder_hidden_states", "encoder_attention_mask"),
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
            attention=((r"transformer_blocks\.\d+\.attn2", "cross"),),
            layout="cross",
            mask_kwarg="encoder_attention_mask",
            negative_keys=("encoder_hidden_states", "encoder_attention_mask"),
            static_text=False,
        ),
        Family(
            name="skyreels_v2",
            denoisers=("SkyReelsV2Transformer3DModel",),
            attention=((r"blocks\.\d+\.attn2", "cross"),),
            layout="cross",
        ),
        Family(
            name="wan",
            denoisers=("WanTransformer3DModel",),
            attention=((r"blocks\.\d+\.attn2", "cross"),),
            layout="cross",
        ),
        # VACE: the control video enters through `control_hidden_states` (the VACE blocks' own stream),
        # not as text; the text cross-attention of both the main and the VACE blocks is guided.
        Family(
            name="wan_vace",
            denoisers=("WanVACETransformer3DModel",),
            attention=((r"(vace_)?blocks\.\d+\.attn2", "cross"),),
            layout="cross",
        ),
        # Qwen-Image 2.1: one block-causal sequence [text with condition-image slots, target image]; the text never
        # sees the target, so the negative prompt's prefix runs in a call of its own (once per generation when the
        # text is modulated from t = 0, `causal_condition`) and each layer's target queries attend to its keys/values.
        Family(
            name="qwenimage21",
            denoisers=("QwenImage21Transformer2DModel",),
            attention=((r"transformer_blocks\.\d+\.attn", "causal_prefix"),),
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
}


@dataclass(frozen=True)
class PipelineSpec:
    """One pipeline class: its denoiser's family, tuned defaults and ``encode_prompt`` outputs.

    ``encode_outputs`` names each element of ``encode_prompt``'s returned tuple by the
    denoiser argument it feeds (None: not used by NAG); ``None`` altogether (pipelines without a
    spec of their own) means: the first output is the prompt embedding, and a following
    ``(batch, tokens)`` tensor is its attention mask. ``negative_overrides`` are
    ``encode_prompt`` arguments set when encoding the negative prompt.
    """

    pipeline: str
    family: str
    label: str
    defaults: FamilyDefaults
    encode_outputs: tuple[str | None, ...] | None
    denoiser_attr: str = "transformer"
    expert_attrs: tuple[str, ...] = ()  # further denoisers of the same family, guided alike when present
    few_step: bool = False
    negative_overrides: dict[str, Any] = field(default_factory=dict)
    # A pipeline component that turns encode_prompt's output into the denoiser's text (LTX-2's `connectors`):
    # the conditional rows are recognised in its output, and the negative prompt is run through it as well.
    text_connector: str | None = None
    # The names under which this pipeline's encode_prompt takes precomputed negative embeddings, mapped to the
    # conditioning they feed, where they differ from the common ones (HiDream: `negative_prompt_embeds_t5`, ...).
    negative_embed_names: dict[str, str] = field(default_factory=dict)
    # A pipeline component run before the denoiser whose output the denoiser adds to its text tokens too (Z-Image's
    # `controlnet`, see nag.control): NAG's negative rows get its output for their own text.
    control_model: str | None = None

    def name_outputs(self, values: Any) -> dict[str, torch.Tensor]:
        """``encode_prompt``'s result as ``{denoiser argument: tensor}``."""
        values = values if isinstance(values, tuple) else (values,)
        if self.encode_outputs is not None:  # (a mask may be None: every token valid)
            return {name: value for name, value in zip(self.encode_outputs, values) if name is not None and value is not None}
        named = {"encoder_hidden_states": values[0]}
        mask = values[1] if len(values) > 1 else None
        if isinstance(mask, torch.Tensor) and mask.ndim == 2 and mask.shape == values[0].shape[:2]:
            named["encoder_attention_mask"] = mask
        return named


_E, _P, _M = "encoder_hidden_states", "pooled_projections", "encoder_attention_mask"

PIPELINES: dict[str, PipelineSpec] = {
    spec.pipeline: spec
    for spec in (
        PipelineSpec("FluxPipeline", "flux", "FLUX.1 (schnell / dev)", FamilyDefaults(5.0, 2.5, 0.25), (_E, _P, None)),
        PipelineSpec("FluxImg2ImgPipeline", "flux", "FLUX.1 image-to-image", FamilyDefaults(5.0, 2.5, 0.25), (_E, _P, None)),
        PipelineSpec("FluxInpaintPipeline", "flux", "FLUX.1 inpainting", FamilyDefaults(5.0, 2.5, 0.25), (_E, _P, None)),
        PipelineSpec("FluxControlPipeline", "flux", "FLUX.1 Canny/Depth control", FamilyDefaults(5.0, 2.5, 0.25), (_E, _P, None)),
        PipelineSpec("FluxKontextPipeline", "flux", "FLUX.1 Kontext (editing)", FamilyDefaults(4.0, 2.5, 0.25), (_E, _P, None)),
        PipelineSpec("FluxKontextInpaintPipeline", "flux", "FLUX.1 Kontext inpainting", FamilyDefaults(4.0, 2.5, 0.25), (_E, _P, None)),
        PipelineSpec("FluxFillPipeline", "flux", "FLUX.1 Fill (inpainting / outpainting)", FamilyDefaults(5.0, 2.5, 0.25), (_E, _P, None)),
        # Qwen-Image: no published NAG defaults; Flux's (the closest published joint-attention
        # flow-matching model) are used.
        PipelineSpec("QwenImagePipeline", "qwenimage", "Qwen-Image", FamilyDefaults(5.0, 2.5, 0.25), (_E, _M)),
        PipelineSpec("QwenImageInpaintPipeline", "qwenimage", "Qwen-Image inpainting", FamilyDefaults(5.0, 2.5, 0.25), (_E, _M)),
        # Qwen-Image-Edit / -Edit-2509 (Plus): the reference images' latents join the image stream (image tokens,
        # never guided text) and enter the prompt encoding as vision tokens, so the negative prompt is encoded with
        # the same images. Qwen-Image-Edit-2511 (zero_cond_t) is refused by the family.
        PipelineSpec("QwenImageEditPipeline", "qwenimage", "Qwen-Image-Edit", FamilyDefaults(5.0, 2.5, 0.25), (_E, _M)),
        # Qwen-Image 2.1 (text-to-image and image-conditioned): no published NAG defaults; FLUX.1's (the closest published
        # flow-matching image DiT) are used. encode_prompt's third output marks the condition images' slots in the text.
        PipelineSpec("QwenImage21Pipeline", "qwenimage21", "Qwen-Image 2.1 (text-to-image, image-conditioned)",
                     FamilyDefaults(5.0, 2.5, 0.25), (_E, _M, "img_mask")),
        PipelineSpec("QwenImageEditPlusPipeline", "qwenimage", "Qwen-Image-Edit-2509 (multiple reference images)",
                     FamilyDefaults(5.0, 2.5, 0.25), (_E, _M)),
        # Chroma: DESIGN.md's Chroma range (3-5, 2.5, 0.25); Flux's 5 within it.
        PipelineSpec("ChromaPipeline", "chroma", "Chroma", FamilyDefaults(5.0, 2.5, 0.25), (_E, None, _M, None, None, None)),
        PipelineSpec("ChromaImg2ImgPipeline", "chroma", "Chroma image-to-image", FamilyDefaults(5.0, 2.5, 0.25),
                     (_E, None, _M, None, None, None)),
        # AuraFlow: no published NAG defaults; SD3.5's (the closest published MMDiT) are used.
        PipelineSpec("AuraFlowPipeline", "auraflow", "AuraFlow", FamilyDefaults(5.0, 2.5, 0.125), (_E, None, None, None)),
        # CogView4: no published NAG defaults; Flux's (the closest published joint-attention
        # flow-matching model) are used.
        PipelineSpec("CogView4Pipeline", "cogview4", "CogView4", FamilyDefaults(5.0, 2.5, 0.25), (_E, None)),
        # CogVideoX: no published NAG defaults; Wan 2.1's with CFG (the closest published text-to-video
        # DiT, multi-step with CFG) are used.
        PipelineSpec("CogVideoXPipeline", "cogvideox", "CogVideoX text-to-video", FamilyDefaults(9.0, 2.5, 0.25), (_E, None)),
        # CogVideoX image-to-video: the encoded image enters as latent channels concatenated to the noisy
        # video (and, in 1.5, an `ofs` embedding in the modulation); the negative rows carry copies of both,
        # so only the text differs between the branches.
        PipelineSpec("CogVideoXImageToVideoPipeline", "cogvideox", "CogVideoX image-to-video", FamilyDefaults(9.0, 2.5, 0.25),
                     (_E, None)),
        # FLUX.2 klein: no published NAG defaults; FLUX.1's (the closest published family) are used.
        PipelineSpec("Flux2KleinPipeline", "flux2", "FLUX.2 klein", FamilyDefaults(5.0, 2.5, 0.25), (_E, None)),
        PipelineSpec("Flux2KleinInpaintPipeline", "flux2", "FLUX.2 klein inpainting", FamilyDefaults(5.0, 2.5, 0.25),
                     (_E, None)),
        # FLUX.2 dev: the same transformer with a guidance embedding, Mistral-Small-3 text (Mistral3); guidance-
        # distilled, so no CFG and no negative prompt in the pipeline: NAG is its only negative prompt. No published
        # NAG defaults; FLUX.1's (the closest published family) are used.
        PipelineSpec("Flux2Pipeline", "flux2", "FLUX.2 dev", FamilyDefaults(5.0, 2.5, 0.25), (_E, None)),
        # Lumina-Image 2.0: no published NAG defaults; SD3.5's (the closest published multi-step DiT with CFG).
        PipelineSpec("Lumina2Pipeline", "lumina2", "Lumina-Image 2.0", FamilyDefaults(5.0, 2.5, 0.125), (_E, _M, None, None)),
        # Z-Image (Turbo: few-step distilled, no CFG; base: CFG with the conditional rows first): no published
        # NAG defaults; FLUX.1's (the closest published flow-matching DiT, also distilled) are used.
        PipelineSpec("ZImagePipeline", "zimage", "Z-Image (Turbo / base)", FamilyDefaults(5.0, 2.5, 0.25), (_E, None)),
        # Z-Image image-to-image / inpainting: the image enters as the starting latents (and, inpainting, the kept region
        # blended back by the pipeline), never as text. Z-Image's defaults.
        PipelineSpec("ZImageImg2ImgPipeline", "zimage", "Z-Image image-to-image", FamilyDefaults(5.0, 2.5, 0.25), (_E, None)),
        PipelineSpec("ZImageInpaintPipeline", "zimage", "Z-Image inpainting", FamilyDefaults(5.0, 2.5, 0.25), (_E, None)),
        # Z-Image ControlNet (also inpainting): the control image enters the ControlNet, whose hints the transformer adds
        # to its [image, caption] sequence; the negative rows get the ControlNet's hints for their own caption (with the
        # guided rows' latents and control), the stock rows the stock hints. Z-Image's defaults.
        PipelineSpec("ZImageControlNetPipeline", "zimage", "Z-Image ControlNet", FamilyDefaults(5.0, 2.5, 0.25), (_E, None),
                     control_model="controlnet"),
        PipelineSpec("ZImageControlNetInpaintPipeline", "zimage", "Z-Image ControlNet inpainting",
                     FamilyDefaults(5.0, 2.5, 0.25), (_E, None), control_model="controlnet"),
        # HunyuanImage 2.1 (CFG through its guider component, one call per branch; the distilled model without):
        # no published NAG defaults; FLUX.1's (the closest published flow-matching image DiT) are used. The
        # negative prompt is encoded by the pipeline's encode_prompt into both streams (its quoted text into byT5).
        PipelineSpec("HunyuanImagePipeline", "hunyuanimage", "HunyuanImage 2.1", FamilyDefaults(5.0, 2.5, 0.25),
                     (_E, _M, "encoder_hidden_states_2", "encoder_attention_mask_2")),
        # HunyuanVideo 1.5 (CFG through its guider component, one call per branch, conditional first): no published
        # NAG defaults; HunyuanVideo's (the same makers' previous video model) are used. The negative prompt is
        # encoded by the pipeline's encode_prompt into both streams (its quoted text into byT5).
        PipelineSpec("HunyuanVideo15Pipeline", "hunyuanvideo15", "HunyuanVideo 1.5 text-to-video", FamilyDefaults(9.0, 2.5, 0.12),
                     (_E, _M, "encoder_hidden_states_2", "encoder_attention_mask_2")),
        # HiDream-I1 (full / dev / fast; CFG batched as [uncond, cond]): no published NAG defaults; FLUX.1's (the
        # closest published flow-matching image DiT) are used. encode_prompt returns T5, Llama-3 (all layers,
        # batch on axis 1) and pooled CLIP embeddings, each followed by its CFG negative.
        PipelineSpec("HiDreamImagePipeline", "hidream", "HiDream-I1", FamilyDefaults(5.0, 2.5, 0.25),
                     (_E, None, "encoder_hidden_states_llama3", None, "pooled_embeds", None),
                     negative_embed_names={"negative_prompt_embeds_t5": _E,
                                           "negative_prompt_embeds_llama3": "encoder_hidden_states_llama3",
                                           "negative_pooled_prompt_embeds": "pooled_embeds"}),
        # HunyuanVideo 1.5 image-to-video: the image enters as latent channels and as SigLIP image embeddings the model
        # joins before the text; the negative rows carry the guided rows' copies of both. The prompt encoding is text
        # only. The text-to-video pipeline's defaults.
        PipelineSpec("HunyuanVideo15ImageToVideoPipeline", "hunyuanvideo15", "HunyuanVideo 1.5 image-to-video",
                     FamilyDefaults(9.0, 2.5, 0.12), (_E, _M, "encoder_hidden_states_2", "encoder_attention_mask_2")),
        PipelineSpec("HunyuanVideoPipeline", "hunyuanvideo", "HunyuanVideo text-to-video", FamilyDefaults(9.0, 2.5, 0.12),
                     (_E, _P, _M)),
        # HunyuanVideo image-to-video (`latent_concat`: the encoded image as latent channels; `token_replace`: as the
        # first latent frame, modulated as at timestep 0): the negative rows carry copies of the guided rows' image
        # tokens. The image also enters the Llava prompt encoding (its vision tokens before the text), so the negative
        # prompt is encoded with the same image. HunyuanVideo's defaults.
        PipelineSpec("HunyuanVideoImageToVideoPipeline", "hunyuanvideo", "HunyuanVideo image-to-video",
                     FamilyDefaults(9.0, 2.5, 0.12), (_E, _P, _M)),
        PipelineSpec("StableDiffusion3Pipeline", "sd3", "Stable Diffusion 3 / 3.5", FamilyDefaults(5.0, 2.5, 0.125), (_E, None, _P, None)),
        PipelineSpec("StableDiffusionXLPipeline", "unet", "Stable Diffusion XL", FamilyDefaults(3.0, 2.5, 0.5), (_E, None, None, None), denoiser_attr="unet"),
        PipelineSpec("StableDiffusionPipeline", "unet", "Stable Diffusion 1.x / 2.x", FamilyDefaults(2.0, 2.5, 0.5), (_E, None), denoiser_attr="unet"),
        PipelineSpec("PixArtSigmaPipeline", "pixart", "PixArt-Sigma", FamilyDefaults(3.0, 2.5, 0.5), (_E, _M, None, None)),
        PipelineSpec("PixArtAlphaPipeline", "pixart", "PixArt-Alpha", FamilyDefaults(3.0, 2.5, 0.5), (_E, _M, None, None)),
        PipelineSpec("SanaPipeline", "sana", "Sana", FamilyDefaults(3.0, 2.5, 0.5), (_E, _M, None, None), negative_overrides={"complex_human_instruction": None}),
        PipelineSpec("SanaSprintPipeline", "sana", "Sana-Sprint", FamilyDefaults(3.0, 2.5, 0.5), (_E, _M), few_step=True, negative_overrides={"complex_human_instruction": None}),
        PipelineSpec("WanImageToVideoPipeline", "wan", "Wan 2.1 / 2.2 image-to-video", FamilyDefaults(9.0, 2.5, 0.25),
                     (_E, None), expert_attrs=("transformer_2",)),
        PipelineSpec("SanaVideoPipeline", "sana", "Sana-Video", FamilyDefaults(3.0, 2.5, 0.5), (_E, _M, None, None), negative_overrides={"complex_human_instruction": None}),
        PipelineSpec("SkyReelsV2Pipeline", "skyreels_v2", "SkyReels-V2 text-to-video", FamilyDefaults(9.0, 2.5, 0.25), (_E, None)),
        PipelineSpec("LTXPipeline", "ltx", "LTX-Video text-to-video", FamilyDefaults(3.0, 2.5, 0.5), (_E, _M, None, None)),
        PipelineSpec("LTXImageToVideoPipeline", "ltx", "LTX-Video image-to-video", FamilyDefaults(3.0, 2.5, 0.5), (_E, _M, None, None)),
        PipelineSpec("LTXConditionPipeline", "ltx", "LTX-Video 0.9.5+ frame conditions", FamilyDefaults(3.0, 2.5, 0.5), (_E, _M, None, None)),
        # LTX-2: no published NAG defaults; LTX-Video's are used. The denoiser's text is the `connectors` output.
        PipelineSpec("LTX2Pipeline", "ltx2", "LTX-2 text-to-video+audio (video stream guided)", FamilyDefaults(3.0, 2.5, 0.5),
                     (_E, _M, None, None), text_connector="connectors"),
        # LTX-2 image-to-video / frame conditions: the images enter as clean latent tokens (timestep 0 there, keyframes
        # appended), never as text; the text path is LTX2Pipeline's. LTX2Pipeline's defaults.
        PipelineSpec("LTX2ImageToVideoPipeline", "ltx2", "LTX-2 image-to-video+audio (video stream guided)",
                     FamilyDefaults(3.0, 2.5, 0.5), (_E, _M, None, None), text_connector="connectors"),
        PipelineSpec("LTX2ConditionPipeline", "ltx2", "LTX-2 frame conditions, video+audio (video stream guided)",
                     FamilyDefaults(3.0, 2.5, 0.5), (_E, _M, None, None), text_connector="connectors"),
        PipelineSpec("WanVACEPipeline", "wan_vace", "Wan 2.1 VACE (control / reference video)", FamilyDefaults(9.0, 2.5, 0.25),
                     (_E, None), expert_attrs=("transformer_2",)),
        PipelineSpec("WanPipeline", "wan", "Wan 2.1 / 2.2 text-to-video", FamilyDefaults(9.0, 2.5, 0.25), (_E, None),
                     expert_attrs=("transformer_2",)),
    )
}


GENERIC_DEFAULTS = FamilyDefaults(3.0, 2.5, 0.5)


def _generic_cross_family(denoiser: torch.nn.Module) -> Family | None:
    """A cross-attention family for a denoiser without an adapter: every diffusers attention
    module that attends to ``encoder_hidden_states`` with its own key/value projections."""
    denoiser = getattr(denoiser, "_orig_mod", denoiser)
    parameters = inspect.signature(denoiser.forward).parameters
    if "encoder_hidden_states" not in parameters:
        return None
    names = [
        name
        for name, module in denoiser.named_modules()
        if hasattr(module, "processor")
        and hasattr(module, "to_k")
        and getattr(module, "added_kv_proj_dim", None) is None
        and (name.rsplit(".", 1)[-1] == "attn2" or getattr(module, "is_cross_attention", False))
    ]
    if not names:
        return None
    masked = "encoder_attention_mask" in parameters
    cls = type(denoiser).__name__
    return Family(
        name=f"generic:{cls}",
        denoisers=(cls,),
        attention=tuple((re.escape(name), "cross") for name in names),
        layout="cross",
        mask_kwarg="encoder_attention_mask" if masked else None,
        negative_keys=("encoder_hidden_states", "encoder_attention_mask") if masked else ("encoder_hidden_states",),
        static_text=False,
    )


def _denoiser_attr(pipe: Any) -> str | None:
    for attr in ("transformer", "unet"):
        if getattr(pipe, attr, None) is not None:
            return attr
    return None


def pipeline_spec(pipe: Any) -> PipelineSpec:
    """The spec for ``pipe``'s class (or a parent class).

    A pipeline without a spec of its own whose denoiser uses cross-attention to the text (a
    known family's denoiser, or any denoiser with diffusers attention modules attending to
    ``encoder_hidden_states``) gets the generic path with a one-line notice; anything else gets
    a clear error naming the supported pipelines.
    """
    for cls in type(pipe).__mro__:
        spec = PIPELINES.get(cls.__name__)
        if spec is not None:
            return spec
    attr = _denoiser_attr(pipe)
    if attr is not None and callable(getattr(pipe, "encode_prompt", None)):
        denoiser = getattr(pipe, attr)
        inner = getattr(denoiser, "_orig_mod", denoiser)
        connected = [spec.pipeline for spec in PIPELINES.values()
                     if spec.text_connector and type(inner).__name__ in FAMILIES[spec.family].denoisers]
        if connected:
            # the denoiser's text comes from a further pipeline component: only pipelines with a spec know it
            raise NotImplementedError(
                f"NAG does not support {type(pipe).__name__} yet: its {type(inner).__name__} gets its text through "
                f"a component after encode_prompt, which NAG follows only in {', '.join(connected)}"
            )
        family = next(
            (f for f in FAMILIES.values() if type(inner).__name__ in f.denoisers and f.layout == "cross"), None
        )
        if family is None:
            family = _generic_cross_family(inner)
            if family is not None:
                FAMILIES.setdefault(family.name, family)
        if family is not None:
            logger.warning(
                "NAG: %s has no tuned defaults; using the generic %s path (scale %s, tau %s, alpha %s unless given)",
                type(pipe).__name__, family.name, GENERIC_DEFAULTS.scale, GENERIC_DEFAULTS.tau, GENERIC_DEFAULTS.alpha,
            )
            return PipelineSpec(type(pipe).__name__, family.name, f"{type(pipe).__name__} (generic)",
                                GENERIC_DEFAULTS, None, denoiser_attr=attr)
    supported = ", ".join(sorted(PIPELINES))
    raise NotImplementedError(
        f"NAG does not support {type(pipe).__name__} yet. Supported pipelines: {supported}; other pipelines "
        "work when their denoiser cross-attends to the text through diffusers attention modules."
    )
