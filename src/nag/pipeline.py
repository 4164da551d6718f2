"""The public API on stock diffusers pipelines: ``apply``, ``remove`` and the handle."""

from __future__ import annotations

import contextlib
import inspect
import logging
import re
import threading
import weakref
from typing import Any, Iterator, Sequence

import torch

from .attention import NAGProcessor
from .control import ControlAttachment, attach_control
from .families import FAMILIES, pipeline_spec
from .hooks import Attachment, attach, unwrap_compiled
from .settings import NAGSettings
from .spec import PipelineSpec
from .state import NAGRuntime

__all__ = ["apply", "remove", "NAGHandle"]

logger = logging.getLogger("nag")

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
_EMBED_NDIM = {"encoder_hidden_states": 3, "pooled_projections": 2, "encoder_attention_mask": 2,
               "encoder_hidden_states_2": 3, "encoder_attention_mask_2": 2}
# HiDream's stacked Llama-3 states (every layer) and pooled CLIP embeddings (PipelineSpec.negative_embed_names)
_EMBED_NDIM.update(encoder_hidden_states_llama3=4, pooled_embeds=2)
_EMBED_LAYOUT = {
    "encoder_hidden_states": "(rows, tokens, width)",
    "pooled_projections": "(rows, width)",
    "encoder_attention_mask": "(rows, tokens)",
    "encoder_hidden_states_2": "(rows, tokens, width)",
    "encoder_attention_mask_2": "(rows, tokens)",
}
_EMBED_LAYOUT.update(encoder_hidden_states_llama3="(layers, rows, tokens, width)", pooled_embeds="(rows, width)")
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

_HANDLES: "weakref.WeakKeyDictionary[Any, NAGHandle]" = weakref.WeakKeyDictionary()
_PATCHED_METHODS = ("check_inputs", "encode_prompt", "progress_bar")


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
        self._connector_pending: tuple[dict | None, torch.Tensor] | None = None
        self._connector_hook: torch.utils.hooks.RemovableHandle | None = None
        self._control: ControlAttachment | None = None
        self._lock = threading.Lock()
        self._generating_thread: threading.Thread | None = None
        self.denoiser = _denoiser_of(pipe, spec)
        self._attachment = attach(self.denoiser, FAMILIES[spec.family], self.runtime, fast=fast)
        # Further experts (Wan 2.2's low-noise `transformer_2`) share the runtime: one generation.
        self._expert_attachments: list[Attachment] = []
        try:
            for attr in spec.expert_attrs:
                expert = getattr(pipe, attr, None)
                if expert is not None:
                    expert = unwrap_compiled(expert)
                    _check_processors(expert, spec)
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
        if "eps" in changes:
            raise TypeError("`eps` is fixed; settings that can change: scale, tau, alpha, start, end, norm")
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
            self._open_generation()
            try:
                self._check_processors_in_place()
                _check_hooks(self.denoiser, self.spec)
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
            try:
                result = original(*args, **kwargs)
                if self._awaiting_positive or self.runtime.denoiser_calls > 0 or self.runtime.positive_reference is None:
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
            return _ClosingProgressBar(original(*args, **kwargs), self._close_generation)

        return progress_bar

    # -- one generation at a time ----------------------------------------------------------------
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
                self.runtime.negative_prefix = None  # the negative prefix's keys/values: freed with the loop

    def _check_processors_in_place(self) -> None:
        """Refuse to generate when something replaced NAG's attention processors after ``apply``
        (``set_attn_processor``, another attention tool): the extended text inputs would reach
        processors that do not split them again."""
        family = FAMILIES[self.spec.family]
        for name, module in self.denoiser.named_modules():
            if family.attention_role(name, module) is None:
                continue
            processor = module.processor
            if not (isinstance(processor, NAGProcessor) and processor.runtime is self.runtime):
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
                _check_widths_against_positive(self.negative_embeds, positive,
                                               self.spec.negative_embed_names or NEGATIVE_EMBED_NAMES)
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
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
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
        arguments[names[1]] = negative_mask.to(device=text.device, dtype=mask.dtype if mask is not None else torch.int64)
        negative_output = module(*bound.args, **bound.kwargs)
        self.runtime.negative = {"encoder_hidden_states": negative_output[0], "encoder_attention_mask": negative_output[-1]}
        return None

    def _named_outputs(self, result: Any) -> dict[str, torch.Tensor]:
        return self.spec.name_outputs(result)

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
        with _tokenizer_state_kept(self.pipe):
            return self._named_outputs(encode(**call))

    def _expand_negative_embeds(self, prompts: int, per_prompt: int, rows: int, reference: torch.Tensor) -> dict:
        expanded = {}
        family = FAMILIES[self.spec.family]
        for key, value in self.negative_embeds.items():
            dim = family.batch_dim(key)
            if value.shape[dim] == prompts and per_prompt > 1:
                value = value.repeat_interleave(per_prompt, dim=dim)
            if value.shape[dim] not in (1, rows):
                raise ValueError(
                    f"negative embeddings `{key}` have {value.shape[dim]} rows; expected 1, {prompts} (one per prompt) "
                    f"or {rows} (one per generated sample)"
                )
            expanded[key] = value.to(reference[0].device if isinstance(reference, (list, tuple)) else reference.device)
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


class _ClosingProgressBar:
    """A pipeline's progress bar that calls ``on_close`` when its ``with`` block (or iteration) ends."""

    def __init__(self, bar: Any, on_close: Any):
        self._bar = bar
        self._on_close = on_close

    def __enter__(self) -> Any:
        return self._bar.__enter__()

    def __exit__(self, *exc: Any) -> Any:
        try:
            return self._bar.__exit__(*exc)
        finally:
            self._on_close()

    def __iter__(self) -> Any:
        try:
            yield from self._bar
        finally:
            self._on_close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._bar, name)


@contextlib.contextmanager
def _tokenizer_state_kept(pipe: Any) -> Iterator[None]:
    """Restore the padding/truncation state of the pipeline's fast tokenizers afterwards.

    A fast tokenizer keeps the settings of its last call, and ``save_pretrained`` writes them into
    ``tokenizer.json``: without this, encoding the negative prompt would make a pipeline that used
    NAG save different files from one that never did.
    """
    saved = []
    for component in getattr(pipe, "components", {}).values():
        backend = getattr(component, "backend_tokenizer", None)
        if backend is not None and hasattr(backend, "truncation") and hasattr(backend, "padding"):
            saved.append((backend, backend.truncation, backend.padding))
    try:
        yield
    finally:
        for backend, truncation, padding in saved:
            if truncation is None:
                backend.no_truncation()
            else:
                backend.enable_truncation(**truncation)
            if padding is None:
                backend.no_padding()
            else:
                backend.enable_padding(**padding)


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


def _check_processors(denoiser: torch.nn.Module, spec: PipelineSpec) -> None:
    """Refuse text-attention processors NAG cannot drive, naming the module and the fix.

    NAG wraps whatever processor a text-attention module has and calls it with the positive and
    the negative context, binding its arguments by name. A processor from another tool works if it
    takes the stock arguments by name (``hidden_states``, ``encoder_hidden_states``, ...); one
    that hides them behind ``*args``/``**kwargs`` or does not take them cannot be driven.
    """
    family = FAMILIES[spec.family]
    for name, module in denoiser.named_modules():
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
            parameters = inspect.signature(processor.__call__).parameters
        except (TypeError, ValueError) as error:
            raise TypeError(f"{label} whose signature cannot be read ({error}); NAG cannot drive it: {fix}") from None
        missing = [p for p in mechanism.binds if p not in parameters]
        if missing:
            raise TypeError(
                f"{label} that takes no named {missing} (another attention tool?); NAG calls the processor "
                f"with the positive and the negative text by those names and cannot drive it: {fix}"
            )


def _check_hooks(denoiser: torch.nn.Module, spec: PipelineSpec) -> None:
    """Refuse diffusers features (hooks) that cannot carry NAG's negative conditioning."""
    layout = FAMILIES[spec.family].layout
    for module in denoiser.modules():
        registry = getattr(module, "_diffusers_hook", None)
        for name in getattr(registry, "hooks", {}) or {}:
            layouts, feature = _INCOMPATIBLE_HOOKS.get(name, ((), ""))
            if layout in layouts:
                raise NotImplementedError(
                    f"{feature} is enabled on pipe.{spec.denoiser_attr}; NAG on {spec.pipeline} carries the negative "
                    f"prompt through the blocks that {feature} skips or replays, so the two cannot run together. "
                    f"Disable it while NAG is applied (pipe.{spec.denoiser_attr}.disable_cache()), or remove NAG."
                )


def _expected_widths(denoiser: torch.nn.Module | None) -> dict[str, tuple[str, int]]:
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


def _check_widths_against_positive(
    negative: dict[str, torch.Tensor], positive: dict[str, torch.Tensor], names: dict[str, str] = NEGATIVE_EMBED_NAMES
) -> None:
    """At encode time: the negative embeddings must have the width of the positive ones (``names``: the
    pipeline's names of precomputed negative embeddings, for the error message)."""
    for key, value in negative.items():
        reference = positive.get(key)
        if key.startswith("encoder_attention_mask") or not isinstance(reference, torch.Tensor):
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


def _validate_negative_embeds(
    spec: PipelineSpec, embeds: dict[str, Any], denoiser: torch.nn.Module | None = None
) -> dict[str, torch.Tensor]:
    """Check precomputed negative embeddings: names, types, dtypes, devices, shapes, values.

    Tensors on another (real) device than the denoiser are fine: they are moved at use. Widths
    are checked against the denoiser's config here and against the prompt embeddings at each
    generation.
    """
    family = FAMILIES[spec.family]
    names = spec.negative_embed_names or NEGATIVE_EMBED_NAMES
    accepted = {name: key for name, key in names.items() if key in family.negative_keys}
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
            raise ValueError(
                f"`{name}` must have {_EMBED_NDIM[key]} dimensions {_EMBED_LAYOUT[key]}, got shape {tuple(value.shape)}"
            )
        if key.startswith("encoder_attention_mask"):
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
        converted[key] = value
    if converted:
        required = [name for name, key in accepted.items() if key != "encoder_attention_mask" and key not in converted]
        if required:
            raise ValueError(f"{spec.pipeline} needs {required} too when negative embeddings are passed instead of a prompt")
    text, mask = converted.get("encoder_hidden_states"), converted.get("encoder_attention_mask")
    if text is not None and mask is not None:
        if mask.shape[1] != text.shape[1] or mask.shape[0] not in (1, text.shape[0]):
            raise ValueError(
                f"`negative_prompt_attention_mask` has shape {tuple(mask.shape)} but `negative_prompt_embeds` "
                f"has {tuple(text.shape)}: expected ({text.shape[0]}, {text.shape[1]}), one entry per token"
            )
    for key, (entry, width) in _expected_widths(denoiser).items():
        value = converted.get(key)
        if value is not None and value.shape[-1] != width:
            name = next(n for n, k in accepted.items() if k == key)
            expected = ("rows", "tokens", width) if value.ndim == 3 else ("rows", width)
            raise ValueError(
                f"`{name}` has width {value.shape[-1]} but {spec.pipeline}'s {spec.denoiser_attr} expects "
                f"{width} (config.{entry}): expected shape {expected}. Encode the negative prompt with "
                "this pipeline's encode_prompt (or pass the negative prompt as text)."
            )
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
    denoiser = _denoiser_of(pipe, spec)
    if any(isinstance(getattr(m, "processor", None), NAGProcessor) for m in denoiser.modules()):
        raise RuntimeError(
            f"the {spec.denoiser_attr} of this pipeline already carries NAG (through another pipeline "
            "sharing it); remove that first"
        )
    _check_processors(denoiser, spec)
    _check_hooks(denoiser, spec)
    if negative_prompt is not None and negative_embeds:
        raise ValueError("pass either negative_prompt or precomputed negative embeddings, not both")
    if negative_prompt is not None:
        if isinstance(negative_prompt, (list, tuple)):
            if not negative_prompt or not all(isinstance(p, str) for p in negative_prompt):
                raise TypeError("negative_prompt must be a string or a non-empty list of strings")
        elif not isinstance(negative_prompt, str):
            raise TypeError(f"negative_prompt must be a string or a list of strings, got {type(negative_prompt).__name__}")
    settings = NAGSettings.resolve(spec.defaults, scale=scale, tau=tau, alpha=alpha, start=start, end=end, norm=norm)
    # (with a text connector the negative embeddings are its input, not the denoiser's: no config width applies)
    embeds = _validate_negative_embeds(spec, negative_embeds, None if spec.text_connector else denoiser)
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
