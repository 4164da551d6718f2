"""Joint attention by log-sum-exp merge: every image token projected and attended once.

The image queries attend to the image keys once; that partial attention (with its log-sum-exp) is merged with the
image queries' attention to the positive text (``Z+``) and, for the guided rows, to the negative text (``Z-``), so
no image token is processed twice. The merge identity: ``Attn(q, [K1, K2]) = (e^l1 o1 + e^l2 o2) / (e^l1 + e^l2)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..kernels import (
    attention,
    attention_with_lse,
    attention_with_lse_and_key_bias,
    merge_attention,
)
from ..state import GuidedCall
from .base import NAGProcessor, pad_tokens, rotate, rows_of
from .placement import ON_THIS_PROCESS, AttentionPlacement


def text_and_image_key_mask(text_mask: torch.Tensor | None, image_len: int) -> torch.Tensor | None:
    """A ``(rows, 1, 1, text + image)`` boolean key mask: the text's own, every image key valid."""
    if text_mask is None:
        return None
    valid = text_mask.bool()
    return torch.cat([valid, valid.new_ones(valid.shape[0], image_len)], dim=1)[:, None, None, :]


def _first_tokens(tensor: torch.Tensor, count: int) -> torch.Tensor:
    """``tensor[:, :count]``, the tensor itself where it has ``count`` tokens (no view made)."""
    return tensor if tensor.shape[1] == count else tensor[:, :count]


def _guided_rows_of(call: GuidedCall, rows: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """What takes the guided rows of a tensor over ``rows`` rows: nothing to take where every row is guided."""
    if len(call.guided_rows) == rows:
        return lambda tensor: tensor
    index = call.row_index
    return lambda tensor: tensor[index]


def guided_merge(
    processor: NAGProcessor, call: GuidedCall, image: tuple[torch.Tensor, torch.Tensor],
    text: tuple[torch.Tensor, torch.Tensor], positive: list, negative: list,
) -> torch.Tensor:
    """Every row's image-query attention merged from its ``image`` and ``text`` parts (``(out, lse)`` over all rows),
    the guided rows' replaced by NAG on their ``positive`` and ``negative`` parts, merged and combined in one pass.
    Heads flattened."""
    rows = call.row_index
    if len(call.guided_rows) == image[0].shape[0]:  # (every row guided: no plain merge needed)
        return processor.merge_and_combine(positive, negative)
    z = merge_attention(image[0], image[1], text[0], text[1]).flatten(2)
    z[rows] = processor.merge_and_combine(positive, negative)
    return z


def guided_image_and_text(
    processor: NAGProcessor,
    call: GuidedCall,
    image: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    positive_text: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    negative_text: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    positive_mask: torch.Tensor | None = None,
    negative_mask: torch.Tensor | None = None,
    placement: AttentionPlacement = ON_THIS_PROCESS,
    text_queries: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Joint attention for the guided call, every image token projected and attended once.

    ``positive_mask`` / ``negative_mask``: ``(rows, text)`` key masks of each branch's text (its own length; every
    image key valid, as Qwen-Image's processor builds its joint mask). Returns the guided image rows' attention
    output (NAG applied to the conditional rows) and the positive and negative text queries' outputs, all with
    heads flattened. ``placement``: where the attention runs (this process, or over every rank's keys/values under
    context parallelism: then the tokens are this rank's shards, and no masks). ``text_queries=False``: the text
    queries' outputs are not computed (None; a block whose text stream ends at this attention).
    """
    qi, ki, vi = image
    qp, kp, vp = (_first_tokens(t, call.positive_text_len) for t in positive_text)
    qn, kn, vn = (_first_tokens(t, call.negative_text_len) for t in negative_text)
    if positive_mask is not None:
        positive_mask = _first_tokens(positive_mask, call.positive_text_len)
    if negative_mask is not None:
        negative_mask = _first_tokens(negative_mask, call.negative_text_len)
    rows = _guided_rows_of(call, qi.shape[0])

    image_image, lse_image = placement.with_lse(qi, ki, vi)
    image_positive, lse_positive = placement.with_lse(qi, kp, vp, positive_mask)
    image_negative, lse_negative = placement.with_lse(rows(qi), kn, vn, negative_mask)
    shared = (rows(image_image), rows(lse_image))
    z = guided_merge(
        processor, call, (image_image, lse_image), (image_positive, lse_positive),
        [shared, (rows(image_positive), rows(lse_positive))], [shared, (image_negative, lse_negative)],
    )

    if not text_queries:
        return z, None, None
    image_len = qi.shape[1]
    text_positive = placement.attend(
        qp, torch.cat([kp, ki], dim=1), torch.cat([vp, vi], dim=1), text_and_image_key_mask(positive_mask, image_len)
    ).flatten(2)
    text_negative = placement.attend(
        qn,
        torch.cat([kn, rows(ki)], dim=1),
        torch.cat([vn, rows(vi)], dim=1),
        text_and_image_key_mask(negative_mask, image_len),
    ).flatten(2)
    return z, text_positive, text_negative


def single_stream_attention(
    processor: NAGProcessor, call: GuidedCall, qkv: Any, negative_qkv: Any, rotary: Any, padded: int,
    placement: AttentionPlacement = ON_THIS_PROCESS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A single-stream block's attention on the stock rows ``[text (padded), image]`` with the negative text rows
    beside them (queries/keys/values of each, rotary tables over ``[text, image]``): the stock rows' output with NAG
    on the guided rows' image tokens, and the negative text's output, both with heads flattened, text padded (attention
    at ``placement``, see :func:`guided_image_and_text`)."""
    (q, k, v), (qn, kn, vn) = qkv, negative_qkv
    if rotary is not None:
        q, k = rotate(q, rotary, 0, None), rotate(k, rotary, 0, None)
        qn, kn = rotate(qn, rotary, 0, padded), rotate(kn, rotary, 0, padded)
    image = (q[:, padded:], k[:, padded:], v[:, padded:])
    text = (q[:, :padded], k[:, :padded], v[:, :padded])
    z, text_positive, text_negative = guided_image_and_text(
        processor, call, image, text, (qn, kn, vn), placement=placement
    )
    return torch.cat([pad_tokens(text_positive, padded), z], dim=1), pad_tokens(text_negative, padded)


def sequence_attention(
    processor: NAGProcessor, call: GuidedCall, qkv: Any, rotary: Any, text_len: int,
    placement: AttentionPlacement = ON_THIS_PROCESS,
) -> torch.Tensor:
    """A single-stream block's attention on the stock rows ``[text, negative text, image]`` (queries/keys/values; each
    text ``text_len`` tokens, padded; every row guided by its own negative text; rotary tables over ``[text, image]``,
    the negative text at the text's positions): the text's and the negative text's outputs and the image tokens' with
    NAG, in that order, heads flattened (attention at ``placement``, see :func:`guided_image_and_text`)."""
    q, k, v = qkv
    if rotary is not None:
        table = tuple(torch.cat([part[:text_len], part]) for part in rotary)
        q, k = rotate(q, table, 0, None), rotate(k, table, 0, None)

    def part(start: int, stop: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return q[:, start:stop], k[:, start:stop], v[:, start:stop]

    z, text_positive, text_negative = guided_image_and_text(
        processor, call, part(2 * text_len, None), part(0, text_len), part(text_len, 2 * text_len), placement=placement
    )
    return torch.cat([pad_tokens(text_positive, text_len), pad_tokens(text_negative, text_len), z], dim=1)


def image_part_is_one(mask: torch.Tensor, image_start: int) -> bool:
    """Whether a ``(rows, text + image)`` mask is boolean or floating with every image token's entry True / 1. Inside
    a ``torch.compile`` trace, where the mask's values cannot choose the path: no (the straightforward path)."""
    if torch.compiler.is_compiling():
        return False
    image = mask[:, image_start:]
    if mask.dtype == torch.bool:
        return bool(image.all())
    return mask.is_floating_point() and bool((image == 1).all())


def outer_mask_row(mask: torch.Tensor, image_start: int) -> torch.Tensor | None:
    """For a ``(rows, 1, L, L)`` block mask built as Chroma's blocks build theirs, the outer product
    ``m[:, None, None, :] * m[:, None, :, None]`` of a ``(rows, L)`` mask ``m`` over ``[text, image]``: the first
    image query's row when its image part is all ones (True). Then ``m``'s image part is one value ``c`` with
    ``c * c = 1``, every image query has that row, and its outer product is the block mask again: the ``(rows, L)``
    mask the fast path works from. None for any other form."""
    if mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[2] != mask.shape[3] or not 0 <= image_start < mask.shape[3]:
        return None
    row = mask[:, 0, image_start]
    return row if image_part_is_one(row, image_start) else None


def outer_mask_parts(mask: torch.Tensor, text_len: int, image_start: int) -> tuple[torch.Tensor, float, torch.Tensor]:
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


def guided_image_and_text_outer_mask(
    processor: NAGProcessor,
    call: GuidedCall,
    image: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    positive_text: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    negative_text: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    text_lengths: tuple[int, int],
    positive_mask: torch.Tensor | None,
    negative_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`guided_image_and_text` for blocks whose attention mask is the outer product of a ``(rows, L)`` mask
    over ``[padded text, image]`` (Chroma): ``positive_mask`` / ``negative_mask`` are each branch's ``(rows, L)``
    masks (image part all ones / True; None: no mask), ``text_lengths`` the branches' own text lengths.

    The image queries' scores get the same bias from every image key (float: +1, boolean: none), added to the
    image->image log-sum-exp, and a per-key bias from the text keys (:func:`attention_with_lse_and_key_bias`), so
    image->image attention is still computed once and merged; the text queries attend to ``[own text, guided image]``
    under their rows of the outer product, as the stock processor gives them."""
    rows = call.row_index
    (qi, ki, vi), (lp, ln) = image, text_lengths
    image_start = positive_text[0].shape[1]
    qp, kp, vp = (t[:, :lp] for t in positive_text)
    qn, kn, vn = (t[:, :ln] for t in negative_text)
    key_bias_p, image_bias_p, text_mask_p = (
        outer_mask_parts(positive_mask, lp, image_start) if positive_mask is not None else (None, 0.0, None)
    )
    key_bias_n, image_bias_n, text_mask_n = (
        outer_mask_parts(negative_mask, ln, image_start) if negative_mask is not None else (None, 0.0, None)
    )

    image_image, lse_image = attention_with_lse(qi, ki, vi)
    image_positive, lse_positive = attention_with_lse_and_key_bias(qi, kp, vp, key_bias_p)
    image_negative, lse_negative = attention_with_lse_and_key_bias(qi[rows], kn, vn, key_bias_n)
    positive_image = (image_image, lse_image + image_bias_p)
    z = guided_merge(
        processor, call, positive_image, (image_positive, lse_positive),
        [(image_image[rows], positive_image[1][rows]), (image_positive[rows], lse_positive[rows])],
        [(image_image[rows], lse_image[rows] + image_bias_n), (image_negative, lse_negative)],
    )

    text_positive = attention(qp, torch.cat([kp, ki], dim=1), torch.cat([vp, vi], dim=1), text_mask_p).flatten(2)
    text_negative = attention(
        qn, torch.cat([kn, ki[rows]], dim=1), torch.cat([vn, vi[rows]], dim=1), text_mask_n
    ).flatten(2)
    return z, text_positive, text_negative


def merged_with_keys(
    q: torch.Tensor, base: torch.Tensor, base_lse: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """Attention of ``q`` over the keys behind ``(base, base_lse)`` and ``k``/``v`` (none: ``base`` itself)."""
    if k.shape[1] == 0:
        return base
    out, lse = attention_with_lse(q, k, v)
    return merge_attention(base, base_lse, out, lse)


def text_key_mask(mask: torch.Tensor | None, image_len: int, rows: int) -> torch.Tensor | None:
    """The text keys' part ``(rows, text)`` of a boolean key mask over ``[image, text]`` shaped ``(rows or 1, 1, 1,
    keys)`` (as HunyuanVideo and HunyuanImage build it: every image key valid, the text's valid tokens first), or of
    a text-only one shaped ``(rows or 1, text)`` (HunyuanVideo 1.5's); None without a mask."""
    if mask is None:
        return None
    return (mask if mask.ndim == 2 else mask[:, 0, 0, image_len:]).expand(rows, -1)


def is_image_first_key_mask(mask: torch.Tensor | None, image_len: int, text_len: int) -> bool:
    if mask is None:
        return True
    if mask.dtype != torch.bool:
        return False
    if mask.ndim == 2:
        return mask.shape[1] == text_len
    return mask.ndim == 4 and mask.shape[1] == 1 and mask.shape[2] == 1 and mask.shape[3] == image_len + text_len


def shared_outer_mask(
    text_mask: torch.Tensor | None, rows: int, image_len: int, dtype: torch.dtype
) -> torch.Tensor | None:
    """The ``(rows, text + image)`` 0/1 mask (in the queries' ``dtype``, as the processor casts it) whose outer product
    ``CogView4AttnProcessor`` builds from its ``(rows, text)`` text mask (every image token valid)."""
    if text_mask is None:
        return None
    valid = (rows_of(text_mask, rows).float() > 0).to(dtype)
    return torch.cat([valid, valid.new_ones(rows, image_len)], dim=1)
