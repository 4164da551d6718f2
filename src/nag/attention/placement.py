"""Where a fast path's attention runs: NAG's own kernels (``nag.kernels``) on this process's tokens, or, under
diffusers' context parallelism, the same kernels inside diffusers' parallel attention.

Under context parallelism each rank holds a shard of the sequence. diffusers' parallel attention (Ulysses: an
all-to-all that gives each rank every token for its share of the heads; ring: each rank's keys/values passed around
and merged by their log-sum-exp) takes the attention op it runs on the gathered tokens as an argument. NAG hands it
its own op, which returns the log-sum-exp on every device (``nag.kernels.attention_with_lse``: cuDNN or flash on
GPUs, checked once per device, dtype and head size; the CPU's flash op; the math): the joint fast paths' image->image
and image->text attentions then run on the shards exactly as on one process, and merge there as they do here.

This replaces the stock processor's attention backend for those calls; it is done where that backend computes exact
softmax attention (:data:`EXACT_PARALLEL_BACKENDS`), never for an approximate one (SageAttention's quantized
kernels): there the straightforward path runs the stock processor under its own backend.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any

import torch

from ..kernels import attention, attention_with_lse, attention_with_lse_over_valid_keys

__all__ = ["AttentionPlacement", "ON_THIS_PROCESS", "EXACT_PARALLEL_BACKENDS", "backend_name", "fast_placement"]

#: Attention backends (``set_attention_backend``) whose parallel attention computes exact softmax attention, so that
#: NAG's kernels may stand in for them under context parallelism.
EXACT_PARALLEL_BACKENDS = frozenset(
    {
        "native", "_native_cudnn", "_native_flash", "_native_efficient", "_native_math",
        "flash", "flash_hub", "flash_varlen", "flash_varlen_hub", "_flash_3", "_flash_3_hub", "_flash_3_varlen_hub",
    }
)  # fmt: skip


@dataclass(frozen=True)
class AttentionPlacement:
    """Softmax attention ``(B, L, H, D)`` for a fast path, with or without its log-sum-exp ``(B, L, H)`` (float32):
    on this process's tokens (``parallel_config`` None), or over every rank's keys/values under diffusers' context
    parallelism (``parallel_config``: the stock processor's ``ParallelConfig``; queries, keys and values are this
    rank's shards, each rank's keys/values the same length)."""

    parallel_config: Any = None

    def with_lse(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention and its log-sum-exp; ``key_mask`` (``(B, Lk)``, true = attend) on this process only."""
        if self.parallel_config is None:
            return attention_with_lse_over_valid_keys(q, k, v, key_mask)
        _no_mask(key_mask)
        return _parallel(q, k, v, True, self.parallel_config)

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Attention; ``mask`` (additive or boolean, broadcastable to ``(B, H, Lq, Lk)``) on this process only."""
        if self.parallel_config is None:
            return attention(q, k, v, mask)
        _no_mask(mask)
        return _parallel(q, k, v, False, self.parallel_config)


ON_THIS_PROCESS = AttentionPlacement()


def _no_mask(mask: torch.Tensor | None) -> None:
    if mask is not None:  # (the fast paths take the straightforward path for masked calls under parallelism)
        raise RuntimeError("NAG's attention under context parallelism takes no mask")


def backend_name(stock: Any) -> str:
    """The attention backend the stock processor runs on: its own (``set_attention_backend``), else the
    process-wide one (``attention_backend(...)``), else ``"native"``."""
    backend = getattr(stock, "_attention_backend", None)
    if backend is None:
        try:
            from diffusers.models.attention_dispatch import _AttentionBackendRegistry
        except ImportError:  # pragma: no cover - older diffusers: no dispatcher, processors use SDPA
            return "native"
        backend = _AttentionBackendRegistry._active_backend
    return str(getattr(backend, "value", backend))


def fast_placement(stock: Any, under_parallelism: bool) -> AttentionPlacement | None:
    """Where a fast path may compute the stock processor's attention with NAG's kernels, or None (the straightforward
    path: the stock processor computes it). Without context parallelism: on this process, where the stock processor
    runs the default (native) backend. Under it: inside diffusers' parallel attention, for fast paths that can run
    there (``under_parallelism``) where the stock processor's backend is exact (:data:`EXACT_PARALLEL_BACKENDS`), with
    gradients off (NAG's op there has no backward: with gradients the stock processor's attention runs)."""
    config = getattr(stock, "_parallel_config", None)
    if config is None:
        return ON_THIS_PROCESS if backend_name(stock) == "native" else None
    if (
        not under_parallelism
        or torch.is_grad_enabled()
        or backend_name(stock) not in EXACT_PARALLEL_BACKENDS
        or _templated() is None
    ):
        return None
    return AttentionPlacement(config)


#: The parameters NAG passes to diffusers' parallel attention, in order (diffusers 0.42).
_TEMPLATED_PARAMETERS = (
    "query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa", "return_lse",
    "forward_op", "backward_op", "_parallel_config",
)  # fmt: skip


@functools.cache
def _templated() -> Any:
    """diffusers' parallel attention (Ulysses, ring, both), which runs a given attention op on the gathered shards;
    None where this diffusers has none of that name and those parameters (then the straightforward path runs)."""
    try:
        from diffusers.models.attention_dispatch import _templated_context_parallel_attention as templated
    except ImportError:  # pragma: no cover - another diffusers: the straightforward path under parallelism
        return None
    if tuple(inspect.signature(templated).parameters) != _TEMPLATED_PARAMETERS:  # pragma: no cover
        return None
    return templated


def _forward_op(
    ctx: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: Any = None,
    dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False,
    return_lse: bool = False, _save_ctx: bool = True, _parallel_config: Any = None,
) -> Any:
    """The attention op diffusers' parallel attention runs on the gathered tokens: NAG's kernels."""
    if return_lse:
        return attention_with_lse(query, key, value)
    return attention(query, key, value)


def _backward_op(*args: Any, **kwargs: Any) -> Any:  # (unreachable: the fast paths run there with gradients off)
    raise NotImplementedError("NAG's fast attention under context parallelism has no backward")


def _parallel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, return_lse: bool, config: Any) -> Any:
    templated = _templated()
    out = templated(
        q, k, v, None, 0.0, False, None, False, return_lse,
        forward_op=_forward_op, backward_op=_backward_op, _parallel_config=config,
    )  # fmt: skip
    if not return_lse:
        return out
    out, lse = out
    return out, lse.float()
