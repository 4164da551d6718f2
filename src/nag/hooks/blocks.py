"""Hooks on the blocks and modules around attention: where the negative rows' image copies are dropped.

Each hook is one method of :class:`BlockHooks`; ``HOOKS`` says which :class:`~nag.spec.ModuleKind` gets which (a
forward pre-hook and a forward hook) and when. A hook does nothing outside a guided call. The pre-hooks that take
the negative text out of a block (the block then runs on the stock rows) leave it in ``runtime.text_path`` for the
block's attention fast path, and the forward hook finishes the block for it with the family's :class:`TextPath`.
"""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence

from ..attention import NAGProcessor, pad_tokens
from ..signatures import forward_signature
from ..spec import Family, ModuleKind
from ..state import NAGRuntime, NegativeText, inert_copy

__all__ = ["BlockHooks", "HOOKS", "Hook"]

_UNKNOWN = object()


class BlockHooks:
    """The block-level hooks of one attachment (``wrapped``: its ``(name, module, stock processor, NAG wrapper)``
    entries, filled as it installs)."""

    def __init__(self, family: Family, runtime: NAGRuntime, wrapped: list[tuple[str, torch.nn.Module, Any, Any]]):
        self.family = family
        self.runtime = runtime
        self.wrapped = wrapped
        self._text_attention: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # block -> its wrapped attention
        # text projection -> (cache key, the axis and index where the negative part starts, its kept output or None),
        # between its two hooks
        self._text_projection: dict[torch.nn.Module, tuple[tuple, int, int, torch.Tensor | None]] = {}
        # the modules that got a SEQUENCE_NORM or SEQUENCE_PROJECTION hook (see installed)
        self._sequence_modules: weakref.WeakSet = weakref.WeakSet()

    def __reduce_ex__(self, protocol: Any) -> tuple:
        """Copies of the model (deepcopy, torch.save) carry hooks that do nothing: no call is guided there."""
        attributes = {
            "runtime": NAGRuntime(self.runtime.settings),
            "wrapped": [],
            "_text_projection": {},
            "_sequence_modules": set(),
        }
        return inert_copy, (type(self), attributes)

    def installed(self, module: torch.nn.Module, kind: ModuleKind) -> None:
        """The attachment installed ``kind``'s hooks on ``module``."""
        if kind in (ModuleKind.SEQUENCE_NORM, ModuleKind.SEQUENCE_PROJECTION):
            self._sequence_modules.add(module)

    def _sequence_hooks_in_place(self, block: torch.nn.Module) -> bool:
        """Whether the block's norm and output projection (direct children) are still the modules NAG hooked: a LoRA
        added while NAG is applied wraps them in new modules, whose output those hooks would not see."""
        return sum(child in self._sequence_modules for child in block.children()) == 2

    def _text_attention_processor(self, block: torch.nn.Module) -> Any:
        """The NAG wrapper of a block's text attention (None if it has none, or something replaced it). The block's
        wrapped attention module is found once (a walk over its modules costs more than the rest of a hook call);
        its processor is read at each call."""
        attention = self._text_attention.get(block, _UNKNOWN)
        if attention is _UNKNOWN:
            # (the instance dict, not getattr: NAG wrappers are plain objects)
            found = (m for m in block.modules() if isinstance(m.__dict__.get("processor"), NAGProcessor))
            attention = self._text_attention[block] = next(found, None)
        processor = attention.__dict__.get("processor") if attention is not None else None
        return processor if isinstance(processor, NAGProcessor) else None

    def _start_text(self, block: torch.nn.Module, text: torch.Tensor, modulation: Any) -> NegativeText:
        normed, saved = self.family.text_path.start(block, text, modulation)
        return NegativeText(normed=normed, saved=saved)

    def _finish_text(self, block: torch.nn.Module, path: NegativeText) -> torch.Tensor:
        return self.family.text_path.finish(block, path.saved, path.attention)

    def stock_rows_of_conditioning(self, module: torch.nn.Module, args: tuple, kwargs: dict):
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

    def stock_rows_of_inputs(self, module: torch.nn.Module, args: tuple, kwargs: dict):
        """Image-side modulation computed from the conditioning alone: the stock rows of every input."""
        call = self.runtime.call
        if call is None:
            return None

        def trim(value: Any) -> Any:
            if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] > call.batch:
                return value[: call.batch]
            return value

        return tuple(trim(a) for a in args), {k: trim(v) for k, v in kwargs.items()}

    def add_image_rows(self, module: torch.nn.Module, args: tuple, kwargs: dict):
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

    def drop_image_rows(self, module: torch.nn.Module, args: tuple, output: Any) -> Any:
        call = self.runtime.call
        if call is None:
            return None
        text, image = output  # (the block's output is (text, image): keep the stock image rows)
        return text, image[: call.batch]

    def stock_image_rows(self, module: torch.nn.Module, args: tuple, kwargs: dict):
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

    def restore_image_rows(self, module: torch.nn.Module, args: tuple, output: Any) -> Any:
        """... and its image output with the guided rows' copies again (the model joins text and image rows)."""
        call = self.runtime.call
        if call is not None and isinstance(output, torch.Tensor) and output.ndim and output.shape[0] == call.batch:
            return torch.cat([output, output[call.cond_rows]])  # (a module returning the image alone)
        if call is None or not isinstance(output, tuple):
            return None
        return tuple(
            torch.cat([x, x[call.cond_rows]]) if isinstance(x, torch.Tensor) and x.shape[0] == call.batch else x
            for x in output
        )

    def split_joined_rows(self, module: torch.nn.Module, args: tuple, kwargs: dict):
        """Fast path for single-stream blocks whose input the model joined as ``[text, image]``: the block runs
        on the stock rows; the negative rows' text takes the family's text-only path around it."""
        call = self.runtime.call
        processor = self._text_attention_processor(module) if call is not None else None
        if call is None or not getattr(processor, "takes_split_text", lambda: False)():
            return None
        bound = _bind(module, args, kwargs)
        mask_name = self.family.text_path.mask
        mask = bound.arguments.get(mask_name) if mask_name else None
        if mask is not None and not getattr(processor, "takes_split_mask", lambda call, mask: False)(call, mask):
            return None  # (a mask form the fast path does not take: the whole rows run through the block)
        joined, modulation = bound.arguments[self.family.image_kwarg], bound.arguments[self.family.text_path.modulation]
        b, text_len = call.batch, call.text_prefix + call.padded_text_len
        negative_modulation = modulation[b:] if modulation.shape[0] > b else modulation
        path = self.runtime.text_path = self._start_text(module, joined[b:, :text_len], negative_modulation)
        bound.arguments[self.family.image_kwarg] = joined[:b]
        bound.arguments[self.family.text_path.modulation] = modulation[:b] if modulation.shape[0] > b else modulation
        if mask is not None:  # the block's mask for the stock rows; the negative rows' for the text path
            path.mask = mask[b:] if mask.shape[0] > b else mask
            bound.arguments[mask_name] = mask[:b] if mask.shape[0] > b else mask
        return bound.args, bound.kwargs

    def join_joined_rows(self, module: torch.nn.Module, args: tuple, output: Any) -> Any:
        call = self.runtime.call
        path, self.runtime.text_path = self.runtime.text_path, None
        if call is None or path is None:
            return None
        text_len = call.text_prefix + call.padded_text_len
        negative = torch.cat([self._finish_text(module, path), output[call.cond_rows, text_len:]], dim=1)
        return torch.cat([output, negative])

    def split_text_rows(self, module: torch.nn.Module, args: tuple, kwargs: dict):
        """Fast path for blocks that concatenate ``[text, image]``: the block runs on the stock
        rows; the negative text rows take the family's text-only path around it, or, where every row is guided and
        the family's text path has ``in_sequence``, ride in their rows' sequence as ``[text, negative text]``."""
        call = self.runtime.call
        if call is None:
            return None
        processor = self._text_attention_processor(module)
        if not getattr(processor, "takes_split_text", lambda: False)():
            # another processor or attention backend: whole rows through the block (the straightforward wrapper)
            self.runtime.whole_rows_block = True
            return self.add_image_rows(module, args, kwargs)
        bound = _bind(module, args, kwargs)
        arguments = bound.arguments
        text, temb = arguments["encoder_hidden_states"], arguments["temb"]
        b = call.batch
        in_sequence = self.family.text_path.in_sequence
        if in_sequence is not None and self._every_row_once(call, text, processor) and self._sequence_hooks_in_place(
            module
        ):
            # the negative text as more tokens of each stock row: [text, negative text] (see InSequence)
            normed, saved = in_sequence.start(module, text[b:], temb[b:])
            length = text.shape[1]
            self.runtime.text_path = NegativeText(normed=normed, saved=saved, sequence=(length, 2 * length))
            arguments["encoder_hidden_states"] = torch.cat([text[:b], text[b:]], dim=1)
        else:
            self.runtime.text_path = self._start_text(module, text[b:], temb[b:])
            arguments["encoder_hidden_states"] = text[:b]
        arguments["temb"] = temb[:b]
        return bound.args, bound.kwargs

    @staticmethod
    def _every_row_once(call: Any, text: torch.Tensor, processor: NAGProcessor) -> bool:
        """Whether each stock row is guided, in order, by one negative text row after the stock rows, and attention
        runs on this process alone: then the negative text can ride in its row's sequence."""
        rows = call.row_index
        return (
            isinstance(rows, slice)
            and (rows.start, rows.stop) == (0, call.batch)
            and text.shape[0] == 2 * call.batch
            and processor.placement().parallel_config is None
        )

    def splice_negative_text(self, module: torch.nn.Module, args: tuple, output: Any) -> Any:
        """In-sequence blocks' modulation norm: the negative tokens of its output are the text path's own (modulated
        by the negative rows' conditioning). Its output is the module's own new tensor, changed in place."""
        path = self.runtime.text_path
        if self.runtime.call is None or path is None or path.sequence is None:
            return None
        normed = output[0] if isinstance(output, tuple) else output
        start, stop = path.sequence
        normed[:, start:stop] = path.normed
        path.spliced = True
        return None

    def keep_negative_projection(self, module: torch.nn.Module, args: tuple, output: Any) -> Any:
        """In-sequence blocks' output projection: its output for the negative tokens, for the text path's finish."""
        path = self.runtime.text_path
        if self.runtime.call is None or path is None or path.sequence is None:
            return None
        start, stop = path.sequence
        path.projected = output[:, start:stop]
        return None

    def join_text_rows(self, module: torch.nn.Module, args: tuple, output: Any) -> Any:
        call = self.runtime.call
        if call is None:
            return None
        if self.runtime.whole_rows_block:
            self.runtime.whole_rows_block = False
            return self.drop_image_rows(module, args, output)
        path, self.runtime.text_path = self.runtime.text_path, None
        text, image = output
        if path.sequence is not None:
            if path.projected is None:
                raise RuntimeError(
                    f"NAG's negative text rode in {type(module).__name__}'s sequence but its output projection did not "
                    "run; apply NAG with fast=False for this model"
                )
            start, stop = path.sequence
            negative = self.family.text_path.in_sequence.finish(module, path.saved, path.projected)
            return torch.cat([text[:, :start], negative]), image
        return torch.cat([text, self._finish_text(module, path)]), image

    def split_sample_rows(self, module: torch.nn.Module, args: tuple, kwargs: dict):
        """Fast path for blocks over per-sample rows ``[image, text, padding]`` (Z-Image's main layers; each row's
        ``call.image_lengths`` and ``call.text_lengths``): the block runs on the stock rows, cut to their longest
        valid length (the padding a longer negative text adds is never attended); each negative row's text span takes
        the family's text-only path around it, with its modulation and its span of the rotary tables."""
        call = self.runtime.call
        self.runtime.text_path = None  # (left behind only by a block that raised)
        processor = self._text_attention_processor(module) if call is not None else None
        if call is None or not getattr(processor, "takes_split_text", lambda: False)():
            return None
        if call.text_lengths is None:  # (the family gives no per-row spans)
            return None
        family, text_path = self.family, self.family.text_path
        bound = _bind(module, args, kwargs)
        arguments = bound.arguments
        stream, modulation = arguments[family.image_kwarg], arguments.get(family.text_path.modulation)
        b, rows, tokens = call.batch, stream.shape[0], stream.shape[1]
        if rows != b + len(call.cond_rows):
            return None
        image_lengths = call.image_lengths
        if image_lengths is None and text_path.text_first:  # (rows [text, image, padding]: the longest row is full)
            image_lengths = [tokens - max(call.text_lengths)] * rows
        elif (
            image_lengths is None
        ):  # (no image lengths from the family: each row's text ends it, the image is the rest)
            image_lengths = [tokens - length for length in call.text_lengths]
        spans = [(0 if text_path.text_first else image_lengths[i], call.text_lengths[i]) for i in range(b, rows)]
        keep = max(image_lengths[i] + call.text_lengths[i] for i in range(b))

        def text_spans(value: torch.Tensor) -> torch.Tensor:
            return pad_sequence([value[b + j, s : s + n] for j, (s, n) in enumerate(spans)], batch_first=True)

        per_row = isinstance(modulation, torch.Tensor) and modulation.ndim and modulation.shape[0] == rows
        path = self._start_text(module, text_spans(stream), modulation[b:] if per_row else modulation)
        rotary = arguments.get(text_path.rotary) if text_path.rotary else None
        path.spans, path.stream = spans, stream
        path.rotary = text_spans(rotary) if rotary is not None else None
        for name, value in list(arguments.items()):  # per-row arguments: the stock rows; per-token ones: their tokens
            if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == rows:
                value = value[:b]
                if name != family.text_path.modulation and value.ndim >= 2 and value.shape[1] == tokens:
                    value = value[:, :keep]
                arguments[name] = value
        self.runtime.text_path = path
        return bound.args, bound.kwargs

    def join_sample_rows(self, module: torch.nn.Module, args: tuple, output: Any) -> Any:
        """... and the block's output for every row again: the negative rows keep their input but for their text
        spans, which take the text path's output (their image tokens are never read: every attention gives them
        the guided rows')."""
        call = self.runtime.call
        path, self.runtime.text_path = self.runtime.text_path, None
        if call is None or path is None:
            return None
        text, stream = self._finish_text(module, path), path.stream
        joined = torch.cat([pad_tokens(output, stream.shape[1]), stream[call.batch :]])
        for j, (start, length) in enumerate(path.spans):
            joined[call.batch + j, start : start + length] = text[j, :length]
        return joined

    def _serves_split_text(self) -> bool:
        """Whether every text-attention wrapper of the denoiser can serve negative rows taken out of their block."""
        return all(getattr(module.processor, "takes_split_text", lambda: False)() for _, module, _, _ in self.wrapped)

    def enter_stock_image_rows(self, module: torch.nn.Module, args: tuple, kwargs: dict):
        """Fast path, the module that takes the image at the model input (``ModuleKind.STOCK_IMAGE_ENTRY``): it runs on
        the stock rows, and its output carries the image stream on at the stock batch, when every text-attention wrapper
        can serve the negative rows beside the stock rows (else whole negative rows, as the straightforward path)."""
        if self.runtime.call is None or not self._serves_split_text():
            return None
        return self.stock_image_rows(module, args, kwargs)

    def split_image_first_rows(self, module: torch.nn.Module, args: tuple, kwargs: dict):
        """Fast path for single-stream blocks that take the image and the text separately and join them as
        ``[image, text]`` themselves (``ModuleKind.IMAGE_FIRST_BLOCK``): the block runs on the stock rows (the image at
        the stock batch, every other per-row argument cut to the stock rows); the negative rows' text takes the
        family's text-only path beside it, their per-row arguments (mask, modulation) kept for the attention
        wrapper. A block whose wrapper cannot serve that gets whole negative rows, the image copied for them."""
        call = self.runtime.call
        self.runtime.text_path = None  # (left behind only by a block that raised)
        if call is None:
            return None
        family = self.family
        bound = _bind(module, args, kwargs)
        arguments = bound.arguments
        image, text = arguments[family.image_kwarg], arguments["encoder_hidden_states"]
        b, rows = call.batch, text.shape[0]
        if rows != b + len(call.cond_rows):
            return None
        processor = self._text_attention_processor(module)
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
        path = self._start_text(module, negative["encoder_hidden_states"], negative[family.text_path.modulation])
        path.inputs = negative
        # (a family without a stock image entry carries the image on whole rows between blocks: it leaves as it came)
        path.whole_image_rows = image.shape[0] > b and ModuleKind.STOCK_IMAGE_ENTRY not in family.modules
        self.runtime.text_path = path
        return bound.args, bound.kwargs

    def join_image_first_rows(self, module: torch.nn.Module, args: tuple, output: Any) -> Any:
        """... and the block's ``(image, text)`` output with the negative rows' text again (the image stays at the
        stock batch; in a family without a ``STOCK_IMAGE_ENTRY`` a block that got it on whole rows returns it so, the
        guided rows' copies for the negative rows, which every attention replaces by the guided rows' image)."""
        call = self.runtime.call
        path, self.runtime.text_path = self.runtime.text_path, None
        if call is None or path is None:
            return None
        image, text = output
        if path.whole_image_rows:
            image = torch.cat([image, image[call.cond_rows]])
        return image, torch.cat([text, self._finish_text(module, path)])

    def stock_text_only(self, module: torch.nn.Module, args: tuple, kwargs: dict):
        """Text projections: the module gets the stock text and the negative text, ``[prompt | negative]`` tokens (cross
        layout, static negative) or the negative rows after the stock rows (joint and concat layouts); where its output
        for the negative part was kept from an earlier call of the generation, it runs on the stock part alone
        (``append_negative_text`` appends the kept output)."""
        self._text_projection.pop(module, None)
        call = self.runtime.call
        if call is None or kwargs or len(args) != 1:
            return None
        text = args[0]
        layout = self.family.layout
        if layout == "cross" and call.static_negative:
            axis, split, negative = 1, call.positive_text_len, call.negative_text_len
        elif layout in ("joint", "concat"):
            axis, split, negative = 0, call.batch, len(call.guided_rows)
        else:
            return None
        if not isinstance(text, torch.Tensor) or text.ndim != 3 or text.shape[axis] != split + negative:
            return None  # (cross layout under context parallelism: the text comes in shards, projected whole)
        kept_under = call.kept_under
        if kept_under is None:  # (autograd records: each call projects its own, see negative_work_context)
            return None
        key = (id(module), tuple(text.shape), text.dtype, text.device, tuple(call.guided_rows), kept_under)
        kept = self.runtime.negative_text_outputs.get(key)
        self._text_projection[module] = (key, axis, split, kept)
        return None if kept is None else ((text.narrow(axis, 0, split),), kwargs)

    def append_negative_text(self, module: torch.nn.Module, args: tuple, output: Any) -> Any:
        """... and the output for the stock part followed by the negative part's kept output (the first call of a
        generation keeps it)."""
        pending = self._text_projection.pop(module, None)
        if pending is None or self.runtime.call is None or not isinstance(output, torch.Tensor):
            return None
        key, axis, split, kept = pending
        if kept is None:
            self.runtime.negative_text_outputs[key] = output.narrow(axis, split, output.shape[axis] - split).clone()
            return None
        return torch.cat([output, kept], dim=axis)


def _bind(module: torch.nn.Module, args: tuple, kwargs: dict) -> inspect.BoundArguments:
    return forward_signature(module).bind(*args, **kwargs)




@dataclass(frozen=True)
class Hook:
    """What a kind of module gets: a forward pre-hook and a forward hook (``BlockHooks`` method names), installed
    only with the fast path (``fast_only``) or only where the family has a text path (``text_path``); ``otherwise``
    is installed where those conditions fail."""

    pre: str | None
    post: str | None = None
    fast_only: bool = False
    text_path: bool = False
    otherwise: Hook | None = None

    def applies(self, fast: bool, family: Family) -> bool:
        return (fast or not self.fast_only) and (family.text_path is not None or not self.text_path)


HOOKS: dict[ModuleKind, Hook] = {
    ModuleKind.IMAGE_NORM: Hook("stock_rows_of_conditioning"),
    ModuleKind.IMAGE_MODULATION: Hook("stock_rows_of_inputs"),
    ModuleKind.STOCK_IMAGE_BLOCK: Hook("stock_image_rows", "restore_image_rows"),
    ModuleKind.JOINED_BLOCK: Hook("split_joined_rows", "join_joined_rows", fast_only=True, text_path=True),
    ModuleKind.CONCATENATING_BLOCK: Hook(
        "split_text_rows",
        "join_text_rows",
        fast_only=True,
        text_path=True,
        otherwise=Hook("add_image_rows", "drop_image_rows"),
    ),
    ModuleKind.SAMPLE_BLOCK: Hook("split_sample_rows", "join_sample_rows", fast_only=True, text_path=True),
    ModuleKind.STOCK_ROW_MODULE: Hook("stock_image_rows", "restore_image_rows", fast_only=True),
    ModuleKind.STOCK_IMAGE_ENTRY: Hook("enter_stock_image_rows", fast_only=True),
    ModuleKind.IMAGE_FIRST_BLOCK: Hook(
        "split_image_first_rows", "join_image_first_rows", fast_only=True, text_path=True
    ),
    ModuleKind.TEXT_PROJECTION: Hook("stock_text_only", "append_negative_text", fast_only=True),
    ModuleKind.SEQUENCE_NORM: Hook(None, "splice_negative_text", fast_only=True, text_path=True),
    ModuleKind.SEQUENCE_PROJECTION: Hook(None, "keep_negative_projection", fast_only=True, text_path=True),
}
