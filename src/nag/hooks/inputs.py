"""A guided call's inputs: which rows are conditional, and the call's arguments extended with the negative
conditioning, per layout (``"cross"``, ``"joint"``, ``"concat"``, ``"prefix"``; see :class:`~nag.spec.Family`)."""

from __future__ import annotations

from typing import Any

import torch

from ..attention import pad_tokens
from ..spec import Family
from ..state import GuidedCall
from .parallel import TEXT_MASK_UNDER_PARALLELISM, shard_tokens


def conditional_rows(text: Any, reference: Any) -> torch.Tensor | None:
    """Rows of ``text`` that carry the conditional (positive) prompt, or None if none do.

    Pipelines batch classifier-free guidance as ``[unconditional, conditional]`` or call the
    denoiser once per branch; either way the conditional rows are the last ``len(reference)``
    rows and equal the positive prompt's embeddings.

    Models that take the text as a list of per-sample tensors of their own lengths (Z-Image) are
    called with ``[conditional, unconditional]``: for lists the first ``len(reference)`` entries
    are tried first, then the last ones.
    """
    if isinstance(text, (list, tuple)):
        rows = len(text)
        if reference is None:
            return torch.arange(rows, device=text[0].device) if rows else None
        n = len(reference)
        if n == 0 or rows < n or rows % n:
            return None
        # the pipeline may repeat each prompt's entry per image (num_images_per_prompt) after encoding
        for repeat in (k for k in range(1, rows // n + 1) if rows % (n * k) == 0):
            expected = [r for r in reference for _ in range(repeat)]
            for start in (0, rows - n * repeat):
                block = text[start : start + n * repeat]
                if all(
                    isinstance(t, torch.Tensor)
                    and t.shape == r.shape
                    and torch.equal(t, r.to(device=t.device, dtype=t.dtype))
                    for t, r in zip(block, expected)
                ):
                    return torch.arange(start, start + n * repeat, device=text[0].device)
        return None
    rows = text.shape[0]
    if reference is None:
        return torch.arange(rows, device=text.device)
    n = reference.shape[0]
    if rows < n or rows % n or text.shape[1:] != reference.shape[1:]:
        return None
    if not torch.equal(text[rows - n :], reference.to(device=text.device, dtype=text.dtype)):
        return None
    return torch.arange(rows - n, rows, device=text.device)


def rows_for(tensor: Any, count: int, name: str, dim: int = 0) -> Any:
    """One negative input for ``count`` guided rows: a tensor (rows along ``dim``, the first axis unless the
    family says otherwise) or a list of per-row tensors."""
    rows = len(tensor) if isinstance(tensor, (list, tuple)) else tensor.shape[dim]
    if rows == count:
        return tensor
    if rows == 1:
        if isinstance(tensor, (list, tuple)):
            return list(tensor) * count
        return tensor.expand(*tensor.shape[:dim], count, *tensor.shape[dim + 1 :])
    if rows and count % rows == 0:  # one per prompt, images repeated per prompt
        if isinstance(tensor, (list, tuple)):
            return [t for t in tensor for _ in range(count // rows)]
        return tensor.repeat_interleave(count // rows, dim=dim)
    raise ValueError(
        f"negative `{name}` has {rows} rows but the guided batch has {count}; pass one row, or one row per prompt"
    )


def to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, (list, tuple)):
        return [v.to(device=device) for v in value]
    return value.to(device=device)


def pad_text_ids(ids: torch.Tensor, length: int) -> torch.Tensor:
    """Unbatched text position ids for a longer branch: the positions continue with the last step between
    the given ones (Flux: all zero, so zeros; Flux2: ``(0, 0, 0, l)``, so ``l`` counts on)."""
    if ids.ndim == 3:
        ids = ids[0]
    missing = length - ids.shape[0]
    if missing <= 0:
        return ids
    step = ids[-1] - ids[-2] if ids.shape[0] >= 2 else torch.zeros_like(ids[-1])
    counts = torch.arange(1, missing + 1, device=ids.device, dtype=ids.dtype).unsqueeze(1)
    return torch.cat([ids, ids[-1] + counts * step])


def without_dim(shape: torch.Size, dim: int) -> tuple[int, ...]:
    """A tensor's shape without its batch axis ``dim``: the shape of one row."""
    return tuple(size for axis, size in enumerate(shape) if axis != dim)


def extend_inputs(
    family: Family,
    arguments: dict[str, Any],
    negative: dict[str, torch.Tensor],
    cond_rows: torch.Tensor,
    pad_to: int = 0,
    shards: int = 1,
) -> tuple[GuidedCall, dict[str, Any]]:
    """The guided call's inputs; ``pad_to``: joint and concat layouts pad both branches' text to at
    least this length (the model's required text length, see ``text_length``); ``shards``: the model splits the
    text into this many equal shards along the sequence (context parallelism, see ``nag.hooks.parallel``)."""
    if isinstance(arguments.get(family.text_kwarg), (list, tuple)):
        return _extend_lists(family, arguments, negative, cond_rows)
    if family.layout == "cross":
        return _extend_cross(family, arguments, negative, cond_rows, shards)
    if family.layout == "prefix":  # the stock rows run as stock; the negative prefix has a call of its own
        text = arguments[family.text_kwarg]
        rows, target = text.shape[0], family.causal_prefix.target_tokens(arguments)
        negative_len = negative["encoder_hidden_states"].shape[1]
        call = GuidedCall(rows, cond_rows, text.shape[1], negative_len, text.shape[1], image_lengths=[target] * rows)
        return call, {}
    if family.layout == "concat":
        return _extend_concat(family, arguments, negative, cond_rows, pad_to, shards)
    return _extend_joint(family, arguments, negative, cond_rows, pad_to, shards)


def checked_negative_text(family: Family, text: torch.Tensor, negative_text: torch.Tensor) -> torch.Tensor:
    """The negative text in the dtype of the call's text, refused with a clear error where its shape beyond the
    token axis differs (embeddings given to ``apply_to_denoiser`` from another text encoder)."""
    if negative_text.shape[2:] != text.shape[2:]:
        def after_tokens(x: torch.Tensor) -> str:
            return ", ".join(["rows", "tokens", *(str(size) for size in x.shape[2:])])

        raise ValueError(
            f"NAG's negative `encoder_hidden_states` has shape ({after_tokens(negative_text)}) but this call's "
            f"`{family.text_kwarg}` has ({after_tokens(text)}): they must agree after the token axis. Encode the "
            "negative prompt with the text encoder(s) that encoded the prompt."
        )
    return negative_text.to(text.dtype)


def _extend_cross(family: Family, arguments, negative, cond_rows, shards=1):
    """``[positive | negative]`` text along the sequence (masks likewise); with ``shards`` (the model splits the
    text into that many equal shards) each shard holds its share of the positive text, then its share of the
    negative text, and the call records the lengths within one shard: every rank splits its own shard as one
    process splits the whole text, and attention over all ranks sees each branch's whole text in order."""
    text = arguments[family.text_kwarg]
    rows, positive_len = text.shape[:2]
    negative_text = checked_negative_text(family, text, negative["encoder_hidden_states"])
    negative_len = negative_text.shape[1]
    if shards > 1 and (positive_len % shards or negative_len % shards):
        raise ValueError(
            f"under context parallelism over {shards} ranks NAG needs text lengths divisible by {shards}; the "
            f"prompt has {positive_len} tokens and the negative prompt {negative_len}: encode both with a "
            f"max_sequence_length divisible by {shards}"
        )
    positive_mask = arguments.get(family.mask_kwarg) if family.mask_kwarg else None
    negative_mask = negative.get("encoder_attention_mask")
    if shards > 1 and (positive_mask is not None or negative_mask is not None):
        raise NotImplementedError(TEXT_MASK_UNDER_PARALLELISM)
    if shards == 1 and len(cond_rows) == rows:  # (every row guided: the negative text is the whole filler)
        changes: dict[str, Any] = {family.text_kwarg: torch.cat([text, negative_text], dim=1)}
    else:
        filler = text.new_zeros(rows, negative_len, *text.shape[2:])
        filler[cond_rows] = negative_text
        changes = {family.text_kwarg: _join_shards(text, filler, shards)}
    if family.mask_kwarg and (positive_mask is not None or negative_mask is not None):
        if positive_mask is not None and positive_mask.ndim != 2:
            raise ValueError(
                f"NAG expects a (batch, tokens) `{family.mask_kwarg}`, got shape {tuple(positive_mask.shape)}"
            )
        like = positive_mask if positive_mask is not None else negative_mask
        if positive_mask is None:
            positive_mask = like.new_ones(rows, positive_len)
        mask_filler = like.new_ones(rows, negative_len)
        if negative_mask is not None:
            mask_filler[cond_rows] = negative_mask.to(like.dtype)
        changes[family.mask_kwarg] = _join_shards(positive_mask, mask_filler, shards)
    call = GuidedCall(
        rows,
        cond_rows,
        positive_len // shards,
        negative_len // shards,
        (positive_len + negative_len) // shards,
        static_negative=family.static_text,
    )
    return call, changes


def _join_shards(positive: torch.Tensor, negative: torch.Tensor, shards: int) -> torch.Tensor:
    """``(rows, tokens, ...)`` tensors joined along the tokens as ``shards`` equal chunks, each its share of
    ``positive`` then its share of ``negative`` (one chunk: ``[positive | negative]``)."""
    parts = (positive.unflatten(1, (shards, -1)), negative.unflatten(1, (shards, -1)))
    return torch.cat(parts, dim=2).flatten(1, 2)


def _guided_row_kwargs(family: Family, arguments: dict[str, Any], rows: int, cond_rows: torch.Tensor) -> dict:
    """The family's per-row arguments (timestep, guidance, ...) with the guided rows' values repeated for the
    negative rows; a per-row argument with neither one row nor one per row is refused."""
    changes = {}
    for key in family.row_kwargs:
        value = arguments.get(key)
        if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == rows:
            changes[key] = torch.cat([value, value[cond_rows]])
        elif isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] != 1:
            raise ValueError(f"`{key}` has {value.shape[0]} rows for a batch of {rows}")
    return changes


def _extend_joint(family: Family, arguments, negative, cond_rows, pad_to=0, shards=1):
    text = arguments[family.text_kwarg]
    rows, positive_len = text.shape[:2]
    negative_text = checked_negative_text(family, text, negative["encoder_hidden_states"])
    negative_len = negative_text.shape[1]
    if family.equal_text_lengths and negative_len != positive_len:
        raise ValueError(
            f"the negative text has {negative_len} tokens but the call's `{family.text_kwarg}` has {positive_len}; "
            f"{family.name} attends to all of its text without a mask, so NAG needs both at the same length: encode "
            "the negative prompt with the same max_sequence_length as the prompt (or pass the negative prompt as text)"
        )
    padded = max(positive_len, negative_len, pad_to)
    layout = TextLayout(positive_len, negative_len, padded, shards)
    changes: dict[str, Any] = {family.text_kwarg: torch.cat([layout.place(text), layout.place(negative_text)])}
    if family.mask_kwarg:
        positive_mask = arguments.get(family.mask_kwarg)
        negative_mask = negative.get("encoder_attention_mask")
        if positive_mask is not None or negative_mask is not None:
            like = positive_mask if positive_mask is not None else negative_mask
            if positive_mask is None:
                positive_mask = like.new_ones(rows, positive_len)
            if negative_mask is None:
                negative_mask = like.new_ones(len(cond_rows), negative_len)
            # padding past each branch's own length is never attended (the processors slice it off)
            changes[family.mask_kwarg] = torch.cat(
                [layout.place(positive_mask), layout.place(negative_mask.to(like.dtype))]
            )
    for key in family.negative_keys:
        if key in ("encoder_hidden_states", "encoder_attention_mask"):
            continue
        value = arguments.get(key)
        if value is None:
            raise ValueError(f"the denoiser call has no `{key}`; NAG needs it to modulate the negative text")
        dim = family.batch_dim(key)
        row, negative_row = without_dim(value.shape, dim), without_dim(negative[key].shape, dim)
        if row != negative_row:
            raise ValueError(
                f"negative `{key}` has shape {negative_row} per row but the call's has {row}; "
                "encode the negative prompt with the pipeline's encode_prompt"
            )
        changes[key] = torch.cat([value, negative[key].to(value.dtype)], dim=dim)
    changes.update(_guided_row_kwargs(family, arguments, rows, cond_rows))
    if family.text_ids_kwarg and arguments.get(family.text_ids_kwarg) is not None:
        changes[family.text_ids_kwarg] = layout.text_ids(arguments[family.text_ids_kwarg])
    call = GuidedCall(rows, cond_rows, *layout.lengths())
    return call, changes


class TextLayout:
    """Where the joint layouts put each branch's text tokens: first, padded to ``padded`` tokens; with ``shards``
    (the model splits the text sequence into that many equal shards), each shard holds its share of each branch's
    tokens first and padding after, so that every rank cuts its branches from its own shard exactly as one process
    cuts them from the whole text (the call then records the lengths within one shard)."""

    def __init__(self, positive_len: int, negative_len: int, padded: int, shards: int = 1):
        if shards > 1 and (positive_len % shards or negative_len % shards):
            raise ValueError(
                f"under context parallelism over {shards} ranks NAG needs text lengths divisible by {shards}; the "
                f"prompt has {positive_len} tokens and the negative prompt {negative_len}: encode both with a "
                f"max_sequence_length divisible by {shards}"
            )
        self.positive_len, self.negative_len, self.shards = positive_len, negative_len, shards
        self.chunk = -(-padded // shards)  # tokens per shard

    def place(self, x: torch.Tensor) -> torch.Tensor:
        """A branch's ``(rows, tokens, ...)`` text (or mask) in the layout."""
        if self.shards == 1:
            return pad_tokens(x, self.chunk)
        return shard_tokens(x, self.shards, self.chunk)

    def lengths(self) -> tuple[int, int, int]:
        """Positive, negative and padded text lengths as the attention modules see them (within one shard)."""
        return self.positive_len // self.shards, self.negative_len // self.shards, self.chunk

    def text_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Text position ids for the layout (one table for both branches, as the models take them)."""
        if self.shards == 1:
            return pad_text_ids(ids, self.chunk)
        full = pad_text_ids(ids, max(self.positive_len, self.negative_len))
        positive, negative = (self.place(full[None, :length])[0] for length in (self.positive_len, self.negative_len))
        real = [self.place(full.new_ones(1, length, 1))[0].bool() for length in (self.positive_len, self.negative_len)]
        both = real[0] & real[1]
        if not torch.equal(positive.masked_fill(~both, 0), negative.masked_fill(~both, 0)):
            raise NotImplementedError(
                "under context parallelism NAG needs the prompt and the negative prompt at the same text length "
                "for a model whose text position ids differ from token to token (the model takes one position "
                "table for all rows, and parallel attention needs every rank to hold an equal share of each "
                "branch, so branches of other lengths would need other positions in the same shard); encode both "
                "with the same max_sequence_length"
            )
        table = torch.where(real[0], positive, negative)
        # batched ids (FLUX.2) stay batched: the model's plan splits them only in the shape the model was given
        return table.expand(ids.shape[0], *table.shape) if ids.ndim == 3 else table


def _extend_concat(family: Family, arguments, negative, cond_rows, pad_to=0, shards=1):
    text = arguments[family.text_kwarg]
    rows, positive_len = text.shape[:2]
    negative_len = negative["encoder_hidden_states"].shape[1]
    padded = max(positive_len, negative_len, pad_to)
    call, changes = _extend_joint(
        family,
        {k: v for k, v in arguments.items() if k != family.mask_kwarg},
        {k: v for k, v in negative.items() if k != "encoder_attention_mask"},
        cond_rows,
        pad_to,
        shards,
    )
    image = arguments[family.image_kwarg]
    changes[family.image_kwarg] = torch.cat([image, image[cond_rows]])
    if family.mask_kwarg:
        positive_mask = arguments.get(family.mask_kwarg)
        negative_mask = negative.get("encoder_attention_mask")
        if positive_mask is not None or negative_mask is not None:
            if shards > 1:  # (no family marked exact under context parallelism takes a concat-layout mask)
                raise NotImplementedError(TEXT_MASK_UNDER_PARALLELISM)
            if positive_mask is not None and positive_mask.ndim != 2:
                raise ValueError(
                    f"NAG expects a (batch, tokens) `{family.mask_kwarg}`, got shape {tuple(positive_mask.shape)}"
                )
            if positive_mask is None:
                like = negative_mask
                image_len = image.shape[1] if family.mask_covers_image else 0
                positive_mask = like.new_ones(rows, positive_len + image_len)
            image_mask = positive_mask[:, positive_len:]
            if image_mask.shape[0] == 1:
                image_mask = image_mask.expand(rows, -1)
            positive_text_mask = positive_mask[:, :positive_len]
            if negative_mask is None:
                negative_mask = positive_mask.new_ones(len(cond_rows), negative_len)
            negative_mask = negative_mask.to(positive_mask.dtype)
            # the padding past each branch's own length is never attended (the processors slice it off)
            changes[family.mask_kwarg] = torch.cat(
                [
                    torch.cat([pad_tokens(positive_text_mask, padded), image_mask], dim=1),
                    torch.cat([pad_tokens(negative_mask, padded), image_mask[cond_rows]], dim=1),
                ]
            )
    return call, changes


def _extend_lists(family: Family, arguments, negative, cond_rows):
    """Concat layout for models that take per-sample lists (Z-Image: ``x`` and ``cap_feats`` lists of
    tensors of their own lengths, padding removed): the negative rows are appended to both lists, the
    image entries copies of the conditional rows', the per-row arguments repeated from them."""
    if family.layout != "concat":
        raise NotImplementedError(f"NAG takes list inputs on the concat layout only, not {family.layout!r}")
    text, image = list(arguments[family.text_kwarg]), list(arguments[family.image_kwarg])
    if any(not isinstance(t, torch.Tensor) for t in text) or any(not isinstance(i, torch.Tensor) for i in image):
        raise NotImplementedError("NAG guides one image and one caption per sample (nested lists: not supported)")
    rows, picked = len(text), cond_rows.tolist()
    negative_text = negative["encoder_hidden_states"]
    negative_text = [t.to(text[0].dtype) for t in negative_text]  # a list, or a (rows, tokens, width) tensor
    changes: dict[str, Any] = {
        family.text_kwarg: text + negative_text,
        family.image_kwarg: image + [image[r] for r in picked],
    }
    changes.update(_guided_row_kwargs(family, arguments, rows, cond_rows))
    positive_len = max(t.shape[0] for t in text)
    negative_len = max(t.shape[0] for t in negative_text)
    call = GuidedCall(rows, cond_rows, positive_len, negative_len, max(positive_len, negative_len))
    return call, changes
