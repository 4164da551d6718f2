"""NAG under diffusers' context parallelism (``model.enable_parallelism(config=ContextParallelConfig(...))``).

The model's context-parallel plan splits some inputs along the sequence at the model's input, after NAG's denoiser
pre-hook has extended them: the blocks, and NAG's attention wrappers, see one rank's shard. Families whose text
reaches every rank whole (Wan: the plan splits only the video) need nothing. Where the plan splits the text (Flux,
FLUX.2), NAG lays out the padded text so that every rank's equal shard holds its share of each branch's tokens
first and the padding after (:func:`shard_tokens`; the cross layout, LTX-Video: its share of the prompt, then its
share of the negative prompt), and records the per-shard lengths in the call: each rank then cuts its own branches
exactly as one process cuts the whole text, and the attention over all ranks sees each branch's tokens and no
padding (Ulysses and ring alike). A split text mask is refused: stock diffusers cannot attend with it
(:data:`TEXT_MASK_UNDER_PARALLELISM`).

Families not marked ``context_parallel`` are refused, at ``attach`` and at every call (parallelism may be enabled
after NAG is applied), with the reason.
"""

from __future__ import annotations

from typing import Any

import torch

from ..spec import Family

__all__ = ["TEXT_MASK_UNDER_PARALLELISM", "context_parallel_config", "text_shards", "refusal", "shard_tokens"]

#: Why a text mask on a split text cannot be exact: stock diffusers (0.42) itself cannot run it. Its processors
#: shape the mask to all of the model's heads, which Ulysses splits between ranks (the attention fails), and ring
#: attention applies each rank's own mask shard to every rank's keys (the output differs from one process).
TEXT_MASK_UNDER_PARALLELISM = (
    "NAG cannot guide a text mask that the model's context-parallel plan splits: stock diffusers cannot attend "
    "with it under context parallelism (Ulysses fails on the mask's head axis; ring applies each rank's mask shard "
    "to every rank's keys, so it differs from one process, with or without NAG). Run this model on one device per "
    "generation (without enable_parallelism), or call the denoiser without `encoder_attention_mask` and pass the "
    "negative prompt without a mask"
)


def context_parallel_config(denoiser: torch.nn.Module) -> Any:
    """The denoiser's ``ContextParallelConfig`` (set by ``enable_parallelism``), or None."""
    config = getattr(denoiser, "_parallel_config", None)
    return getattr(config, "context_parallel_config", None)


def _degree(config: Any) -> int:
    return (getattr(config, "ring_degree", None) or 1) * (getattr(config, "ulysses_degree", None) or 1)


def _splits_text(denoiser: torch.nn.Module, family: Family) -> bool:
    """Whether the model's context-parallel plan splits the text at the model's input."""
    plan = getattr(denoiser, "_cp_plan", None) or {}
    return family.text_kwarg in plan.get("", {})


def refusal(denoiser: torch.nn.Module, family: Family) -> str | None:
    """Why NAG cannot guide ``denoiser`` under its context parallelism, or None (none enabled, or exact)."""
    config = context_parallel_config(denoiser)
    if config is None or _degree(config) <= 1:
        return None
    if not family.context_parallel:
        why = family.context_parallel_refusal or "yet"
        return (
            f"NAG is not exact for {family.name} under context parallelism {why}; run it on one device per "
            "generation (without enable_parallelism), or remove NAG"
        )
    if _splits_text(denoiser, family) and (
        getattr(config, "ulysses_anything", False) or getattr(config, "ring_anything", False)
    ):
        return (
            "NAG lays the text out in equal shards per rank; ulysses_anything / ring_anything shard unevenly: "
            "use plain ulysses_degree / ring_degree"
        )
    return None


def text_shards(denoiser: torch.nn.Module, family: Family) -> int:
    """How many shards the text of one call is split into (1: it reaches every rank whole).

    Raises ``NotImplementedError`` with the reason where NAG cannot guide under this parallelism."""
    reason = refusal(denoiser, family)
    if reason:
        raise NotImplementedError(f"NAG cannot guide this {type(denoiser).__name__}: {reason}")
    config = context_parallel_config(denoiser)
    if config is None or not _splits_text(denoiser, family):
        return 1
    return _degree(config)


def shard_tokens(x: torch.Tensor, shards: int, chunk: int, dim: int = 1) -> torch.Tensor:
    """``x``'s tokens along ``dim`` (a multiple of ``shards`` long) laid out over ``shards`` equal chunks of
    ``chunk`` tokens: each chunk holds its share of the tokens, in order, then zeros."""
    parts = x.unflatten(dim, (shards, -1))
    missing = chunk - parts.shape[dim + 1]
    if missing:
        filler = parts.new_zeros(*parts.shape[: dim + 1], missing, *parts.shape[dim + 2 :])
        parts = torch.cat([parts, filler], dim=dim + 1)
    return parts.flatten(dim, dim + 1)
