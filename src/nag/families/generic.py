"""The generic path: any denoiser whose diffusers attention modules cross-attend to ``encoder_hidden_states``."""

from __future__ import annotations

import inspect
import re

import torch

from ..attention import CROSS
from ..settings import FamilyDefaults
from ..spec import Family

GENERIC_DEFAULTS = FamilyDefaults(3.0, 2.5, 0.5)


def generic_cross_family(denoiser: torch.nn.Module) -> Family | None:
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
        attention=tuple((re.escape(name), CROSS) for name in names),
        layout="cross",
        mask_kwarg="encoder_attention_mask" if masked else None,
        negative_keys=("encoder_hidden_states", "encoder_attention_mask") if masked else ("encoder_hidden_states",),
        static_text=False,
    )
