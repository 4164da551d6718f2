"""NAG attention processors.

Each wrapper holds the module's stock processor and, when the current denoiser call is guided,
calls it twice: once with the negative context for the guided rows (capturing the image queries'
attention output ``Z-`` just before the output projection) and once as stock with the positive
context, where the image queries' output ``Z+`` is replaced by ``nag_combine(Z+, Z-)`` before the
projection. The stock processor does all attention math (projections, norms, RoPE, masks,
backends), so every processor a family uses keeps working. When the call is not guided the stock
processor runs with the stock arguments, untouched.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import TYPE_CHECKING, Any, Callable

import torch

from .combine import nag_combine
from .kernels import attention, attention_with_lse, attention_with_lse_over_valid_keys, merge_attention
from .kernels import attention_with_lse_and_key_bias

if TYPE_CHECKING:  # pragma: no cover
    from .engine import GuidedCall, NAGRuntime


class _ProjectionTap:
    """The output projection as a processor sees it: calls go through ``fn``; attributes
    (``weight``, ``bias``, ...) are the real layer's."""

    def __init__(self, layer: torch.nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]):
        object.__setattr__(self, "_layer", layer)
        object.__setattr__(self, "_fn", fn)

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return object.__getattribute__(self, "_fn")(z)

    def __getattr__(self, name: str) -> Any:
        return getattr(object.__getattribute__(self, "_layer"), name)


class _OutputProjectionView:
    """Stands in for an attention module, routing its ``to_out[0]`` through ``project``."""

    def __init__(self, module: torch.nn.Module, project: Callable[[torch.Tensor], torch.Tensor]):
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "to_out", [_ProjectionTap(module.to_out[0], project), *list(module.to_out)[1:]])

    def __getattr__(self, name: str) -> Any:
        return getattr(object.__getattribute__(self, "_module"), name)


def _split_rows(mask: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor | None:
    if mask is None or mask.shape[0] == 1:
        return mask
    return mask[rows]


def _slice_text_rotary(rotary: Any, text_len: int, padded_text_len: int) -> Any:
    """Rotary tables for ``[text[:text_len], image]`` out of tables built for ``[text[:padded], image]``."""
    if rotary is None or text_len == padded_text_len:
        return rotary
    if isinstance(rotary, (tuple, list)):
        return type(rotary)(_slice_text_rotary(r, text_len, padded_text_len) for r in rotary)
    return torch.cat([rotary[:text_len], rotary[padded_text_len:]], dim=0)


def _rotary_for(
    arguments: dict[str, Any], name: str, text_len: int, padded_text_len: int, split: bool = False
) -> dict[str, Any]:
    """The rotary-table argument for a branch whose text is ``text_len`` long (empty if the call has none).

    ``split``: the tables come as ``(image, text)`` (Qwen-Image) rather than one table over
    ``[text, image]``; text positions start at the same place for every length.
    """
    if name not in arguments:
        return {}
    rotary = arguments[name]
    if split and rotary is not None:
        image, text = rotary
        return {name: (image, text[:text_len])}
    return {name: _slice_text_rotary(rotary, text_len, padded_text_len)}


def pad_tokens(x: torch.Tensor, length: int) -> torch.Tensor:
    if x.shape[1] == length:
        return x
    return torch.cat([x, x.new_zeros(x.shape[0], length - x.shape[1], *x.shape[2:])], dim=1)


class NAGProcessor:
    """Base wrapper: binds the stock processor's arguments by name and dispatches."""

    role = "base"

    def __init__(self, stock: Any, runtime: "NAGRuntime"):
        self.stock = stock
        self.stock_kind = type(stock).__name__  # decides which fast path applies
        self.runtime = runtime
        self._signature = inspect.signature(stock.__call__)
        self._var_positional = tuple(
            name for name, p in self._signature.parameters.items() if p.kind is inspect.Parameter.VAR_POSITIONAL
        )

    # diffusers' ``set_attention_backend`` configures a module's processor: pass it to the stock one.
    @property
    def _attention_backend(self) -> Any:
        return getattr(self.stock, "_attention_backend", None)

    @_attention_backend.setter
    def _attention_backend(self, value: Any) -> None:
        self.stock._attention_backend = value

    @property
    def _parallel_config(self) -> Any:
        return getattr(self.stock, "_parallel_config", None)

    @_parallel_config.setter
    def _parallel_config(self, value: Any) -> None:
        self.stock._parallel_config = value

    #: Stock processor kinds whose blocks a hook may run on the stock rows, the negative text beside them (the
    #: wrapper's fast path serves that text); none for the straightforward wrappers.
    split_text_processors: frozenset[str] = frozenset()

    def takes_split_text(self) -> bool:
        """Whether a block hook may take the negative rows out of the block: this wrapper's fast path serves them
        (its stock processor is one it knows, on the default attention backend)."""
        return self.stock_kind in self.split_text_processors and _default_backend(self.stock)

    def __call__(self, attn: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        call = self.runtime.call
        if call is None:
            return self.stock(attn, *args, **kwargs)
        bound = self._signature.bind(attn, *args, **kwargs)
        return self.guided(attn, call, dict(bound.arguments))

    def run_stock(self, attn: Any, arguments: dict[str, Any], **changes: Any) -> Any:
        arguments = {**arguments, **changes}
        arguments.pop("attn", None)
        for name in self._var_positional:  # (processors taking `*args` get none from NAG)
            arguments.pop(name, None)
        extra = arguments.pop("kwargs", {}) if "kwargs" in self._signature.parameters else {}
        return self.stock(attn, **arguments, **extra)

    def combine(self, call: "GuidedCall", z_positive: torch.Tensor, z_negative: torch.Tensor) -> torch.Tensor:
        s = self.runtime.settings
        return nag_combine(z_positive, z_negative, s.scale, s.tau, s.alpha, norm=s.norm, eps=s.eps)

    def guided_projection_inputs(
        self, attn: torch.nn.Module, call: "GuidedCall", run_negative: Callable[[Any], Any], run_positive: Callable[[Any], Any],
        positive_image_start: int = 0, negative_image_start: int = 0, image_len: int | None = None,
    ) -> tuple[Any, Any]:
        """Run the negative pass capturing ``Z-`` at the output projection, then the positive pass
        with the guided rows' ``Z+`` replaced by the NAG combination.

        When the projection also sees text tokens (single-stream processors that project
        ``[text, image]`` together), the image tokens start at ``positive_image_start`` /
        ``negative_image_start`` in each pass (and are ``image_len`` long; None: to the end); only they are
        combined. The output projection is ``attn.to_out[0]``, or ``attn.to_out`` where that is one layer."""
        captured: dict[str, torch.Tensor] = {}
        single_layer = isinstance(attn.to_out, torch.nn.Linear)
        project = attn.to_out if single_layer else attn.to_out[0]
        view = _FusedOutputView if single_layer else _OutputProjectionView

        def tokens(start: int) -> slice:
            return slice(start, None if image_len is None else start + image_len)

        def capture(z: torch.Tensor) -> torch.Tensor:
            captured["z"] = z
            return project(z)

        def combine(z: torch.Tensor) -> torch.Tensor:
            z = z.clone()
            positive_tokens = tokens(positive_image_start)
            z[call.cond_rows, positive_tokens] = self.combine(
                call, z[call.cond_rows, positive_tokens], captured["z"][:, tokens(negative_image_start)]
            )
            return project(z)

        negative = run_negative(view(attn, capture))
        if "z" not in captured:
            raise RuntimeError(
                f"NAG cannot guide {type(attn).__name__} with {self.stock_kind}: the processor never calls "
                "attn.to_out, where NAG combines the attention outputs. Restore diffusers' processor "
                "(e.g. pipe.transformer.set_default_attn_processor()) or remove NAG."
            )
        positive = run_positive(view(attn, combine))
        return negative, positive

    def guided(self, attn: torch.nn.Module, call: "GuidedCall", arguments: dict[str, Any]) -> Any:
        raise NotImplementedError


def wrap_processor(cls: type[NAGProcessor], stock: Any, runtime: "NAGRuntime") -> NAGProcessor:
    """Wrap ``stock`` so that modules which inspect their processor's signature (to filter
    keyword arguments) see the stock signature."""
    stock_call = type(stock).__call__
    sub = _WRAPPER_CLASSES.get((cls, stock_call))
    if sub is None:

        def __call__(self: NAGProcessor, attn: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
            return cls.__call__(self, attn, *args, **kwargs)

        __call__.__signature__ = inspect.signature(stock_call)  # type: ignore[attr-defined]
        sub = type(f"{cls.__name__}[{type(stock).__name__}]", (cls,), {"__call__": __call__})
        _WRAPPER_CLASSES[(cls, stock_call)] = sub
    return sub(stock, runtime)


_WRAPPER_CLASSES: dict[tuple[type, Any], type] = {}


class CrossAttentionNAG(NAGProcessor):
    """Cross-attention to text (UNet ``attn2``, PixArt, Sana, Wan, ...).

    The denoiser hook appends the negative context after the positive one along the token axis
    (``[positive | negative]``, masks likewise), so the model's own text preprocessing runs on
    both. Here the two are split again: ``Z+`` from the positive part, ``Z-`` from the negative
    part for the guided rows.
    """

    role = "cross"

    def guided(self, attn: torch.nn.Module, call: "GuidedCall", arguments: dict[str, Any]) -> Any:
        context = arguments.get("encoder_hidden_states")
        if context is None:
            return self.run_stock(attn, arguments)
        if getattr(attn, "add_k_proj", None) is not None:
            raise NotImplementedError(
                f"{type(attn).__name__} also attends to an image context (image-to-video); NAG guides its text "
                "branch only on the fast path: apply NAG with fast=True (the default)"
            )
        split = context.shape[1] - call.negative_text_len
        mask = arguments.get("attention_mask")
        positive_mask = negative_mask = None
        if mask is not None:
            positive_mask = mask[..., :split]
            negative_mask = _split_rows(mask[..., split:], call.cond_rows)
        hidden = arguments["hidden_states"]

        def run_negative(view: Any) -> Any:
            return self.run_stock(
                view,
                arguments,
                hidden_states=hidden[call.cond_rows],
                encoder_hidden_states=context[call.cond_rows, split:],
                attention_mask=negative_mask,
            )

        def run_positive(view: Any) -> Any:
            return self.run_stock(
                view, arguments, encoder_hidden_states=context[:, :split], attention_mask=positive_mask
            )

        _, positive = self.guided_projection_inputs(attn, call, run_negative, run_positive)
        return positive


class JointAttentionNAG(NAGProcessor):
    """Joint attention over ``[text, image]`` with separate text projections (Flux double-stream
    blocks, SD3 joint blocks).

    The text batch holds the stock rows followed by one negative text row per guided row, both
    padded to a common length; the image batch holds the stock rows only. The negative text
    attends to ``[negative text, image]`` with the guided image stream's keys/values.
    """

    role = "joint"
    rotary_argument = "image_rotary_emb"
    text_mask_argument = "encoder_hidden_states_mask"

    def guided(self, attn: torch.nn.Module, call: "GuidedCall", arguments: dict[str, Any]) -> Any:
        text = arguments["encoder_hidden_states"]
        hidden = arguments["hidden_states"]
        padded = text.shape[1]
        mask = arguments.get(self.text_mask_argument)
        split = self.stock_kind in _SPLIT_ROTARY_PROCESSORS

        def branch(rows: slice, text_len: int) -> dict[str, Any]:
            """The text, its rotary tables and its mask for one branch (its own length, no padding)."""
            changes = {"encoder_hidden_states": text[rows, :text_len],
                       **_rotary_for(arguments, self.rotary_argument, text_len, padded, split)}
            if mask is not None:
                changes[self.text_mask_argument] = mask[rows, :text_len]
            return changes

        def run_negative(view: Any) -> Any:
            return self.run_stock(
                view, arguments, hidden_states=hidden[call.cond_rows],
                **branch(slice(call.batch, None), call.negative_text_len),
            )

        def run_positive(view: Any) -> Any:
            return self.run_stock(view, arguments, **branch(slice(0, call.batch), call.positive_text_len))

        negative, positive = self.guided_projection_inputs(attn, call, run_negative, run_positive)
        image_out, positive_text_out = positive[0], positive[1]
        negative_text_out = negative[1]
        if positive_text_out is None:
            return image_out, None
        text_out = torch.cat([pad_tokens(positive_text_out, padded), pad_tokens(negative_text_out, padded)], dim=0)
        return (image_out, text_out, *positive[2:])


class SingleStreamAttentionNAG(NAGProcessor):
    """Attention over a block's own concatenation ``[text, image]`` with shared projections and no
    output projection inside the processor (Flux and Chroma single-stream blocks).

    The block's input holds the stock rows followed by one row per guided row carrying the
    negative text; that row's image part is replaced by the guided stream's, so the negative text
    attends to ``[negative text, image]`` with the guided image's keys/values. A mask over
    ``[text, image]`` (Chroma) is sliced for each branch like the tokens.
    """

    role = "single"
    rotary_argument = "image_rotary_emb"
    mask_argument = "attention_mask"

    def branches(self, call: "GuidedCall", arguments: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], int, int, int]:
        """Each branch's ``[own text, guided image]`` input, rotary tables and mask; the text lengths."""
        hidden = arguments["hidden_states"]
        b, prefix = call.batch, call.text_prefix
        padded = prefix + call.padded_text_len
        lp, ln = prefix + call.positive_text_len, prefix + call.negative_text_len
        mask = arguments.get(self.mask_argument)
        image = hidden[:b, padded:]

        def branch(rows: slice, text: torch.Tensor, text_len: int) -> dict[str, Any]:
            changes = {"hidden_states": torch.cat([text, image if rows.start == 0 else image[call.cond_rows]], dim=1),
                       **_rotary_for(arguments, self.rotary_argument, text_len, padded)}
            if mask is not None:
                changes[self.mask_argument] = _branch_mask(mask, rows, text_len, padded)
            return changes

        positive = branch(slice(0, b), hidden[:b, :lp], lp)
        negative = branch(slice(b, None), hidden[b:, :ln], ln)
        return positive, negative, lp, ln, padded

    def guided(self, attn: torch.nn.Module, call: "GuidedCall", arguments: dict[str, Any]) -> Any:
        positive, negative, lp, ln, padded = self.branches(call, arguments)
        negative_out = self.run_stock(attn, arguments, **negative)
        positive_out = self.run_stock(attn, arguments, **positive)

        image_out = positive_out[:, lp:].clone()
        image_out[call.cond_rows] = self.combine(call, image_out[call.cond_rows], negative_out[:, ln:])
        text_out = torch.cat([pad_tokens(positive_out[:, :lp], padded), pad_tokens(negative_out[:, :ln], padded)])
        return torch.cat([text_out, torch.cat([image_out, image_out[call.cond_rows]])], dim=1)


class SingleProjectedAttentionNAG(SingleStreamAttentionNAG):
    """Like :class:`SingleStreamAttentionNAG`, for processors that apply the output projection to
    ``[text, image]`` themselves (AuraFlow single blocks): ``Z-`` is captured at the projection
    and the guided rows' image tokens are combined there."""

    role = "single_projected"

    def guided(self, attn: torch.nn.Module, call: "GuidedCall", arguments: dict[str, Any]) -> Any:
        positive, negative, lp, ln, padded = self.branches(call, arguments)
        negative_out, positive_out = self.guided_projection_inputs(
            attn, call, lambda view: self.run_stock(view, arguments, **negative),
            lambda view: self.run_stock(view, arguments, **positive), positive_image_start=lp, negative_image_start=ln,
        )
        image_out = positive_out[:, lp:]
        text_out = torch.cat([pad_tokens(positive_out[:, :lp], padded), pad_tokens(negative_out[:, :ln], padded)])
        return torch.cat([text_out, torch.cat([image_out, image_out[call.cond_rows]])], dim=1)


class _FusedOutputView:
    """Stands in for an attention module whose ``to_out`` is one linear layer over ``[attention, MLP]``
    (Flux2's parallel single blocks), routing that layer's calls through ``project``."""

    def __init__(self, module: torch.nn.Module, project: Callable[[torch.Tensor], torch.Tensor]):
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "to_out", _ProjectionTap(module.to_out, project))

    def __getattr__(self, name: str) -> Any:
        return getattr(object.__getattribute__(self, "_module"), name)


class FusedSingleAttentionNAG(SingleStreamAttentionNAG):
    """Like :class:`SingleStreamAttentionNAG`, for parallel blocks whose processor ends in one output
    projection over ``[attention output, MLP activations]`` of ``[text, image]`` (Flux2 single blocks):
    the projection's input is captured in the negative pass, and in the positive pass the guided rows'
    image tokens get ``nag_combine`` on the attention columns only (the first ``attn.inner_dim``),
    before the projection mixes attention and MLP."""

    role = "single_fused"

    def guided(self, attn: torch.nn.Module, call: "GuidedCall", arguments: dict[str, Any]) -> Any:
        positive, negative, lp, ln, padded = self.branches(call, arguments)
        width = attn.inner_dim
        project = attn.to_out
        captured: dict[str, torch.Tensor] = {}

        def capture(x: torch.Tensor) -> torch.Tensor:
            captured["x"] = x
            return project(x)

        def combine(x: torch.Tensor) -> torch.Tensor:
            x = x.clone()
            rows = call.cond_rows
            x[rows, lp:, :width] = self.combine(call, x[rows, lp:, :width], captured["x"][:, ln:, :width])
            return project(x)

        negative_out = self.run_stock(_FusedOutputView(attn, capture), arguments, **negative)
        if "x" not in captured:
            raise RuntimeError(
                f"NAG cannot guide {type(attn).__name__} with {self.stock_kind}: the processor never calls attn.to_out"
            )
        positive_out = self.run_stock(_FusedOutputView(attn, combine), arguments, **positive)
        image_out = positive_out[:, lp:]
        text_out = torch.cat([pad_tokens(positive_out[:, :lp], padded), pad_tokens(negative_out[:, :ln], padded)])
        return torch.cat([text_out, torch.cat([image_out, image_out[call.cond_rows]])], dim=1)


class RowsJointAttentionNAG(NAGProcessor):
    """Joint attention with separate text projections in a model whose negative rows are whole
    batch rows (layout ``"concat"``: Chroma double blocks, AuraFlow joint blocks).

    Text and image both hold the stock rows followed by one row per guided row (or the image only the stock
    rows, in blocks that run the image stream at the stock batch: ``Family.stock_image_blocks``). The negative
    rows' image tokens are a placeholder: the negative text attends to ``[negative text, guided
    image]`` (the stock rows' image tokens), and the negative rows' image output is the guided
    rows' image output. Masks over ``[text, image]`` (``(rows, 1, L, L)`` or ``(rows, L)``) are
    sliced per branch.
    """

    role = "joint_rows"
    rotary_argument: str | None = "image_rotary_emb"
    mask_argument = "attention_mask"
    projection_sees_text = False  # the output projection sees the image tokens only

    def guided(self, attn: torch.nn.Module, call: "GuidedCall", arguments: dict[str, Any]) -> Any:
        text = arguments["encoder_hidden_states"]
        b = call.batch
        image = arguments["hidden_states"][:b]
        padded = text.shape[1]
        lp, ln = call.text_prefix + call.positive_text_len, call.text_prefix + call.negative_text_len
        mask = arguments.get(self.mask_argument)

        def branch(rows: slice, text_len: int) -> dict[str, Any]:
            changes = {"encoder_hidden_states": text[rows, :text_len],
                       **_rotary_for(arguments, self.rotary_argument, text_len, padded)}
            if mask is not None:
                changes[self.mask_argument] = _branch_mask(mask, rows, text_len, padded)
            return changes

        def run_negative(view: Any) -> Any:
            return self.run_stock(view, arguments, hidden_states=image[call.cond_rows], **branch(slice(b, None), ln))

        def run_positive(view: Any) -> Any:
            return self.run_stock(view, arguments, hidden_states=image, **branch(slice(0, b), lp))

        starts = (lp, ln) if self.projection_sees_text else (0, 0)
        negative, positive = self.guided_projection_inputs(attn, call, run_negative, run_positive, *starts)
        image_out = positive[0]
        if arguments["hidden_states"].shape[0] > b:  # whole negative rows: their image part is the guided rows'
            image_out = torch.cat([image_out, image_out[call.cond_rows]])
        text_out = torch.cat([pad_tokens(positive[1], padded), pad_tokens(negative[1], padded)])
        return (image_out, text_out, *positive[2:])


class RowsSharedAttentionNAG(RowsJointAttentionNAG):
    """Like :class:`RowsJointAttentionNAG`, for processors that join ``[text, image]`` themselves
    and run shared projections over both, the output projection included, before splitting them
    again (CogView4, CogVideoX): ``Z-`` is captured at the output projection and the guided rows'
    image tokens (after each branch's own text) are combined there. Their rotary tables cover the
    image tokens only, so they are the same for every text length; a text mask is ``(rows, text)``."""

    role = "joint_rows_shared"
    rotary_argument = None  # image-only tables: passed through unchanged
    projection_sees_text = True


class RowsImageFirstAttentionNAG(NAGProcessor):
    """Attention over ``[image, text]`` on whole negative rows (layout ``"concat"``), for processors
    that take the image and the text separately and join them as ``[image, text]`` (HunyuanVideo's
    double blocks, with separate text projections and an image-only output projection, and its
    single blocks, with shared projections and no output projection in the processor).

    The negative text attends to ``[guided image, negative text]``; the negative rows' image output
    is the guided rows'. The rotary tables cover the image tokens only; a mask over ``[image, padded
    text]`` (keys on the last axis) is cut to each branch's own text length. Text the model adds after
    the input text's valid tokens and before its padding (HunyuanImage's byT5 stream) is kept. HunyuanVideo 1.5's processor takes a
    key mask over the text alone (it puts the image's keys in front itself): that is cut the same way.
    """

    role = "joint_rows_image_first"

    def guided(self, attn: torch.nn.Module, call: "GuidedCall", arguments: dict[str, Any]) -> Any:
        text = arguments["encoder_hidden_states"]
        b, rows = call.batch, call.cond_rows
        image = arguments["hidden_states"][:b]
        image_len, padded = image.shape[1], text.shape[1]
        mask = arguments.get("attention_mask")
        # tokens the model adds to the text it was given (HunyuanImage's second, byT5 stream, joined in front of
        # the padding): each branch keeps them, and loses only the padding NAG added at the end
        extra = max(padded - call.padded_text_len, 0)

        def branch(selected: slice, text_len: int) -> dict[str, Any]:
            text_len += extra
            changes = {"encoder_hidden_states": text[selected, :text_len]}
            if mask is not None:
                kept = mask[selected] if mask.shape[0] > 1 else mask
                if kept.ndim == 2 and kept.shape[-1] == padded:  # a text-only key mask (HunyuanVideo 1.5)
                    changes["attention_mask"] = kept[:, :text_len]
                    return changes
                length = image_len + text_len
                if kept.ndim >= 3 and kept.shape[-2] == image_len + padded:
                    kept = kept[..., :length, :]
                changes["attention_mask"] = kept[..., :length]
            return changes

        def run_negative(view: Any) -> Any:
            return self.run_stock(view, arguments, hidden_states=image[rows], **branch(slice(b, None), call.negative_text_len))

        def run_positive(view: Any) -> Any:
            return self.run_stock(view, arguments, hidden_states=image, **branch(slice(0, b), call.positive_text_len))

        if getattr(attn, "to_out", None) is None:  # no output projection: the outputs are Z+ and Z- themselves
            negative, positive = run_negative(attn), run_positive(attn)
            image_out = positive[0].clone()
            image_out[rows] = self.combine(call, image_out[rows], negative[0])
        else:
            negative, positive = self.guided_projection_inputs(attn, call, run_negative, run_positive)
            image_out = positive[0]
        text_out = torch.cat([pad_tokens(positive[1], padded), pad_tokens(negative[1], padded)])
        if arguments["hidden_states"].shape[0] == b:  # (the image stream at the stock batch: image rows as given)
            return image_out, text_out
        return torch.cat([image_out, image_out[rows]]), text_out


class RowsPerSampleAttentionNAG(NAGProcessor):
    """Self-attention over per-sample sequences ``[text (its own length), image, padding]`` (Lumina2's joint
    blocks, layout ``"concat"``): every row's text has its own length (``call.text_lengths``), so the image
    tokens start at a different offset in every row. The stock processor runs once on the stock rows and once
    on the negative rows, whose image tokens and image rotary tables are the guided rows' (the image queries
    are the same in both passes); ``Z+`` and ``Z-`` are the image tokens' attention outputs, combined at the
    output projection; the negative rows' image output is the guided rows'."""

    role = "joint_rows_per_sample"
    rotary_kwarg = "image_rotary_emb"

    def image_spans(self, call: "GuidedCall", x: torch.Tensor, mask: torch.Tensor | None) -> list[tuple[int, int, int, int]]:
        """``(guided row, its image offset, the negative row's image offset, image length)`` per guided row."""
        b, lengths = call.batch, call.text_lengths
        image_len = int(mask[0].sum()) - lengths[0] if mask is not None else x.shape[1] - lengths[0]
        return [(r, lengths[r], lengths[b + j], image_len) for j, r in enumerate(call.cond_rows.tolist())]

    def guided(self, attn: torch.nn.Module, call: "GuidedCall", arguments: dict[str, Any]) -> Any:
        x = arguments["hidden_states"]
        self_attention = arguments.get("encoder_hidden_states") is x
        mask, rotary = arguments.get("attention_mask"), arguments.get(self.rotary_kwarg)
        b = call.batch
        spans = self.image_spans(call, x, mask)
        negative_x = x[b:].clone()
        negative_rotary = rotary[b:].clone() if rotary is not None else None
        for j, (r, start, negative_start, image_len) in enumerate(spans):
            negative_x[j, negative_start : negative_start + image_len] = x[r, start : start + image_len]
            if rotary is not None:
                negative_rotary[j, negative_start : negative_start + image_len] = rotary[r, start : start + image_len]

        def branch(hidden: torch.Tensor, selected: slice, table: Any) -> dict[str, Any]:
            changes = {"hidden_states": hidden, "attention_mask": mask[selected] if mask is not None else None}
            if self_attention:
                changes["encoder_hidden_states"] = hidden
            if rotary is not None:
                changes[self.rotary_kwarg] = table
            return changes

        captured: dict[str, torch.Tensor] = {}
        project = attn.to_out[0]

        def capture(z: torch.Tensor) -> torch.Tensor:
            captured["z"] = z
            return project(z)

        def combine(z: torch.Tensor) -> torch.Tensor:
            z = z.clone()
            for j, (r, start, negative_start, image_len) in enumerate(spans):
                z[r, start : start + image_len] = self.combine(
                    call, z[r, start : start + image_len], captured["z"][j, negative_start : negative_start + image_len]
                )
            return project(z)

        negative = self.run_stock(_OutputProjectionView(attn, capture), arguments,
                                  **branch(negative_x, slice(b, None), negative_rotary))
        if "z" not in captured:
            raise RuntimeError(f"NAG cannot guide {type(attn).__name__} with {self.stock_kind}: no attn.to_out[0] call")
        positive = self.run_stock(_OutputProjectionView(attn, combine), arguments,
                                  **branch(x[:b], slice(0, b), rotary[:b] if rotary is not None else None))
        negative = negative.clone()
        for j, (r, start, negative_start, image_len) in enumerate(spans):
            negative[j, negative_start : negative_start + image_len] = positive[r, start : start + image_len]
        return torch.cat([positive, negative])


class RowsPerSampleImageFirstAttentionNAG(RowsPerSampleAttentionNAG):
    """Self-attention over per-sample sequences ``[image, text (its own padded length), padding]`` (Z-Image's
    main blocks, ``ZSingleStreamAttnProcessor`` with ``freqs_cis``; layout ``"concat"`` with list inputs): the
    image starts every row, ``call.image_lengths[row]`` tokens long (the model's own image padding included), but
    its rotary positions follow each row's caption length, so the negative rows take the guided rows' image
    tokens and image rotary tables, as in :class:`RowsPerSampleAttentionNAG`."""

    role = "joint_rows_per_sample_image_first"
    rotary_kwarg = "freqs_cis"

    def image_spans(self, call: "GuidedCall", x: torch.Tensor, mask: torch.Tensor | None) -> list[tuple[int, int, int, int]]:
        return [(r, 0, 0, call.image_lengths[r]) for r in call.cond_rows.tolist()]


#: ``runtime.scratch`` key set while the negative prefix's own call runs: the prefix processors record into it.
PREFIX_RECORDING = "causal_prefix_recording"
#: ``runtime.cache`` key of the recorded negative prefix (per generation).
NEGATIVE_PREFIX = "causal_prefix"


class PrefixKeysValues:
    """One layer's prefix keys and values, filled by the stock processor (``store``) and read back (``get``)
    in the shape the model's own per-layer key/value cache has."""

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def store(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys, self.values = keys, values

    def get(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys is None or self.values is None:
            raise RuntimeError("NAG's negative prefix has no keys/values for this layer")
        return self.keys, self.values


class CausalPrefixAttentionNAG(NAGProcessor):
    """Attention over one causal sequence ``[text with condition images, target image]`` (Qwen-Image 2.1's
    block-causal processor, layout ``"prefix"``).

    While the negative prompt's own call runs (``runtime.scratch[PREFIX_RECORDING]`` set), the stock processor
    runs as in the model's cache-filling step and this layer's prefix keys/values and the prefix's key mask are
    recorded (the engine adds the target image's rotary table at the negative layout's positions). In a guided call the stock processor runs twice: the
    guided rows' target-image tokens alone, at the negative call's target positions, attending to
    ``[recorded negative prefix, themselves]`` (the model's cached-decode step: ``Z-``), then the stock call
    with the guided rows' target-image ``Z+`` replaced by the NAG combination before the output projection.
    The text and the stock rows are never touched.
    """

    role = "causal_prefix"

    def __call__(self, attn: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        recording = self.runtime.scratch.get(PREFIX_RECORDING)
        if recording is None or self.runtime.call is not None:
            return super().__call__(attn, *args, **kwargs)
        arguments = dict(self._signature.bind(attn, *args, **kwargs).arguments)
        segments = arguments.get("segments")
        prefix_len = segments[-1][1] if segments else 0
        layer = PrefixKeysValues()
        recording.setdefault("layers", {})[attn] = layer
        key_valid = arguments.get("key_valid")
        recording.setdefault("prefix_key_valid", key_valid[:, :prefix_len] if key_valid is not None else None)
        return self.run_stock(attn, arguments, layer_cache=layer, kv_cache_mode="extract",
                              cache_write_slice=slice(0, prefix_len))

    def guided(self, attn: torch.nn.Module, call: "GuidedCall", arguments: dict[str, Any]) -> Any:
        prefix = self.runtime.cache[NEGATIVE_PREFIX]
        hidden = arguments["hidden_states"]
        start = hidden.shape[1] - call.image_lengths[0]
        key_valid = prefix["key_valid"]

        def run_negative(view: Any) -> Any:
            return self.run_stock(
                view, arguments, hidden_states=hidden[call.cond_rows, start:], rotary_emb=prefix["rotary"],
                attention_mask=None if key_valid is None else key_valid[:, None, None, :],
                layer_cache=prefix["layers"][attn], kv_cache_mode="cached", cache_write_slice=None, segments=None,
                key_valid=None,
            )

        def run_positive(view: Any) -> Any:
            return self.run_stock(view, arguments)

        _, positive = self.guided_projection_inputs(attn, call, run_negative, run_positive, start, 0)
        return positive


class _AttributeView:
    """Stands in for a module, with some attributes replaced."""

    def __init__(self, module: torch.nn.Module, **replaced: Any):
        object.__setattr__(self, "_module", module)
        for name, value in replaced.items():
            object.__setattr__(self, name, value)

    def __getattr__(self, name: str) -> Any:
        return getattr(object.__getattribute__(self, "_module"), name)


class FastCausalPrefixAttentionNAG(CausalPrefixAttentionNAG):
    """:class:`CausalPrefixAttentionNAG` without projecting the target-image tokens twice: the stock call runs first,
    its query/key/value projections of the guided rows' target tokens are kept, and at its output projection the
    negative pass runs on them (the model's cached-decode step with the kept projections), giving ``Z-`` to combine
    with ``Z+`` there."""

    def guided(self, attn: torch.nn.Module, call: "GuidedCall", arguments: dict[str, Any]) -> Any:
        prefix = self.runtime.cache[NEGATIVE_PREFIX]
        hidden = arguments["hidden_states"]
        start = hidden.shape[1] - call.image_lengths[0]
        key_valid = prefix["key_valid"]
        kept: dict[str, torch.Tensor] = {}
        project = attn.to_out[0]

        def keeping(name: str) -> _ProjectionTap:
            layer = getattr(attn, name)

            def run(x: torch.Tensor) -> torch.Tensor:
                out = layer(x)
                kept[name] = out[call.cond_rows, start:]
                return out

            return _ProjectionTap(layer, run)

        def kept_projection(name: str) -> _ProjectionTap:
            return _ProjectionTap(getattr(attn, name), lambda x: kept[name])

        def combine(z: torch.Tensor) -> torch.Tensor:
            negative: dict[str, torch.Tensor] = {}

            def capture(z_negative: torch.Tensor) -> torch.Tensor:
                negative["z"] = z_negative
                return z_negative  # (the negative pass's output is not used)

            view = _AttributeView(attn, to_q=kept_projection("to_q"), to_k=kept_projection("to_k"),
                                  to_v=kept_projection("to_v"), to_out=[_ProjectionTap(project, capture), *attn.to_out[1:]])
            self.run_stock(
                view, arguments, hidden_states=hidden[call.cond_rows, start:], rotary_emb=prefix["rotary"],
                attention_mask=None if key_valid is None else key_valid[:, None, None, :],
                layer_cache=prefix["layers"][attn], kv_cache_mode="cached", cache_write_slice=None, segments=None,
                key_valid=None,
            )
            z = z.clone()
            z[call.cond_rows, start:] = self.combine(call, z[call.cond_rows, start:], negative["z"])
            return project(z)

        view = _AttributeView(attn, to_q=keeping("to_q"), to_k=keeping("to_k"), to_v=keeping("to_v"),
                              to_out=[_ProjectionTap(project, combine), *attn.to_out[1:]])
        return self.run_stock(view, arguments)


def _branch_mask(mask: torch.Tensor, rows: slice, text_len: int, padded_text_len: int) -> torch.Tensor:
    """One branch's rows of a mask over ``[padded text, image]`` (keys on the last axis, queries
    on the one before when it has that length), restricted to ``[text[:text_len], image]``."""
    if mask.shape[0] > 1:
        mask = mask[rows]
    if text_len == padded_text_len:
        return mask
    length = mask.shape[-1]
    keep = torch.cat([torch.arange(text_len), torch.arange(padded_text_len, length)]).to(mask.device)
    mask = mask.index_select(-1, keep)
    if mask.ndim >= 3 and mask.shape[-2] == length:
        mask = mask.index_select(-2, keep)
    return mask


class HiDreamJointAttentionNAG(NAGProcessor):
    """HiDream's double-stream attention on whole negative rows (layout ``"concat"``): ``HiDreamAttnProcessor``
    joins ``[image, text]`` with separate text projections, and its output projections are single linear layers,
    ``attn.to_out`` for the image tokens and ``attn.to_out_t`` for the text. Its per-row inputs, the image key mask
    ``hidden_states_masks`` and the rotary tables over ``[image, text]``, have a row for every row of the call.

    The stock processor runs once on the stock rows and once on the negative rows, whose image tokens, key mask
    and rotary tables are the guided rows': the negative text attends to ``[guided image, negative text]``. ``Z-``
    is captured at ``attn.to_out`` and the guided rows' ``Z+`` combined there; the negative rows' image output is
    the guided rows'. Positive and negative text have the same length (``Family.equal_text_lengths``).
    """

    role = "hidream_joint"
    per_row_arguments = ("hidden_states_masks", "image_rotary_emb")

    def per_row_inputs(self, call: "GuidedCall", arguments: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """The per-row arguments for the stock rows and for the negative rows (the guided rows' own)."""
        total = arguments["hidden_states"].shape[0]
        positive, negative = {}, {}
        for name in self.per_row_arguments:
            value = arguments.get(name)
            if isinstance(value, torch.Tensor) and value.shape[0] == total:
                positive[name], negative[name] = value[: call.batch], value[call.cond_rows]
            elif name in arguments:  # None, or one row for all
                positive[name] = negative[name] = value
        return positive, negative

    def guided(self, attn: torch.nn.Module, call: "GuidedCall", arguments: dict[str, Any]) -> Any:
        b, rows = call.batch, call.cond_rows
        image, text = arguments["hidden_states"][:b], arguments["encoder_hidden_states"]
        positive_inputs, negative_inputs = self.per_row_inputs(call, arguments)

        def run_negative(view: Any) -> Any:
            return self.run_stock(view, arguments, hidden_states=image[rows], encoder_hidden_states=text[b:],
                                  **negative_inputs)

        def run_positive(view: Any) -> Any:
            return self.run_stock(view, arguments, hidden_states=image, encoder_hidden_states=text[:b], **positive_inputs)

        negative, positive = self.guided_projection_inputs(attn, call, run_negative, run_positive)
        image_out = positive[0]
        return torch.cat([image_out, image_out[rows]]), torch.cat([positive[1], negative[1]])


class HiDreamSingleAttentionNAG(HiDreamJointAttentionNAG):
    """HiDream's single-stream attention on whole negative rows: the block's stream ``[image, text]`` (joined by
    the model, ``call.text_lengths`` text tokens per row) with shared projections and one output projection
    ``attn.to_out`` over all tokens; the key mask covers the whole stream.

    The negative rows' stream is ``[guided image, negative text]``, with the guided rows' key mask and rotary
    tables; ``Z-`` is captured at the output projection and the guided rows' image tokens (the first ones) are
    combined there; the negative rows' image output is the guided rows'."""

    role = "hidream_single"

    def guided(self, attn: torch.nn.Module, call: "GuidedCall", arguments: dict[str, Any]) -> Any:
        b, rows = call.batch, call.cond_rows
        stream = arguments["hidden_states"]
        image_len = stream.shape[1] - call.text_lengths[0]
        negative_stream = torch.cat([stream[:b][rows, :image_len], stream[b:, image_len:]], dim=1)
        positive_inputs, negative_inputs = self.per_row_inputs(call, arguments)
        negative, positive = self.guided_projection_inputs(
            attn, call, lambda view: self.run_stock(view, arguments, hidden_states=negative_stream, **negative_inputs),
            lambda view: self.run_stock(view, arguments, hidden_states=stream[:b], **positive_inputs), image_len=image_len,
        )
        return torch.cat([positive, torch.cat([positive[rows, :image_len], negative[:, image_len:]], dim=1)])


# ---------------------------------------------------------------------------------------------
# Fast paths: NAG-aware attention math for the stock processors we know. Image tokens are
# projected once; cross-attention caches the negative keys/values for the generation; joint
# attention computes image->image attention once and merges it by log-sum-exp with
# image->positive-text and image->negative-text attention. Anything else falls back to the
# straightforward wrappers above.
# ---------------------------------------------------------------------------------------------

_CROSS_FLAT_NORM = {
    "AttnProcessor2_0": False,
    "SanaAttnProcessor2_0": True,
    "WanAttnProcessor": True,
    "SkyReelsV2AttnProcessor": True,
    "LTXVideoAttnProcessor": True,
    "LTX2AudioVideoAttnProcessor": True,  # (text cross-attention: no rotary tables; optional per-head output gates)
}
_JOINT_PROCESSORS = {"FluxAttnProcessor", "JointAttnProcessor2_0", "Flux2AttnProcessor", "QwenDoubleStreamAttnProcessor2_0"}
# Joint processors whose rotary tables come as (image, text) instead of one table over [text, image].
_SPLIT_ROTARY_PROCESSORS = {"QwenDoubleStreamAttnProcessor2_0"}
# Cross-attention processors that also attend to an image context placed before the text
# (Wan-style image-to-video): NAG guides the text branch; the image branch is added unguided.
_IMAGE_CONTEXT_PROCESSORS = {"WanAttnProcessor", "SkyReelsV2AttnProcessor"}


def _default_backend(stock: Any) -> bool:
    """Whether the stock processor would run diffusers' default (native) attention: only then
    may a fast path compute attention with its own kernels."""
    if getattr(stock, "_attention_backend", None) not in (None, "native") or getattr(stock, "_parallel_config", None):
        return False
    try:
        from diffusers.models.attention_dispatch import _AttentionBackendRegistry
    except ImportError:  # pragma: no cover - older diffusers: no dispatcher, processors use SDPA
        return True
    return _AttentionBackendRegistry._active_backend == "native"


def _split_heads(attn: Any, x: torch.Tensor, norm: Any, flat_norm: bool) -> torch.Tensor:
    """``(B, L, H*D)`` -> ``(B, L, H, D)`` with the module's q/k norm where the stock processor puts it."""
    if norm is not None and flat_norm:
        x = norm(x)
    x = x.unflatten(-1, (attn.heads, -1))
    if norm is not None and not flat_norm:
        x = norm(x)
    return x


def _qkv(attn: Any, x: torch.Tensor, fused: str, names: tuple[str, str, str]) -> tuple[torch.Tensor, ...]:
    if getattr(attn, "fused_projections", False) and getattr(attn, fused, None) is not None:
        return getattr(attn, fused)(x).chunk(3, dim=-1)
    return tuple(getattr(attn, name)(x) for name in names)


def _image_qkv(attn: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v = _qkv(attn, x, "to_qkv", ("to_q", "to_k", "to_v"))
    return (_split_heads(attn, q, attn.norm_q, False), _split_heads(attn, k, attn.norm_k, False),
            v.unflatten(-1, (attn.heads, -1)))


def _text_qkv(attn: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v = _qkv(attn, x, "to_added_qkv", ("add_q_proj", "add_k_proj", "add_v_proj"))
    return (_split_heads(attn, q, attn.norm_added_q, False), _split_heads(attn, k, attn.norm_added_k, False),
            v.unflatten(-1, (attn.heads, -1)))


def _rotate(x: torch.Tensor, rotary: Any, start: int, stop: int | None) -> torch.Tensor:
    from diffusers.models.embeddings import apply_rotary_emb

    cos, sin = rotary
    return apply_rotary_emb(x, (cos[start:stop], sin[start:stop]), sequence_dim=1)


class FastCrossAttentionNAG(CrossAttentionNAG):
    """Cross-attention fast path: one query and one output projection; the negative keys/values
    are projected once per generation (the negative context does not change between steps)."""

    def _supported(self, attn: Any, hidden: torch.Tensor) -> bool:
        return (
            self.stock_kind in _CROSS_FLAT_NORM
            and _default_backend(self.stock)
            and hidden.ndim == 3
            and getattr(attn, "spatial_norm", None) is None
            and getattr(attn, "group_norm", None) is None
            and not getattr(attn, "norm_cross", None)
            and (getattr(attn, "add_k_proj", None) is None or self.stock_kind in _IMAGE_CONTEXT_PROCESSORS)
        )

    def _mask(self, attn: Any, mask: torch.Tensor | None, rows: int) -> torch.Tensor | None:
        if mask is None:
            return None
        keys = mask.shape[-1]
        mask = attn.prepare_attention_mask(mask, keys, rows)
        return mask.view(rows, attn.heads, -1, keys)

    def guided(self, attn: torch.nn.Module, call: "GuidedCall", arguments: dict[str, Any]) -> Any:
        hidden, context = arguments["hidden_states"], arguments.get("encoder_hidden_states")
        rotary = arguments.get("query_rotary_emb") is not None or arguments.get("key_rotary_emb") is not None
        if context is None or rotary or not self._supported(attn, hidden):
            return super().guided(attn, call, arguments)
        flat = _CROSS_FLAT_NORM[self.stock_kind]
        split = context.shape[1] - call.negative_text_len
        mask = arguments.get("attention_mask")
        rows = hidden.shape[0]
        # Image context (image-to-video) precedes the text: [image, positive text, negative text].
        image_len = split - call.positive_text_len if getattr(attn, "add_k_proj", None) is not None else 0

        query = _split_heads(attn, attn.to_q(hidden), attn.norm_q, flat)
        positive = context[:, image_len:split]
        key = _split_heads(attn, attn.to_k(positive), attn.norm_k, flat)
        value = attn.to_v(positive).unflatten(-1, (attn.heads, -1))

        negative = context[call.cond_rows, split:]
        cache_key = (id(attn), "negative_kv", tuple(negative.shape), negative.dtype, negative.device)
        cached = self.runtime.cache.get(cache_key) if call.static_negative else None
        if cached is None:
            cached = (
                _split_heads(attn, attn.to_k(negative), attn.norm_k, flat),
                attn.to_v(negative).unflatten(-1, (attn.heads, -1)),
            )
            if call.static_negative:
                self.runtime.cache[cache_key] = cached
        negative_key, negative_value = cached

        positive_mask = negative_mask = None
        if mask is not None:
            positive_mask = self._mask(attn, mask[..., :split], rows)
            negative_mask = self._mask(attn, _split_rows(mask[..., split:], call.cond_rows), len(call.cond_rows))
        z = attention(query, key, value, positive_mask)
        z_negative = attention(query[call.cond_rows], negative_key, negative_value, negative_mask)
        if getattr(attn, "to_gate_logits", None) is not None:  # LTX-2: per-head output gates from the queries' input
            gates = 2.0 * torch.sigmoid(attn.to_gate_logits(hidden)).unsqueeze(-1)
            z, z_negative = z * gates, z_negative * gates[call.cond_rows]
        z, z_negative = z.flatten(2), z_negative.flatten(2)
        z[call.cond_rows] = self.combine(call, z[call.cond_rows], z_negative)
        if image_len:
            image = context[:, :image_len]
            image_key = attn.norm_added_k(attn.add_k_proj(image)).unflatten(-1, (attn.heads, -1))
            image_value = attn.add_v_proj(image).unflatten(-1, (attn.heads, -1))
            z = z + attention(query, image_key, image_value).flatten(2)

        out = attn.to_out[1](attn.to_out[0](z))
        if getattr(attn, "residual_connection", False):
            out = out + hidden
        return out / getattr(attn, "rescale_output_factor", 1.0)


def _text_and_image_key_mask(text_mask: torch.Tensor | None, image_len: int) -> torch.Tensor | None:
    """A ``(rows, 1, 1, text + image)`` boolean key mask: the text's own, every image key valid."""
    if text_mask is None:
        return None
    valid = text_mask.bool()
    return torch.cat([valid, valid.new_ones(valid.shape[0], image_len)], dim=1)[:, None, None, :]


def _guided_image_and_text(
    processor: NAGProcessor,
    call: "GuidedCall",
    image: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    positive_text: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    negative_text: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    positive_mask: torch.Tensor | None = None,
    negative_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Joint attention for the guided call, every image token projected and attended once.

    ``positive_mask`` / ``negative_mask``: ``(rows, text)`` key masks of each branch's text (its own length; every
    image key valid, as Qwen-Image's processor builds its joint mask). Returns the guided image rows' attention
    output (NAG applied to the conditional rows) and the positive and negative text queries' outputs, all with
    heads flattened.
    """
    rows = call.cond_rows
    qi, ki, vi = image
    qp, kp, vp = (t[:, : call.positive_text_len] for t in positive_text)
    qn, kn, vn = (t[:, : call.negative_text_len] for t in negative_text)
    if positive_mask is not None:
        positive_mask = positive_mask[:, : call.positive_text_len]
    if negative_mask is not None:
        negative_mask = negative_mask[:, : call.negative_text_len]

    image_image, lse_image = attention_with_lse(qi, ki, vi)
    image_positive, lse_positive = attention_with_lse_over_valid_keys(qi, kp, vp, positive_mask)
    image_negative, lse_negative = attention_with_lse_over_valid_keys(qi[rows], kn, vn, negative_mask)
    z = merge_attention(image_image, lse_image, image_positive, lse_positive).flatten(2)
    z_negative = merge_attention(image_image[rows], lse_image[rows], image_negative, lse_negative).flatten(2)
    z[rows] = processor.combine(call, z[rows], z_negative)

    image_len = qi.shape[1]
    text_positive = attention(qp, torch.cat([kp, ki], dim=1), torch.cat([vp, vi], dim=1),
                              _text_and_image_key_mask(positive_mask, image_len)).flatten(2)
    text_negative = attention(qn, torch.cat([kn, ki[rows]], dim=1), torch.cat([vn, vi[rows]], dim=1),
                              _text_and_image_key_mask(negative_mask, image_len)).flatten(2)
    return z, text_positive, text_negative


class FastJointAttentionNAG(JointAttentionNAG):
    """Joint attention fast path (Flux double-stream, SD3): projections once per token,
    image->image attention once, merged by log-sum-exp with each branch's image->text attention."""

    def guided(self, attn: torch.nn.Module, call: "GuidedCall", arguments: dict[str, Any]) -> Any:
        if self.stock_kind not in _JOINT_PROCESSORS or not _default_backend(self.stock) or arguments.get("attention_mask") is not None:
            return super().guided(attn, call, arguments)
        hidden, text = arguments["hidden_states"], arguments["encoder_hidden_states"]
        rotary = arguments.get(self.rotary_argument)
        padded = text.shape[1]
        qi, ki, vi = _image_qkv(attn, hidden)
        qt, kt, vt = _text_qkv(attn, text)
        if rotary is not None and self.stock_kind in _SPLIT_ROTARY_PROCESSORS:  # (image, text) tables, complex
            from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

            image_table, text_table = rotary
            qi, ki = (apply_rotary_emb_qwen(x, image_table, use_real=False) for x in (qi, ki))
            qt, kt = (apply_rotary_emb_qwen(x, text_table[:padded], use_real=False) for x in (qt, kt))
        elif rotary is not None:
            qi, ki = _rotate(qi, rotary, padded, None), _rotate(ki, rotary, padded, None)
            qt, kt = _rotate(qt, rotary, 0, padded), _rotate(kt, rotary, 0, padded)
        b = call.batch
        mask = arguments.get(self.text_mask_argument)
        z, text_positive, text_negative = _guided_image_and_text(
            self, call, (qi, ki, vi), (qt[:b], kt[:b], vt[:b]), (qt[b:], kt[b:], vt[b:]),
            *((mask[:b], mask[b:]) if mask is not None else ()),
        )
        image_out = attn.to_out[1](attn.to_out[0](z.to(hidden.dtype)))
        text_out = torch.cat([pad_tokens(text_positive, padded), pad_tokens(text_negative, padded)])
        if getattr(attn, "to_add_out", None) is not None and not getattr(attn, "context_pre_only", False):
            text_out = attn.to_add_out(text_out)
        return image_out, text_out


def _single_stream_attention(
    processor: NAGProcessor, call: "GuidedCall", qkv: Any, negative_qkv: Any, rotary: Any, padded: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A single-stream block's attention on the stock rows ``[text (padded), image]`` with the negative text rows
    beside them (queries/keys/values of each, rotary tables over ``[text, image]``): the stock rows' output with NAG
    on the guided rows' image tokens, and the negative text's output, both with heads flattened, text padded."""
    (q, k, v), (qn, kn, vn) = qkv, negative_qkv
    if rotary is not None:
        q, k = _rotate(q, rotary, 0, None), _rotate(k, rotary, 0, None)
        qn, kn = _rotate(qn, rotary, 0, padded), _rotate(kn, rotary, 0, padded)
    image = (q[:, padded:], k[:, padded:], v[:, padded:])
    text = (q[:, :padded], k[:, :padded], v[:, :padded])
    z, text_positive, text_negative = _guided_image_and_text(processor, call, image, text, (qn, kn, vn))
    return torch.cat([pad_tokens(text_positive, padded), z], dim=1), pad_tokens(text_negative, padded)


class FastSingleStreamAttentionNAG(SingleStreamAttentionNAG):
    """Flux single-stream fast path: the block runs on the stock rows only; the negative text
    rows' modulated input arrives through ``runtime.scratch`` (set by the block hook), and their
    attention output leaves the same way. No image token is duplicated."""

    split_text_processors = frozenset({"FluxAttnProcessor"})

    def guided(self, attn: torch.nn.Module, call: "GuidedCall", arguments: dict[str, Any]) -> Any:
        state = self.runtime.scratch.get("single_block")
        if state is None:
            return super().guided(attn, call, arguments)
        hidden = arguments["hidden_states"]
        rotary = arguments.get(self.rotary_argument)
        padded = call.padded_text_len
        attended, text_negative = _single_stream_attention(
            self, call, _image_qkv(attn, hidden), _image_qkv(attn, state["normed"]), rotary, padded)
        state["attention"] = text_negative
        return attended.to(hidden.dtype)


def _fused_qkv_mlp(attn: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A parallel block's fused input projection: query/key/value heads (with their norms) and the MLP half."""
    fused = attn.to_qkv_mlp_proj(x)
    qkv, mlp = fused.split([3 * attn.inner_dim, fused.shape[-1] - 3 * attn.inner_dim], dim=-1)
    q, k, v = (t.unflatten(-1, (-1, attn.head_dim)) for t in qkv.chunk(3, dim=-1))
    return attn.norm_q(q), attn.norm_k(k), v, mlp


class FastFusedSingleAttentionNAG(FusedSingleAttentionNAG):
    """FLUX.2 single-stream fast path: the block runs on the stock rows only; the negative text rows' modulated
    input arrives through ``runtime.scratch`` (set by the joined-block hook), and their output (attention and MLP
    through the fused output projection) leaves the same way. Image tokens are projected and attended once
    (image->image attention merged by log-sum-exp with each branch's image->text attention)."""

    split_text_processors = frozenset({"Flux2ParallelSelfAttnProcessor"})

    def guided(self, attn: torch.nn.Module, call: "GuidedCall", arguments: dict[str, Any]) -> Any:
        state = self.runtime.scratch.get("single_block")
        if state is None or arguments.get("attention_mask") is not None:
            return super().guided(attn, call, arguments)
        hidden = arguments["hidden_states"]
        rotary = arguments.get(self.rotary_argument)
        padded = call.text_prefix + call.padded_text_len
        *qkv, mlp = _fused_qkv_mlp(attn, hidden)
        *negative_qkv, mlp_negative = _fused_qkv_mlp(attn, state["normed"])
        attended, text_negative = _single_stream_attention(self, call, qkv, negative_qkv, rotary, padded)
        attended = attended.to(hidden.dtype)
        state["attention"] = attn.to_out(torch.cat([text_negative.to(hidden.dtype), attn.mlp_act_fn(mlp_negative)], dim=-1))
        return attn.to_out(torch.cat([attended, attn.mlp_act_fn(mlp)], dim=-1))


def _image_part_is_one(mask: torch.Tensor, image_start: int) -> bool:
    """Whether a ``(rows, text + image)`` mask is boolean or floating with every image token's entry True / 1."""
    image = mask[:, image_start:]
    if mask.dtype == torch.bool:
        return bool(image.all())
    return mask.is_floating_point() and bool((image == 1).all())


def _outer_mask_row(mask: torch.Tensor, image_start: int) -> torch.Tensor | None:
    """For a ``(rows, 1, L, L)`` block mask built as Chroma's blocks build theirs, the outer product
    ``m[:, None, None, :] * m[:, None, :, None]`` of a ``(rows, L)`` mask ``m`` over ``[text, image]``: the first
    image query's row when its image part is all ones (True). Then ``m``'s image part is one value ``c`` with
    ``c * c = 1``, every image query has that row, and its outer product is the block mask again: the ``(rows, L)``
    mask the fast path works from. None for any other form."""
    if mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[2] != mask.shape[3] or not 0 <= image_start < mask.shape[3]:
        return None
    row = mask[:, 0, image_start]
    return row if _image_part_is_one(row, image_start) else None


def _outer_mask_parts(mask: torch.Tensor, text_len: int, image_start: int) -> tuple[torch.Tensor, float, torch.Tensor]:
    """One branch's attention masks from its ``(rows, L)`` mask ``m`` over ``[padded text, image]`` (image part all
    ones / True), as the outer product ``m_query * m_key`` gives them for ``[text[:text_len], image]``: the image
    queries' additive bias over the text keys (``(rows, text_len)``, float32; 0 / ``-inf`` for a boolean mask), the
    bias they add to every image key (1 for a float mask, 0 for a boolean one), and the text queries' mask
    ``(rows, 1, text_len, text_len + image)`` in the mask's dtype (SDPA adds a float one, a boolean one masks)."""
    text = mask[:, :text_len]
    keys = torch.cat([text, mask[:, image_start:]], dim=1)
    text_queries = keys[:, None, None, :] * text[:, None, :, None]
    if mask.dtype == torch.bool:
        bias = torch.zeros(text.shape, device=mask.device, dtype=torch.float32).masked_fill(~text, float("-inf"))
        return bias, 0.0, text_queries
    return text.float(), 1.0, text_queries


def _guided_image_and_text_outer_mask(
    processor: NAGProcessor,
    call: "GuidedCall",
    image: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    positive_text: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    negative_text: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    text_lengths: tuple[int, int],
    positive_mask: torch.Tensor | None,
    negative_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_guided_image_and_text` for blocks whose attention mask is the outer product of a ``(rows, L)`` mask
    over ``[padded text, image]`` (Chroma): ``positive_mask`` / ``negative_mask`` are each branch's ``(rows, L)``
    masks (image part all ones / True; None: no mask), ``text_lengths`` the branches' own text lengths.

    The image queries' scores get the same bias from every image key (float: +1, boolean: none), added to the
    image->image log-sum-exp, and a per-key bias from the text keys (:func:`attention_with_lse_and_key_bias`), so
    image->image attention is still computed once and merged; the text queries attend to ``[own text, guided image]``
    under their rows of the outer product, as the stock processor gives them."""
    rows = call.cond_rows
    (qi, ki, vi), (lp, ln) = image, text_lengths
    image_start = positive_text[0].shape[1]
    qp, kp, vp = (t[:, :lp] for t in positive_text)
    qn, kn, vn = (t[:, :ln] for t in negative_text)
    key_bias_p, image_bias_p, text_mask_p = (
        _outer_mask_parts(positive_mask, lp, image_start) if positive_mask is not None else (None, 0.0, None))
    key_bias_n, image_bias_n, text_mask_n = (
        _outer_mask_parts(negative_mask, ln, image_start) if negative_mask is not None else (None, 0.0, None))

    image_image, lse_image = attention_with_lse(qi, ki, vi)
    image_positive, lse_positive = attention_with_lse_and_key_bias(qi, kp, vp, key_bias_p)
    image_negative, lse_negative = attention_with_lse_and_key_bias(qi[rows], kn, vn, key_bias_n)
    z = merge_attention(image_image, lse_image + image_bias_p, image_positive, lse_positive).flatten(2)
    z_negative = merge_attention(image_image[rows], lse_image[rows] + image_bias_n, image_negative, lse_negative).flatten(2)
    z[rows] = processor.combine(call, z[rows], z_negative)

    text_positive = attention(qp, torch.cat([kp, ki], dim=1), torch.cat([vp, vi], dim=1), text_mask_p).flatten(2)
    text_negative = attention(qn, torch.cat([kn, ki[rows]], dim=1), torch.cat([vn, vi[rows]], dim=1),
                              text_mask_n).flatten(2)
    return z, text_positive, text_negative


def _rows_of(mask: torch.Tensor | None, rows: int) -> torch.Tensor | None:
    """A ``(1 or rows, L)`` mask with ``rows`` rows."""
    return mask.expand(rows, -1) if mask is not None and mask.shape[0] == 1 else mask


class FastOuterMaskJointAttentionNAG(RowsJointAttentionNAG):
    """Chroma double-stream fast path (``FluxAttnProcessor``, the image stream at the stock batch: the text holds the
    stock rows and one negative row per guided row): every token projected once, image->image attention once,
    merged by log-sum-exp with each branch's image->text attention, under the block's mask, the outer product of the
    model's ``(rows, text + image)`` mask (see :func:`_guided_image_and_text_outer_mask`). Masks whose image part is
    not all ones (True), other processors and attention backends take the straightforward wrapper."""

    def guided(self, attn: torch.nn.Module, call: "GuidedCall", arguments: dict[str, Any]) -> Any:
        hidden, text = arguments["hidden_states"], arguments.get("encoder_hidden_states")
        mask = arguments.get(self.mask_argument)
        b = call.batch
        if (self.stock_kind != "FluxAttnProcessor" or not _default_backend(self.stock) or text is None
                or hidden.shape[0] != b or call.text_prefix):
            return super().guided(attn, call, arguments)
        padded = text.shape[1]
        if mask is not None:
            if mask.ndim != 4 or mask.shape[0] not in (1, text.shape[0]) or mask.shape[-1] != padded + hidden.shape[1]:
                return super().guided(attn, call, arguments)
            mask = _rows_of(_outer_mask_row(mask, padded), text.shape[0])
            if mask is None:
                return super().guided(attn, call, arguments)
        rotary = arguments.get(self.rotary_argument)
        qi, ki, vi = _image_qkv(attn, hidden)
        qt, kt, vt = _text_qkv(attn, text)
        if rotary is not None:
            qi, ki = _rotate(qi, rotary, padded, None), _rotate(ki, rotary, padded, None)
            qt, kt = _rotate(qt, rotary, 0, padded), _rotate(kt, rotary, 0, padded)
        z, text_positive, text_negative = _guided_image_and_text_outer_mask(
            self, call, (qi, ki, vi), (qt[:b], kt[:b], vt[:b]), (qt[b:], kt[b:], vt[b:]),
            (call.positive_text_len, call.negative_text_len),
            mask[:b] if mask is not None else None, mask[b:] if mask is not None else None,
        )
        image_out = attn.to_out[1](attn.to_out[0](z.to(hidden.dtype)))
        text_out = torch.cat([pad_tokens(text_positive, padded), pad_tokens(text_negative, padded)])
        return image_out, attn.to_add_out(text_out.to(hidden.dtype))


class FastOuterMaskSingleAttentionNAG(SingleStreamAttentionNAG):
    """Chroma single-stream fast path (``FluxAttnProcessor``): the block runs on the stock rows only; the negative
    rows' modulated text arrives through ``runtime.scratch`` (set by the joined-block hook) with their rows of the
    model's ``(rows, text + image)`` mask, and their attention output leaves the same way. No image token is
    duplicated; attention as in :func:`_guided_image_and_text_outer_mask`, under the block's mask (the outer product
    of the stock rows' mask) and the outer product of the negative rows' mask."""

    split_text_processors = frozenset({"FluxAttnProcessor"})

    def takes_split_mask(self, call: "GuidedCall", mask: torch.Tensor) -> bool:
        """Whether this path can serve the block's ``(rows, text + image)`` mask argument: boolean or floating, every
        image token's entry True / 1 (the Chroma pipeline's float 0/1 mask); the text part may be anything."""
        return mask.ndim == 2 and _image_part_is_one(mask, call.text_prefix + call.padded_text_len)

    def guided(self, attn: torch.nn.Module, call: "GuidedCall", arguments: dict[str, Any]) -> Any:
        state = self.runtime.scratch.get("single_block")
        if state is None:
            return super().guided(attn, call, arguments)
        hidden = arguments["hidden_states"]
        rotary = arguments.get(self.rotary_argument)
        prefix = call.text_prefix
        padded = prefix + call.padded_text_len
        mask, negative_mask = arguments.get(self.mask_argument), state.get("mask")
        if (mask is None) != (negative_mask is None):
            raise RuntimeError("NAG's fast path got a mask for only one branch of a single-stream block")
        if mask is not None:
            if mask.shape[-1] != hidden.shape[1] or negative_mask.shape[-1] != hidden.shape[1]:
                raise ValueError(
                    f"the attention mask covers {negative_mask.shape[-1]} tokens but the block's [text, image] has "
                    f"{hidden.shape[1]}; pass a (batch, text + image) mask"
                )
            mask = _rows_of(_outer_mask_row(mask, padded), hidden.shape[0])
            if mask is None:
                raise RuntimeError(
                    f"NAG's fast path expected the block to hand {type(attn).__name__} the outer product of its "
                    "(rows, text + image) mask; apply NAG with fast=False for this model"
                )
        q, k, v = _image_qkv(attn, hidden)
        qn, kn, vn = _image_qkv(attn, state["normed"])
        if rotary is not None:
            q, k = _rotate(q, rotary, 0, None), _rotate(k, rotary, 0, None)
            qn, kn = _rotate(qn, rotary, 0, padded), _rotate(kn, rotary, 0, padded)
        z, text_positive, text_negative = _guided_image_and_text_outer_mask(
            self, call, (q[:, padded:], k[:, padded:], v[:, padded:]), (q[:, :padded], k[:, :padded], v[:, :padded]),
            (qn, kn, vn), (prefix + call.positive_text_len, prefix + call.negative_text_len),
            mask, _rows_of(negative_mask, len(call.cond_rows)),
        )
        state["attention"] = pad_tokens(text_negative, padded)
        return torch.cat([pad_tokens(text_positive, padded), z], dim=1).to(hidden.dtype)


def _rotate_complex(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotary embedding from a complex table ``(B, L, D/2)`` (Z-Image's ``freqs_cis``), as its processor applies it."""
    with torch.amp.autocast("cuda", enabled=False):
        rotated = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2)) * table.unsqueeze(2)
        return torch.view_as_real(rotated).flatten(3).type_as(x)


def _unguided_ranges(rows: int, guided: Any) -> list[slice]:
    """The rows ``range(rows)`` not in ``guided``, as runs of consecutive rows (slices: no index tensor to copy)."""
    runs: list[slice] = []
    start = None
    for row in range(rows + 1):
        if row < rows and row not in guided:
            start = row if start is None else start
        elif start is not None:
            runs.append(slice(start, row))
            start = None
    return runs


def _project_out(attn: Any, z: torch.Tensor) -> torch.Tensor:
    """An attention module's output projection (and its dropout, when it has one)."""
    out = attn.to_out[0](z)
    return attn.to_out[1](out) if len(attn.to_out) > 1 else out


class FastRowsPerSampleImageFirstAttentionNAG(RowsPerSampleImageFirstAttentionNAG):
    """Z-Image main-block fast path: the block runs on the stock rows only (each ``[image, caption, padding]``); the
    negative rows' captions arrive beside them through ``runtime.scratch`` (set by the sample-block hook: modulated
    input, rotary tables, lengths), and their attention output leaves the same way. Every image token is projected
    once. For each guided row, image->image attention is computed once and merged by log-sum-exp with
    image->caption attention (``Z+``) and image->negative-caption attention (``Z-``); the negative caption's queries
    attend to ``[guided image, negative caption]``, the guided image with its own tables, the caption with its own
    row's (as the straightforward path gives them). The other stock rows get the stock attention with their mask."""

    split_text_processors = frozenset({"ZSingleStreamAttnProcessor"})

    def guided(self, attn: torch.nn.Module, call: "GuidedCall", arguments: dict[str, Any]) -> Any:
        state = self.runtime.scratch.get("single_block")
        if state is None:
            return super().guided(attn, call, arguments)
        hidden = arguments["hidden_states"]
        mask, rotary = arguments.get("attention_mask"), arguments.get(self.rotary_kwarg)
        q, k, v = _image_qkv(attn, hidden)
        qn, kn, vn = _image_qkv(attn, state["normed"])
        if rotary is not None:
            q, k = _rotate_complex(q, rotary), _rotate_complex(k, rotary)
        if state["rotary"] is not None:
            qn, kn = _rotate_complex(qn, state["rotary"]), _rotate_complex(kn, state["rotary"])
        negative_of = {r: j for j, r in enumerate(state["guided_rows"])}
        z = q.new_zeros(q.shape)
        for rows in _unguided_ranges(hidden.shape[0], negative_of):  # (the unconditional rows with CFG): stock attention
            key_mask = mask[rows][:, None, None, :] if mask is not None and mask.ndim == 2 else mask
            z[rows] = attention(q[rows], k[rows], v[rows], key_mask)
        z = z.flatten(2)
        z_negative = qn.new_zeros(qn.shape).flatten(2)
        for r, j in negative_of.items():
            image, valid = call.image_lengths[r], call.image_lengths[r] + call.text_lengths[r]
            length = state["spans"][j][1]
            qi, ki, vi = q[r : r + 1, :image], k[r : r + 1, :image], v[r : r + 1, :image]
            kt, vt = kn[j : j + 1, :length], vn[j : j + 1, :length]
            image_image, lse_image = attention_with_lse(qi, ki, vi)
            image_positive, lse_positive = attention_with_lse(qi, k[r : r + 1, image:valid], v[r : r + 1, image:valid])
            image_negative, lse_negative = attention_with_lse(qi, kt, vt)
            z_positive = merge_attention(image_image, lse_image, image_positive, lse_positive).flatten(2)
            z_guided = merge_attention(image_image, lse_image, image_negative, lse_negative).flatten(2)
            z[r, :image] = self.combine(call, z_positive, z_guided)[0]
            # the caption's (and the row padding's) queries over the row's valid keys, as the stock mask has it
            z[r, image:] = attention(q[r : r + 1, image:], k[r : r + 1, :valid], v[r : r + 1, :valid]).flatten(2)[0]
            z_negative[j, :length] = attention(qn[j : j + 1, :length], torch.cat([ki, kt], dim=1),
                                               torch.cat([vi, vt], dim=1)).flatten(2)[0]
        state["attention"] = _project_out(attn, z_negative.to(hidden.dtype))
        return _project_out(attn, z.to(hidden.dtype))


def _lumina2_qkv(attn: Any, x: torch.Tensor, table: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries, keys and values ``(B, L, heads, D)`` as ``Lumina2AttnProcessor2_0`` makes them: q/k norms, the complex
    rotary table, the key/value heads repeated over the query heads (grouped-query attention)."""
    q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
    head_dim = q.shape[-1] // attn.heads
    q, k, v = q.unflatten(-1, (attn.heads, head_dim)), k.unflatten(-1, (-1, head_dim)), v.unflatten(-1, (-1, head_dim))
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    if table is not None:
        q, k = _rotate_complex(q, table), _rotate_complex(k, table)
    repeats = attn.heads // k.shape[2]
    if repeats > 1:
        k, v = k.repeat_interleave(repeats, dim=2), v.repeat_interleave(repeats, dim=2)
    return q.to(x.dtype), k.to(x.dtype), v


def _merged_with_keys(q: torch.Tensor, base: torch.Tensor, base_lse: torch.Tensor, k: torch.Tensor,
                      v: torch.Tensor) -> torch.Tensor:
    """Attention of ``q`` over the keys behind ``(base, base_lse)`` and ``k``/``v`` (none: ``base`` itself)."""
    if k.shape[1] == 0:
        return base
    out, lse = attention_with_lse(q, k, v)
    return merge_attention(base, base_lse, out, lse)


class FastRowsPerSampleAttentionNAG(RowsPerSampleAttentionNAG):
    """Lumina2 joint-layer fast path: the block runs on the stock rows only (each ``[caption, image, padding]``,
    ``Family.sample_blocks`` with ``sample_text_first``); the negative rows' captions arrive beside them through
    ``runtime.scratch`` (set by the sample-block hook: modulated input, rotary tables, lengths), and their attention
    output leaves the same way. Every image token is projected once. For each guided row, image->image attention is
    computed once and merged by log-sum-exp with image->caption attention (``Z+``) and image->negative-caption
    attention (``Z-``); the negative caption's queries attend to ``[negative caption, guided image]``, the caption
    with its own row's rotary tables, the guided image with the guided row's (as the straightforward path gives
    them). The other stock rows get the stock attention with their mask."""

    split_text_processors = frozenset({"Lumina2AttnProcessor2_0"})

    def guided(self, attn: torch.nn.Module, call: "GuidedCall", arguments: dict[str, Any]) -> Any:
        state = self.runtime.scratch.get("single_block")
        if state is None:
            return super().guided(attn, call, arguments)
        hidden = arguments["hidden_states"]
        if arguments.get("encoder_hidden_states") is not hidden or arguments.get("base_sequence_length") is not None:
            raise RuntimeError("NAG's Lumina2 fast path serves the blocks' self-attention at the default softmax scale "
                               "only; apply NAG with fast=False")
        mask, lengths = arguments.get("attention_mask"), call.text_lengths
        rows = hidden.shape[0]
        image_len = hidden.shape[1] - max(lengths[:rows])
        q, k, v = _lumina2_qkv(attn, hidden, arguments.get(self.rotary_kwarg))
        qn, kn, vn = _lumina2_qkv(attn, state["normed"], state["rotary"])
        negative_of = {r: j for j, r in enumerate(state["guided_rows"])}
        z = q.new_zeros(q.shape)
        for unguided in _unguided_ranges(rows, negative_of):  # (the unconditional rows with CFG): stock attention
            key_mask = mask[unguided].bool()[:, None, None, :] if mask is not None else None
            z[unguided] = attention(q[unguided], k[unguided], v[unguided], key_mask)
        z = z.flatten(2)
        z_negative = qn.new_zeros(qn.shape).flatten(2)
        for r, j in negative_of.items():
            text, valid, length = lengths[r], lengths[r] + image_len, state["spans"][j][1]
            qi, ki, vi = q[r : r + 1, text:valid], k[r : r + 1, text:valid], v[r : r + 1, text:valid]
            kt, vt = kn[j : j + 1, :length], vn[j : j + 1, :length]
            image_image, lse_image = attention_with_lse(qi, ki, vi)
            z_positive = _merged_with_keys(qi, image_image, lse_image, k[r : r + 1, :text], v[r : r + 1, :text])
            z_guided = _merged_with_keys(qi, image_image, lse_image, kt, vt)
            z[r, text:valid] = self.combine(call, z_positive.flatten(2), z_guided.flatten(2))[0]
            # the caption's (and the row padding's) queries over the row's valid keys, as the stock mask has it
            others = torch.cat([q[r : r + 1, :text], q[r : r + 1, valid:]], dim=1)
            if others.shape[1]:
                out = attention(others, k[r : r + 1, :valid], v[r : r + 1, :valid]).flatten(2)[0]
                z[r, :text], z[r, valid:] = out[:text], out[text:]
            if length:
                z_negative[j, :length] = attention(qn[j : j + 1, :length], torch.cat([kt, ki], dim=1),
                                                   torch.cat([vt, vi], dim=1)).flatten(2)[0]
        state["attention"] = _project_out(attn, z_negative.to(hidden.dtype))
        return _project_out(attn, z.to(hidden.dtype))


class FastRowsJointAttentionNAG(RowsJointAttentionNAG):
    """AuraFlow joint-block fast path (``AuraFlowAttnProcessor2_0``, the image stream at the stock batch: the text
    holds the stock rows and one negative row per guided row, each ``[register tokens, text]``): every token projected
    once, image->image attention once, merged by log-sum-exp with each branch's image->text attention (each branch's
    own text length after the shared registers). Other processors, attention backends, masks and whole image rows
    take the straightforward wrapper."""

    def guided(self, attn: torch.nn.Module, call: "GuidedCall", arguments: dict[str, Any]) -> Any:
        hidden, text = arguments["hidden_states"], arguments.get("encoder_hidden_states")
        b = call.batch
        if (self.stock_kind != "AuraFlowAttnProcessor2_0" or not _default_backend(self.stock) or text is None
                or hidden.shape[0] != b or arguments.get(self.mask_argument) is not None):
            return super().guided(attn, call, arguments)
        padded, prefix = text.shape[1], call.text_prefix
        lengths = dataclasses.replace(call, positive_text_len=prefix + call.positive_text_len,
                                      negative_text_len=prefix + call.negative_text_len)
        qt, kt, vt = _text_qkv(attn, text)
        z, text_positive, text_negative = _guided_image_and_text(
            self, lengths, _image_qkv(attn, hidden), (qt[:b], kt[:b], vt[:b]), (qt[b:], kt[b:], vt[b:]))
        image_out = attn.to_out[1](attn.to_out[0](z.to(hidden.dtype)))
        text_out = torch.cat([pad_tokens(attn.to_add_out(text_positive.to(text.dtype)), padded),
                              pad_tokens(attn.to_add_out(text_negative.to(text.dtype)), padded)])
        return image_out, text_out


class FastSingleProjectedAttentionNAG(SingleProjectedAttentionNAG):
    """AuraFlow single-block fast path (``AuraFlowAttnProcessor2_0``): the block runs on the stock rows only, each
    ``[register tokens, text (padded), image]``; the negative rows' modulated ``[register tokens, text]`` arrives
    through ``runtime.scratch`` (set by the joined-block hook) and its attention output (output projection included)
    leaves the same way. No image token is duplicated; image->image attention is computed once and merged by
    log-sum-exp with each branch's image->text attention."""

    split_text_processors = frozenset({"AuraFlowAttnProcessor2_0"})

    def guided(self, attn: torch.nn.Module, call: "GuidedCall", arguments: dict[str, Any]) -> Any:
        state = self.runtime.scratch.get("single_block")
        if state is None:
            return super().guided(attn, call, arguments)
        hidden = arguments["hidden_states"]
        prefix = call.text_prefix
        padded, lp, ln = prefix + call.padded_text_len, prefix + call.positive_text_len, prefix + call.negative_text_len
        lengths = dataclasses.replace(call, positive_text_len=lp, negative_text_len=ln)
        q, k, v = _image_qkv(attn, hidden)
        z, text_positive, text_negative = _guided_image_and_text(
            self, lengths, (q[:, padded:], k[:, padded:], v[:, padded:]), (q[:, :padded], k[:, :padded], v[:, :padded]),
            _image_qkv(attn, state["normed"]))
        out = _project_out(attn, torch.cat([text_positive, z], dim=1).to(hidden.dtype))
        state["attention"] = pad_tokens(_project_out(attn, text_negative.to(hidden.dtype)), padded)
        return torch.cat([pad_tokens(out[:, :lp], padded), out[:, lp:]], dim=1)


def _text_key_mask(mask: torch.Tensor | None, image_len: int, rows: int) -> torch.Tensor | None:
    """The text keys' part ``(rows, text)`` of a boolean key mask over ``[image, text]`` shaped ``(rows or 1, 1, 1,
    keys)`` (as HunyuanVideo and HunyuanImage build it: every image key valid, the text's valid tokens first), or of
    a text-only one shaped ``(rows or 1, text)`` (HunyuanVideo 1.5's); None without a mask."""
    if mask is None:
        return None
    return (mask if mask.ndim == 2 else mask[:, 0, 0, image_len:]).expand(rows, -1)


def _is_image_first_key_mask(mask: torch.Tensor | None, image_len: int, text_len: int) -> bool:
    if mask is None:
        return True
    if mask.dtype != torch.bool:
        return False
    if mask.ndim == 2:
        return mask.shape[1] == text_len
    return mask.ndim == 4 and mask.shape[1] == 1 and mask.shape[2] == 1 and mask.shape[3] == image_len + text_len


# Processors over [image, text] whose math the image-first fast path reproduces: the text's keys take a key mask
# (HunyuanVideo 1.5's processor also masks the padding text tokens' queries, whose outputs no valid token reads).
_IMAGE_FIRST_PROCESSORS = {"HunyuanVideoAttnProcessor2_0", "HunyuanImageAttnProcessor", "HunyuanVideo15AttnProcessor2_0"}


class FastRowsImageFirstAttentionNAG(RowsImageFirstAttentionNAG):
    """HunyuanVideo / HunyuanImage 2.1 / HunyuanVideo 1.5 fast path (their stock processors, ``_IMAGE_FIRST_PROCESSORS``,
    on the default attention backend), with the image stream at the stock batch (``Family.stock_image_entry``): every
    image token is projected once, and for the guided rows image->image attention is computed once and merged by
    log-sum-exp with image->text attention (``Z+``) and image->negative-text attention (``Z-``), each over its own
    valid text keys. Text the model adds to the input text before its padding (the byT5 stream, the image embedding)
    is part of each branch's text.

    - Double blocks (separate text projections): the text holds the stock rows and one negative row per guided row;
      the negative text queries attend to ``[guided video, negative text]``.
    - Single blocks (shared projections, no output projection): the block runs on the stock rows; the negative rows'
      modulated text and their key mask arrive through ``runtime.scratch`` (``Family.image_first_blocks``), and their
      attention output leaves the same way.

    Anything else (another processor or backend, the video on whole negative rows) takes the straightforward path.
    """

    split_text_processors = frozenset(_IMAGE_FIRST_PROCESSORS)

    def guided(self, attn: torch.nn.Module, call: "GuidedCall", arguments: dict[str, Any]) -> Any:
        state = self.runtime.scratch.get("single_block")
        hidden, text = arguments["hidden_states"], arguments.get("encoder_hidden_states")
        mask = arguments.get("attention_mask")
        b, negative_rows = call.batch, len(call.cond_rows)
        separate = getattr(attn, "add_q_proj", None) is not None
        if separate:
            supported = (state is None and self.takes_split_text() and text is not None and hidden.shape[0] == b
                         and text.shape[0] == b + negative_rows and text.shape[1] >= call.padded_text_len
                         and _is_image_first_key_mask(mask, hidden.shape[1], text.shape[1]))
            if not supported:
                return super().guided(attn, call, arguments)
        elif state is None:
            return super().guided(attn, call, arguments)
        elif not all(_is_image_first_key_mask(m, hidden.shape[1], text.shape[1])
                     for m in (mask, state["inputs"].get("attention_mask"))):
            raise NotImplementedError(
                f"NAG's fast path takes a boolean (batch, 1, 1, keys) attention mask in {type(attn).__name__}, as the "
                "model builds it; apply NAG with fast=False for other masks"
            )
        image_len, padded = hidden.shape[1], text.shape[1]
        extra = padded - call.padded_text_len  # (the model's own text before the padding NAG added: both branches')
        if extra:
            call = dataclasses.replace(call, positive_text_len=call.positive_text_len + extra,
                                       negative_text_len=call.negative_text_len + extra)
        rotary = arguments.get("image_rotary_emb")
        qi, ki, vi = _image_qkv(attn, hidden)
        if rotary is not None:
            qi, ki = _rotate(qi, rotary, 0, None), _rotate(ki, rotary, 0, None)
        if separate:
            qt, kt, vt = _text_qkv(attn, text)
            positive, negative = (qt[:b], kt[:b], vt[:b]), (qt[b:], kt[b:], vt[b:])
            text_mask = _text_key_mask(mask, image_len, b + negative_rows)
            masks = (text_mask[:b], text_mask[b:]) if text_mask is not None else (None, None)
        else:
            positive, negative = _image_qkv(attn, text), _image_qkv(attn, state["normed"])
            masks = (_text_key_mask(mask, image_len, b),
                     _text_key_mask(state["inputs"].get("attention_mask"), image_len, negative_rows))
        z, text_positive, text_negative = _guided_image_and_text(self, call, (qi, ki, vi), positive, negative, *masks)
        z = z.to(qi.dtype)
        text_positive, text_negative = pad_tokens(text_positive, padded), pad_tokens(text_negative, padded)
        if not separate:
            state["attention"] = text_negative.to(qi.dtype)
            return z, text_positive.to(qi.dtype)
        if getattr(attn, "to_out", None) is not None:
            z = attn.to_out[1](attn.to_out[0](z))
        text_out = torch.cat([text_positive, text_negative]).to(qi.dtype)
        if getattr(attn, "to_add_out", None) is not None:
            text_out = attn.to_add_out(text_out)
        return z, text_out


# Processors that join [text, image] with shared projections (output projection included), whose fast path the
# shared-rows class below serves: name -> how the rotary tables pair a head's features (``use_real_unbind_dim``).
_SHARED_PROCESSORS = {"CogView4AttnProcessor": -2, "CogVideoXAttnProcessor2_0": -1}
# ... of which those that take a (rows, text) text mask and attend under its outer product with [text, image] (the
# others take no mask in the fast path)
_SHARED_TEXT_MASK_PROCESSORS = {"CogView4AttnProcessor"}


def _shared_outer_mask(text_mask: torch.Tensor | None, rows: int, image_len: int, dtype: torch.dtype) -> torch.Tensor | None:
    """The ``(rows, text + image)`` 0/1 mask (in the queries' ``dtype``, as the processor casts it) whose outer product
    ``CogView4AttnProcessor`` builds from its ``(rows, text)`` text mask (every image token valid)."""
    if text_mask is None:
        return None
    valid = (_rows_of(text_mask, rows).float() > 0).to(dtype)
    return torch.cat([valid, valid.new_ones(rows, image_len)], dim=1)


class FastRowsSharedAttentionNAG(RowsSharedAttentionNAG):
    """CogView4 and CogVideoX fast path (``CogView4AttnProcessor``, ``CogVideoXAttnProcessor2_0`` on the default
    attention backend): the block runs on the stock rows (``Family.image_first_blocks``; CogView4 keeps the image
    stream at the stock batch from the patch embedding on, ``Family.stock_image_entry``); the negative rows' modulated
    text (and CogView4's text mask) arrive through ``runtime.scratch``, and their attention output (after the shared
    output projection) leaves the same way. Every token is projected once; image->image attention
    is computed once and merged by log-sum-exp with image->text attention (``Z+``) and image->negative-text attention
    (``Z-``), under the processor's mask (the outer product of ``[text mask, image ones]``, a float 0/1 mask that SDPA
    adds: see :func:`_guided_image_and_text_outer_mask`). Anything else takes the straightforward wrapper."""

    split_text_processors = frozenset(_SHARED_PROCESSORS)

    def guided(self, attn: torch.nn.Module, call: "GuidedCall", arguments: dict[str, Any]) -> Any:
        state = self.runtime.scratch.get("single_block")
        if state is None:
            return super().guided(attn, call, arguments)
        from diffusers.models.embeddings import apply_rotary_emb

        hidden, text = arguments["hidden_states"], arguments["encoder_hidden_states"]
        negative_text = state["normed"]
        dtype, (b, image_len), padded = text.dtype, hidden.shape[:2], text.shape[1]
        negative_rows = negative_text.shape[0]
        for mask in (arguments.get("attention_mask"), state["inputs"].get("attention_mask")):
            if mask is not None and self.stock_kind not in _SHARED_TEXT_MASK_PROCESSORS:
                raise NotImplementedError(f"NAG's fast path takes no attention mask in {type(attn).__name__} with "
                                          f"{self.stock_kind}; apply NAG with fast=False to pass one")
            if mask is not None and (mask.ndim != 2 or mask.shape[-1] != padded):
                raise ValueError(f"NAG expects a (batch, text tokens) attention mask of {padded} tokens in "
                                 f"{type(attn).__name__}, got shape {tuple(mask.shape)}")

        def qkv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            q, k, v = _image_qkv(attn, x)
            return q.to(dtype), k.to(dtype), v

        qi, ki, vi = qkv(hidden)
        rotary = arguments.get("image_rotary_emb")
        if rotary is not None:
            unbind = _SHARED_PROCESSORS[self.stock_kind]
            qi, ki = (apply_rotary_emb(x, rotary, use_real_unbind_dim=unbind, sequence_dim=1) for x in (qi, ki))
        # a missing mask is an all-ones one (the same +1 on every key of a query: no change)
        positive_mask = _shared_outer_mask(arguments.get("attention_mask"), b, image_len, dtype)
        negative_mask = _shared_outer_mask(state["inputs"].get("attention_mask"), negative_rows, image_len, dtype)
        if (positive_mask is None) != (negative_mask is None):
            positive_mask = positive_mask if positive_mask is not None else _shared_outer_mask(
                text.new_ones(b, padded), b, image_len, dtype)
            negative_mask = negative_mask if negative_mask is not None else _shared_outer_mask(
                text.new_ones(negative_rows, padded), negative_rows, image_len, dtype)
        z, text_positive, text_negative = _guided_image_and_text_outer_mask(
            self, call, (qi, ki, vi), qkv(text), qkv(negative_text),
            (call.positive_text_len, call.negative_text_len), positive_mask, negative_mask,
        )
        state["attention"] = pad_tokens(_project_out(attn, text_negative.to(dtype)), padded)
        return _project_out(attn, z.to(dtype)), pad_tokens(_project_out(attn, text_positive.to(dtype)), padded)


# HiDream-I1 fast paths (``HiDreamAttnProcessor``): the blocks run on the stock rows and the negative text beside them
# (``Family.image_first_blocks`` for the double-stream blocks, ``Family.sample_blocks`` for the single-stream ones).
_HIDREAM_PROCESSORS = {"HiDreamAttnProcessor"}


def _hidream_qkv(attn: Any, x: torch.Tensor, key_mask: torch.Tensor | None = None, text: bool = False):
    """Queries, keys and values of ``x`` (heads split) as ``HiDreamAttnProcessor`` builds them: RMS-normed queries
    and keys (the ``*_t`` projections for a double-stream block's text), keys multiplied by the ``(rows, tokens)``
    key mask."""
    suffix = "_t" if text else ""
    dtype = x.dtype
    q = getattr(attn, "q_rms_norm" + suffix)(getattr(attn, "to_q" + suffix)(x)).to(dtype=dtype)
    k = getattr(attn, "k_rms_norm" + suffix)(getattr(attn, "to_k" + suffix)(x)).to(dtype=dtype)
    v = getattr(attn, "to_v" + suffix)(x)
    q, k, v = (t.unflatten(-1, (attn.heads, -1)) for t in (q, k, v))
    if key_mask is not None:
        k = k * key_mask[:, :, None, None]
    return q, k, v


def _hidream_rope(q: torch.Tensor, k: torch.Tensor, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """HiDream's rotary embedding of some tokens (``table``: their rows of the tables, which act on each token
    alone): every feature of a head, or the first half when the tables cover half a head, as the processor does."""
    from diffusers.models.transformers.transformer_hidream_image import apply_rope

    if q.shape[-1] == table.shape[-3] * 2:
        return apply_rope(q, k, table)
    (q1, q2), (k1, k2) = q.chunk(2, dim=-1), k.chunk(2, dim=-1)
    q1, k1 = apply_rope(q1, k1, table)
    return torch.cat([q1, q2], dim=-1), torch.cat([k1, k2], dim=-1)


def _guided_rows_of(table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The guided rows of a per-row table (a table of one row serves every row)."""
    return table if table.shape[0] == 1 else table[rows]


class FastHiDreamJointAttentionNAG(HiDreamJointAttentionNAG):
    """HiDream double-stream fast path: the block runs on the stock rows only (``Family.image_first_blocks``); the
    negative text's modulated input arrives through ``runtime.scratch`` (set by the block hook) and its attention
    output (after ``attn.to_out_t``) leaves the same way. Every image token is projected once: image->image attention is computed
    once and merged by log-sum-exp with image->positive-text attention (``Z+``) and image->negative-text attention
    (``Z-``); the negative text attends to ``[guided image, negative text]`` with the guided rows' key mask and
    rotary tables (as the straightforward path gives them)."""

    split_text_processors = frozenset(_HIDREAM_PROCESSORS)

    def guided(self, attn: torch.nn.Module, call: "GuidedCall", arguments: dict[str, Any]) -> Any:
        state = self.runtime.scratch.get("single_block")
        if state is None:
            return super().guided(attn, call, arguments)
        image, text = arguments["hidden_states"], arguments["encoder_hidden_states"]
        mask, rotary = arguments.get("hidden_states_masks"), arguments["image_rotary_emb"]
        rows, image_len = call.cond_rows, image.shape[1]
        qi, ki, vi = _hidream_qkv(attn, image, mask)
        qt, kt, vt = _hidream_qkv(attn, text, text=True)
        qn, kn, vn = _hidream_qkv(attn, state["normed"], text=True)
        qi, ki = _hidream_rope(qi, ki, rotary[:, :image_len])
        qt, kt = _hidream_rope(qt, kt, rotary[:, image_len:])
        qn, kn = _hidream_rope(qn, kn, _guided_rows_of(rotary, rows)[:, image_len:])
        # (the blocks' text, T5 and Llama-3 tokens, has the same length in both branches: no padding to cut)
        lengths = dataclasses.replace(call, positive_text_len=text.shape[1], negative_text_len=text.shape[1])
        z, text_positive, text_negative = _guided_image_and_text(self, lengths, (qi, ki, vi), (qt, kt, vt), (qn, kn, vn))
        state["attention"] = attn.to_out_t(text_negative.to(image.dtype))
        return attn.to_out(z.to(image.dtype)), attn.to_out_t(text_positive.to(image.dtype))


class FastHiDreamSingleAttentionNAG(HiDreamSingleAttentionNAG):
    """HiDream single-stream fast path: the block runs on the stock rows only, each ``[image, text]``
    (``Family.sample_blocks``); the negative text's modulated input arrives through ``runtime.scratch`` (set by the
    block hook) and its attention output (after ``attn.to_out``) leaves the same way. Every image token is projected
    once, image->image attention computed once and merged by log-sum-exp with each branch's image->text attention."""

    split_text_processors = frozenset(_HIDREAM_PROCESSORS)

    def guided(self, attn: torch.nn.Module, call: "GuidedCall", arguments: dict[str, Any]) -> Any:
        state = self.runtime.scratch.get("single_block")
        if state is None:
            return super().guided(attn, call, arguments)
        stream = arguments["hidden_states"]
        mask, rotary = arguments.get("hidden_states_masks"), arguments["image_rotary_emb"]
        rows = call.cond_rows
        negative = state["normed"]
        image_len = stream.shape[1] - negative.shape[1]
        q, k, v = _hidream_qkv(attn, stream, mask)
        q, k = _hidream_rope(q, k, rotary)
        qn, kn, vn = _hidream_qkv(attn, negative, _guided_rows_of(mask, rows)[:, image_len:] if mask is not None else None)
        qn, kn = _hidream_rope(qn, kn, _guided_rows_of(rotary, rows)[:, image_len:])
        lengths = dataclasses.replace(call, positive_text_len=negative.shape[1], negative_text_len=negative.shape[1])
        z, text_positive, text_negative = _guided_image_and_text(
            self, lengths, (q[:, :image_len], k[:, :image_len], v[:, :image_len]),
            (q[:, image_len:], k[:, image_len:], v[:, image_len:]), (qn, kn, vn))
        state["attention"] = attn.to_out(text_negative.to(stream.dtype))
        return attn.to_out(torch.cat([z, text_positive], dim=1).to(stream.dtype))
