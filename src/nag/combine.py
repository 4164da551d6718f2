"""The NAG equation: one pure function on tensors (torch only)."""

from __future__ import annotations

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
    ``scale = 5`` here). Both norms are floored at ``eps``, so a zero-norm token yields
    ``z_positive`` and never NaN. Norms and the arithmetic run in float32 when the inputs are
    half precision; the result has the dtype and shape of ``z_positive``.
    """
    if z_positive.shape != z_negative.shape:
        raise ValueError(
            f"z_positive {tuple(z_positive.shape)} and z_negative {tuple(z_negative.shape)} must have the same shape"
        )
    out_dtype = z_positive.dtype
    compute_dtype = torch.float32 if out_dtype in (torch.float16, torch.bfloat16) else out_dtype
    positive = z_positive.to(compute_dtype)
    negative = z_negative.to(compute_dtype)

    guided = positive * scale - negative * (scale - 1.0)
    norm_positive = torch.linalg.vector_norm(positive, ord=norm, dim=-1, keepdim=True).clamp_min(eps)
    norm_guided = torch.linalg.vector_norm(guided, ord=norm, dim=-1, keepdim=True).clamp_min(eps)
    ratio = norm_guided / norm_positive
    guided = guided * (ratio.clamp_max(tau) / ratio)
    return (guided * alpha + positive * (1.0 - alpha)).to(out_dtype)
