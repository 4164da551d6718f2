"""The public API on stock diffusers pipelines: ``apply``, ``remove`` and the handle."""

from __future__ import annotations

import inspect
import logging
import re
import weakref
from typing import Any, Sequence

import torch

from .attention import NAGProcessor
from .engine import Attachment, NAGRuntime, attach
from .families import FAMILIES, PipelineSpec, pipeline_spec
from .settings import NAGSettings

__all__ = ["apply", "remove", "NAGHandle"]

logger = logging.getLogger("nag")

# Names of precomputed negative embeddings (as the pipelines' encode_prompt spells them) and the
# denoiser argument each one feeds.
NEGATIVE_EMBED_NAMES = {
    "negative_prompt_embeds": "encoder_hidden_states",
    "negative_pooled_prompt_embeds": "pooled_projections",
    "negative_prompt_attention_mask": "encoder_attention_mask",
}
_EMBED_NDIM = {"encoder_hidden_states": 3, "pooled_projections": 2, "encoder_attention_mask": 2}

_HANDLES: "weakref.WeakKeyDictionary[Any, NAGHandle]" = weakref.WeakKeyDictionary()
_PATCHED_METHODS = ("check_inputs", "encode_prompt")


def _reset_to_default(name: str) -> bool:
    """encode_prompt arguments that belong to the positive prompt's other inputs or to CFG."""
    return bool(re.fullmatch(r"prompt_\d+", name)) or "embeds" in name or "attention_mask" in name or name.startswith(
        "negative_"
    )


class NAGHandle:
    """NAG installed on one pipeline. Use ``remove()`` or a ``with`` block to undo it.

    Attributes:
        pipe: the pipeline.
        settings: the :class:`~nag.NAGSettings` in force.
        family: the model family name.
    """

    def __init__(
        self,
        pipe: Any,
        spec: PipelineSpec,
        settings: NAGSettings,
        negative_prompt: str | Sequence[str] | None,
        negative_embeds: dict[str, torch.Tensor],
        fast: bool = True,
    ):
        self.pipe = pipe
        self.spec = spec
        self.family = spec.family
        self.negative_prompt = negative_prompt
        self.negative_embeds = negative_embeds
        self.runtime = NAGRuntime(settings=settings, progress=self._progress)
        self._awaiting_positive = True
        self._saved_attributes: dict[str, Any] = {}
        self._attachment: Attachment | None = None
        denoiser = getattr(pipe, spec.denoiser_attr, None)
        if denoiser is None:
            raise ValueError(f"{type(pipe).__name__} has no `{spec.denoiser_attr}`; NAG needs the denoiser loaded")
        self._attachment = attach(denoiser, FAMILIES[spec.family], self.runtime, fast=fast)
        if negative_embeds and settings.enabled:
            # Until a pipeline call encodes its prompt, direct denoiser calls guide every row.
            self.runtime.begin_generation(dict(negative_embeds), None)
        try:
            self._patch_pipeline()
        except BaseException:
            self.remove()
            raise

    # -- public ---------------------------------------------------------------------------------
    @property
    def settings(self) -> NAGSettings:
        return self.runtime.settings

    @property
    def guided_calls(self) -> int:
        """Denoiser calls guided by NAG in the latest generation."""
        return self.runtime.guided_calls

    @property
    def active(self) -> bool:
        return self._attachment is not None

    def update(self, **changes: float) -> "NAGHandle":
        """Change settings (``scale``, ``tau``, ``alpha``, ``start``, ``end``, ``norm``) in place."""
        self.runtime.settings = self.runtime.settings.with_updates(**changes)
        return self

    def remove(self) -> None:
        """Undo everything ``apply`` installed. Safe to call twice."""
        if self._attachment is not None:
            self._attachment.detach()
            self._attachment = None
        for name in list(self._saved_attributes):
            previous = self._saved_attributes.pop(name)
            if previous is _MISSING:
                self.pipe.__dict__.pop(name, None)
            else:
                self.pipe.__dict__[name] = previous
        if _HANDLES.get(self.pipe) is self:
            del _HANDLES[self.pipe]

    def __enter__(self) -> "NAGHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __repr__(self) -> str:
        s = self.settings
        state = "active" if self.active else "removed"
        return (
            f"NAGHandle({type(self.pipe).__name__}, family={self.family!r}, scale={s.scale}, tau={s.tau}, "
            f"alpha={s.alpha}, start={s.start}, end={s.end}, norm={s.norm}, {state})"
        )

    # -- pipeline interception -------------------------------------------------------------------
    def _patch_pipeline(self) -> None:
        for name in _PATCHED_METHODS:
            original = getattr(self.pipe, name, None)
            if original is None:
                continue
            self._saved_attributes[name] = self.pipe.__dict__.get(name, _MISSING)
            self.pipe.__dict__[name] = getattr(self, f"_wrap_{name}")(original)

    def _wrap_check_inputs(self, original: Any) -> Any:
        signature = inspect.signature(original)

        def check_inputs(*args: Any, **kwargs: Any) -> Any:
            self._awaiting_positive = True
            prompt = signature.bind_partial(*args, **kwargs).arguments.get("prompt")
            if isinstance(prompt, (list, tuple)):
                self._check_negative_count(len(prompt))
            return original(*args, **kwargs)

        return check_inputs

    def _wrap_encode_prompt(self, original: Any) -> Any:
        signature = inspect.signature(original)

        def encode_prompt(*args: Any, **kwargs: Any) -> Any:
            result = original(*args, **kwargs)
            if self._awaiting_positive or self.runtime.denoiser_calls > 0 or self.runtime.positive_reference is None:
                self._awaiting_positive = False
                bound = signature.bind(*args, **kwargs)
                bound.apply_defaults()
                self._begin_generation(original, signature, bound.arguments, result)
            return result

        return encode_prompt

    def _begin_generation(self, encode: Any, signature: inspect.Signature, arguments: dict, result: tuple) -> None:
        positive = self._named_outputs(result)
        reference = positive["encoder_hidden_states"]
        rows = reference.shape[0]
        per_prompt = arguments.get("num_images_per_prompt") or arguments.get("num_videos_per_prompt") or 1
        prompts = max(rows // per_prompt, 1)
        negative = None
        if self.settings.enabled:
            if self.negative_prompt is not None:
                negative = self._encode_negative(encode, signature, arguments, prompts)
            elif self.negative_embeds:
                negative = self._expand_negative_embeds(prompts, per_prompt, rows, reference)
        self.runtime.begin_generation(negative, reference)

    def _named_outputs(self, result: Any) -> dict[str, torch.Tensor]:
        values = result if isinstance(result, tuple) else (result,)
        return {name: value for name, value in zip(self.spec.encode_outputs, values) if name is not None}

    def _check_negative_count(self, prompts: int) -> None:
        negative = self.negative_prompt
        if isinstance(negative, (list, tuple)) and len(negative) not in (1, prompts):
            raise ValueError(
                f"NAG negative_prompt has {len(negative)} entries but the call has {prompts} prompts; "
                "pass one negative prompt (a string) or one per prompt"
            )

    def _encode_negative(self, encode: Any, signature: inspect.Signature, arguments: dict, prompts: int) -> dict:
        self._check_negative_count(prompts)
        negative = self.negative_prompt
        texts = [negative] * prompts if isinstance(negative, str) else list(negative) * (prompts // len(negative))
        call = dict(arguments)
        for name, parameter in signature.parameters.items():
            if name == "prompt":
                call[name] = texts
            elif name == "do_classifier_free_guidance":
                call[name] = False
            elif _reset_to_default(name):
                call[name] = None if parameter.default is inspect.Parameter.empty else parameter.default
        call.update({k: v for k, v in self.spec.negative_overrides.items() if k in signature.parameters})
        return self._named_outputs(encode(**call))

    def _expand_negative_embeds(self, prompts: int, per_prompt: int, rows: int, reference: torch.Tensor) -> dict:
        expanded = {}
        for key, value in self.negative_embeds.items():
            if value.shape[0] == prompts and per_prompt > 1:
                value = value.repeat_interleave(per_prompt, dim=0)
            if value.shape[0] not in (1, rows):
                raise ValueError(
                    f"negative embeddings `{key}` have {value.shape[0]} rows; expected 1, {prompts} (one per prompt) "
                    f"or {rows} (one per generated sample)"
                )
            expanded[key] = value.to(reference.device)
        return expanded

    def _progress(self, step_index: int) -> float | None:
        """Fraction of the trajectory done at ``step_index`` of this generation's denoising loop.

        The loop's length is the pipeline's ``_num_timesteps`` (set before the loop), else the
        scheduler's timestep count; an img2img-style start inside the schedule counts as done.
        """
        scheduler = getattr(self.pipe, "scheduler", None)
        begin = getattr(scheduler, "begin_index", None) or 0
        steps = getattr(self.pipe, "_num_timesteps", None)
        if steps:
            total = begin + steps
        else:
            timesteps = getattr(scheduler, "timesteps", None)
            if timesteps is None or len(timesteps) == 0:
                return None
            total = len(timesteps)
        return (begin + step_index) / total


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING = _Missing()


def _validate_negative_embeds(spec: PipelineSpec, embeds: dict[str, Any]) -> dict[str, torch.Tensor]:
    family = FAMILIES[spec.family]
    accepted = {name: key for name, key in NEGATIVE_EMBED_NAMES.items() if key in family.negative_keys}
    unknown = sorted(set(embeds) - set(accepted))
    if unknown:
        raise TypeError(
            f"nag.apply got unexpected keyword argument(s) {unknown} for {spec.pipeline}; "
            f"precomputed negative embeddings it accepts: {sorted(accepted)}"
        )
    converted: dict[str, torch.Tensor] = {}
    for name, value in embeds.items():
        if value is None:
            continue
        key = accepted[name]
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor, got {type(value).__name__}")
        if value.ndim != _EMBED_NDIM[key]:
            raise ValueError(f"`{name}` must have {_EMBED_NDIM[key]} dimensions, got shape {tuple(value.shape)}")
        converted[key] = value
    if converted:
        required = [name for name, key in accepted.items() if key != "encoder_attention_mask" and key not in converted]
        if required:
            raise ValueError(f"{spec.pipeline} needs {required} too when negative embeddings are passed instead of a prompt")
    return converted


def apply(
    pipe: Any,
    negative_prompt: str | Sequence[str] | None = None,
    *,
    scale: float | None = None,
    tau: float | None = None,
    alpha: float | None = None,
    start: float = 0.0,
    end: float = 1.0,
    norm: int = 1,
    fast: bool = True,
    **negative_embeds: torch.Tensor,
) -> NAGHandle:
    """Install Normalized Attention Guidance on a stock diffusers pipeline.

    Args:
        pipe: a supported diffusers pipeline (see ``nag.supported_pipelines()``).
        negative_prompt: what to steer away from: a string, or a list with one entry per prompt.
            It is encoded with the pipeline's own text encoders and call settings.
        scale: extrapolation factor ``s`` (> 1 guides; 1 is off). The paper's phi = ``scale - 1``.
        tau: bound on the guided feature's norm growth.
        alpha: blend of the normalized guided feature with the positive one.
        start, end: the fraction of the sampling trajectory (from the noisy end) that is guided.
        norm: 1 (L1, default) or 2 (L2, the reference Flux code's choice).
        fast: use the fast attention paths where they apply (default). ``False`` runs every
            stock attention processor once per branch: slower, the reference the fast paths
            are tested against.
        **negative_embeds: instead of ``negative_prompt``, precomputed ``negative_prompt_embeds``
            (and ``negative_pooled_prompt_embeds`` / ``negative_prompt_attention_mask`` where the
            pipeline has them), with 1 row, one per prompt, or one per generated sample.

    Omitted ``scale``/``tau``/``alpha`` take the family's tuned defaults. Returns a
    :class:`NAGHandle`; ``handle.remove()``, ``nag.remove(pipe)`` or leaving a ``with`` block
    undoes everything.
    """
    spec = pipeline_spec(pipe)
    if pipe in _HANDLES:
        raise RuntimeError(
            f"{type(pipe).__name__} already carries NAG; call nag.remove(pipe) (or handle.update(...)) first"
        )
    denoiser = getattr(pipe, spec.denoiser_attr, None)
    if denoiser is not None and any(
        isinstance(getattr(m, "processor", None), NAGProcessor) for m in denoiser.modules()
    ):
        raise RuntimeError(
            f"the {spec.denoiser_attr} of this pipeline already carries NAG (through another pipeline "
            "sharing it); remove that first"
        )
    if negative_prompt is not None and negative_embeds:
        raise ValueError("pass either negative_prompt or precomputed negative embeddings, not both")
    if negative_prompt is not None:
        if isinstance(negative_prompt, (list, tuple)):
            if not negative_prompt or not all(isinstance(p, str) for p in negative_prompt):
                raise TypeError("negative_prompt must be a string or a non-empty list of strings")
        elif not isinstance(negative_prompt, str):
            raise TypeError(f"negative_prompt must be a string or a list of strings, got {type(negative_prompt).__name__}")
    embeds = _validate_negative_embeds(spec, negative_embeds)
    defaults = spec.defaults
    settings = NAGSettings(
        scale=defaults.scale if scale is None else scale,
        tau=defaults.tau if tau is None else tau,
        alpha=defaults.alpha if alpha is None else alpha,
        start=start,
        end=end,
        norm=norm,
    )
    if negative_prompt is None and not embeds:
        logger.warning("nag.apply without a negative prompt: NAG stays off until one is given")
    handle = NAGHandle(pipe, spec, settings, negative_prompt, embeds, fast=fast)
    _HANDLES[pipe] = handle
    return handle


def remove(pipe: Any) -> None:
    """Remove NAG from ``pipe`` (no-op if it carries none)."""
    handle = _HANDLES.get(pipe)
    if handle is not None:
        handle.remove()
