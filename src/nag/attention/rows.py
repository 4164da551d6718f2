"""Shared rows: joint attention in models that join text and image themselves (layout ``"concat"``: Chroma and
AuraFlow double blocks, CogView4, CogVideoX, the Hunyuan models).

The negative rows are whole batch rows ``[negative text, image]`` whose image part is a placeholder: the negative
text attends to the guided rows' image, and the negative rows' image output is the guided rows'. The fast paths run
the blocks on the stock rows with the negative text beside them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..state import GuidedCall, NegativeText
from .base import (
    BesideStockRows,
    NAGProcessor,
    branch_mask,
    default_backend,
    image_qkv,
    pad_tokens,
    project_out,
    rotary_for,
    rotate,
    rows_of,
    text_qkv,
)
from .lse import (
    guided_image_and_text,
    guided_image_and_text_outer_mask,
    is_image_first_key_mask,
    outer_mask_row,
    shared_outer_mask,
    text_key_mask,
)


class RowsJointAttentionNAG(NAGProcessor):
    """Joint attention with separate text projections in a model whose negative rows are whole
    batch rows (layout ``"concat"``: Chroma double blocks, AuraFlow joint blocks).

    Text and image both hold the stock rows followed by one row per guided row (or the image only the stock
    rows, in blocks that run the image stream at the stock batch: ``ModuleKind.STOCK_IMAGE_BLOCK``). The negative
    rows' image tokens are a placeholder: the negative text attends to ``[negative text, guided
    image]`` (the stock rows' image tokens), and the negative rows' image output is the guided
    rows' image output. Masks over ``[text, image]`` (``(rows, 1, L, L)`` or ``(rows, L)``) are
    sliced per branch.
    """

    rotary_argument: str | None = "image_rotary_emb"
    mask_argument = "attention_mask"
    projection_sees_text = False  # the output projection sees the image tokens only

    def guided(self, attn: torch.nn.Module, call: GuidedCall, arguments: dict[str, Any]) -> Any:
        text = arguments["encoder_hidden_states"]
        b = call.batch
        image = arguments["hidden_states"][:b]
        padded = text.shape[1]
        lp, ln = call.text_prefix + call.positive_text_len, call.text_prefix + call.negative_text_len
        mask = arguments.get(self.mask_argument)

        def branch(rows: slice, text_len: int) -> dict[str, Any]:
            changes = {
                "encoder_hidden_states": text[rows, :text_len],
                **rotary_for(arguments, self.rotary_argument, text_len, padded),
            }
            if mask is not None:
                changes[self.mask_argument] = branch_mask(mask, rows, text_len, padded)
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
    the input text's valid tokens and before its padding (HunyuanImage's byT5 stream) is kept. HunyuanVideo 1.5's
    processor takes a key mask over the text alone (it puts the image's keys in front itself): that is cut the same way.
    """

    def guided(self, attn: torch.nn.Module, call: GuidedCall, arguments: dict[str, Any]) -> Any:
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
            return self.run_stock(
                view, arguments, hidden_states=image[rows], **branch(slice(b, None), call.negative_text_len)
            )

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


class FastOuterMaskJointAttentionNAG(RowsJointAttentionNAG):
    """Chroma double-stream fast path (``FluxAttnProcessor``, the image stream at the stock batch: the text holds the
    stock rows and one negative row per guided row): every token projected once, image->image attention once,
    merged by log-sum-exp with each branch's image->text attention, under the block's mask, the outer product of the
    model's ``(rows, text + image)`` mask (see :func:`guided_image_and_text_outer_mask`). Masks whose image part is
    not all ones (True), other processors and attention backends take the straightforward wrapper."""

    fast_processors = frozenset({"FluxAttnProcessor"})

    def guided(self, attn: torch.nn.Module, call: GuidedCall, arguments: dict[str, Any]) -> Any:
        hidden, text = arguments["hidden_states"], arguments.get("encoder_hidden_states")
        mask = arguments.get(self.mask_argument)
        b = call.batch
        if (
            self.stock_kind not in self.fast_processors
            or not default_backend(self.stock)
            or text is None
            or hidden.shape[0] != b
            or call.text_prefix
        ):
            return super().guided(attn, call, arguments)
        padded = text.shape[1]
        if mask is not None:
            if mask.ndim != 4 or mask.shape[0] not in (1, text.shape[0]) or mask.shape[-1] != padded + hidden.shape[1]:
                return super().guided(attn, call, arguments)
            mask = rows_of(outer_mask_row(mask, padded), text.shape[0])
            if mask is None:
                return super().guided(attn, call, arguments)
        rotary = arguments.get(self.rotary_argument)
        qi, ki, vi = image_qkv(attn, hidden)
        qt, kt, vt = text_qkv(attn, text)
        if rotary is not None:
            qi, ki = rotate(qi, rotary, padded, None), rotate(ki, rotary, padded, None)
            qt, kt = rotate(qt, rotary, 0, padded), rotate(kt, rotary, 0, padded)
        z, text_positive, text_negative = guided_image_and_text_outer_mask(
            self,
            call,
            (qi, ki, vi),
            (qt[:b], kt[:b], vt[:b]),
            (qt[b:], kt[b:], vt[b:]),
            (call.positive_text_len, call.negative_text_len),
            mask[:b] if mask is not None else None,
            mask[b:] if mask is not None else None,
        )
        image_out = attn.to_out[1](attn.to_out[0](z.to(hidden.dtype)))
        text_out = torch.cat([pad_tokens(text_positive, padded), pad_tokens(text_negative, padded)])
        return image_out, attn.to_add_out(text_out.to(hidden.dtype))


class FastRowsJointAttentionNAG(RowsJointAttentionNAG):
    """AuraFlow joint-block fast path (``AuraFlowAttnProcessor2_0``, the image stream at the stock batch: the text
    holds the stock rows and one negative row per guided row, each ``[register tokens, text]``): every token projected
    once, image->image attention once, merged by log-sum-exp with each branch's image->text attention (each branch's
    own text length after the shared registers). Other processors, attention backends, masks and whole image rows
    take the straightforward wrapper."""

    fast_processors = frozenset({"AuraFlowAttnProcessor2_0"})

    def guided(self, attn: torch.nn.Module, call: GuidedCall, arguments: dict[str, Any]) -> Any:
        hidden, text = arguments["hidden_states"], arguments.get("encoder_hidden_states")
        b = call.batch
        if (
            self.stock_kind not in self.fast_processors
            or not default_backend(self.stock)
            or text is None
            or hidden.shape[0] != b
            or arguments.get(self.mask_argument) is not None
        ):
            return super().guided(attn, call, arguments)
        padded, prefix = text.shape[1], call.text_prefix
        lengths = dataclasses.replace(
            call, positive_text_len=prefix + call.positive_text_len, negative_text_len=prefix + call.negative_text_len
        )
        qt, kt, vt = text_qkv(attn, text)
        z, text_positive, text_negative = guided_image_and_text(
            self, lengths, image_qkv(attn, hidden), (qt[:b], kt[:b], vt[:b]), (qt[b:], kt[b:], vt[b:])
        )
        image_out = attn.to_out[1](attn.to_out[0](z.to(hidden.dtype)))
        text_out = torch.cat(
            [
                pad_tokens(attn.to_add_out(text_positive.to(text.dtype)), padded),
                pad_tokens(attn.to_add_out(text_negative.to(text.dtype)), padded),
            ]
        )
        return image_out, text_out


# Processors over [image, text] whose math the image-first fast path reproduces: the text's keys take a key mask
# (HunyuanVideo 1.5's processor also masks the padding text tokens' queries, whose outputs no valid token reads).
_IMAGE_FIRST_PROCESSORS = {
    "HunyuanVideoAttnProcessor2_0",
    "HunyuanImageAttnProcessor",
    "HunyuanVideo15AttnProcessor2_0",
}


class FastRowsImageFirstAttentionNAG(RowsImageFirstAttentionNAG):
    """HunyuanVideo / HunyuanImage 2.1 / HunyuanVideo 1.5 fast path (their stock processors, ``fast_processors``, on
    the default attention backend), with the image stream at the stock batch (``ModuleKind.STOCK_IMAGE_ENTRY``): every
    image token is projected once, and for the guided rows image->image attention is computed once and merged by
    log-sum-exp with image->text attention (``Z+``) and image->negative-text attention (``Z-``), each over its own
    valid text keys. Text the model adds to the input text before its padding (the byT5 stream, the image embedding)
    is part of each branch's text.

    - Double blocks (separate text projections): the text holds the stock rows and one negative row per guided row;
      the negative text queries attend to ``[guided video, negative text]``.
    - Single blocks (shared projections, no output projection): the block runs on the stock rows; the negative rows'
      modulated text and their key mask arrive through ``runtime.text_path`` (``ModuleKind.IMAGE_FIRST_BLOCK``), and
      their attention output leaves the same way.

    Anything else (another processor or backend, the video on whole negative rows) takes the straightforward path.
    """

    split_text_processors = fast_processors = frozenset(_IMAGE_FIRST_PROCESSORS)

    def _serves(self, attn: Any, call: GuidedCall, arguments: dict[str, Any]) -> bool:
        """Whether the fast path serves this call: double blocks (separate text projections) with the stock rows'
        image and the negative text rows, or single blocks whose negative text a block hook took out of the block."""
        path, mask = self.runtime.text_path, arguments.get("attention_mask")
        hidden, text = arguments["hidden_states"], arguments.get("encoder_hidden_states")
        if getattr(attn, "add_q_proj", None) is not None:
            return (
                path is None
                and self.takes_split_text()
                and text is not None
                and hidden.shape[0] == call.batch
                and text.shape[0] == call.batch + len(call.cond_rows)
                and text.shape[1] >= call.padded_text_len
                and is_image_first_key_mask(mask, hidden.shape[1], text.shape[1])
            )
        if path is None:
            return False
        if not all(
            is_image_first_key_mask(m, hidden.shape[1], text.shape[1])
            for m in (mask, path.inputs.get("attention_mask"))
        ):
            raise NotImplementedError(
                f"NAG's fast path takes a boolean (batch, 1, 1, keys) attention mask in {type(attn).__name__}, as the "
                "model builds it; apply NAG with fast=False for other masks"
            )
        return True

    def guided(self, attn: torch.nn.Module, call: GuidedCall, arguments: dict[str, Any]) -> Any:
        if not self._serves(attn, call, arguments):
            return super().guided(attn, call, arguments)
        path = self.runtime.text_path
        hidden, text = arguments["hidden_states"], arguments.get("encoder_hidden_states")
        mask = arguments.get("attention_mask")
        b, negative_rows = call.batch, len(call.cond_rows)
        separate = getattr(attn, "add_q_proj", None) is not None
        image_len, padded = hidden.shape[1], text.shape[1]
        extra = padded - call.padded_text_len  # (the model's own text before the padding NAG added: both branches')
        if extra:
            call = dataclasses.replace(
                call, positive_text_len=call.positive_text_len + extra, negative_text_len=call.negative_text_len + extra
            )
        rotary = arguments.get("image_rotary_emb")
        qi, ki, vi = image_qkv(attn, hidden)
        if rotary is not None:
            qi, ki = rotate(qi, rotary, 0, None), rotate(ki, rotary, 0, None)
        if separate:
            qt, kt, vt = text_qkv(attn, text)
            positive, negative = (qt[:b], kt[:b], vt[:b]), (qt[b:], kt[b:], vt[b:])
            text_mask = text_key_mask(mask, image_len, b + negative_rows)
            masks = (text_mask[:b], text_mask[b:]) if text_mask is not None else (None, None)
        else:
            positive, negative = image_qkv(attn, text), image_qkv(attn, path.normed)
            masks = (
                text_key_mask(mask, image_len, b),
                text_key_mask(path.inputs.get("attention_mask"), image_len, negative_rows),
            )
        z, text_positive, text_negative = guided_image_and_text(self, call, (qi, ki, vi), positive, negative, *masks)
        z = z.to(qi.dtype)
        text_positive, text_negative = pad_tokens(text_positive, padded), pad_tokens(text_negative, padded)
        if not separate:
            path.attention = text_negative.to(qi.dtype)
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


class FastRowsSharedAttentionNAG(BesideStockRows, RowsSharedAttentionNAG):
    """CogView4 and CogVideoX fast path (``CogView4AttnProcessor``, ``CogVideoXAttnProcessor2_0`` on the default
    attention backend): the block runs on the stock rows (``ModuleKind.IMAGE_FIRST_BLOCK``; CogView4 keeps the image
    stream at the stock batch from the patch embedding on, ``ModuleKind.STOCK_IMAGE_ENTRY``); the negative rows'
    modulated text (and CogView4's text mask) arrive through ``runtime.text_path``, and their attention output (after
    the shared output projection) leaves the same way. Every token is projected once; image->image attention
    is computed once and merged by log-sum-exp with image->text attention (``Z+``) and image->negative-text attention
    (``Z-``), under the processor's mask (the outer product of ``[text mask, image ones]``, a float 0/1 mask that SDPA
    adds: see :func:`guided_image_and_text_outer_mask`). Anything else takes the straightforward wrapper."""

    split_text_processors = fast_processors = frozenset(_SHARED_PROCESSORS)

    def guided_beside(
        self, attn: torch.nn.Module, call: GuidedCall, arguments: dict[str, Any], path: NegativeText
    ) -> Any:
        from diffusers.models.embeddings import apply_rotary_emb

        hidden, text = arguments["hidden_states"], arguments["encoder_hidden_states"]
        negative_text = path.normed
        dtype, (b, image_len), padded = text.dtype, hidden.shape[:2], text.shape[1]
        negative_rows = negative_text.shape[0]
        for mask in (arguments.get("attention_mask"), path.inputs.get("attention_mask")):
            if mask is not None and self.stock_kind not in _SHARED_TEXT_MASK_PROCESSORS:
                raise NotImplementedError(
                    f"NAG's fast path takes no attention mask in {type(attn).__name__} with "
                    f"{self.stock_kind}; apply NAG with fast=False to pass one"
                )
            if mask is not None and (mask.ndim != 2 or mask.shape[-1] != padded):
                raise ValueError(
                    f"NAG expects a (batch, text tokens) attention mask of {padded} tokens in "
                    f"{type(attn).__name__}, got shape {tuple(mask.shape)}"
                )

        def qkv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            q, k, v = image_qkv(attn, x)
            return q.to(dtype), k.to(dtype), v

        qi, ki, vi = qkv(hidden)
        rotary = arguments.get("image_rotary_emb")
        if rotary is not None:
            unbind = _SHARED_PROCESSORS[self.stock_kind]
            qi, ki = (apply_rotary_emb(x, rotary, use_real_unbind_dim=unbind, sequence_dim=1) for x in (qi, ki))
        # a missing mask is an all-ones one (the same +1 on every key of a query: no change)
        positive_mask = shared_outer_mask(arguments.get("attention_mask"), b, image_len, dtype)
        negative_mask = shared_outer_mask(path.inputs.get("attention_mask"), negative_rows, image_len, dtype)
        if (positive_mask is None) != (negative_mask is None):
            positive_mask = (
                positive_mask
                if positive_mask is not None
                else shared_outer_mask(text.new_ones(b, padded), b, image_len, dtype)
            )
            negative_mask = (
                negative_mask
                if negative_mask is not None
                else shared_outer_mask(text.new_ones(negative_rows, padded), negative_rows, image_len, dtype)
            )
        z, text_positive, text_negative = guided_image_and_text_outer_mask(
            self,
            call,
            (qi, ki, vi),
            qkv(text),
            qkv(negative_text),
            (call.positive_text_len, call.negative_text_len),
            positive_mask,
            negative_mask,
        )
        path.attention = pad_tokens(project_out(attn, text_negative.to(dtype)), padded)
        return project_out(attn, z.to(dtype)), pad_tokens(project_out(attn, text_positive.to(dtype)), padded)
