"""What ``nag.apply`` checks before it installs anything: processors it can drive, diffusers features it cannot run
under, and precomputed negative embeddings of the wrong shape or width. Each refusal names the fix."""

from __future__ import annotations

import inspect
import re
from collections.abc import Sequence
from typing import Any

import torch

from .attention import NAGProcessor
from .families import FAMILIES
from .signatures import call_signature
from .spec import PipelineSpec

# Names of precomputed negative embeddings (as the pipelines' encode_prompt spells them) and the
# denoiser argument each one feeds.
NEGATIVE_EMBED_NAMES = {
    "negative_prompt_embeds": "encoder_hidden_states",
    "negative_pooled_prompt_embeds": "pooled_projections",
    "negative_prompt_attention_mask": "encoder_attention_mask",
    "negative_prompt_embeds_mask": "encoder_attention_mask",  # (HunyuanImage's name for it)
    # HunyuanImage's second text stream (byT5) and its mask
    "negative_prompt_embeds_2": "encoder_hidden_states_2",
    "negative_prompt_embeds_mask_2": "encoder_attention_mask_2",
}
_EMBED_NDIM = {
    "encoder_hidden_states": 3,
    "pooled_projections": 2,
    "encoder_attention_mask": 2,
    "encoder_hidden_states_2": 3,
    "encoder_attention_mask_2": 2,
}
# HiDream's stacked Llama-3 states (every layer) and pooled CLIP embeddings (PipelineSpec.negative_embed_names)
_EMBED_NDIM.update(encoder_hidden_states_llama3=4, pooled_embeds=2)
# Qwen-Image 2.1's image-slot mask: which text positions stand for condition-image tokens (negative_embed_names)
_EMBED_NDIM.update(img_mask=2)
# Masks: bool, integer or float, one entry per token; the optional ones may be left out (every token valid / no slot
# holds an image)
_MASK_KEYS = ("encoder_attention_mask", "encoder_attention_mask_2", "img_mask")
_OPTIONAL_KEYS = ("encoder_attention_mask", "img_mask")
_EMBED_LAYOUT = {
    "encoder_hidden_states": "(rows, tokens, width)",
    "pooled_projections": "(rows, width)",
    "encoder_attention_mask": "(rows, tokens)",
    "encoder_hidden_states_2": "(rows, tokens, width)",
    "encoder_attention_mask_2": "(rows, tokens)",
}
_EMBED_LAYOUT.update(encoder_hidden_states_llama3="(layers, rows, tokens, width)", pooled_embeds="(rows, width)")
_EMBED_LAYOUT.update(img_mask="(rows, tokens)")
# Denoiser config entries that give the width each negative input must have, in order of preference
# (PixArt/Sana: `caption_channels` is the text width, `cross_attention_dim` the projected one).
_WIDTH_CONFIG = {
    "encoder_hidden_states": ("joint_attention_dim", "caption_channels", "text_dim", "cross_attention_dim"),
    "pooled_projections": ("pooled_projection_dim",),
    "pooled_embeds": ("text_emb_dim",),
}
# diffusers hooks (by their registry names) that NAG cannot run under: name -> (layouts, feature).
# The block caches skip blocks, or replay a block's output or attention from an earlier step; on
# the joint and concat layouts (Flux, SD3, Chroma, ...) NAG carries the negative rows through every
# block, and a skipped or replayed block drops them (diffusers then fails with a shape or key error).
# FasterCache rebuilds the unconditional branch from cached attention and fails likewise.
_BLOCK_CACHE = ("joint", "concat")
_INCOMPATIBLE_HOOKS = {
    "fbc_leader_block_hook": (_BLOCK_CACHE, "first-block cache"),
    "fbc_block_hook": (_BLOCK_CACHE, "first-block cache"),
    "pyramid_attention_broadcast": (_BLOCK_CACHE, "pyramid attention broadcast"),
    "taylorseer_cache": (_BLOCK_CACHE, "TaylorSeer cache"),
    "mag_cache_leader_block_hook": (_BLOCK_CACHE, "MagCache"),
    "mag_cache_block_hook": (_BLOCK_CACHE, "MagCache"),
    "faster_cache_denoiser": (("cross", "joint", "concat"), "FasterCache"),
    "faster_cache_block": (("cross", "joint", "concat"), "FasterCache"),
}


def check_processors(
    denoiser: torch.nn.Module, spec: PipelineSpec, modules: Sequence[tuple[str, torch.nn.Module]] | None = None
) -> None:
    """Refuse text-attention processors NAG cannot drive, naming the module and the fix.

    NAG wraps whatever processor a text-attention module has and calls it with the positive and
    the negative context, binding its arguments by name. A processor from another tool works if it
    takes the stock arguments by name (``hidden_states``, ``encoder_hidden_states``, ...); one
    that hides them behind ``*args``/``**kwargs`` or does not take them cannot be driven. ``modules``: the
    denoiser's ``named_modules()`` where the caller has them.
    """
    family = FAMILIES[spec.family]
    for name, module in denoiser.named_modules() if modules is None else modules:
        mechanism = family.attention_role(name, module)
        if mechanism is None:
            continue
        processor = module.processor
        label = f"`{spec.denoiser_attr}.{name}` has a {type(processor).__name__}"
        fix = (
            f"restore diffusers' processors first (e.g. pipe.{spec.denoiser_attr}.set_default_attn_processor(), "
            "or reload the model), or remove the other tool"
        )
        if isinstance(processor, NAGProcessor):
            raise RuntimeError(f"{label}: this denoiser already carries NAG; remove that first")
        if not callable(processor):
            raise TypeError(f"{label}, which is not callable; NAG needs a diffusers attention processor: {fix}")
        try:
            parameters = call_signature(processor).parameters
        except (TypeError, ValueError) as error:
            raise TypeError(f"{label} whose signature cannot be read ({error}); NAG cannot drive it: {fix}") from None
        missing = [p for p in mechanism.binds if p not in parameters]
        if missing:
            raise TypeError(
                f"{label} that takes no named {missing} (another attention tool?); NAG calls the processor "
                f"with the positive and the negative text by those names and cannot drive it: {fix}"
            )


def check_hooks(
    denoiser: torch.nn.Module, spec: PipelineSpec, modules: Sequence[tuple[str, torch.nn.Module]] | None = None
) -> None:
    """Refuse diffusers features (hooks) that cannot carry NAG's negative conditioning (``modules``: the denoiser's
    ``named_modules()`` where the caller has them)."""
    layout = FAMILIES[spec.family].layout
    for _, module in denoiser.named_modules() if modules is None else modules:
        # (read from the instance dict: a missing attribute through nn.Module.__getattr__ raises, slowly, per module;
        # this runs at every generation)
        registry = module.__dict__.get("_diffusers_hook")
        for name in getattr(registry, "hooks", {}) or {}:
            layouts, feature = _INCOMPATIBLE_HOOKS.get(name, ((), ""))
            if layout in layouts:
                raise NotImplementedError(
                    f"{feature} is enabled on pipe.{spec.denoiser_attr}; NAG on {spec.pipeline} carries the negative "
                    f"prompt through the blocks that {feature} skips or replays, so the two cannot run together. "
                    f"Disable it while NAG is applied (pipe.{spec.denoiser_attr}.disable_cache()), or remove NAG."
                )


def expected_widths(denoiser: torch.nn.Module | None) -> dict[str, tuple[str, int]]:
    """Widths the denoiser's config prescribes for each negative input: key -> (config entry, width)."""
    config = getattr(denoiser, "config", None)
    widths: dict[str, tuple[str, int]] = {}
    if config is None:
        return widths
    for key, entries in _WIDTH_CONFIG.items():
        for entry in entries:
            value = config.get(entry) if hasattr(config, "get") else getattr(config, entry, None)
            if isinstance(value, int) and not isinstance(value, bool):
                widths[key] = (entry, value)
                break
    return widths


def check_widths_against_positive(
    negative: dict[str, torch.Tensor], positive: dict[str, torch.Tensor], names: dict[str, str] = NEGATIVE_EMBED_NAMES
) -> None:
    """At encode time: the negative embeddings must have the width of the positive ones (``names``: the
    pipeline's names of precomputed negative embeddings, for the error message)."""
    for key, value in negative.items():
        reference = positive.get(key)
        if isinstance(reference, (list, tuple)) and reference:  # per-prompt lists (Z-Image): one tensor's width
            reference = reference[0]
        value = value[0] if isinstance(value, (list, tuple)) else value
        if key in _MASK_KEYS or not isinstance(reference, torch.Tensor):
            continue
        if value.shape[-1] != reference.shape[-1]:
            name = next(n for n, k in names.items() if k == key)
            expected = ("rows", "tokens", reference.shape[-1]) if value.ndim == 3 else ("rows", reference.shape[-1])
            if value.ndim == 4:  # (HiDream's stacked Llama-3 states)
                expected = ("layers", "rows", "tokens", reference.shape[-1])
            raise ValueError(
                f"`{name}` has width {value.shape[-1]} but this call's prompt embeddings have width "
                f"{reference.shape[-1]}: expected shape {expected}. Encode the negative prompt with "
                "this pipeline's encode_prompt (or pass the negative prompt as text)."
            )


def _check_tensor(name: str, value: Any, key: str, ndim: int, layout: str = "") -> None:
    """One precomputed negative tensor: its type, dimensions, dtype, device and values."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(value).__name__}")
    if value.ndim != ndim:
        raise ValueError(f"`{name}` must have {ndim} dimensions {layout}, got shape {tuple(value.shape)}")
    if key in _MASK_KEYS:
        if value.is_complex():
            raise TypeError(f"`{name}` must be a bool, integer or float mask (1 = keep), got {value.dtype}")
    elif not value.is_floating_point():
        raise TypeError(
            f"`{name}` must be a floating-point tensor (embeddings, not token ids), got {value.dtype}; "
            f"encode the negative prompt with the pipeline's encode_prompt, or pass it as text"
        )
    if value.is_meta:
        raise ValueError(f"`{name}` is on the meta device (shape only, no values); pass a materialized tensor")
    if 0 in value.shape:
        raise ValueError(f"`{name}` is empty (shape {tuple(value.shape)}); it needs at least one row and one token")
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        raise ValueError(f"`{name}` contains NaN or inf; NAG would turn every guided output into NaN")


def _check_masks_match_text(converted: dict[str, Any], accepted: dict[str, str]) -> None:
    """Each precomputed mask has one entry per token of the negative embeddings (and one row or one per row)."""
    text = converted.get("encoder_hidden_states")
    if not isinstance(text, torch.Tensor):
        return
    for key in ("encoder_attention_mask", "img_mask"):
        mask = converted.get(key)
        if mask is not None and (mask.shape[1] != text.shape[1] or mask.shape[0] not in (1, text.shape[0])):
            name = next(n for n, k in accepted.items() if k == key)
            text_name = next(n for n, k in accepted.items() if k == "encoder_hidden_states")
            raise ValueError(
                f"`{name}` has shape {tuple(mask.shape)} but `{text_name}` has {tuple(text.shape)}: "
                f"expected ({text.shape[0]}, {text.shape[1]}), one entry per token"
            )


def validate_negative_embeds(
    spec: PipelineSpec, embeds: dict[str, Any], denoiser: torch.nn.Module | None = None
) -> dict[str, Any]:
    """Check precomputed negative embeddings: names, types, dtypes, devices, shapes, values.

    Tensors on another (real) device than the denoiser are fine: they are moved at use. Widths
    are checked against the denoiser's config here and against the prompt embeddings at each
    generation.
    """
    family = FAMILIES[spec.family]
    names = spec.negative_embed_names or NEGATIVE_EMBED_NAMES
    # (encode_prompt outputs the family reads beside the text conditioning count too: Qwen-Image 2.1's `img_mask`)
    used = {*family.negative_keys, *(spec.encode_outputs or ())}
    accepted = {name: key for name, key in names.items() if key in used}
    unknown = sorted(set(embeds) - set(accepted) - set(spec.unused_negative_names))
    if unknown:
        raise TypeError(
            f"nag.apply got unexpected keyword argument(s) {unknown} for {spec.pipeline}; "
            f"precomputed negative embeddings it accepts: {sorted({*accepted, *spec.unused_negative_names})}"
        )
    converted: dict[str, Any] = {}
    for name, value in embeds.items():
        if value is None:
            continue
        if name in spec.unused_negative_names:  # checked like the others, then left out: NAG does not use it
            _check_tensor(name, value, NEGATIVE_EMBED_NAMES.get(name, "pooled_projections"), getattr(value, "ndim", 0))
            continue
        key = accepted[name]
        if spec.per_prompt_lists and key == "encoder_hidden_states" and isinstance(value, (list, tuple)):
            # one (tokens, width) tensor per prompt, each of its own length, as encode_prompt returns them
            if not value:
                raise ValueError(f"`{name}` is an empty list; it needs one (tokens, width) tensor per prompt")
            for index, item in enumerate(value):
                _check_tensor(f"{name}[{index}]", item, key, 2, "(tokens, width)")
            converted[key] = list(value)
            continue
        _check_tensor(name, value, key, _EMBED_NDIM[key], _EMBED_LAYOUT[key])
        converted[key] = value
    if converted:
        required = [name for name, key in accepted.items() if key not in _OPTIONAL_KEYS and key not in converted]
        if required:
            raise ValueError(
                f"{spec.pipeline} needs {required} too when negative embeddings are passed instead of a prompt"
            )
    _check_masks_match_text(converted, accepted)
    for key, (entry, width) in expected_widths(denoiser).items():
        value = converted.get(key)
        value = value[0] if isinstance(value, list) else value
        if value is not None and value.shape[-1] != width:
            name = next(n for n, k in accepted.items() if k == key)
            expected = ("rows", "tokens", width) if value.ndim == 3 else ("rows", width)
            raise ValueError(
                f"`{name}` has width {value.shape[-1]} but {spec.pipeline}'s {spec.denoiser_attr} expects "
                f"{width} (config.{entry}): expected shape {expected}. Encode the negative prompt with "
                "this pipeline's encode_prompt (or pass the negative prompt as text)."
            )
    return converted


def check_prompt_texts(name: str, value: Any) -> None:
    """A negative prompt: a string or a non-empty list of strings (TypeError naming ``name`` otherwise)."""
    if isinstance(value, (list, tuple)):
        if not value or not all(isinstance(text, str) for text in value):
            raise TypeError(f"{name} must be a string or a non-empty list of strings")
    elif not isinstance(value, str):
        raise TypeError(f"{name} must be a string or a list of strings, got {type(value).__name__}")


def further_encoder_negatives(pipe: Any, negative_prompt: Any, extra: dict[str, Any]) -> dict[str, Any]:
    """``negative_prompt_2`` (``_3``, ``_4``) taken out of ``extra``, nag.apply's keyword arguments: the negative
    prompt for the pipeline's further text encoders, as its ``encode_prompt`` takes ``prompt_2`` (...). Returns
    ``{"prompt_2": text(s), ...}``; an empty or None one is left out (that encoder gets ``negative_prompt``, as in
    diffusers)."""
    names = sorted(name for name in extra if re.fullmatch(r"negative_prompt_\d+", name))
    found = {name: extra.pop(name) for name in names}
    encode = getattr(pipe, "encode_prompt", None)
    parameters = inspect.signature(encode).parameters if callable(encode) else {}
    texts: dict[str, Any] = {}
    for name, value in found.items():
        target = name.removeprefix("negative_")
        if target not in parameters:
            raise TypeError(
                f"nag.apply got {name}, but {type(pipe).__name__}'s encode_prompt takes no {target}: pass "
                "negative_prompt alone (every text encoder gets it)"
            )
        if value is None or (isinstance(value, str) and not value.strip()):
            continue
        check_prompt_texts(name, value)
        texts[target] = value
    if texts and negative_prompt is None:
        raise ValueError(
            f"{', '.join('negative_' + target for target in texts)} given without negative_prompt: pass "
            "negative_prompt too (the first text encoder's, and that of every encoder without its own)"
        )
    return texts
