"""Single-stream attention over a block's own ``[text, image]`` (Flux, Chroma, AuraFlow and FLUX.2 single blocks).

The straightforward wrappers run the stock processor once per branch on ``[own text, guided image]``; the fast
paths run the block on the stock rows only, the negative text beside them (``runtime.text_path``, set by the block
hook), with image->image attention once, merged by log-sum-exp.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..state import GuidedCall, NegativeText
from .base import (
    BesideStockRows,
    FusedOutputView,
    NAGProcessor,
    branch_mask,
    image_qkv,
    pad_tokens,
    project_out,
    rotary_for,
    rotate,
    rows_of,
)
from .lse import (
    guided_image_and_text,
    guided_image_and_text_outer_mask,
    image_part_is_one,
    outer_mask_row,
    sequence_attention,
    single_stream_attention,
)


class SingleStreamAttentionNAG(NAGProcessor):
    """Attention over a block's own concatenation ``[text, image]`` with shared projections and no
    output projection inside the processor (Flux and Chroma single-stream blocks).

    The block's input holds the stock rows followed by one row per guided row carrying the
    negative text; that row's image part is replaced by the guided stream's, so the negative text
    attends to ``[negative text, image]`` with the guided image's keys/values. A mask over
    ``[text, image]`` (Chroma) is sliced for each branch like the tokens.
    """

    rotary_argument = "image_rotary_emb"
    mask_argument = "attention_mask"

    def branches(
        self, call: GuidedCall, arguments: dict[str, Any]
    ) -> tuple[dict[str, Any], dict[str, Any], int, int, int]:
        """Each branch's ``[own text, guided image]`` input, rotary tables and mask; the text lengths."""
        hidden = arguments["hidden_states"]
        b, prefix = call.batch, call.text_prefix
        padded = prefix + call.padded_text_len
        lp, ln = prefix + call.positive_text_len, prefix + call.negative_text_len
        mask = arguments.get(self.mask_argument)
        image = hidden[:b, padded:]

        def branch(rows: slice, text: torch.Tensor, text_len: int) -> dict[str, Any]:
            changes = {
                "hidden_states": torch.cat([text, image if rows.start == 0 else image[call.cond_rows]], dim=1),
                **rotary_for(arguments, self.rotary_argument, text_len, padded),
            }
            if mask is not None:
                changes[self.mask_argument] = branch_mask(mask, rows, text_len, padded)
            return changes

        positive = branch(slice(0, b), hidden[:b, :lp], lp)
        negative = branch(slice(b, None), hidden[b:, :ln], ln)
        return positive, negative, lp, ln, padded

    def guided(self, attn: torch.nn.Module, call: GuidedCall, arguments: dict[str, Any]) -> Any:
        positive, negative, lp, ln, padded = self.branches(call, arguments)
        negative_out = self.run_stock(attn, arguments, **negative)
        positive_out = self.run_stock(attn, arguments, **positive)

        image_out = positive_out[:, lp:].clone()
        rows = call.row_index
        image_out[rows] = self.combine(call, image_out[rows], negative_out[:, ln:])
        text_out = torch.cat([pad_tokens(positive_out[:, :lp], padded), pad_tokens(negative_out[:, :ln], padded)])
        return torch.cat([text_out, torch.cat([image_out, image_out[rows]])], dim=1)


class SingleProjectedAttentionNAG(SingleStreamAttentionNAG):
    """Like :class:`SingleStreamAttentionNAG`, for processors that apply the output projection to
    ``[text, image]`` themselves (AuraFlow single blocks): ``Z-`` is captured at the projection
    and the guided rows' image tokens are combined there."""

    def guided(self, attn: torch.nn.Module, call: GuidedCall, arguments: dict[str, Any]) -> Any:
        positive, negative, lp, ln, padded = self.branches(call, arguments)
        negative_out, positive_out = self.guided_projection_inputs(
            attn,
            call,
            lambda view: self.run_stock(view, arguments, **negative),
            lambda view: self.run_stock(view, arguments, **positive),
            positive_image_start=lp,
            negative_image_start=ln,
        )
        image_out = positive_out[:, lp:]
        text_out = torch.cat([pad_tokens(positive_out[:, :lp], padded), pad_tokens(negative_out[:, :ln], padded)])
        return torch.cat([text_out, torch.cat([image_out, image_out[call.cond_rows]])], dim=1)


class FusedSingleAttentionNAG(SingleStreamAttentionNAG):
    """Like :class:`SingleStreamAttentionNAG`, for parallel blocks whose processor ends in one output
    projection over ``[attention output, MLP activations]`` of ``[text, image]`` (Flux2 single blocks):
    the projection's input is captured in the negative pass, and in the positive pass the guided rows'
    image tokens get ``nag_combine`` on the attention columns only (the first ``attn.inner_dim``),
    before the projection mixes attention and MLP."""

    def guided(self, attn: torch.nn.Module, call: GuidedCall, arguments: dict[str, Any]) -> Any:
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

        negative_out = self.run_stock(FusedOutputView(attn, capture), arguments, **negative)
        if "x" not in captured:
            raise RuntimeError(
                f"NAG cannot guide {type(attn).__name__} with {self.stock_kind}: the processor never calls attn.to_out"
            )
        positive_out = self.run_stock(FusedOutputView(attn, combine), arguments, **positive)
        image_out = positive_out[:, lp:]
        text_out = torch.cat([pad_tokens(positive_out[:, :lp], padded), pad_tokens(negative_out[:, :ln], padded)])
        return torch.cat([text_out, torch.cat([image_out, image_out[call.cond_rows]])], dim=1)


class FastSingleStreamAttentionNAG(BesideStockRows, SingleStreamAttentionNAG):
    """Flux single-stream fast path: the block runs on the stock rows only; the negative text
    rows' modulated input arrives through ``runtime.text_path`` (set by the block hook), and their
    attention output leaves the same way. No image token is duplicated. Where every row is guided, the negative
    text rides in the block's own sequence instead, ``[text, negative text, image]`` (the block's token-wise layers
    then run once; see :class:`~nag.spec.InSequence`)."""

    split_text_processors = fast_processors = frozenset({"FluxAttnProcessor"})
    fast_under_parallelism = True

    def guided_beside(
        self, attn: torch.nn.Module, call: GuidedCall, arguments: dict[str, Any], path: NegativeText
    ) -> Any:
        hidden = arguments["hidden_states"]
        rotary = arguments.get(self.rotary_argument)
        if path.sequence is not None:  # the negative text rides in the sequence: [text, negative text, image]
            if not path.spliced:
                raise RuntimeError(
                    "NAG's negative text rode in a single-stream block's sequence but the block's norm did not give it "
                    "its own modulation; apply NAG with fast=False for this model"
                )
            attended = sequence_attention(self, call, image_qkv(attn, hidden), rotary, path.sequence[0], self._placed())
            return attended.to(hidden.dtype)
        padded = call.padded_text_len
        attended, text_negative = single_stream_attention(
            self, call, image_qkv(attn, hidden), image_qkv(attn, path.normed), rotary, padded, self._placed()
        )
        path.attention = text_negative
        return attended.to(hidden.dtype)


def fused_qkv_mlp(attn: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A parallel block's fused input projection: query/key/value heads (with their norms) and the MLP half."""
    fused = attn.to_qkv_mlp_proj(x)
    qkv, mlp = fused.split([3 * attn.inner_dim, fused.shape[-1] - 3 * attn.inner_dim], dim=-1)
    q, k, v = (t.unflatten(-1, (-1, attn.head_dim)) for t in qkv.chunk(3, dim=-1))
    return attn.norm_q(q), attn.norm_k(k), v, mlp


class FastFusedSingleAttentionNAG(BesideStockRows, FusedSingleAttentionNAG):
    """FLUX.2 single-stream fast path: the block runs on the stock rows only; the negative text rows' modulated
    input arrives through ``runtime.text_path`` (set by the joined-block hook), and their output (attention and MLP
    through the fused output projection) leaves the same way. Image tokens are projected and attended once
    (image->image attention merged by log-sum-exp with each branch's image->text attention)."""

    split_text_processors = fast_processors = frozenset({"Flux2ParallelSelfAttnProcessor"})
    fast_under_parallelism = True

    def guided_beside(
        self, attn: torch.nn.Module, call: GuidedCall, arguments: dict[str, Any], path: NegativeText
    ) -> Any:
        if arguments.get("attention_mask") is not None:
            return self.straightforward(attn, call, arguments)
        hidden = arguments["hidden_states"]
        rotary = arguments.get(self.rotary_argument)
        padded = call.text_prefix + call.padded_text_len
        *qkv, mlp = fused_qkv_mlp(attn, hidden)
        *negative_qkv, mlp_negative = fused_qkv_mlp(attn, path.normed)
        attended, text_negative = single_stream_attention(
            self, call, qkv, negative_qkv, rotary, padded, self._placed()
        )
        attended = attended.to(hidden.dtype)
        path.attention = attn.to_out(torch.cat([text_negative.to(hidden.dtype), attn.mlp_act_fn(mlp_negative)], dim=-1))
        return attn.to_out(torch.cat([attended, attn.mlp_act_fn(mlp)], dim=-1))


class FastOuterMaskSingleAttentionNAG(BesideStockRows, SingleStreamAttentionNAG):
    """Chroma single-stream fast path (``FluxAttnProcessor``): the block runs on the stock rows only; the negative
    rows' modulated text arrives through ``runtime.text_path`` (set by the joined-block hook) with their rows of the
    model's ``(rows, text + image)`` mask, and their attention output leaves the same way. No image token is
    duplicated; attention as in :func:`guided_image_and_text_outer_mask`, under the block's mask (the outer product
    of the stock rows' mask) and the outer product of the negative rows' mask."""

    split_text_processors = fast_processors = frozenset({"FluxAttnProcessor"})

    def takes_split_mask(self, call: GuidedCall, mask: torch.Tensor) -> bool:
        """Whether this path can serve the block's ``(rows, text + image)`` mask argument: boolean or floating, every
        image token's entry True / 1 (the Chroma pipeline's float 0/1 mask); the text part may be anything."""
        return mask.ndim == 2 and image_part_is_one(mask, call.text_prefix + call.padded_text_len)

    def guided_beside(
        self, attn: torch.nn.Module, call: GuidedCall, arguments: dict[str, Any], path: NegativeText
    ) -> Any:
        hidden = arguments["hidden_states"]
        rotary = arguments.get(self.rotary_argument)
        prefix = call.text_prefix
        padded = prefix + call.padded_text_len
        mask, negative_mask = arguments.get(self.mask_argument), path.mask
        if (mask is None) != (negative_mask is None):
            raise RuntimeError("NAG's fast path got a mask for only one branch of a single-stream block")
        if mask is not None:
            if mask.shape[-1] != hidden.shape[1] or negative_mask.shape[-1] != hidden.shape[1]:
                raise ValueError(
                    f"the attention mask covers {negative_mask.shape[-1]} tokens but the block's [text, image] has "
                    f"{hidden.shape[1]}; pass a (batch, text + image) mask"
                )
            mask = rows_of(outer_mask_row(mask, padded), hidden.shape[0])
            if mask is None:
                raise RuntimeError(
                    f"NAG's fast path expected the block to hand {type(attn).__name__} the outer product of its "
                    "(rows, text + image) mask; apply NAG with fast=False for this model"
                )
        q, k, v = image_qkv(attn, hidden)
        qn, kn, vn = image_qkv(attn, path.normed)
        if rotary is not None:
            q, k = rotate(q, rotary, 0, None), rotate(k, rotary, 0, None)
            qn, kn = rotate(qn, rotary, 0, padded), rotate(kn, rotary, 0, padded)
        z, text_positive, text_negative = guided_image_and_text_outer_mask(
            self,
            call,
            (q[:, padded:], k[:, padded:], v[:, padded:]),
            (q[:, :padded], k[:, :padded], v[:, :padded]),
            (qn, kn, vn),
            (prefix + call.positive_text_len, prefix + call.negative_text_len),
            mask,
            rows_of(negative_mask, len(call.cond_rows)),
        )
        path.attention = pad_tokens(text_negative, padded)
        return torch.cat([pad_tokens(text_positive, padded), z], dim=1).to(hidden.dtype)


class FastSingleProjectedAttentionNAG(BesideStockRows, SingleProjectedAttentionNAG):
    """AuraFlow single-block fast path (``AuraFlowAttnProcessor2_0``): the block runs on the stock rows only, each
    ``[register tokens, text (padded), image]``; the negative rows' modulated ``[register tokens, text]`` arrives
    through ``runtime.text_path`` (set by the joined-block hook) and its attention output (output projection included)
    leaves the same way. No image token is duplicated; image->image attention is computed once and merged by
    log-sum-exp with each branch's image->text attention."""

    split_text_processors = fast_processors = frozenset({"AuraFlowAttnProcessor2_0"})

    def guided_beside(
        self, attn: torch.nn.Module, call: GuidedCall, arguments: dict[str, Any], path: NegativeText
    ) -> Any:
        hidden = arguments["hidden_states"]
        prefix = call.text_prefix
        padded, lp, ln = prefix + call.padded_text_len, prefix + call.positive_text_len, prefix + call.negative_text_len
        lengths = dataclasses.replace(call, positive_text_len=lp, negative_text_len=ln)
        q, k, v = image_qkv(attn, hidden)
        z, text_positive, text_negative = guided_image_and_text(
            self,
            lengths,
            (q[:, padded:], k[:, padded:], v[:, padded:]),
            (q[:, :padded], k[:, :padded], v[:, :padded]),
            image_qkv(attn, path.normed),
        )
        out = project_out(attn, torch.cat([text_positive, z], dim=1).to(hidden.dtype))
        path.attention = pad_tokens(project_out(attn, text_negative.to(hidden.dtype)), padded)
        return torch.cat([pad_tokens(out[:, :lp], padded), out[:, lp:]], dim=1)
