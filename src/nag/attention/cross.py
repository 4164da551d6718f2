"""Cross-attention to text (UNet ``attn2``, PixArt, Sana, Wan, LTX, ...): layout ``"cross"``."""

from __future__ import annotations

from typing import Any

import torch

from ..combine import records_gradient
from ..kernels import attention
from ..state import GuidedCall
from .base import (
    NAGProcessor,
    OutputProjectionView,
    backend_attention,
    native_backend,
    qkv,
    split_heads,
    split_rows,
)

#: Processors that take the UNet's ``(text, [image embeddings per adapter])`` context of an IP-Adapter and add
#: ``scale * Attn(q, K_ip, V_ip)`` per adapter to the text attention before the output projection: given an empty
#: list of image embeddings (and no IP masks) they attend to the text alone.
IP_ADAPTER_PROCESSORS = frozenset(
    {"IPAdapterAttnProcessor", "IPAdapterAttnProcessor2_0", "IPAdapterXFormersAttnProcessor"}
)


def image_prompt_context(context: Any) -> tuple[Any, Any]:
    """``(text, image embeddings)`` of a cross-attention context: an IP-Adapter's UNet passes ``(text, [image
    embeddings per adapter])``; any other context is text alone (image embeddings None)."""
    if isinstance(context, tuple) and len(context) == 2 and isinstance(context[1], (list, tuple)):
        return context
    return context, None


def split_context_mask(call: GuidedCall, context: torch.Tensor, mask: Any) -> tuple[int, Any, Any]:
    """Where the negative context starts in ``[positive | negative]``, and the mask of each part (the negative
    part's for the guided rows)."""
    split = context.shape[1] - call.negative_text_len
    if mask is None:
        return split, None, None
    return split, mask[..., :split], split_rows(mask[..., split:], call.cond_rows)


#: Additive mask values at or below this give a key the weight ``exp(<= -1e4)``, which is exactly zero (diffusers' masks
#: use -1e4, -1e6 or -inf for the keys not attended).
MASKED_BIAS = -1e4


def drop_masked_keys(
    key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Keys and values ``(rows, tokens, heads, dim)`` without the tokens that ``mask`` (``(rows, heads, queries,
    tokens)``, boolean or additive) masks for every row, head and query, and the mask for the rest: None where it
    lets every remaining key through unchanged. A masked key adds exactly zero to an attention that has at least one
    key it attends, so the output is the same; where some row, head or query attends to no key at all (the softmax
    then spreads over every key), nothing is dropped. Padded text (a short negative prompt padded to the encoder's
    length) then costs nothing per step."""
    if mask is None:
        return key, value, None
    attended = mask if mask.dtype == torch.bool else mask > MASKED_BIAS
    keep = attended.flatten(0, -2).any(0)
    if bool(keep.all()) or not bool(attended.any(-1).all()):
        return key, value, mask
    index = keep.nonzero().squeeze(1)
    mask = mask.index_select(-1, index)
    if bool(mask.all()) if mask.dtype == torch.bool else not bool(mask.any()):
        mask = None
    return key.index_select(1, index), value.index_select(1, index), mask


def collapse_repeated_keys(
    key: torch.Tensor, value: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Keys and values ``(rows, tokens, heads, dim)`` with each row's run of repeats of its last key and value (the
    same bits: text padded with zero embeddings, as Wan's pipelines pad it, projects to one key) kept as few copies,
    and the additive mask ``(rows, 1, 1, kept tokens)`` that gives those copies the run's weight: ``log(run /
    copies)`` each. ``exp(s + log n) = n exp(s)``, so the attention is the same (to rounding); a run of 500 padding
    keys then costs one. None for the mask (and the inputs themselves) where no row has a run worth collapsing."""
    rows, tokens = key.shape[:2]
    # A row's run must reach back to `probe` for the collapse to keep at most half the keys: where some row's key or
    # value there differs from its last, nothing is collapsed (two slices compared instead of every key).
    probe = tokens // 2 - 1
    if probe < 0 or not (torch.equal(key[:, probe], key[:, -1]) and torch.equal(value[:, probe], value[:, -1])):
        return key, value, None
    same = (key == key[:, -1:]).flatten(2).all(-1) & (value == value[:, -1:]).flatten(2).all(-1)
    runs = same.flip(1).to(torch.int64).cumprod(1).sum(1)  # each row's trailing run (at least its last key)
    kept = tokens - int(runs.min()) + 1
    if kept > tokens // 2:  # (little to gain)
        return key, value, None
    copies = (runs - (tokens - kept)).to(torch.float64)  # each row's copies of its repeat among the kept keys
    start = tokens - runs  # where each row's run starts
    positions = torch.arange(kept, device=key.device)
    bias = torch.where(positions[None, :] >= start[:, None], (runs / copies).log()[:, None], 0.0)
    mask = bias.to(key.dtype)[:, None, None, :]
    return key[:, :kept].clone(), value[:, :kept].clone(), mask


class CrossAttentionNAG(NAGProcessor):
    """Cross-attention to text (UNet ``attn2``, PixArt, Sana, Wan, ...).

    The denoiser hook appends the negative context after the positive one along the token axis
    (``[positive | negative]``, masks likewise), so the model's own text preprocessing runs on
    both. Here the two are split again: ``Z+`` from the positive part, ``Z-`` from the negative
    part for the guided rows.

    With an IP-Adapter the context is ``(text, [image embeddings])``: only the text is guided. The image-prompt
    attention is added to the combined text attention as the IP-Adapter processor adds it, unguided.
    """

    def guided(self, attn: torch.nn.Module, call: GuidedCall, arguments: dict[str, Any]) -> Any:
        context, image_prompt = image_prompt_context(arguments.get("encoder_hidden_states"))
        if context is None:
            return self.run_stock(attn, arguments)
        if image_prompt is not None:
            return self.guided_with_image_prompt(attn, call, arguments, context, image_prompt)
        if getattr(attn, "add_k_proj", None) is not None:
            raise NotImplementedError(
                f"{type(attn).__name__} also attends to an image context (image-to-video); NAG guides its text "
                "branch only on the fast path: apply NAG with fast=True (the default)"
            )
        split, positive_mask, negative_mask = split_context_mask(call, context, arguments.get("attention_mask"))
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

    def guided_with_image_prompt(
        self, attn: torch.nn.Module, call: GuidedCall, arguments: dict[str, Any], context: Any, image_prompt: Any
    ) -> Any:
        """An IP-Adapter processor, run three times: on the positive and on the negative text alone (an empty list of
        image embeddings), capturing ``Z+`` and ``Z-`` at the output projection, then as stock, where the guided rows'
        text attention ``Z+`` inside the projection's input is replaced by ``nag_combine(Z+, Z-)``; what remains of
        that input is the image-prompt attention the processor added, unguided."""
        split, positive_mask, negative_mask = split_context_mask(call, context, arguments.get("attention_mask"))
        rows, project = call.cond_rows, attn.to_out[0]
        text_only = {"ip_adapter_masks": None} if "ip_adapter_masks" in arguments else {}
        captured: dict[str, torch.Tensor] = {}

        def capture(name: str) -> Any:
            def tap(z: torch.Tensor) -> torch.Tensor:
                captured[name] = z
                return project(z)

            return OutputProjectionView(attn, tap)

        def combine(z: torch.Tensor) -> torch.Tensor:
            z, text = z.clone(), captured["positive"][rows]
            z[rows] = self.combine(call, text, captured["negative"]) + (z[rows] - text)
            return project(z)

        negative_context = (context[rows, split:], [])
        self.run_stock(
            capture("negative"),
            arguments,
            hidden_states=arguments["hidden_states"][rows],
            encoder_hidden_states=negative_context,
            attention_mask=negative_mask,
            **text_only,
        )
        positive_context = context[:, :split]
        self.run_stock(
            capture("positive"),
            arguments,
            encoder_hidden_states=(positive_context, []),
            attention_mask=positive_mask,
            **text_only,
        )
        if "negative" not in captured or "positive" not in captured:
            raise RuntimeError(
                f"NAG cannot guide {type(attn).__name__} with {self.stock_kind}: the processor never calls "
                "attn.to_out, where NAG combines the attention outputs. Restore diffusers' IP-Adapter processors "
                "(load the IP-Adapter again) or remove NAG."
            )
        return self.run_stock(
            OutputProjectionView(attn, combine),
            arguments,
            encoder_hidden_states=(positive_context, image_prompt),
            attention_mask=positive_mask,
        )


_CROSS_FLAT_NORM = {
    "AttnProcessor2_0": False,
    "FusedAttnProcessor2_0": False,  # (AttnProcessor2_0 with the text's keys and values in one projection, to_kv)
    "SanaAttnProcessor2_0": True,
    "WanAttnProcessor": True,
    "SkyReelsV2AttnProcessor": True,
    "LTXVideoAttnProcessor": True,
    "LTX2AudioVideoAttnProcessor": True,  # (text cross-attention: no rotary tables; optional per-head output gates)
}


# Cross-attention processors that also attend to an image context placed before the text
# (Wan-style image-to-video): NAG guides the text branch; the image branch is added unguided.
_IMAGE_CONTEXT_PROCESSORS = {"WanAttnProcessor", "SkyReelsV2AttnProcessor"}


# Cross-attention processors that attend through diffusers' dispatcher (so on the backend chosen with
# set_attention_backend, and under the model's context parallelism); the others call torch's SDPA whatever the
# backend, and never run under context parallelism.
_DISPATCHING = {"WanAttnProcessor", "SkyReelsV2AttnProcessor", "LTXVideoAttnProcessor", "LTX2AudioVideoAttnProcessor"}
# ... of which those that attend to the text without context parallelism also when the model has it (each process's
# queries attend to the whole text, which every process holds): diffusers' Wan processor passes no parallel
# configuration for cross-attention. The others' text is split with the sequence: they attend under it.
_LOCAL_UNDER_PARALLELISM = {"WanAttnProcessor"}


def text_keys_values(attn: Any, text: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The text's keys and values, heads not split (through ``to_kv`` where the projections are fused, as
    ``FusedAttnProcessor2_0`` projects them)."""
    return qkv(attn, text, "to_kv", ("to_k", "to_v"))


class FastCrossAttentionNAG(CrossAttentionNAG):
    """Cross-attention fast path: one query and one output projection; the negative keys/values
    are projected once per generation (the negative context does not change between steps). Attention runs on the
    stock processor's backend (:func:`~nag.attention.base.backend_attention`), under context parallelism too for the
    processors that dispatch: locally where the stock processor attends to the whole text on every rank (Wan), under
    the model's parallel attention where the text is split with the sequence (LTX-Video)."""

    fast_processors = frozenset({*_CROSS_FLAT_NORM, "IPAdapterAttnProcessor2_0"})

    def _supported(self, attn: Any, hidden: torch.Tensor, arguments: dict[str, Any], image_prompt: Any) -> bool:
        if image_prompt is None:
            known = self.stock_kind in _CROSS_FLAT_NORM
        else:  # IP-Adapter: the processor applies no q/k norms; per-image scales come with IP masks only
            known = (
                self.stock_kind == "IPAdapterAttnProcessor2_0"
                and arguments.get("ip_adapter_masks") is None
                and getattr(attn, "norm_q", None) is None
                and getattr(attn, "norm_k", None) is None
                and all(isinstance(scale, (int, float)) for scale in self.stock.scale)
            )
        parallel = getattr(self.stock, "_parallel_config", None) is not None
        return (
            known
            and (not parallel or self.stock_kind in _DISPATCHING)
            and hidden.ndim == 3
            and getattr(attn, "spatial_norm", None) is None
            and getattr(attn, "group_norm", None) is None
            and not getattr(attn, "norm_cross", None)
            and (getattr(attn, "add_k_proj", None) is None or self.stock_kind in _IMAGE_CONTEXT_PROCESSORS)
        )

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Attention ``(B, L, H, D)`` as the stock processor computes it: on its backend where it dispatches, under
        the model's context parallelism where it attends under it (the text split with the sequence: LTX-Video)."""
        if self.stock_kind in _DISPATCHING:
            parallel = self.stock_kind not in _LOCAL_UNDER_PARALLELISM
            return backend_attention(self.stock, q, k, v, mask, parallel=parallel)
        return attention(q, k, v, mask)

    def _image_prompt_attention(self, attn: Any, query: torch.Tensor, image_prompt: Any) -> torch.Tensor | int:
        """The IP-Adapter processor's image-prompt term: ``sum(scale * Attn(q, K_ip, V_ip))`` over its adapters."""
        total: torch.Tensor | int = 0
        stock = self.stock
        for states, scale, to_k, to_v in zip(image_prompt, stock.scale, stock.to_k_ip, stock.to_v_ip):
            if scale == 0:
                continue
            key = to_k(states).reshape(query.shape[0], -1, *query.shape[2:])
            value = to_v(states).reshape(query.shape[0], -1, *query.shape[2:])
            total = total + scale * self._attend(query, key, value).flatten(2)
        return total

    def _mask(self, attn: Any, mask: torch.Tensor | None, rows: int) -> torch.Tensor | None:
        if mask is None:
            return None
        keys = mask.shape[-1]
        mask = attn.prepare_attention_mask(mask, keys, rows)
        return mask.view(rows, attn.heads, -1, keys)

    def _negative_keys_values(
        self, attn: Any, call: GuidedCall, context: torch.Tensor, split: int, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The guided rows' negative keys, values and mask; with a static negative, projected once per generation
        and kept without the keys that every guided row masks (see :func:`drop_masked_keys`)."""
        flat = _CROSS_FLAT_NORM.get(self.stock_kind, False)
        shape = (len(call.guided_rows), context.shape[1] - split, *context.shape[2:])
        kept_under = call.kept_under
        keep = call.static_negative and kept_under is not None
        cache_key = (id(attn), "negative_kv", shape, context.dtype, context.device, mask is None, kept_under)
        cached = self.runtime.negative_kv.get(cache_key) if keep else None
        if cached is not None:
            return cached
        negative = context[call.row_index, split:]
        negative_mask = None
        if mask is not None:
            negative_mask = self._mask(attn, split_rows(mask[..., split:], call.row_index), len(call.guided_rows))
        negative_key, negative_value = text_keys_values(attn, negative)
        projected = (
            split_heads(attn, negative_key, attn.norm_k, flat),
            negative_value.unflatten(-1, (attn.heads, -1)),
            negative_mask,
        )
        # (kept only while autograd does not record: see negative_work_context)
        if keep:
            # (under context parallelism every rank must keep the same keys; inside a torch.compile trace the keys'
            # values cannot choose the shapes: all are kept)
            if self._parallel_config is None and not torch.compiler.is_compiling():
                projected = drop_masked_keys(*projected)
                if projected[2] is None and (self.stock_kind not in _DISPATCHING or native_backend(self.stock)):
                    projected = collapse_repeated_keys(*projected[:2])  # (an additive mask: native attention only)
            self.runtime.negative_kv[cache_key] = projected
        return projected

    def guided(self, attn: torch.nn.Module, call: GuidedCall, arguments: dict[str, Any]) -> Any:
        hidden = arguments["hidden_states"]
        context, image_prompt = image_prompt_context(arguments.get("encoder_hidden_states"))
        rotary = arguments.get("query_rotary_emb") is not None or arguments.get("key_rotary_emb") is not None
        if context is None or rotary or not self._supported(attn, hidden, arguments, image_prompt):
            return super().guided(attn, call, arguments)
        flat = _CROSS_FLAT_NORM.get(self.stock_kind, False)
        split = context.shape[1] - call.negative_text_len
        mask = arguments.get("attention_mask")
        rows = hidden.shape[0]
        # Image context (image-to-video) precedes the text: [image, positive text, negative text].
        image_len = split - call.positive_text_len if getattr(attn, "add_k_proj", None) is not None else 0

        query = split_heads(attn, attn.to_q(hidden), attn.norm_q, flat)
        key, value = text_keys_values(attn, context[:, image_len:split])
        key = split_heads(attn, key, attn.norm_k, flat)
        value = value.unflatten(-1, (attn.heads, -1))

        guided = call.row_index
        negative_key, negative_value, negative_mask = self._negative_keys_values(attn, call, context, split, mask)
        positive_mask = self._mask(attn, mask[..., :split], rows) if mask is not None else None
        z = self._attend(query, key, value, positive_mask)
        z_negative = self._attend(query[guided], negative_key, negative_value, negative_mask)
        if getattr(attn, "to_gate_logits", None) is not None:  # LTX-2: per-head output gates from the queries' input
            gates = 2.0 * torch.sigmoid(attn.to_gate_logits(hidden)).unsqueeze(-1)
            z, z_negative = z * gates, z_negative * gates[guided]
        z, z_negative = z.flatten(2), z_negative.flatten(2)
        if len(call.guided_rows) == rows:  # (every row guided: no copy back into z)
            z = self.combine(call, z, z_negative)
        else:  # (into a copy while autograd records: z may be the attention kernel's own output, kept for backward)
            z = z.clone() if records_gradient(z) else z
            z[guided] = self.combine(call, z[guided], z_negative)
        if image_len:
            image = context[:, :image_len]
            image_key = attn.norm_added_k(attn.add_k_proj(image)).unflatten(-1, (attn.heads, -1))
            image_value = attn.add_v_proj(image).unflatten(-1, (attn.heads, -1))
            z = z + self._attend(query, image_key, image_value).flatten(2)
        if image_prompt is not None:  # IP-Adapter: its image-prompt attention, unguided
            z = z + self._image_prompt_attention(attn, query, image_prompt)

        out = attn.to_out[1](attn.to_out[0](z))
        if getattr(attn, "residual_connection", False):
            out = out + hidden
        return out / getattr(attn, "rescale_output_factor", 1.0)
