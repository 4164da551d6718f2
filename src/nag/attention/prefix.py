"""Causal prefix: attention in block-causal single-stream models (layout ``"prefix"``: Qwen-Image 2.1), where the
negative prompt's prefix runs in a call of its own and the guided rows' image queries attend to its recorded
keys/values in every layer."""

from __future__ import annotations

from typing import Any

import torch

from ..state import GuidedCall, PrefixKeysValues
from .base import NAGProcessor, ProjectionTap, StandIn


class CausalPrefixAttentionNAG(NAGProcessor):
    """Attention over one causal sequence ``[text with condition images, target image]`` (Qwen-Image 2.1's
    block-causal processor, layout ``"prefix"``).

    While the negative prompt's own call runs (``runtime.prefix_recording`` set), the stock processor
    runs as in the model's cache-filling step and this layer's prefix keys/values and the prefix's key mask are
    recorded (the hooks add the target image's rotary table at the negative layout's positions). In a guided call
    the stock processor runs twice: the guided rows' target-image tokens alone, at the negative call's target
    positions, attending to ``[recorded negative prefix, themselves]`` (the model's cached-decode step: ``Z-``), then
    the stock call with the guided rows' target-image ``Z+`` replaced by the NAG combination before the output
    projection. The text and the stock rows are never touched.
    """

    def __call__(self, attn: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        recording = self.runtime.prefix_recording
        if recording is None or self.runtime.call is not None:
            return super().__call__(attn, *args, **kwargs)
        arguments = self._binder.bind(attn, *args, **kwargs)
        segments = arguments.get("segments")
        prefix_len = segments[-1][1] if segments else 0
        layer = PrefixKeysValues()
        recording.layers[attn] = layer
        if not recording.key_valid_recorded:  # (the first layer's: every layer has the same)
            key_valid = arguments.get("key_valid")
            recording.key_valid = key_valid[:, :prefix_len] if key_valid is not None else None
            recording.key_valid_recorded = True
        return self.run_stock(
            attn, arguments, layer_cache=layer, kv_cache_mode="extract", cache_write_slice=slice(0, prefix_len)
        )

    def cached_decode(self, attn: Any, call: GuidedCall, hidden: torch.Tensor, start: int) -> dict[str, Any]:
        """The stock processor's arguments for the model's cached-decode step of the guided rows' target tokens
        (from ``start``) against the recorded negative prefix: ``Z-``."""
        prefix = self.runtime.negative_prefix
        key_valid = prefix.key_valid
        return dict(
            hidden_states=hidden[call.cond_rows, start:],
            rotary_emb=prefix.rotary,
            attention_mask=None if key_valid is None else key_valid[:, None, None, :],
            layer_cache=prefix.layers[attn],
            kv_cache_mode="cached",
            cache_write_slice=None,
            segments=None,
            key_valid=None,
        )

    def guided(self, attn: torch.nn.Module, call: GuidedCall, arguments: dict[str, Any]) -> Any:
        hidden = arguments["hidden_states"]
        start = hidden.shape[1] - call.image_lengths[0]

        def run_negative(view: Any) -> Any:
            return self.run_stock(view, arguments, **self.cached_decode(attn, call, hidden, start))

        def run_positive(view: Any) -> Any:
            return self.run_stock(view, arguments)

        _, positive = self.guided_projection_inputs(attn, call, run_negative, run_positive, start, 0)
        return positive


class FastCausalPrefixAttentionNAG(CausalPrefixAttentionNAG):
    """:class:`CausalPrefixAttentionNAG` without projecting the target-image tokens twice: the stock call runs first,
    its query/key/value projections of the guided rows' target tokens are kept, and at its output projection the
    negative pass runs on them (the model's cached-decode step with the kept projections), giving ``Z-`` to combine
    with ``Z+`` there."""

    fast_processors = None  # (the stock processor's own math, with the kept projections)

    def guided(self, attn: torch.nn.Module, call: GuidedCall, arguments: dict[str, Any]) -> Any:
        hidden = arguments["hidden_states"]
        start = hidden.shape[1] - call.image_lengths[0]
        kept: dict[str, torch.Tensor] = {}
        project = attn.to_out[0]

        def keeping(name: str) -> ProjectionTap:
            layer = getattr(attn, name)

            def run(x: torch.Tensor) -> torch.Tensor:
                out = layer(x)
                kept[name] = out[call.cond_rows, start:]
                return out

            return ProjectionTap(layer, run)

        def kept_projection(name: str) -> ProjectionTap:
            return ProjectionTap(getattr(attn, name), lambda x: kept[name])

        def combine(z: torch.Tensor) -> torch.Tensor:
            negative: dict[str, torch.Tensor] = {}

            def capture(z_negative: torch.Tensor) -> torch.Tensor:
                negative["z"] = z_negative
                return z_negative  # (the negative pass's output is not used)

            view = StandIn(
                attn,
                to_q=kept_projection("to_q"),
                to_k=kept_projection("to_k"),
                to_v=kept_projection("to_v"),
                to_out=[ProjectionTap(project, capture), *attn.to_out[1:]],
            )
            self.run_stock(view, arguments, **self.cached_decode(attn, call, hidden, start))
            z = z.clone()
            z[call.row_index, start:] = self.combine(call, z[call.row_index, start:], negative["z"])
            return project(z)

        view = StandIn(
            attn,
            to_q=keeping("to_q"),
            to_k=keeping("to_k"),
            to_v=keeping("to_v"),
            to_out=[ProjectionTap(project, combine), *attn.to_out[1:]],
        )
        return self.run_stock(view, arguments)
