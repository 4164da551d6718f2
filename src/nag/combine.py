"""The NAG equation: one pure function on tensors (torch only)."""

from __future__ import annotations

import math

import torch

__all__ = ["nag_combine"]


def nag_combine(
    z_positive: torch.Tensor,
    z_negative: torch.Tensor,
    scale: float,
    tau: float,
    alpha: float,
    norm: int = 1,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Combine positive and negative attention outputs by Normalized Attention Guidance.

    ``z_positive`` and ``z_negative`` are attention outputs of the same queries against the
    positive and the negative context, shaped ``(..., tokens, hidden)`` with all heads flattened
    into the last dimension. Per token::

        z_tilde = scale * z_positive - (scale - 1) * z_negative      # extrapolation
        r       = |z_tilde|_p / |z_positive|_p                        # over the hidden dim
        z_hat   = z_tilde * min(r, tau) / r                           # normalization
        out     = alpha * z_hat + (1 - alpha) * z_positive            # blend

    Scale convention: ``scale`` is the extrapolation factor ``s`` above; ``scale = 1`` means
    no guidance. The paper's tables quote ``phi = scale - 1`` (so the paper's phi = 4 is
    ``scale = 5`` here). ``scale = 1`` or ``alpha = 0`` returns (a copy of) ``z_positive``.

    Numerics: finite inputs always give a finite result of the dtype and shape of
    ``z_positive``.

    * Both norms are floored at ``eps``, so a zero-norm token yields ``z_positive``, never NaN.
    * Half-precision inputs are computed in float32. The equation is evaluated as
      ``z_hat = w * min(s, tau * |z_positive| / |w|)`` with ``w = z_tilde / s =
      (z_positive - z_negative) + z_negative / s``, which is the formula above rearranged so
      that no intermediate grows with ``s`` and ``z_negative == z_positive`` gives
      ``z_positive`` to rounding for any ``s``.
    * Unless both inputs are float16 (whose range float32 covers with room to spare), each
      token is first divided by the power of two just above its largest magnitude and
      multiplied back at the end. Scaling by a power of two is exact, so ordinary inputs give
      the same bits as without it, while bfloat16/float32/float64 values near their type's
      limits neither overflow nor underflow the norms. Tokens are independent of each other.
    * A result beyond the output dtype's range (fp16 values near 65504 pushed further out by
      the guidance) saturates at the largest finite value instead of becoming inf.
    """
    if z_positive.shape != z_negative.shape:
        raise ValueError(
            f"z_positive {tuple(z_positive.shape)} and z_negative {tuple(z_negative.shape)} must have the same shape"
        )
    out_dtype = z_positive.dtype
    if not (out_dtype.is_floating_point and z_negative.dtype.is_floating_point):
        raise TypeError(
            f"nag_combine needs floating-point attention outputs, got {z_positive.dtype} and {z_negative.dtype}"
        )
    if scale == 1.0 or alpha == 0.0:
        return z_positive.clone()

    half = (torch.float16, torch.bfloat16)
    compute_dtype = torch.float32 if out_dtype in half else out_dtype
    if z_negative.dtype not in half and torch.finfo(z_negative.dtype).bits > torch.finfo(compute_dtype).bits:
        compute_dtype = z_negative.dtype
    info = torch.finfo(compute_dtype)

    up: torch.Tensor | None = None
    if z_positive.dtype == torch.float16 and z_negative.dtype == torch.float16:
        # float32 holds every intermediate of float16 inputs: no rescaling needed.
        positive, negative = z_positive.to(compute_dtype), z_negative.to(compute_dtype)
        bound = torch.finfo(torch.float16).max  # largest |value| of positive / negative
        s = min(float(scale), info.max / (4.0 * bound))
        floor_positive: torch.Tensor | float = eps
        floor_w: torch.Tensor | float = eps / s
    else:
        # Per token, divide by 2**e with 2**(e-1) <= max|z| < 2**e (e is capped so that 2**e and
        # 2**-e are normal numbers). Powers of two scale exactly; the product is the cast.
        peak = torch.maximum(
            torch.linalg.vector_norm(z_positive, ord=float("inf"), dim=-1, keepdim=True),
            torch.linalg.vector_norm(z_negative, ord=float("inf"), dim=-1, keepdim=True),
        ).to(compute_dtype)
        largest = math.frexp(info.max)[1] - 1
        exponent = torch.frexp(peak)[1].clamp(2 - largest, largest).to(compute_dtype)
        down, up = torch.exp2(-exponent), torch.exp2(exponent)
        positive, negative = torch.mul(z_positive, down), torch.mul(z_negative, down)
        bound = 2.0
        s = min(float(scale), info.max / (4.0 * bound))
        # The floors in scaled units (subnormal, so a few percent off, for tokens beyond ~1e32).
        floor_positive, floor_w = down * eps, down * (eps / s)

    # w = z_tilde / s, free of cancellation when z_negative == z_positive. |w| <= 3 * bound, and
    # s is capped so that w * s stays finite (only absurd scales, > ~1e33, are affected).
    w = torch.add(positive - negative, negative, alpha=1.0 / s)
    norm_positive = torch.linalg.vector_norm(positive, ord=norm, dim=-1, keepdim=True).clamp_min(floor_positive)
    if norm == 2:
        # |w| ~ |z_tilde| / s may be small enough for its squares to underflow: scale it first.
        # (|z+| needs no care: its entries are at most 2 after the scaling above, or float16.)
        peak_w = torch.linalg.vector_norm(w, ord=float("inf"), dim=-1, keepdim=True).clamp_min(info.tiny)
        norm_w = torch.linalg.vector_norm(w / peak_w, ord=2, dim=-1, keepdim=True) * peak_w
    else:
        norm_w = torch.linalg.vector_norm(w, ord=norm, dim=-1, keepdim=True)
    norm_w = norm_w.clamp_min(floor_w)
    # z_tilde * min(r, tau) / r == w * min(s, tau * |z+| / |w|), both norms floored. Per token:
    # a zero |w| (w == 0, so the factor does not matter) takes s; an overflow to inf takes s too.
    limit = torch.where(norm_w > 0, norm_positive * min(float(tau), info.max) / norm_w, s).clamp_max(s)
    out = torch.addcmul(positive * (1.0 - alpha), w, limit * alpha)
    if up is not None:
        out = out * up  # may exceed the range: saturated below
    limit_out = torch.finfo(out_dtype).max
    return out.clamp(-limit_out, limit_out).to(out_dtype)
