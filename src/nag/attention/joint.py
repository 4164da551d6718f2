"""Joint attention with separate text projections, the image stream at the stock batch (Flux double-stream
blocks, SD3, Qwen-Image, FLUX.2 double blocks): the negative text rows ride along the text batch.

Flux's IP-Adapter processor (``FluxIPAdapterAttnProcessor``) also returns an image-prompt term: the image queries
(before the rotary embedding) attending to the image-prompt tokens, scaled, which the block adds to the image stream
after its MLP. It does not depend on the text, so NAG leaves it unguided: the stock rows' term, as the processor
computes it, is returned beside the guided image and text outputs.
"""

from __future__ import annotations

from typing import Any

import torch

from ..state import GuidedCall
from .base import (
    NAGProcessor,
    image_qkv,
    pad_tokens,
    rotary_for,
    rotate,
    text_qkv,
)
from .lse import guided_image_and_text


class JointAttentionNAG(NAGProcessor):
    """Joint attention over ``[text, image]`` with separate text projections (Flux double-stream
    blocks, SD3 joint blocks).

    The text batch holds the stock rows followed by one negative text row per guided row, both
    padded to a common length; the image batch holds the stock rows only. The negative text
    attends to ``[negative text, image]`` with the guided image stream's keys/values.
    """

    rotary_argument = "image_rotary_emb"
    text_mask_argument = "encoder_hidden_states_mask"

    def guided(self, attn: torch.nn.Module, call: GuidedCall, arguments: dict[str, Any]) -> Any:
        text = arguments["encoder_hidden_states"]
        hidden = arguments["hidden_states"]
        padded = text.shape[1]
        mask = arguments.get(self.text_mask_argument)
        split = self.stock_kind in _SPLIT_ROTARY_PROCESSORS

        def branch(rows: slice, text_len: int) -> dict[str, Any]:
            """The text, its rotary tables and its mask for one branch (its own length, no padding)."""
            changes = {
                "encoder_hidden_states": text[rows, :text_len],
                **rotary_for(arguments, self.rotary_argument, text_len, padded, split),
            }
            if mask is not None:
                changes[self.text_mask_argument] = mask[rows, :text_len]
            return changes

        # The negative pass only supplies Z-; an IP-Adapter processor would also compute (at the guided rows'
        # batch, from image-prompt tokens at the stock batch) an image-prompt term nobody reads: give it none.
        no_image_prompt = {"ip_hidden_states": []} if arguments.get("ip_hidden_states") is not None else {}

        def run_negative(view: Any) -> Any:
            return self.run_stock(
                view,
                arguments,
                hidden_states=hidden[call.cond_rows],
                **branch(slice(call.batch, None), call.negative_text_len),
                **no_image_prompt,
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


_JOINT_PROCESSORS = {
    "FluxAttnProcessor",
    "FluxIPAdapterAttnProcessor",
    "JointAttnProcessor2_0",
    "FusedJointAttnProcessor2_0",
    "Flux2AttnProcessor",
    "QwenDoubleStreamAttnProcessor2_0",
}


# Joint processors whose rotary tables come as (image, text) instead of one table over [text, image].
_SPLIT_ROTARY_PROCESSORS = {"QwenDoubleStreamAttnProcessor2_0"}
# SD3's processors: JointAttnProcessor2_0, and the one fuse_qkv_projections sets (its q/k/v in one projection per
# stream), which applies none of the module's q/k norms (SD3.5's): NAG computes what each computes.
_SD3_PROCESSORS = {"JointAttnProcessor2_0", "FusedJointAttnProcessor2_0"}
_WITHOUT_QK_NORMS = {"FusedJointAttnProcessor2_0"}


class FastJointAttentionNAG(JointAttentionNAG):
    """Joint attention fast path (Flux double-stream, SD3): projections once per token,
    image->image attention once, merged by log-sum-exp with each branch's image->text attention."""

    fast_processors = frozenset(_JOINT_PROCESSORS)
    fast_under_parallelism = True

    def guided(self, attn: torch.nn.Module, call: GuidedCall, arguments: dict[str, Any]) -> Any:
        placement = self.placement()
        if (
            self.stock_kind not in _JOINT_PROCESSORS
            or placement is None
            or arguments.get("attention_mask") is not None
            or (placement.parallel_config is not None and not self._runs_under_parallelism(arguments))
        ):
            return super().guided(attn, call, arguments)
        hidden, text = arguments["hidden_states"], arguments["encoder_hidden_states"]
        rotary = arguments.get(self.rotary_argument)
        padded = text.shape[1]
        norms = self.stock_kind not in _WITHOUT_QK_NORMS
        qi, ki, vi = image_qkv(attn, hidden, norms)
        image_prompt_queries = qi  # the IP-Adapter's queries: normed, not rotated
        qt, kt, vt = text_qkv(attn, text, norms)
        if rotary is not None and self.stock_kind in _SPLIT_ROTARY_PROCESSORS:  # (image, text) tables, complex
            from diffusers.models.transformers.transformer_qwenimage import (
                apply_rotary_emb_qwen,
            )

            image_table, text_table = rotary
            qi, ki = (apply_rotary_emb_qwen(x, image_table, use_real=False) for x in (qi, ki))
            qt, kt = (apply_rotary_emb_qwen(x, text_table[:padded], use_real=False) for x in (qt, kt))
        elif rotary is not None:
            qi, ki = rotate(qi, rotary, padded, None), rotate(ki, rotary, padded, None)
            qt, kt = rotate(qt, rotary, 0, padded), rotate(kt, rotary, 0, padded)
        b = call.batch
        mask = arguments.get(self.text_mask_argument)
        # (a block whose text stream ends here, SD3's last, discards the text's attention output: none is computed)
        text_ends = getattr(attn, "context_pre_only", False) is True and self.stock_kind in _SD3_PROCESSORS
        z, text_positive, text_negative = guided_image_and_text(
            self,
            call,
            (qi, ki, vi),
            (qt[:b], kt[:b], vt[:b]),
            (qt[b:], kt[b:], vt[b:]),
            *((mask[:b], mask[b:]) if mask is not None else (None, None)),
            placement=placement,
            text_queries=not text_ends,
        )
        image_out = attn.to_out[1](attn.to_out[0](z.to(hidden.dtype)))
        if text_ends:
            return image_out, None
        text_out = torch.cat([pad_tokens(text_positive, padded), pad_tokens(text_negative, padded)])
        if getattr(attn, "to_add_out", None) is not None and not getattr(attn, "context_pre_only", False):
            text_out = attn.to_add_out(text_out)
        if self.stock_kind == "FluxIPAdapterAttnProcessor":
            return image_out, text_out, image_prompt_term(self.stock, attn, image_prompt_queries, image_out, arguments)
        return image_out, text_out

    def _runs_under_parallelism(self, arguments: dict[str, Any]) -> bool:
        """Under context parallelism: no text mask (parallel attention here takes none) and no image-prompt term
        (its tokens are not this rank's shard)."""
        return arguments.get(self.text_mask_argument) is None and self.stock_kind != "FluxIPAdapterAttnProcessor"


def image_prompt_term(
    stock: Any, attn: torch.nn.Module, queries: torch.Tensor, image_out: torch.Tensor, arguments: dict[str, Any]
) -> torch.Tensor:
    """``FluxIPAdapterAttnProcessor``'s image-prompt term for the stock rows, as it computes it: the image queries
    ``(B, L, H, D)`` attend to each adapter's image-prompt tokens, each result scaled by the adapter's scale. Unguided:
    it does not see the text."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    batch = queries.shape[0]
    term = torch.zeros_like(image_out)
    for tokens, scale, to_k, to_v in zip(
        arguments.get("ip_hidden_states") or [], stock.scale, stock.to_k_ip, stock.to_v_ip
    ):
        keys = to_k(tokens).view(batch, -1, attn.heads, attn.head_dim)
        values = to_v(tokens).view(batch, -1, attn.heads, attn.head_dim)
        out = dispatch_attention_fn(queries, keys, values, attn_mask=None, dropout_p=0.0, is_causal=False)
        term += scale * out.reshape(batch, -1, attn.heads * attn.head_dim).to(queries.dtype)
    return term
