"""NAG on a bare denoiser, for custom sampling loops and benchmarks."""

from __future__ import annotations

from typing import Any

import torch

from .families import family_of
from .hooks import Attachment, attach
from .settings import NAGSettings
from .state import NAGRuntime

__all__ = ["apply_to_denoiser", "DenoiserHandle"]


class DenoiserHandle:
    """NAG installed on a denoiser; ``remove()`` (or leaving a ``with`` block) undoes it."""

    def __init__(self, attachment: Attachment):
        self._attachment: Attachment | None = attachment
        self.runtime = attachment.runtime

    @property
    def settings(self) -> NAGSettings:
        return self.runtime.settings

    def set_negative(self, negative: dict[str, torch.Tensor], positive_reference: torch.Tensor | None = None) -> None:
        """Replace the negative conditioning (denoiser argument names -> tensors)."""
        self.runtime.begin_generation(dict(negative), positive_reference)

    def remove(self) -> None:
        if self._attachment is not None:
            self._attachment.detach()
            self._attachment = None

    def __enter__(self) -> DenoiserHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def apply_to_denoiser(
    denoiser: torch.nn.Module,
    negative: dict[str, torch.Tensor],
    *,
    scale: float,
    tau: float = 2.5,
    alpha: float = 0.5,
    norm: int = 1,
    positive_reference: torch.Tensor | None = None,
    fast: bool = True,
) -> DenoiserHandle:
    """Guide every call of ``denoiser`` with NAG (no pipeline, no step window).

    ``negative`` maps the denoiser's argument names to the negative conditioning, e.g.
    ``{"encoder_hidden_states": ..., "pooled_projections": ...}`` for Flux/SD3 or
    ``{"encoder_hidden_states": ..., "encoder_attention_mask": ...}`` for PixArt/Sana, with one
    row per guided row (or one row). With ``positive_reference`` (the positive text embeddings),
    only the rows carrying it are guided, as in a classifier-free-guidance batch
    ``[unconditional, conditional]``; without it every row is guided.

    What depends on the negative alone is computed in the first guided call and reused by the later ones (on the
    cross-attention models: the negative tokens' text projection and keys/values), until
    :meth:`DenoiserHandle.set_negative`: call it again after changing the denoiser's weights (loading a LoRA).
    """
    family = family_of(denoiser)
    missing = [key for key in family.negative_keys if key not in negative and key != "encoder_attention_mask"]
    if missing:
        raise ValueError(f"{type(denoiser).__name__} needs negative {missing}")
    runtime = NAGRuntime(settings=NAGSettings(scale=scale, tau=tau, alpha=alpha, norm=norm))
    runtime.begin_generation(dict(negative), positive_reference)
    return DenoiserHandle(attach(denoiser, family, runtime, fast=fast))
