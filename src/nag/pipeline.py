"""The public API on stock diffusers pipelines: ``apply``, ``remove`` and the handle."""

from __future__ import annotations

import contextlib
import inspect
import logging
import re
import threading
import weakref
from collections.abc import Sequence
from typing import Any

import torch

from .attention import NAGProcessor
from .checks import (
    NEGATIVE_EMBED_NAMES,
    check_hooks,
    check_processors,
    check_prompt_texts,
    check_widths_against_positive,
    further_encoder_negatives,
    validate_negative_embeds,
)
from .control import ControlAttachment, attach_control
from .families import FAMILIES, pipeline_spec
from .hooks import Attachment, attach, unwrap_compiled
from .patching import MISSING, ClosingProgressBar, PatchedMethod, tokenizer_state_kept
from .schedule import schedule_fraction, schedule_sigma
from .settings import NAGSettings
from .signatures import forward_signature
from .spec import PipelineSpec
from .state import NAGRuntime, inert_copy

__all__ = ["apply", "remove", "NAGHandle"]

logger = logging.getLogger("nag")


_HANDLES: weakref.WeakKeyDictionary[Any, NAGHandle] = weakref.WeakKeyDictionary()
_PATCHED_METHODS = (
    "check_inputs",
    "encode_prompt",
    "progress_bar",
    "set_ip_adapter_scale",
    "load_ip_adapter",
    "unload_ip_adapter",
)


def _reset_to_default(name: str) -> bool:
    """encode_prompt arguments that belong to the positive prompt's other inputs or to CFG."""
    return (
        bool(re.fullmatch(r"prompt_\d+", name))
        or "embeds" in name
        or "attention_mask" in name
        or name.startswith("negative_")
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
        modules: list[tuple[str, torch.nn.Module]] | None = None,
        further_negatives: dict[str, str | Sequence[str]] | None = None,
    ):
        self.pipe = pipe
        self.spec = spec
        self.family = spec.family
        self.negative_prompt = negative_prompt
        self.further_negatives = dict(further_negatives or {})  # {"prompt_2": ...}: nag.apply's negative_prompt_2
        self.negative_embeds = negative_embeds
        self.runtime = NAGRuntime(settings=settings, progress=self._progress, sigma=self._sigma,
                                  owns_call=self._owns_call)
        self._awaiting_positive = True
        self._saved_attributes: dict[str, Any] = {}
        self._connector_pending: tuple[dict | None, torch.Tensor] | None = None
        self._connector_hook: torch.utils.hooks.RemovableHandle | None = None
        self._control: ControlAttachment | None = None
        self._lock = threading.Lock()
        self._generating_thread: threading.Thread | None = None
        self.denoiser = _denoiser_of(pipe, spec)
        self._attachment: Attachment | None = attach(self.denoiser, FAMILIES[spec.family], self.runtime, fast=fast,
                                                     modules=modules)
        # Further experts (Wan 2.2's low-noise `transformer_2`) share the runtime: one generation.
        self._expert_attachments: list[Attachment] = []
        try:
            for attr in spec.expert_attrs:
                expert = unwrap_compiled(getattr(pipe, attr, None))  # (None where the pipeline has no such expert)
                if expert is not None:
                    check_processors(expert, spec)
                    self._expert_attachments.append(attach(expert, FAMILIES[spec.family], self.runtime, fast=fast))
        except BaseException:
            self.remove()
            raise
        # Pipelines whose denoiser text comes from a further component (LTX-2's `connectors`): the negative is run
        # through it too, and the conditional rows are recognised in its output.
        connector = getattr(pipe, spec.text_connector, None) if spec.text_connector else None
        if connector is not None:
            self._connector_hook = unwrap_compiled(connector).register_forward_hook(
                self._after_connector, with_kwargs=True, always_call=True
            )
        if negative_embeds and settings.enabled and connector is None:
            # Until a pipeline call encodes its prompt, direct denoiser calls guide every row.
            self.runtime.begin_generation(dict(negative_embeds), None)
        try:
            # A control model whose output the denoiser adds to its text tokens too (Z-Image's ControlNet): the
            # negative rows get its output for their own text.
            control = getattr(pipe, spec.control_model, None) if spec.control_model else None
            if control is not None:
                self._control = attach_control(control, self.denoiser, self.runtime)
            self._patch_pipeline()
        except BaseException:
            self.remove()
            raise

    def __reduce_ex__(self, protocol: Any) -> tuple:
        """A deep copy or a saved copy of the pipeline, or of a model the handle hooks, is stock: the handle's hooks
        there do nothing (:func:`~nag.state.inert_copy`) and its patched methods are the pipeline's own."""
        return inert_copy, (type(self), {"_connector_pending": None})

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

    def update(self, **changes: float) -> NAGHandle:
        """Change settings (``scale``, ``tau``, ``alpha``, ``start``, ``end``, ``min_sigma``, ``norm``) in place."""
        if "eps" in changes:
            raise TypeError("`eps` is fixed; settings that can change: scale, tau, alpha, start, end, min_sigma, norm")
        self.runtime.settings = self.runtime.settings.with_updates(**changes)
        return self

    def remove(self) -> None:
        """Undo everything ``apply`` installed. Safe to call twice."""
        if self._attachment is not None:
            self._attachment.detach()
            self._attachment = None
        while self._expert_attachments:
            self._expert_attachments.pop().detach()
        if self._connector_hook is not None:
            self._connector_hook.remove()
            self._connector_hook = None
        if self._control is not None:
            self._control.remove()
            self._control = None
        self._connector_pending = None
        for name in list(self._saved_attributes):
            previous = self._saved_attributes.pop(name)
            if previous is MISSING:
                self.pipe.__dict__.pop(name, None)
            else:
                self.pipe.__dict__[name] = previous
        if _HANDLES.get(self.pipe) is self:
            del _HANDLES[self.pipe]

    def __enter__(self) -> NAGHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __repr__(self) -> str:
        s = self.settings
        state = "active" if self.active else "removed"
        bound = f", min_sigma={s.min_sigma}" if s.min_sigma else ""
        return (
            f"NAGHandle({type(self.pipe).__name__}, family={self.family!r}, scale={s.scale}, tau={s.tau}, "
            f"alpha={s.alpha}, start={s.start}, end={s.end}{bound}, norm={s.norm}, {state})"
        )

    # -- pipeline interception -------------------------------------------------------------------
    def _patch_pipeline(self) -> None:
        for name in _PATCHED_METHODS:
            original = getattr(self.pipe, name, None)
            if original is None:
                continue
            previous = self._saved_attributes[name] = self.pipe.__dict__.get(name, MISSING)
            wrapper = getattr(self, f"_wrap_{name}")(original)
            self.pipe.__dict__[name] = PatchedMethod(wrapper, self.pipe, name, previous)

    def _wrap_check_inputs(self, original: Any) -> Any:
        signature = inspect.signature(original)

        def check_inputs(*args: Any, **kwargs: Any) -> Any:
            self._open_generation()
            try:
                self._check_processors_in_place()
                check_hooks(self.denoiser, self.spec, self._attachment.modules if self._attachment else None)
                self._awaiting_positive = True
                prompt = signature.bind_partial(*args, **kwargs).arguments.get("prompt")
                if isinstance(prompt, (list, tuple)):
                    self._check_negative_count(len(prompt))
                return original(*args, **kwargs)
            except BaseException:
                self._close_generation()
                raise

        return check_inputs

    def _wrap_encode_prompt(self, original: Any) -> Any:
        signature = inspect.signature(original)

        def encode_prompt(*args: Any, **kwargs: Any) -> Any:
            if "check_inputs" not in self._saved_attributes:  # (Z-Image has none: its generation opens here)
                self._open_generation()
            try:
                result = original(*args, **kwargs)
                if (
                    self._awaiting_positive
                    or self.runtime.denoiser_calls > 0
                    or self.runtime.positive_reference is None
                ):
                    self._awaiting_positive = False
                    bound = signature.bind(*args, **kwargs)
                    bound.apply_defaults()
                    self._begin_generation(original, signature, bound.arguments, result)
                return result
            except BaseException:
                self._close_generation()
                raise

        return encode_prompt

    def _wrap_progress_bar(self, original: Any) -> Any:
        """Every supported pipeline runs its denoising loop inside ``self.progress_bar(...)``:
        leaving it (normally or by an exception) ends the generation for the thread guard."""

        def progress_bar(*args: Any, **kwargs: Any) -> Any:
            return ClosingProgressBar(original(*args, **kwargs), self._close_generation)

        return progress_bar

    def _wrap_set_ip_adapter_scale(self, original: Any) -> Any:
        """diffusers finds the IP-Adapter processors by their class to set their scales: it does so with the stock
        processors in place (NAG's wrappers call the very same processor objects)."""

        def set_ip_adapter_scale(*args: Any, **kwargs: Any) -> Any:
            with contextlib.ExitStack() as stack:
                for attachment in [self._attachment, *self._expert_attachments]:
                    if attachment is not None:
                        stack.enter_context(attachment.stock_processors())
                return original(*args, **kwargs)

        return set_ip_adapter_scale

    def _wrap_load_ip_adapter(self, original: Any) -> Any:
        return self._refused_while_applied("load_ip_adapter")

    def _wrap_unload_ip_adapter(self, original: Any) -> Any:
        return self._refused_while_applied("unload_ip_adapter")

    def _refused_while_applied(self, name: str) -> Any:
        def refused(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError(
                f"pipe.{name} replaces the attention processors NAG has wrapped; call nag.remove(pipe) first, then "
                f"pipe.{name}(...), then nag.apply(pipe, ...) again"
            )

        return refused

    # -- one generation at a time ----------------------------------------------------------------
    def _owns_call(self) -> bool:
        """Whether a denoiser call is this pipeline's: its generation is running in this thread (from
        ``check_inputs`` to the end of the denoising loop). Outside one, the calls of a pipeline sharing the
        denoiser (``from_pipe``) run stock; so do direct denoiser calls, except before the first generation with
        negative embeddings given to ``apply`` (every row guided, see ``apply``)."""
        return self._generating_thread is threading.current_thread() or self.runtime.positive_reference is None


    def _open_generation(self) -> None:
        """Mark a generation as running in this thread; refuse one from a second thread meanwhile.

        NAG's per-generation state (the negative conditioning, the step counter, the guided call
        in flight) lives on the handle, like the pipeline's own scheduler state: two threads
        generating on one pipeline at once would mix their states silently.
        """
        current = threading.current_thread()
        with self._lock:
            owner = self._generating_thread
            if owner is not None and owner is not current and owner.is_alive():
                raise RuntimeError(
                    f"this {type(self.pipe).__name__} is already generating with NAG in thread {owner.name!r}; "
                    "one pipeline (with its NAG state) serves one generation at a time. Give each thread its "
                    "own pipeline with its own denoiser, or serialize the calls with a lock."
                )
            self._generating_thread = current

    def _close_generation(self) -> None:
        with self._lock:
            if self._generating_thread is threading.current_thread():
                self._generating_thread = None
                self.runtime.release_negative_work()  # freed with the loop

    def _check_processors_in_place(self) -> None:
        """Refuse to generate when something replaced NAG's attention processors after ``apply``
        (``set_attn_processor``, another attention tool): the extended text inputs would reach
        processors that do not split them again. (Only the wrapped modules are looked at: this runs every
        generation.)"""
        for attachment in (self._attachment, *self._expert_attachments):
            for name, processor in attachment.replaced_processors():
                raise RuntimeError(
                    f"the attention processor of `{name}` was replaced after nag.apply (now "
                    f"{type(processor).__name__}); call nag.remove(pipe), set the processors, then nag.apply again"
                )

    def _begin_generation(self, encode: Any, signature: inspect.Signature, arguments: dict, result: tuple) -> None:
        positive = self._named_outputs(result)
        reference = positive["encoder_hidden_states"]
        if isinstance(reference, (list, tuple)):
            # Per-sample lists (Z-Image): one entry per prompt; the pipeline repeats them per image afterwards,
            # and the denoiser hook repeats the negative entries alike.
            rows, per_prompt = len(reference), 1
        else:
            rows = reference.shape[0]
            per_prompt = arguments.get("num_images_per_prompt") or arguments.get("num_videos_per_prompt") or 1
        prompts = max(rows // per_prompt, 1)
        negative = None
        if self.settings.enabled:
            if self.negative_prompt is not None:
                negative = self._encode_negative(encode, signature, arguments, prompts)
            elif self.negative_embeds:
                check_widths_against_positive(
                    self.negative_embeds, positive, self.spec.negative_embed_names or NEGATIVE_EMBED_NAMES
                )
                negative = self._expand_negative_embeds(prompts, per_prompt, rows, reference)
        self.runtime.begin_generation(negative, reference)
        if self._connector_hook is not None:
            # the denoiser sees the connector's output: nothing is guided until the connector has run
            self.runtime.negative = self.runtime.positive_reference = None
            self._connector_pending = (negative, reference)

    def _after_connector(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        """The text connector ran on the encoded prompts (``[negative, positive]`` under CFG): the positive rows
        of its video text output become the reference, and the NAG negative goes through the same connector."""
        pending, self._connector_pending = self._connector_pending, None
        if pending is None or not isinstance(output, tuple):
            return None
        negative, positive = pending
        bound = forward_signature(module).bind(*args, **kwargs)
        arguments = bound.arguments
        names = list(arguments)
        text, mask = arguments[names[0]], arguments[names[1]] if len(names) > 1 else None
        rows = positive.shape[0]
        if (
            not isinstance(text, torch.Tensor)
            or text.shape[0] < rows
            or text.shape[1:] != positive.shape[1:]
            or not torch.equal(text[-rows:], positive.to(device=text.device, dtype=text.dtype))
        ):
            self._connector_pending = pending  # not the prompt's encoding: wait for the call that is
            return None
        self.runtime.positive_reference = output[0][-rows:]
        if negative is None:
            return None
        negative_text = negative["encoder_hidden_states"].to(device=text.device, dtype=text.dtype)
        negative_mask = negative.get("encoder_attention_mask")
        if negative_mask is None:
            negative_mask = (mask if mask is not None else text).new_ones(negative_text.shape[:2])
        arguments[names[0]] = negative_text
        arguments[names[1]] = negative_mask.to(
            device=text.device, dtype=mask.dtype if mask is not None else torch.int64
        )
        negative_output = module(*bound.args, **bound.kwargs)
        self.runtime.negative = {
            "encoder_hidden_states": negative_output[0],
            "encoder_attention_mask": negative_output[-1],
        }
        return None

    def _named_outputs(self, result: Any) -> dict[str, torch.Tensor]:
        return self.spec.name_outputs(result)

    def _negative_prompts(self) -> dict[str, str | Sequence[str]]:
        """The negative prompt under each ``encode_prompt`` argument it goes to: ``prompt``, ``prompt_2``, ..."""
        return {"prompt": self.negative_prompt, **self.further_negatives}

    def _check_negative_count(self, prompts: int) -> None:
        for name, negative in self._negative_prompts().items():
            if isinstance(negative, (list, tuple)) and len(negative) not in (1, prompts):
                raise ValueError(
                    f"NAG negative_{name} has {len(negative)} entries but the call has {prompts} prompts; "
                    "pass one negative prompt (a string) or one per prompt"
                )

    def _encode_negative(self, encode: Any, signature: inspect.Signature, arguments: dict, prompts: int) -> dict:
        self._check_negative_count(prompts)
        texts = {
            name: [negative] * prompts if isinstance(negative, str) else list(negative) * (prompts // len(negative))
            for name, negative in self._negative_prompts().items()
        }
        call = dict(arguments)
        for name, parameter in signature.parameters.items():
            if name in texts:
                call[name] = texts[name]
            elif name == "do_classifier_free_guidance":
                call[name] = False
            elif _reset_to_default(name):
                call[name] = None if parameter.default is inspect.Parameter.empty else parameter.default
        call.update({k: v for k, v in self.spec.negative_overrides.items() if k in signature.parameters})
        with tokenizer_state_kept(self.pipe):
            return self._named_outputs(encode(**call))

    def _expand_negative_embeds(self, prompts: int, per_prompt: int, rows: int, reference: Any) -> dict:
        expanded = {}
        family = FAMILIES[self.spec.family]
        device = reference[0].device if isinstance(reference, (list, tuple)) else reference.device
        for key, value in self.negative_embeds.items():
            if isinstance(value, list):  # per-prompt tensors (Z-Image), each of its own length
                count = len(value)
                if count == prompts and per_prompt > 1:
                    value, count = [item for item in value for _ in range(per_prompt)], count * per_prompt
            else:
                dim = family.batch_dim(key)
                if value.shape[dim] == prompts and per_prompt > 1:
                    value = value.repeat_interleave(per_prompt, dim=dim)
                count = value.shape[dim]
            if count not in (1, rows):
                raise ValueError(
                    f"negative embeddings `{key}` have {count} rows; expected 1, {prompts} (one per prompt) "
                    f"or {rows} (one per generated sample)"
                )
            expanded[key] = [item.to(device) for item in value] if isinstance(value, list) else value.to(device)
        return expanded

    def _sigma(self, timestep: Any) -> float | None:
        """The noise level of the current call's step, from the pipeline's scheduler (``nag.schedule``)."""
        return schedule_sigma(getattr(self.pipe, "scheduler", None), timestep)

    def _progress(self, timestep: Any, counted_steps: int) -> float | None:
        """Fraction of the full noise schedule done when the current call's step began (``nag.schedule``).

        Read from the pipeline's scheduler, so every call of one step gets that step's decision and img2img
        ``strength`` or ``denoising_start``/``denoising_end`` count on the full schedule. Where the scheduler does
        not say (a custom one without a schedule), the steps counted from the timesteps the denoiser saw, on the
        scheduler's timestep count.
        """
        scheduler = getattr(self.pipe, "scheduler", None)
        fraction = schedule_fraction(scheduler, timestep)
        if fraction is not None:
            return fraction
        timesteps = getattr(scheduler, "timesteps", None)
        if timesteps is None or len(timesteps) == 0:
            return None
        begin = getattr(scheduler, "begin_index", None) or 0
        return (begin + counted_steps) / len(timesteps)


def _denoiser_of(pipe: Any, spec: PipelineSpec) -> torch.nn.Module:
    """The pipeline's denoiser, the module itself when it was wrapped by ``torch.compile``,
    after checking that it is the architecture the pipeline's family expects."""
    denoiser = getattr(pipe, spec.denoiser_attr, None)
    if denoiser is None:
        raise ValueError(f"{type(pipe).__name__} has no `{spec.denoiser_attr}`; NAG needs the denoiser loaded")
    # torch.compile(model) wraps the module: hooks and processors go on the module itself; the
    # compiled wrapper calls it (and traces them).
    denoiser = unwrap_compiled(denoiser)
    family = FAMILIES[spec.family]
    if not any(cls.__name__ in family.denoisers for cls in type(denoiser).__mro__):
        raise NotImplementedError(
            f"{type(pipe).__name__}.{spec.denoiser_attr} is a {type(denoiser).__name__}; NAG's {family.name!r} "
            f"family supports {', '.join(family.denoisers)}. Load the pipeline with its stock denoiser."
        )
    return denoiser


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
    min_sigma: float = 0.0,
    **negative_embeds: torch.Tensor | str | Sequence[str],
) -> NAGHandle:
    """Install Normalized Attention Guidance on a stock diffusers pipeline.

    Args:
        pipe: a supported diffusers pipeline (see ``nag.supported_pipelines()``).
        negative_prompt: what to steer away from: a string, or a list with one entry per prompt.
            It is encoded with the pipeline's own text encoders and call settings. An empty (or blank) string
            is no negative prompt: NAG stays off, as in ``nag generate`` and the web UI.
        scale: extrapolation factor ``s`` (> 1 guides; 1 is off). The paper's phi = ``scale - 1``.
        tau: bound on the guided feature's norm growth.
        alpha: blend of the normalized guided feature with the positive one.
        start, end: the fraction of the full noise schedule (from the noisy end) that is guided: step ``i`` of the
            scheduler's ``N`` steps when ``start <= i / N < end``, every call of a step alike (see ``nag.schedule``).
        min_sigma: NAG is off at the steps whose noise level sigma (the scheduler's, when the step begins) is below
            it; 0 (default): no bound. Combines with ``start``/``end``.
        norm: 1 (L1, default) or 2 (L2, the reference Flux code's choice).
        fast: use the fast attention paths where they apply (default). ``False`` runs every
            stock attention processor once per branch: slower, the reference the fast paths
            are tested against.
        **negative_embeds: ``negative_prompt_2`` (``_3``, ``_4``) where the pipeline's ``encode_prompt`` takes
            ``prompt_2`` (...): that text encoder's own negative prompt (SDXL's second CLIP, Flux's T5, SD3's second
            CLIP and, ``_3``, its T5; an encoder without one gets ``negative_prompt``, as in diffusers). Or, instead
            of ``negative_prompt``, precomputed ``negative_prompt_embeds`` (and ``negative_pooled_prompt_embeds`` /
            ``negative_prompt_attention_mask`` where the pipeline has them), with 1 row, one per prompt, or one per
            generated sample.

    Omitted ``scale``/``tau``/``alpha`` take the family's tuned defaults. Returns a
    :class:`NAGHandle`; ``handle.remove()``, ``nag.remove(pipe)`` or leaving a ``with`` block
    undoes everything.
    """
    spec = pipeline_spec(pipe)
    if pipe in _HANDLES:
        raise RuntimeError(
            f"{type(pipe).__name__} already carries NAG; call nag.remove(pipe) (or handle.update(...)) first"
        )
    denoiser = _denoiser_of(pipe, spec)
    modules = list(denoiser.named_modules())  # (one walk for the checks and the installation)
    if any(isinstance(m.__dict__.get("processor"), NAGProcessor) for _, m in modules):
        raise RuntimeError(
            f"the {spec.denoiser_attr} of this pipeline already carries NAG (through another pipeline "
            "sharing it); remove that first"
        )
    check_processors(denoiser, spec, modules)
    check_hooks(denoiser, spec, modules)
    if isinstance(negative_prompt, str) and not negative_prompt.strip():
        negative_prompt = None  # one rule everywhere: an empty negative prompt is no negative prompt (NAG off)
    further_negatives = further_encoder_negatives(pipe, negative_prompt, negative_embeds)  # (taken out of them)
    if negative_prompt is not None and negative_embeds:
        raise ValueError("pass either negative_prompt or precomputed negative embeddings, not both")
    if negative_prompt is not None:
        check_prompt_texts("negative_prompt", negative_prompt)
    settings = NAGSettings.resolve(
        spec.defaults, scale=scale, tau=tau, alpha=alpha, start=start, end=end, norm=norm, min_sigma=min_sigma
    )
    # (with a text connector the negative embeddings are its input, not the denoiser's: no config width applies)
    embeds = validate_negative_embeds(spec, negative_embeds, None if spec.text_connector else denoiser)
    if negative_prompt is None and not embeds:
        logger.warning("nag.apply without a negative prompt: NAG stays off until one is given")
    handle = NAGHandle(pipe, spec, settings, negative_prompt, embeds, fast=fast, modules=modules,
                       further_negatives=further_negatives)
    _HANDLES[pipe] = handle
    return handle


def remove(pipe: Any) -> None:
    """Remove NAG from ``pipe`` (no-op if it carries none)."""
    handle = _HANDLES.get(pipe)
    if handle is not None:
        handle.remove()
