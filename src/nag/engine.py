"""The hooking mechanics, in one place.

``attach(denoiser, family, runtime)`` installs on a denoiser (a diffusers transformer or UNet):

* a NAG wrapper around the processor of every attention module that attends to text;
* a forward pre-hook on the denoiser that decides, for each call, whether it is guided (NAG
  enabled, a negative available, the step inside ``[start, end)``, the call carrying the
  conditional rows) and, if so, extends the call's text inputs with the negative conditioning;
* for joint-attention families, hooks that keep the image stream at its stock batch: image-side
  modulation norms take the stock rows of the conditioning embedding, and blocks that
  concatenate text and image see one extra image row per negative text row, dropped afterwards;
* for families whose model forward joins text and image itself (layout ``"concat"``: Chroma,
  AuraFlow), the negative rows are whole extra batch rows ``[negative text, image]`` from the
  model input on; every attention layer gives them the guided rows' image tokens, and their
  rows are dropped from the model output. Where that is exact, the copies are dropped inside the
  model: double-stream blocks run the image stream at the stock batch (``Family.stock_image_blocks``),
  and with the fast path single-stream blocks run on the stock rows while the negative text takes the
  block's text-only path beside them (``joined_blocks``: FLUX.2; ``sample_blocks``: Z-Image's and Lumina2's per-sample
  rows; ``stock_row_modules``: modules the negative rows' copies need not pass at all; ``stock_image_entry`` with
  ``image_first_blocks``: the Hunyuan models' image stream at the stock batch from the patch embedding on);
* for causal single-stream families (layout ``"prefix"``: Qwen-Image 2.1), the negative prompt's prefix runs in a
  denoiser call of its own before the first guided call (or before every guided call when the prefix depends on
  the timestep); its per-layer keys/values are recorded for the attention wrappers, and the stock rows run as stock.

``Attachment.detach()`` restores every processor and removes every hook. When a call is not
guided, the hooks pass the stock arguments through unchanged, so the output is bit-identical.
"""

from __future__ import annotations

import inspect
import logging
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch.nn.utils.rnn import pad_sequence

from .attention import NEGATIVE_PREFIX, PREFIX_RECORDING, NAGProcessor, wrap_processor
from .attention import pad_tokens
from .settings import NAGSettings

if TYPE_CHECKING:  # pragma: no cover
    from .families import Family

logger = logging.getLogger("nag")

__all__ = ["GuidedCall", "NAGRuntime", "Attachment", "attach", "family_of", "unwrap_compiled"]


@dataclass
class GuidedCall:
    """What the attention wrappers need to know about the current guided denoiser call."""

    batch: int  # image rows (the stock batch)
    cond_rows: torch.Tensor  # indices of the guided (conditional) rows
    positive_text_len: int
    negative_text_len: int
    padded_text_len: int  # joint families: common length of positive and negative text rows
    static_negative: bool = False  # the negative context reaching attention is the same every step
    # Tokens the model puts before the text inside its blocks (AuraFlow's register tokens): the
    # attention modules see ``[prefix, text, image]`` with the prefix shared by both branches.
    text_prefix: int = 0
    # Per-sample text lengths of every row of the extended call (models that join each sample's own
    # ``[text, image]`` with the text at its own length: Lumina2).
    text_lengths: list[int] | None = None
    # Per-row image token counts of the extended call, for models whose samples start with the image
    # (Z-Image: ``[image, caption, padding]`` per sample, the image span padded by the model itself).
    image_lengths: list[int] | None = None


@dataclass
class NAGRuntime:
    """Mutable state shared by the hooks of one attachment.

    ``negative`` maps the denoiser's keyword names (``encoder_hidden_states``,
    ``pooled_projections``, ``encoder_attention_mask``, ...) to tensors with one row per row of
    ``positive_reference`` (or one row, broadcast). ``positive_reference`` is the text tensor the
    conditional rows carry; when it is None every row of a call is guided.
    """

    settings: NAGSettings
    negative: dict[str, torch.Tensor] | None = None
    positive_reference: torch.Tensor | None = None
    progress: Callable[[int], float | None] | None = None  # step index -> fraction of the trajectory
    call: GuidedCall | None = None
    step_index: int = -1
    last_timestep: torch.Tensor | None = None
    guided_calls: int = 0
    denoiser_calls: int = 0
    control_attached: bool = False  # a control model's hints are extended for the negative rows (nag.control)
    cache: dict = field(default_factory=dict)  # per generation (e.g. projected negative keys/values)
    scratch: dict = field(default_factory=dict)  # per block (fast single-stream path)

    def begin_generation(
        self, negative: dict[str, torch.Tensor] | None, positive_reference: torch.Tensor | None
    ) -> None:
        if self.negative is not None and self.denoiser_calls and not self.guided_calls and self.settings.enabled:
            logger.warning(
                "NAG guided none of the %d denoiser calls of the previous generation: no call carried the "
                "encoded positive prompt (was the prompt embedding changed between encode_prompt and the "
                "denoiser?) or no step fell inside [start=%s, end=%s)",
                self.denoiser_calls, self.settings.start, self.settings.end,
            )
        self.negative = negative
        self.positive_reference = positive_reference
        self.step_index = -1
        self.last_timestep = None
        self.call = None
        self.guided_calls = 0
        self.denoiser_calls = 0
        self.cache.clear()
        self.scratch.clear()

    def advance(self, timestep: Any) -> None:
        """Count steps: a call whose timestep differs from the previous call's starts a new step."""
        if isinstance(timestep, torch.Tensor):
            timestep = timestep.detach()
            same = (
                self.last_timestep is not None
                and isinstance(self.last_timestep, torch.Tensor)
                and self.last_timestep.shape == timestep.shape
                and torch.equal(self.last_timestep, timestep)
            )
        else:
            same = self.last_timestep is not None and self.last_timestep == timestep
        if not same:
            self.step_index += 1
            self.last_timestep = timestep

    def step_in_window(self) -> bool:
        progress = self.progress(self.step_index) if self.progress is not None else None
        return self.settings.in_window(progress)


def conditional_rows(text: Any, reference: Any) -> torch.Tensor | None:
    """Rows of ``text`` that carry the conditional (positive) prompt, or None if none do.

    Pipelines batch classifier-free guidance as ``[unconditional, conditional]`` or call the
    denoiser once per branch; either way the conditional rows are the last ``len(reference)``
    rows and equal the positive prompt's embeddings.

    Models that take the text as a list of per-sample tensors of their own lengths (Z-Image) are
    called with ``[conditional, unconditional]``: for lists the first ``len(reference)`` entries
    are tried first, then the last ones.
    """
    if isinstance(text, (list, tuple)):
        rows = len(text)
        if reference is None:
            return torch.arange(rows, device=text[0].device) if rows else None
        n = len(reference)
        if n == 0 or rows < n or rows % n:
            return None
        # the pipeline may repeat each prompt's entry per image (num_images_per_prompt) after encoding
        for repeat in (k for k in range(1, rows // n + 1) if rows % (n * k) == 0):
            expected = [r for r in reference for _ in range(repeat)]
            for start in (0, rows - n * repeat):
                block = text[start : start + n * repeat]
                if all(
                    isinstance(t, torch.Tensor) and t.shape == r.shape and torch.equal(t, r.to(device=t.device, dtype=t.dtype))
                    for t, r in zip(block, expected)
                ):
                    return torch.arange(start, start + n * repeat, device=text[0].device)
        return None
    rows = text.shape[0]
    if reference is None:
        return torch.arange(rows, device=text.device)
    n = reference.shape[0]
    if rows < n or rows % n or text.shape[1:] != reference.shape[1:]:
        return None
    if not torch.equal(text[rows - n :], reference.to(device=text.device, dtype=text.dtype)):
        return None
    return torch.arange(rows - n, rows, device=text.device)


def _rows_for(tensor: Any, count: int, name: str, dim: int = 0) -> Any:
    """One negative input for ``count`` guided rows: a tensor (rows along ``dim``, the first axis unless the
    family says otherwise) or a list of per-row tensors."""
    rows = len(tensor) if isinstance(tensor, (list, tuple)) else tensor.shape[dim]
    if rows == count:
        return tensor
    if rows == 1:
        if isinstance(tensor, (list, tuple)):
            return list(tensor) * count
        return tensor.expand(*tensor.shape[:dim], count, *tensor.shape[dim + 1:])
    if rows and count % rows == 0:  # one per prompt, images repeated per prompt
        if isinstance(tensor, (list, tuple)):
            return [t for t in tensor for _ in range(count // rows)]
        return tensor.repeat_interleave(count // rows, dim=dim)
    raise ValueError(
        f"negative `{name}` has {rows} rows but the guided batch has {count}; "
        "pass one row, or one row per prompt"
    )


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, (list, tuple)):
        return [v.to(device=device) for v in value]
    return value.to(device=device)


class Attachment:
    """Everything installed on one denoiser; ``detach()`` removes it all."""

    def __init__(self, denoiser: torch.nn.Module, family: "Family", runtime: NAGRuntime, fast: bool = True):
        denoiser = unwrap_compiled(denoiser)
        self.denoiser = denoiser
        self.family = family
        self.runtime = runtime
        self.fast = fast
        self._stock_processors: list[tuple[torch.nn.Module, Any]] = []
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._forward_signature = inspect.signature(denoiser.forward)
        try:
            self._install()
        except BaseException:
            self.detach()
            raise

    # -- installation -------------------------------------------------------------------------
    def _install(self) -> None:
        family = self.family
        reason = family.refuse(self.denoiser) if family.refuse is not None else None
        if reason:
            raise NotImplementedError(f"NAG cannot guide this {type(self.denoiser).__name__}: {reason}")
        wrapped = 0
        for name, module in self.denoiser.named_modules():
            role = family.attention_role(name, module)
            if role is None:
                continue
            stock = module.processor
            self._stock_processors.append((module, stock))
            module.set_processor(wrap_processor(family.processor_class(role, self.fast), stock, self.runtime))
            wrapped += 1
        if wrapped == 0:
            raise RuntimeError(
                f"found no text attention modules in {type(self.denoiser).__name__} for family {family.name!r}"
            )
        self._hooks.append(
            self.denoiser.register_forward_pre_hook(self._before_denoiser, with_kwargs=True, prepend=True)
        )
        self._hooks.append(self.denoiser.register_forward_hook(self._after_denoiser, always_call=True))
        for name, module in self.denoiser.named_modules():
            if family.image_norms and re.fullmatch(family.image_norms, name):
                self._hooks.append(module.register_forward_pre_hook(self._stock_rows_of_conditioning, with_kwargs=True))
            if family.image_modulations and re.fullmatch(family.image_modulations, name):
                self._hooks.append(module.register_forward_pre_hook(self._stock_rows_of_inputs, with_kwargs=True))
            if family.stock_image_blocks and re.fullmatch(family.stock_image_blocks, name):
                self._hooks.append(module.register_forward_pre_hook(self._stock_image_rows, with_kwargs=True))
                self._hooks.append(module.register_forward_hook(self._restore_image_rows))
            if family.joined_blocks and re.fullmatch(family.joined_blocks, name) and self.fast and family.single_block_text:
                self._hooks.append(module.register_forward_pre_hook(self._split_joined_rows, with_kwargs=True))
                self._hooks.append(module.register_forward_hook(self._join_joined_rows))
            if family.concatenating_blocks and re.fullmatch(family.concatenating_blocks, name):
                if self.fast and family.single_block_text is not None:
                    self._hooks.append(module.register_forward_pre_hook(self._split_text_rows, with_kwargs=True))
                    self._hooks.append(module.register_forward_hook(self._join_text_rows))
                else:
                    self._hooks.append(module.register_forward_pre_hook(self._add_image_rows, with_kwargs=True))
                    self._hooks.append(module.register_forward_hook(self._drop_image_rows))
            if family.sample_blocks and re.fullmatch(family.sample_blocks, name) and self.fast and family.single_block_text:
                self._hooks.append(module.register_forward_pre_hook(self._split_sample_rows, with_kwargs=True))
                self._hooks.append(module.register_forward_hook(self._join_sample_rows))
            if family.stock_row_modules and re.fullmatch(family.stock_row_modules, name) and self.fast:
                self._hooks.append(module.register_forward_pre_hook(self._stock_image_rows, with_kwargs=True))
                self._hooks.append(module.register_forward_hook(self._restore_image_rows))
            if family.stock_image_entry and re.fullmatch(family.stock_image_entry, name) and self.fast:
                self._hooks.append(module.register_forward_pre_hook(self._enter_stock_image_rows, with_kwargs=True))
            if family.image_first_blocks and re.fullmatch(family.image_first_blocks, name) and self.fast and family.single_block_text:
                self._hooks.append(module.register_forward_pre_hook(self._split_image_first_rows, with_kwargs=True))
                self._hooks.append(module.register_forward_hook(self._join_image_first_rows))

    def detach(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for module, stock in reversed(self._stock_processors):
            module.set_processor(stock)
        self._stock_processors.clear()
        self.runtime.call = None

    # -- denoiser hooks -----------------------------------------------------------------------
    def _before_denoiser(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        runtime = self.runtime
        runtime.call = None
        runtime.denoiser_calls += 1
        family = self.family
        bound = self._forward_signature.bind_partial(*args, **kwargs)
        arguments = bound.arguments
        runtime.advance(arguments.get(family.timestep_kwarg))
        if not runtime.settings.enabled or runtime.negative is None or not runtime.step_in_window():
            return None
        text = arguments.get(family.text_kwarg)
        if text is None:
            return None
        cond_rows = conditional_rows(text, runtime.positive_reference)
        if cond_rows is None:
            return None
        hints = family.control_hints_kwarg
        if hints and arguments.get(hints) is not None and not runtime.control_attached:
            raise ValueError(
                f"NAG on a bare {type(module).__name__} cannot give its negative rows `{hints}` (a control model's "
                f"output for the negative text); apply NAG to the pipeline (nag.apply), which runs the control model "
                f"for them, or call the denoiser without `{hints}`"
            )
        device = cond_rows.device
        per_sample = isinstance(text, (list, tuple))  # list inputs (Z-Image): negative tensors become per-row lists
        negative = {
            key: _to_device(_rows_for(list(value) if per_sample and isinstance(value, torch.Tensor) else value,
                                      len(cond_rows), key, family.batch_dim(key)), device)
            for key, value in runtime.negative.items()
        }
        pad_to = (family.text_length(module) or 0) if family.text_length is not None else 0
        call, changes = family.extend_inputs(arguments, negative, cond_rows, pad_to)
        if family.layout == "prefix":
            self._prefill_negative(module, arguments, negative, cond_rows)
            runtime.call = call
            runtime.guided_calls += 1
            return None
        if family.text_prefix is not None:
            call.text_prefix = family.text_prefix(module)
        arguments.update(changes)
        if family.row_text_lengths is not None:
            call.text_lengths = family.row_text_lengths(arguments)
        if family.row_image_lengths is not None:
            call.image_lengths = family.row_image_lengths(arguments)
        runtime.call = call
        runtime.guided_calls += 1
        return bound.args, bound.kwargs

    def _prefill_negative(self, module: torch.nn.Module, arguments: dict, negative: dict, cond_rows: torch.Tensor) -> None:
        """Layout ``"prefix"``: run the negative prompt's own call for the guided rows, recording every layer's prefix
        keys/values (once per generation when the prefix does not depend on the timestep, else at every step)."""
        prefix = self.family.causal_prefix
        rows = cond_rows.tolist()
        recorded = self.runtime.cache.get(NEGATIVE_PREFIX)
        if recorded is not None and recorded["rows"] == rows and prefix.step_independent(module):
            return
        recording: dict[str, Any] = {}
        self.runtime.scratch[PREFIX_RECORDING] = recording
        try:  # `forward`, not the module: hooks watching the denoiser's calls see only the pipeline's
            module.forward(**prefix.prefill_call(arguments, negative, cond_rows))
        finally:
            self.runtime.scratch.pop(PREFIX_RECORDING, None)
        key_valid = recording.get("prefix_key_valid")
        if key_valid is not None:  # every target key is valid
            key_valid = torch.cat([key_valid, key_valid.new_ones(len(rows), prefix.target_tokens(arguments))], dim=1)
        self.runtime.cache[NEGATIVE_PREFIX] = {
            "rows": rows, "layers": recording["layers"], "key_valid": key_valid,
            "rotary": prefix.target_rotary(module, arguments, negative, cond_rows),
        }

    def _after_denoiser(self, module: torch.nn.Module, args: tuple, output: Any) -> Any:
        call, self.runtime.call = self.runtime.call, None
        if call is None or output is None or self.family.layout != "concat":  # (None: the call raised)
            return None
        return _stock_rows_of_output(output, call.batch)

    def _stock_rows_of_conditioning(self, module: torch.nn.Module, args: tuple, kwargs: dict):
        """Image-side modulation: use the stock rows of the (extended) conditioning embedding."""
        call = self.runtime.call
        if call is None:
            return None
        rows = (args[0] if args else next(iter(kwargs.values()))).shape[0]

        def trim(value: Any) -> Any:
            if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] > rows:
                return value[:rows]
            return value

        new_args = (args[0], *(trim(a) for a in args[1:])) if args else args
        first = None if args else next(iter(kwargs))
        new_kwargs = {k: (v if k == first else trim(v)) for k, v in kwargs.items()}
        return new_args, new_kwargs

    def _stock_rows_of_inputs(self, module: torch.nn.Module, args: tuple, kwargs: dict):
        """Image-side modulation computed from the conditioning alone: the stock rows of every input."""
        call = self.runtime.call
        if call is None:
            return None

        def trim(value: Any) -> Any:
            if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] > call.batch:
                return value[: call.batch]
            return value

        return tuple(trim(a) for a in args), {k: trim(v) for k, v in kwargs.items()}

    def _add_image_rows(self, module: torch.nn.Module, args: tuple, kwargs: dict):
        """Blocks that concatenate ``[text, image]``: one image row per negative text row."""
        call = self.runtime.call
        if call is None:
            return None
        name = self.family.image_kwarg
        if name in kwargs:
            image = kwargs[name]
            kwargs = {**kwargs, name: torch.cat([image, image[call.cond_rows]])}
            return args, kwargs
        image = args[0]
        return (torch.cat([image, image[call.cond_rows]]), *args[1:]), kwargs

    def _drop_image_rows(self, module: torch.nn.Module, args: tuple, output: Any) -> Any:
        call = self.runtime.call
        if call is None:
            return None
        return self.family.drop_image_rows(output, call.batch)

    def _stock_image_rows(self, module: torch.nn.Module, args: tuple, kwargs: dict):
        """Double-stream blocks of a concat-layout model: the image stream (and its per-row modulation) at the
        stock batch; the negative text rows attend to the guided image in the joint attention wrapper."""
        call = self.runtime.call
        if call is None:
            return None
        bound = _bind(module, args, kwargs)
        for name in (self.family.image_kwarg, *self.family.stock_image_kwargs):
            value = bound.arguments.get(name)
            if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] > call.batch:
                bound.arguments[name] = value[: call.batch]
        return bound.args, bound.kwargs

    def _restore_image_rows(self, module: torch.nn.Module, args: tuple, output: Any) -> Any:
        """... and its image output with the guided rows' copies again (the model joins text and image rows)."""
        call = self.runtime.call
        if call is not None and isinstance(output, torch.Tensor) and output.ndim and output.shape[0] == call.batch:
            return torch.cat([output, output[call.cond_rows]])  # (a module returning the image alone)
        if call is None or not isinstance(output, tuple):
            return None
        return tuple(torch.cat([x, x[call.cond_rows]]) if isinstance(x, torch.Tensor) and x.shape[0] == call.batch else x
                     for x in output)

    def _split_joined_rows(self, module: torch.nn.Module, args: tuple, kwargs: dict):
        """Fast path for single-stream blocks whose input the model joined as ``[text, image]``: the block runs
        on the stock rows; the negative rows' text takes the family's text-only path around it."""
        call = self.runtime.call
        processor = _text_attention_processor(module)
        if call is None or not getattr(processor, "takes_split_text", lambda: False)():
            return None
        bound = _bind(module, args, kwargs)
        mask_name = self.family.joined_block_mask
        mask = bound.arguments.get(mask_name) if mask_name else None
        if mask is not None and not getattr(processor, "takes_split_mask", lambda call, mask: False)(call, mask):
            return None  # (a mask form the fast path does not take: the whole rows run through the block)
        joined, modulation = bound.arguments[self.family.image_kwarg], bound.arguments[self.family.joined_block_modulation]
        b, text_len = call.batch, call.text_prefix + call.padded_text_len
        negative_modulation = modulation[b:] if modulation.shape[0] > b else modulation
        start, _ = self.family.single_block_text
        state = self.runtime.scratch["single_block"] = start(module, joined[b:, :text_len], negative_modulation)
        bound.arguments[self.family.image_kwarg] = joined[:b]
        bound.arguments[self.family.joined_block_modulation] = modulation[:b] if modulation.shape[0] > b else modulation
        if mask is not None:  # the block's mask for the stock rows; the negative rows' for the text path
            state["mask"] = mask[b:] if mask.shape[0] > b else mask
            bound.arguments[mask_name] = mask[:b] if mask.shape[0] > b else mask
        return bound.args, bound.kwargs

    def _join_joined_rows(self, module: torch.nn.Module, args: tuple, output: Any) -> Any:
        call = self.runtime.call
        state = self.runtime.scratch.pop("single_block", None)
        if call is None or state is None:
            return None
        _, finish = self.family.single_block_text
        text_len = call.text_prefix + call.padded_text_len
        negative = torch.cat([finish(module, state), output[call.cond_rows, text_len:]], dim=1)
        return torch.cat([output, negative])

    def _split_text_rows(self, module: torch.nn.Module, args: tuple, kwargs: dict):
        """Fast path for blocks that concatenate ``[text, image]``: the block runs on the stock
        rows; the negative text rows take the family's text-only path around it."""
        call = self.runtime.call
        if call is None:
            return None
        if not getattr(_text_attention_processor(module), "takes_split_text", lambda: False)():
            # another processor or attention backend: whole rows through the block (the straightforward wrapper)
            self.runtime.scratch["single_block_whole_rows"] = True
            return self._add_image_rows(module, args, kwargs)
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
        arguments = bound.arguments
        text, temb = arguments["encoder_hidden_states"], arguments["temb"]
        start, _ = self.family.single_block_text
        self.runtime.scratch["single_block"] = start(module, text[call.batch :], temb[call.batch :])
        arguments["encoder_hidden_states"] = text[: call.batch]
        arguments["temb"] = temb[: call.batch]
        return bound.args, bound.kwargs

    def _join_text_rows(self, module: torch.nn.Module, args: tuple, output: Any) -> Any:
        call = self.runtime.call
        if call is None:
            return None
        if self.runtime.scratch.pop("single_block_whole_rows", False):
            return self._drop_image_rows(module, args, output)
        state = self.runtime.scratch.pop("single_block")
        _, finish = self.family.single_block_text
        text, image = output
        return torch.cat([text, finish(module, state)]), image

    def _split_sample_rows(self, module: torch.nn.Module, args: tuple, kwargs: dict):
        """Fast path for blocks over per-sample rows ``[image, text, padding]`` (Z-Image's main layers; each row's
        ``call.image_lengths`` and ``call.text_lengths``): the block runs on the stock rows, cut to their longest
        valid length (the padding a longer negative text adds is never attended); each negative row's text span takes
        the family's text-only path around it, with its modulation and its span of the rotary tables."""
        call = self.runtime.call
        self.runtime.scratch.pop("single_block", None)  # (left behind only by a block that raised)
        processor = _text_attention_processor(module)
        if call is None or not getattr(processor, "takes_split_text", lambda: False)():
            return None
        if call.text_lengths is None:  # (the family gives no per-row spans)
            return None
        family = self.family
        bound = _bind(module, args, kwargs)
        arguments = bound.arguments
        stream, modulation = arguments[family.image_kwarg], arguments.get(family.joined_block_modulation)
        b, rows, tokens = call.batch, stream.shape[0], stream.shape[1]
        if rows != b + len(call.cond_rows):
            return None
        image_lengths = call.image_lengths
        if image_lengths is None and family.sample_text_first:  # (rows [text, image, padding]: the longest row is full)
            image_lengths = [tokens - max(call.text_lengths)] * rows
        elif image_lengths is None:  # (no image lengths from the family: each row's text ends it, the image is the rest)
            image_lengths = [tokens - length for length in call.text_lengths]
        spans = [(0 if family.sample_text_first else image_lengths[i], call.text_lengths[i]) for i in range(b, rows)]
        keep = max(image_lengths[i] + call.text_lengths[i] for i in range(b))

        def text_spans(value: torch.Tensor) -> torch.Tensor:
            return pad_sequence([value[b + j, s : s + n] for j, (s, n) in enumerate(spans)], batch_first=True)

        per_row = isinstance(modulation, torch.Tensor) and modulation.ndim and modulation.shape[0] == rows
        start, _ = family.single_block_text
        state = start(module, text_spans(stream), modulation[b:] if per_row else modulation)
        rotary = arguments.get(family.sample_block_rotary) if family.sample_block_rotary else None
        cached = self.runtime.scratch.get("guided_rows")
        if cached is None or cached[0] is not call:  # (once per call: reading device indices waits for the device)
            cached = self.runtime.scratch["guided_rows"] = (call, call.cond_rows.tolist())
        state.update(spans=spans, rotary=text_spans(rotary) if rotary is not None else None, stream=stream,
                     guided_rows=cached[1])
        for name, value in list(arguments.items()):  # per-row arguments: the stock rows; per-token ones: their tokens
            if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == rows:
                value = value[:b]
                if name != family.joined_block_modulation and value.ndim >= 2 and value.shape[1] == tokens:
                    value = value[:, :keep]
                arguments[name] = value
        self.runtime.scratch["single_block"] = state
        return bound.args, bound.kwargs

    def _join_sample_rows(self, module: torch.nn.Module, args: tuple, output: Any) -> Any:
        """... and the block's output for every row again: the negative rows keep their input but for their text
        spans, which take the text path's output (their image tokens are never read: every attention gives them
        the guided rows')."""
        call = self.runtime.call
        state = self.runtime.scratch.pop("single_block", None)
        if call is None or state is None:
            return None
        _, finish = self.family.single_block_text
        text, stream = finish(module, state), state["stream"]
        joined = torch.cat([pad_tokens(output, stream.shape[1]), stream[call.batch :]])
        for j, (start, length) in enumerate(state["spans"]):
            joined[call.batch + j, start : start + length] = text[j, :length]
        return joined

    def _serves_split_text(self) -> bool:
        """Whether every text-attention wrapper of the denoiser can serve negative rows taken out of their block."""
        return all(getattr(module.processor, "takes_split_text", lambda: False)() for module, _ in self._stock_processors)

    def _enter_stock_image_rows(self, module: torch.nn.Module, args: tuple, kwargs: dict):
        """Fast path, the module that takes the image at the model input (``Family.stock_image_entry``): it runs on the
        stock rows, and its output carries the image stream on at the stock batch, when every text-attention wrapper
        can serve the negative rows beside the stock rows (else whole negative rows, as the straightforward path)."""
        if self.runtime.call is None or not self._serves_split_text():
            return None
        return self._stock_image_rows(module, args, kwargs)

    def _split_image_first_rows(self, module: torch.nn.Module, args: tuple, kwargs: dict):
        """Fast path for single-stream blocks that take the image and the text separately and join them as
        ``[image, text]`` themselves (``Family.image_first_blocks``): the block runs on the stock rows (the image at
        the stock batch, every other per-row argument cut to the stock rows); the negative rows' text takes the
        family's text-only path beside it, their per-row arguments (mask, modulation) kept for the attention
        wrapper. A block whose wrapper cannot serve that gets whole negative rows, the image copied for them."""
        call = self.runtime.call
        self.runtime.scratch.pop("single_block", None)  # (left behind only by a block that raised)
        if call is None:
            return None
        family = self.family
        bound = _bind(module, args, kwargs)
        arguments = bound.arguments
        image, text = arguments[family.image_kwarg], arguments["encoder_hidden_states"]
        b, rows = call.batch, text.shape[0]
        if rows != b + len(call.cond_rows):
            return None
        processor = _text_attention_processor(module)
        if not getattr(processor, "takes_split_text", lambda: False)():
            if image.shape[0] == b:  # (the image stream came at the stock batch: copies for the negative rows)
                arguments[family.image_kwarg] = torch.cat([image, image[call.cond_rows]])
                return bound.args, bound.kwargs
            return None
        negative: dict[str, torch.Tensor] = {}
        for name, value in list(arguments.items()):
            if name != family.image_kwarg and isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == rows:
                negative[name], arguments[name] = value[b:], value[:b]
        arguments[family.image_kwarg] = image[:b]
        start, _ = family.single_block_text
        state = start(module, negative["encoder_hidden_states"], negative[family.joined_block_modulation])
        state["inputs"] = negative
        # (a family without stock_image_entry carries the image on whole rows between blocks: it leaves as it came)
        state["whole_image_rows"] = image.shape[0] > b and not family.stock_image_entry
        self.runtime.scratch["single_block"] = state
        return bound.args, bound.kwargs

    def _join_image_first_rows(self, module: torch.nn.Module, args: tuple, output: Any) -> Any:
        """... and the block's ``(image, text)`` output with the negative rows' text again (the image stays at the
        stock batch; in a family without ``stock_image_entry`` a block that got it on whole rows returns it so, the
        guided rows' copies for the negative rows, which every attention replaces by the guided rows' image)."""
        call = self.runtime.call
        state = self.runtime.scratch.pop("single_block", None)
        if call is None or state is None:
            return None
        _, finish = self.family.single_block_text
        image, text = output
        if state.get("whole_image_rows"):
            image = torch.cat([image, image[call.cond_rows]])
        return image, torch.cat([text, finish(module, state)])


def _bind(module: torch.nn.Module, args: tuple, kwargs: dict) -> inspect.BoundArguments:
    return inspect.signature(module.forward).bind(*args, **kwargs)


def _text_attention_processor(block: torch.nn.Module) -> Any:
    """The NAG wrapper of a block's text attention (None if it has none)."""
    return next((m.processor for m in block.modules() if isinstance(getattr(m, "processor", None), NAGProcessor)), None)


def _stock_rows_of_output(output: Any, rows: int) -> Any:
    """A denoiser output (tuple or ``...Output`` dataclass) without the negative rows."""
    if isinstance(output, (torch.Tensor, list)):
        return output[:rows]
    if isinstance(output, tuple):
        return (output[0][:rows], *output[1:])
    sample = getattr(output, "sample", None)
    if isinstance(sample, (torch.Tensor, list)):  # (Z-Image: a list of per-sample tensors)
        output.sample = sample[:rows]  # diffusers' BaseOutput keeps the mapping in step with the attribute
        return output
    raise TypeError(f"NAG cannot trim the negative rows from a denoiser output of type {type(output).__name__}")


def attach(denoiser: torch.nn.Module, family: "Family", runtime: NAGRuntime, fast: bool = True) -> Attachment:
    """Install NAG on ``denoiser`` for ``family``; returns the attachment to ``detach()``.

    ``fast=False`` uses the straightforward wrappers everywhere (each stock processor called once
    per branch); the fast paths must agree with them.
    """
    return Attachment(denoiser, family, runtime, fast)


def unwrap_compiled(module: torch.nn.Module) -> torch.nn.Module:
    """The module inside a ``torch.compile`` wrapper (hooks go there; compiled calls run them)."""
    return getattr(module, "_orig_mod", module)


def family_of(denoiser: torch.nn.Module) -> "Family":
    """The family adapter for a denoiser instance, or a clear error."""
    from .families import FAMILIES

    for cls in type(unwrap_compiled(denoiser)).__mro__:
        for family in FAMILIES.values():
            if cls.__name__ in family.denoisers:
                return family
    supported = sorted(name for family in FAMILIES.values() for name in family.denoisers)
    raise NotImplementedError(f"NAG does not support {type(denoiser).__name__}; supported denoisers: {supported}")
