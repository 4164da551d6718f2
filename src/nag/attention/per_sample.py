"""Per-sample rows: self-attention over per-sample sequences in which every row's text has its own length (Lumina2's
``[text, image, padding]``, Z-Image's ``[image, text, padding]``): the image tokens start at a different offset in
every row, so the negative rows take the guided rows' image tokens and image rotary tables span by span."""

from __future__ import annotations

from typing import Any

import torch

from ..kernels import attention, attention_with_lse, merge_attention
from ..state import GuidedCall, NegativeText
from .base import (
    BesideStockRows,
    NAGProcessor,
    OutputProjectionView,
    image_qkv,
    project_out,
    rotate_complex,
    unguided_ranges,
)
from .lse import merged_with_keys


class RowsPerSampleAttentionNAG(NAGProcessor):
    """Self-attention over per-sample sequences ``[text (its own length), image, padding]`` (Lumina2's joint
    blocks, layout ``"concat"``): every row's text has its own length (``call.text_lengths``), so the image
    tokens start at a different offset in every row. The stock processor runs once on the stock rows and once
    on the negative rows, whose image tokens and image rotary tables are the guided rows' (the image queries
    are the same in both passes); ``Z+`` and ``Z-`` are the image tokens' attention outputs, combined at the
    output projection; the negative rows' image output is the guided rows'."""

    rotary_kwarg = "image_rotary_emb"

    def image_spans(
        self, call: GuidedCall, x: torch.Tensor, mask: torch.Tensor | None
    ) -> list[tuple[int, int, int, int]]:
        """``(guided row, its image offset, the negative row's image offset, image length)`` per guided row."""
        b, lengths = call.batch, call.text_lengths
        image_len = int(mask[0].sum()) - lengths[0] if mask is not None else x.shape[1] - lengths[0]
        return [(r, lengths[r], lengths[b + j], image_len) for j, r in enumerate(call.guided_rows)]

    def guided(self, attn: torch.nn.Module, call: GuidedCall, arguments: dict[str, Any]) -> Any:
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

        negative = self.run_stock(
            OutputProjectionView(attn, capture), arguments, **branch(negative_x, slice(b, None), negative_rotary)
        )
        if "z" not in captured:
            raise RuntimeError(f"NAG cannot guide {type(attn).__name__} with {self.stock_kind}: no attn.to_out[0] call")
        positive = self.run_stock(
            OutputProjectionView(attn, combine),
            arguments,
            **branch(x[:b], slice(0, b), rotary[:b] if rotary is not None else None),
        )
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

    rotary_kwarg = "freqs_cis"

    def image_spans(
        self, call: GuidedCall, x: torch.Tensor, mask: torch.Tensor | None
    ) -> list[tuple[int, int, int, int]]:
        return [(r, 0, 0, call.image_lengths[r]) for r in call.guided_rows]


class FastRowsPerSampleImageFirstAttentionNAG(BesideStockRows, RowsPerSampleImageFirstAttentionNAG):
    """Z-Image main-block fast path: the block runs on the stock rows only (each ``[image, caption, padding]``); the
    negative rows' captions arrive beside them through ``runtime.text_path`` (set by the sample-block hook: modulated
    input, rotary tables, lengths), and their attention output leaves the same way. Every image token is projected
    once. For each guided row, image->image attention is computed once and merged by log-sum-exp with
    image->caption attention (``Z+``) and image->negative-caption attention (``Z-``); the negative caption's queries
    attend to ``[guided image, negative caption]``, the guided image with its own tables, the caption with its own
    row's (as the straightforward path gives them). The other stock rows get the stock attention with their mask."""

    split_text_processors = fast_processors = frozenset({"ZSingleStreamAttnProcessor"})

    def guided_beside(
        self, attn: torch.nn.Module, call: GuidedCall, arguments: dict[str, Any], path: NegativeText
    ) -> Any:
        hidden = arguments["hidden_states"]
        mask, rotary = arguments.get("attention_mask"), arguments.get(self.rotary_kwarg)
        q, k, v = image_qkv(attn, hidden)
        qn, kn, vn = image_qkv(attn, path.normed)
        if rotary is not None:
            q, k = rotate_complex(q, rotary), rotate_complex(k, rotary)
        if path.rotary is not None:
            qn, kn = rotate_complex(qn, path.rotary), rotate_complex(kn, path.rotary)
        negative_of = {r: j for j, r in enumerate(call.guided_rows)}
        z = q.new_zeros(q.shape)
        for rows in unguided_ranges(hidden.shape[0], negative_of):  # (the unconditional rows with CFG): stock attention
            key_mask = mask[rows][:, None, None, :] if mask is not None and mask.ndim == 2 else mask
            z[rows] = attention(q[rows], k[rows], v[rows], key_mask)
        z = z.flatten(2)
        z_negative = qn.new_zeros(qn.shape).flatten(2)
        for r, j in negative_of.items():
            image, valid = call.image_lengths[r], call.image_lengths[r] + call.text_lengths[r]
            length = path.spans[j][1]
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
            z_negative[j, :length] = attention(
                qn[j : j + 1, :length], torch.cat([ki, kt], dim=1), torch.cat([vi, vt], dim=1)
            ).flatten(2)[0]
        path.attention = project_out(attn, z_negative.to(hidden.dtype))
        return project_out(attn, z.to(hidden.dtype))


def lumina2_qkv(
    attn: Any, x: torch.Tensor, table: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
        q, k = rotate_complex(q, table), rotate_complex(k, table)
    repeats = attn.heads // k.shape[2]
    if repeats > 1:
        k, v = k.repeat_interleave(repeats, dim=2), v.repeat_interleave(repeats, dim=2)
    return q.to(x.dtype), k.to(x.dtype), v


class FastRowsPerSampleAttentionNAG(BesideStockRows, RowsPerSampleAttentionNAG):
    """Lumina2 joint-layer fast path: the block runs on the stock rows only (each ``[caption, image, padding]``,
    ``ModuleKind.SAMPLE_BLOCK`` with ``TextPath.text_first``); the negative rows' captions arrive beside them through
    ``runtime.text_path`` (set by the sample-block hook: modulated input, rotary tables, lengths), and their attention
    output leaves the same way. Every image token is projected once. For each guided row, image->image attention is
    computed once and merged by log-sum-exp with image->caption attention (``Z+``) and image->negative-caption
    attention (``Z-``); the negative caption's queries attend to ``[negative caption, guided image]``, the caption
    with its own row's rotary tables, the guided image with the guided row's (as the straightforward path gives
    them). The other stock rows get the stock attention with their mask."""

    split_text_processors = fast_processors = frozenset({"Lumina2AttnProcessor2_0"})

    def guided_beside(
        self, attn: torch.nn.Module, call: GuidedCall, arguments: dict[str, Any], path: NegativeText
    ) -> Any:
        hidden = arguments["hidden_states"]
        if arguments.get("encoder_hidden_states") is not hidden or arguments.get("base_sequence_length") is not None:
            raise RuntimeError(
                "NAG's Lumina2 fast path serves the blocks' self-attention at the default softmax scale "
                "only; apply NAG with fast=False"
            )
        mask, lengths = arguments.get("attention_mask"), call.text_lengths
        rows = hidden.shape[0]
        image_len = hidden.shape[1] - max(lengths[:rows])
        q, k, v = lumina2_qkv(attn, hidden, arguments.get(self.rotary_kwarg))
        qn, kn, vn = lumina2_qkv(attn, path.normed, path.rotary)
        negative_of = {r: j for j, r in enumerate(call.guided_rows)}
        z = q.new_zeros(q.shape)
        for unguided in unguided_ranges(rows, negative_of):  # (the unconditional rows with CFG): stock attention
            key_mask = mask[unguided].bool()[:, None, None, :] if mask is not None else None
            z[unguided] = attention(q[unguided], k[unguided], v[unguided], key_mask)
        z = z.flatten(2)
        z_negative = qn.new_zeros(qn.shape).flatten(2)
        for r, j in negative_of.items():
            text, valid, length = lengths[r], lengths[r] + image_len, path.spans[j][1]
            qi, ki, vi = q[r : r + 1, text:valid], k[r : r + 1, text:valid], v[r : r + 1, text:valid]
            kt, vt = kn[j : j + 1, :length], vn[j : j + 1, :length]
            image_image, lse_image = attention_with_lse(qi, ki, vi)
            z_positive = merged_with_keys(qi, image_image, lse_image, k[r : r + 1, :text], v[r : r + 1, :text])
            z_guided = merged_with_keys(qi, image_image, lse_image, kt, vt)
            z[r, text:valid] = self.combine(call, z_positive.flatten(2), z_guided.flatten(2))[0]
            # the caption's (and the row padding's) queries over the row's valid keys, as the stock mask has it
            others = torch.cat([q[r : r + 1, :text], q[r : r + 1, valid:]], dim=1)
            if others.shape[1]:
                out = attention(others, k[r : r + 1, :valid], v[r : r + 1, :valid]).flatten(2)[0]
                z[r, :text], z[r, valid:] = out[:text], out[text:]
            if length:
                z_negative[j, :length] = attention(
                    qn[j : j + 1, :length], torch.cat([kt, ki], dim=1), torch.cat([vt, vi], dim=1)
                ).flatten(2)[0]
        path.attention = project_out(attn, z_negative.to(hidden.dtype))
        return project_out(attn, z.to(hidden.dtype))
