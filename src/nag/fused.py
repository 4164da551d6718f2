"""The joint-attention paths' log-sum-exp merge and the NAG combine as one compiled region.

On the joint-attention fast paths each branch's image-query attention comes in parts over
disjoint key sets (image->image, computed once and shared, and image->text of that branch), each
with its log-sum-exp. :func:`merge_and_combine` merges each branch's parts into its attention
output (:func:`nag.kernels.merge_attention`, folded over the parts) and applies
:func:`nag.combine.nag_combine` to the two, compiled into one pass by default (see
:mod:`nag.compiled`); :func:`merge_and_combine_eager` is the same computation in plain PyTorch,
the reference and the fallback.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .combine import Scalar, check_combine_inputs, combine_eager, combine_scalars, records_gradient
from .compiled import CompiledFunction

__all__ = ["merge_and_combine", "merge_and_combine_eager", "merge_parts"]

Part = tuple[torch.Tensor, torch.Tensor]


def merge_parts(parts: Sequence[Part], first_complete: bool = False) -> torch.Tensor:
    """Attention over the union of disjoint key sets from the attentions ``(out, lse)`` over each (``(B, L, H, D)``
    and float32 ``(B, L, H)``), heads flattened: ``(B, L, H * D)`` in the dtype of the first part's ``out``.

    Folds :func:`nag.kernels.merge_attention`'s formula over the parts in order (two parts: the same
    operations, so the same result; more parts are merged in float32, rounded once at the end). A part with a
    log-sum-exp of ``-inf`` (no key) adds nothing. ``first_complete``: the caller knows that the first part has a key
    for every query (a finite log-sum-exp everywhere: the joint paths' image->image part), which spares the test for
    two empty parts in a row."""
    out, lse = parts[0]
    dtype = out.dtype
    merged = out.float()
    for index, (other, other_lse) in enumerate(parts[1:], start=2):
        # the weight of what is merged so far against the next part: sigmoid(lse - other_lse); an empty next
        # part (-inf) gives 1 and an empty part so far 0; where both are empty (-inf - -inf: NaN) 1 (zeros either way)
        weight = torch.sigmoid(lse - other_lse)
        if not first_complete:
            weight = torch.where(other_lse == float("-inf"), 1.0, weight)
        merged = torch.lerp(other.float(), merged, weight.unsqueeze(-1))  # other + weight * (merged - other): one pass
        if index < len(parts):  # (the last part's log-sum-exp is not needed)
            lse = torch.logaddexp(lse, other_lse)
    return merged.to(dtype).flatten(-2)


def merge_and_combine_eager(
    positive: Sequence[Part],
    negative: Sequence[Part],
    s: Scalar,
    inverse_s: Scalar,
    tau: Scalar,
    alpha: Scalar,
    eps: Scalar,
    eps_over_s: Scalar,
    norm: int = 1,
    first_complete: bool = False,
) -> torch.Tensor:
    """:func:`merge_and_combine` in plain PyTorch after its checks and shortcuts (the scalars from
    :func:`nag.combine.combine_scalars`)."""
    return combine_eager(
        merge_parts(positive, first_complete), merge_parts(negative, first_complete),
        s, inverse_s, tau, alpha, eps, eps_over_s, norm,
    )


_COMPILED = CompiledFunction(merge_and_combine_eager, "merge_and_combine")


def merge_and_combine(
    positive: Sequence[Part],
    negative: Sequence[Part],
    scale: float,
    tau: float,
    alpha: float,
    norm: int = 1,
    eps: float = 1e-6,
    *,
    compiled: bool = True,
    first_complete: bool = False,
) -> torch.Tensor:
    """NAG's guided image-query output from each branch's attention in parts, merged and combined in one pass.

    ``positive`` and ``negative`` are sequences of ``(out, lse)`` pairs, one per disjoint key set of that branch:
    ``out`` the attention of the guided rows' image queries over that key set, ``(B, L, H, D)`` (the layout of
    :mod:`nag.kernels`), and ``lse`` its natural-log log-sum-exp, float32 ``(B, L, H)`` (``-inf`` where the set has
    no key for a query). Every pair has the same ``B, L, H, D``; a key set's additive bias (a mask's value shared by
    its keys) is added to its ``lse`` by the caller. A part both branches share (image->image) is passed in both.

    Returns ``nag_combine(merge_parts(positive), merge_parts(negative), scale, tau, alpha, norm, eps)``:
    ``(B, L, H * D)`` in the dtype of ``positive[0][0]``, with :func:`nag.combine.nag_combine`'s numerics
    (float32 norms for half precision, no overflow) and the same result as :func:`nag.kernels.merge_attention` on
    each branch followed by ``nag_combine`` (equal for two parts per branch in the eager code; to rounding
    compiled). ``scale == 1`` or ``alpha == 0`` returns the positive branch's merge.

    Compiled, eager or falling back exactly as :func:`nag.combine.nag_combine` (``compiled=False``,
    ``NAG_EAGER=1``, inside a ``torch.compile`` trace, or after a failed compile). ``first_complete``: each branch's
    first part has a key for every query (see :func:`merge_parts`; the image->image part below).

    On a joint-attention path (``rows`` the guided rows; ``image_bias``: a mask's value shared by the image keys of
    the negative branch, or 0)::

        image, image_lse = attention_with_lse(qi, ki, vi)                       # once, every row
        positive, positive_lse = attention_with_lse(qi, kp, vp)
        negative, negative_lse = attention_with_lse(qi[rows], kn, vn)           # guided rows only
        z_rows = merge_and_combine([(image[rows], image_lse[rows]), (positive[rows], positive_lse[rows])],
                                   [(image[rows], image_lse[rows] + image_bias), (negative, negative_lse)],
                                   s.scale, s.tau, s.alpha, norm=s.norm, eps=s.eps)

    ``z_rows`` replaces ``merge_attention(image, image_lse, positive, positive_lse).flatten(2)[rows]``; rows that
    are not guided (CFG's unconditional ones) keep that plain merge.
    """
    if not positive or not negative:
        raise ValueError("merge_and_combine needs at least one (out, lse) part per branch")
    shapes = {tuple(out.shape) for out, _ in (*positive, *negative)}
    if len(shapes) != 1:
        raise ValueError(f"every part's output must have the same shape, got {sorted(shapes)}")
    check_combine_inputs(positive[0][0], negative[0][0])
    if scale == 1.0 or alpha == 0.0:
        return merge_parts(positive, first_complete)
    scalars = combine_scalars(positive[0][0].dtype, negative[0][0].dtype, scale, tau, alpha, eps)
    outputs = [out for out, _ in (*positive, *negative)]
    if not compiled or not _COMPILED.wanted(outputs[0].numel()) or records_gradient(*outputs):
        return merge_and_combine_eager(positive, negative, *scalars, norm, first_complete)
    batch, tokens, heads, head_dim = positive[0][0].shape  # one token axis, as in nag_combine

    def flat(parts: Sequence[Part]) -> tuple[Part, ...]:
        return tuple((out.reshape(-1, heads, head_dim), lse.reshape(-1, heads)) for out, lse in parts)

    out = _COMPILED(flat(positive), flat(negative), *scalars, norm, first_complete)
    return out.reshape(batch, tokens, heads * head_dim)
