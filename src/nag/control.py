"""Control models whose output the denoiser adds to its text tokens too (Z-Image's ControlNet).

A pipeline with such a model calls it right before the denoiser, every step, with the denoiser's own inputs
(latents, timestep, text) and a control image; it returns hints, one ``(rows, tokens, width)`` tensor per
denoiser layer, that the denoiser adds to its whole per-row ``[image, caption]`` sequence. On families whose
negative prompt travels as whole extra rows (layout ``"concat"``), the negative rows carry the negative text
through every layer: they get the hints the control model gives for the guided rows' latents, timestep and
control with the negative text, as the model would for the negative prompt. The stock rows keep the stock
hints, unchanged (padded with zeros to the longer rows: padding the model never reads back). The control
image is never text: it reaches the control model as the pipeline passes it.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .attention import pad_tokens
from .hooks import unwrap_compiled
from .state import NAGRuntime, inert_copy

__all__ = ["ControlModel", "CONTROL_MODELS", "ControlAttachment", "attach_control"]


@dataclass(frozen=True)
class ControlModel:
    """How one control model's output reaches the denoiser.

    Attributes:
        hints_kwarg: the denoiser argument taking the control model's output (``{layer: (rows, tokens, width)}``).
        image_kwarg / text_kwarg: the latents and text arguments the control model shares with the denoiser.
        row_kwargs: its further per-row arguments (tensors with the rows first, or per-row lists), taken from the
            guided rows for the negative rows; the other arguments are passed as the pipeline passed them.
    """

    hints_kwarg: str
    image_kwarg: str
    text_kwarg: str
    row_kwargs: tuple[str, ...]


CONTROL_MODELS: dict[str, ControlModel] = {
    "ZImageControlNetModel": ControlModel(
        hints_kwarg="controlnet_block_samples",
        image_kwarg="x",
        text_kwarg="cap_feats",
        row_kwargs=("t", "control_context"),
    ),
}


def _pick_rows(value: Any, rows: list[int], batch: int) -> Any:
    if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == batch:
        return value[rows]
    if isinstance(value, (list, tuple)) and len(value) == batch:
        return [value[r] for r in rows]
    return value


def _same_tensors(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_tensors(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_tensors(x, y) for x, y in zip(a, b))
    return False


class ControlAttachment:
    """Hooks on a control model and its denoiser; ``remove()`` takes them off."""

    def __init__(self, control: torch.nn.Module, denoiser: torch.nn.Module, runtime: NAGRuntime, adapter: ControlModel):
        self.control = control
        self.adapter = adapter
        self.runtime = runtime
        self._control_signature = inspect.signature(control.forward)
        self._denoiser_signature = inspect.signature(denoiser.forward)
        self._last: tuple[dict[str, Any], Any] | None = None  # the control model's latest call: (arguments, output)
        runtime.control_attached = True
        self._running = False
        # the denoiser hook runs after NAG's own pre-hook (registered before it, prepended): it sees the extended call
        self._hooks = [
            control.register_forward_hook(self._remember, with_kwargs=True),
            denoiser.register_forward_pre_hook(self._extend_hints, with_kwargs=True),
        ]

    def __reduce_ex__(self, protocol: Any) -> tuple:
        """Copies of the models (deepcopy, torch.save) carry hooks that do nothing (``inert_copy``)."""
        state = {"runtime": NAGRuntime(self.runtime.settings), "_running": True, "_last": None}
        return inert_copy, (type(self), state)

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self._last = None
        self.runtime.control_attached = False

    @contextlib.contextmanager
    def _own_call(self) -> Iterator[None]:
        self._running = True
        try:
            yield
        finally:
            self._running = False

    def _remember(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if not self._running:
            self._last = (dict(self._control_signature.bind(*args, **kwargs).arguments), output)

    def _extend_hints(self, module: torch.nn.Module, args: tuple, kwargs: dict):
        """A guided denoiser call (NAG's negative rows appended): hints for the negative rows too."""
        call = self.runtime.call
        if call is None:
            return None
        adapter = self.adapter
        bound = self._denoiser_signature.bind_partial(*args, **kwargs)
        arguments = bound.arguments
        hints = arguments.get(adapter.hints_kwarg)
        if hints is None:
            return None
        last, self._last = self._last, None
        control_name, denoiser_name = type(self.control).__name__, type(module).__name__
        if last is None or not _same_tensors(last[1], hints):
            raise RuntimeError(
                f"NAG: the `{adapter.hints_kwarg}` of this {denoiser_name} call are not the output of the latest "
                f"{control_name} call; NAG runs the {control_name} for its negative rows with that call's inputs. Call "
                f"the {control_name} right before the {denoiser_name}, with the same latents, and pass its output "
                "as is."
            )
        control_arguments, _ = last
        stock_images = arguments[adapter.image_kwarg][: call.batch]
        if not _same_tensors(list(control_arguments[adapter.image_kwarg]), list(stock_images)):
            raise RuntimeError(
                f"NAG: the latest {control_name} call had other `{adapter.image_kwarg}` than this {denoiser_name} "
                f"call; NAG needs the {control_name} called with the {denoiser_name}'s own inputs"
            )
        rows = call.guided_rows
        negative_call = dict(control_arguments)
        negative_call[adapter.image_kwarg] = [control_arguments[adapter.image_kwarg][r] for r in rows]
        negative_call[adapter.text_kwarg] = list(arguments[adapter.text_kwarg][call.batch :])
        for key in adapter.row_kwargs:
            negative_call[key] = _pick_rows(control_arguments.get(key), rows, call.batch)
        with self._own_call():
            negative_hints = self.control(**negative_call)
        extended = {}
        for key, stock in hints.items():
            negative = negative_hints[key].to(stock.dtype)
            length = max(stock.shape[1], negative.shape[1])
            extended[key] = torch.cat([pad_tokens(stock, length), pad_tokens(negative, length)])
        arguments[adapter.hints_kwarg] = extended
        return bound.args, bound.kwargs


def attach_control(control: torch.nn.Module, denoiser: torch.nn.Module, runtime: NAGRuntime) -> ControlAttachment:
    """Give NAG's negative rows the control model's output for their own text (see the module docstring)."""
    control = unwrap_compiled(control)
    adapter = next((CONTROL_MODELS[c.__name__] for c in type(control).__mro__ if c.__name__ in CONTROL_MODELS), None)
    if adapter is None:
        raise NotImplementedError(
            f"NAG does not support the control model {type(control).__name__}; supported: {', '.join(CONTROL_MODELS)}"
        )
    return ControlAttachment(control, unwrap_compiled(denoiser), runtime, adapter)
