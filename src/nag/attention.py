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

import inspect
from typing import TYPE_CHECKING, Any, Callable

import torch

from .combine import nag_combine

if TYPE_CHECKING:  # pragma: no cover
    from .engine import GuidedCall, NAGRuntime


class _OutputProjectionView:
    """Stands in for an attention module, routing its ``to_out[0]`` through ``project``."""

    def __init__(self, module: torch.nn.Module, project: Callable[[torch.Tensor], torch.Tensor]):
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "to_out", [project, *list(module.to_out)[1:]])

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


def pad_tokens(x: torch.Tensor, length: int) -> torch.Tensor:
    if x.shape[1] == length:
        return x
    return torch.cat([x, x.new_zeros(x.shape[0], length - x.shape[1], *x.shape[2:])], dim=1)


class NAGProcessor:
    """Base wrapper: binds the stock processor's arguments by name and dispatches."""

    role = "base"

    def __init__(self, stock: Any, runtime: "NAGRuntime"):
        self.stock = stock
        self.runtime = runtime
        self._signature = inspect.signature(stock.__call__)

    def __call__(self, attn: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        call = self.runtime.call
        if call is None:
            return self.stock(attn, *args, **kwargs)
        bound = self._signature.bind(attn, *args, **kwargs)
        return self.guided(attn, call, dict(bound.arguments))

    def run_stock(self, attn: Any, arguments: dict[str, Any], **changes: Any) -> Any:
        arguments = {**arguments, **changes}
        arguments.pop("attn", None)
        extra = arguments.pop("kwargs", {}) if "kwargs" in self._signature.parameters else {}
        return self.stock(attn, **arguments, **extra)

    def combine(self, call: "GuidedCall", z_positive: torch.Tensor, z_negative: torch.Tensor) -> torch.Tensor:
        s = self.runtime.settings
        return nag_combine(z_positive, z_negative, s.scale, s.tau, s.alpha, norm=s.norm, eps=s.eps)

    def guided_projection_inputs(
        self, attn: torch.nn.Module, call: "GuidedCall", run_negative: Callable[[Any], Any], run_positive: Callable[[Any], Any]
    ) -> tuple[Any, Any]:
        """Run the negative pass capturing ``Z-`` at the output projection, then the positive pass
        with the guided rows' ``Z+`` replaced by the NAG combination."""
        captured: dict[str, torch.Tensor] = {}
        project = attn.to_out[0]

        def capture(z: torch.Tensor) -> torch.Tensor:
            captured["z"] = z
            return project(z)

        def combine(z: torch.Tensor) -> torch.Tensor:
            z = z.clone()
            z[call.cond_rows] = self.combine(call, z[call.cond_rows], captured["z"])
            return project(z)

        negative = run_negative(_OutputProjectionView(attn, capture))
        positive = run_positive(_OutputProjectionView(attn, combine))
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

    def guided(self, attn: torch.nn.Module, call: "GuidedCall", arguments: dict[str, Any]) -> Any:
        text = arguments["encoder_hidden_states"]
        hidden = arguments["hidden_states"]
        rotary = arguments.get(self.rotary_argument)
        padded = text.shape[1]
        extra: dict[str, Any] = {}

        def rotary_for(text_len: int) -> dict[str, Any]:
            if self.rotary_argument not in arguments:
                return {}
            return {self.rotary_argument: _slice_text_rotary(rotary, text_len, padded)}

        def run_negative(view: Any) -> Any:
            return self.run_stock(
                view,
                arguments,
                hidden_states=hidden[call.cond_rows],
                encoder_hidden_states=text[call.batch :, : call.negative_text_len],
                **rotary_for(call.negative_text_len),
                **extra,
            )

        def run_positive(view: Any) -> Any:
            return self.run_stock(
                view,
                arguments,
                encoder_hidden_states=text[: call.batch, : call.positive_text_len],
                **rotary_for(call.positive_text_len),
                **extra,
            )

        negative, positive = self.guided_projection_inputs(attn, call, run_negative, run_positive)
        image_out, positive_text_out = positive[0], positive[1]
        negative_text_out = negative[1]
        if positive_text_out is None:
            return image_out, None
        text_out = torch.cat([pad_tokens(positive_text_out, padded), pad_tokens(negative_text_out, padded)], dim=0)
        return (image_out, text_out, *positive[2:])


class SingleStreamAttentionNAG(NAGProcessor):
    """Attention over a block's own concatenation ``[text, image]`` with shared projections and no
    output projection inside the processor (Flux single-stream blocks).

    The block's input holds the stock rows followed by one row per guided row carrying the
    negative text; that row's image part is replaced by the guided stream's, so the negative text
    attends to ``[negative text, image]`` with the guided image's keys/values.
    """

    role = "single"
    rotary_argument = "image_rotary_emb"

    def guided(self, attn: torch.nn.Module, call: "GuidedCall", arguments: dict[str, Any]) -> Any:
        hidden = arguments["hidden_states"]
        rotary = arguments.get(self.rotary_argument)
        padded = call.padded_text_len
        lp, ln, b = call.positive_text_len, call.negative_text_len, call.batch

        def rotary_for(text_len: int) -> dict[str, Any]:
            if self.rotary_argument not in arguments:
                return {}
            return {self.rotary_argument: _slice_text_rotary(rotary, text_len, padded)}

        image = hidden[:b, padded:]
        positive_in = torch.cat([hidden[:b, :lp], image], dim=1) if lp != padded else hidden[:b]
        negative_in = torch.cat([hidden[b:, :ln], image[call.cond_rows]], dim=1)
        negative_out = self.run_stock(attn, arguments, hidden_states=negative_in, **rotary_for(ln))
        positive_out = self.run_stock(attn, arguments, hidden_states=positive_in, **rotary_for(lp))

        image_out = positive_out[:, lp:].clone()
        image_out[call.cond_rows] = self.combine(call, image_out[call.cond_rows], negative_out[:, ln:])
        text_out = torch.cat([pad_tokens(positive_out[:, :lp], padded), pad_tokens(negative_out[:, :ln], padded)])
        return torch.cat([text_out, torch.cat([image_out, image_out[call.cond_rows]])], dim=1)
