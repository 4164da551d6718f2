"""Model families: one module each (or per close group), registered here.

Each family module declares its :class:`~nag.spec.Family` adapters (``FAMILIES``), the text paths and any attention
processor only it uses, and its pipeline rows (``PIPELINES``: one :class:`~nag.spec.PipelineSpec` per pipeline
class). Adding a family is one new module plus one line in ``_FAMILY_MODULES``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..hooks import unwrap_compiled
from ..spec import Family, PipelineSpec
from . import (
    auraflow,
    cogview,
    cross_attention,
    flux,
    flux2,
    hidream,
    hunyuan,
    lumina2,
    qwenimage,
    qwenimage21,
    sd3,
    zimage,
)
from .generic import GENERIC_DEFAULTS, generic_cross_family

__all__ = ["FAMILIES", "PIPELINES", "GENERIC_DEFAULTS", "pipeline_spec", "family_of"]

logger = logging.getLogger("nag")

_FAMILY_MODULES = (
    flux,
    sd3,
    qwenimage,
    auraflow,
    cogview,
    hunyuan,
    hidream,
    flux2,
    lumina2,
    zimage,
    cross_attention,
    qwenimage21,
)

FAMILIES: dict[str, Family] = {family.name: family for module in _FAMILY_MODULES for family in module.FAMILIES}
PIPELINES: dict[str, PipelineSpec] = {spec.pipeline: spec for module in _FAMILY_MODULES for spec in module.PIPELINES}


def family_of(denoiser: torch.nn.Module) -> Family:
    """The family adapter for a denoiser instance, or a clear error."""
    for cls in type(unwrap_compiled(denoiser)).__mro__:
        for family in FAMILIES.values():
            if cls.__name__ in family.denoisers:
                return family
    supported = sorted(name for family in FAMILIES.values() for name in family.denoisers)
    raise NotImplementedError(f"NAG does not support {type(denoiser).__name__}; supported denoisers: {supported}")


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
        connected = [
            spec.pipeline
            for spec in PIPELINES.values()
            if spec.text_connector and type(inner).__name__ in FAMILIES[spec.family].denoisers
        ]
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
            family = generic_cross_family(inner)
            if family is not None:
                FAMILIES.setdefault(family.name, family)
        if family is not None:
            logger.warning(
                "NAG: %s has no tuned defaults; using the generic %s path (scale %s, tau %s, alpha %s unless given)",
                type(pipe).__name__,
                family.name,
                GENERIC_DEFAULTS.scale,
                GENERIC_DEFAULTS.tau,
                GENERIC_DEFAULTS.alpha,
            )
            return PipelineSpec(
                type(pipe).__name__,
                family.name,
                f"{type(pipe).__name__} (generic)",
                GENERIC_DEFAULTS,
                None,
                denoiser_attr=attr,
            )
    supported = ", ".join(sorted(PIPELINES))
    raise NotImplementedError(
        f"NAG does not support {type(pipe).__name__} yet. Supported pipelines: {supported}; other pipelines "
        "work when their denoiser cross-attends to the text through diffusers attention modules."
    )


def mechanisms() -> dict[str, Any]:
    """Every attention mechanism the registered families use, by name (``nag.attention.processor_table`` lists
    which stock processor gets which wrapper)."""
    return {mechanism.name: mechanism for family in FAMILIES.values() for _, mechanism in family.attention}
