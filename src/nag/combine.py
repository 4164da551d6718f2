"""The NAG equation: one pure function on tensors (torch only)."""

from __future__ import annotations

import math

import torch

from .compiled import CompiledFunction

__all__ = ["nag_combine"]


def nag_combine(
    z_positive: torch.Tensor,
    z_negative: torch.Tensor,
    scale: float,
    tau: float,
    alpha: float,
    norm: int = 1,
    eps: float = 1e-6,
    *,
    compiled: bool = True,
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
      limits neither overflow nor underflow the norms (the eager code on the CPU therefore skips it
      for tokens far from those limits: :func:`combine_plain`). Tokens are independent of each other.
    * A result beyond the output dtype's range (fp16 values near 65504 pushed further out by
      the guidance) saturates at the largest finite value instead of becoming inf.

    Runs compiled (``torch.compile``; see :mod:`nag.compiled`) unless ``compiled=False``, the
    environment variable ``NAG_EAGER=1`` is set, the call is inside a ``torch.compile`` trace, or
    compiling failed (one warning, then the eager code). Both give the same result to rounding.
    """
    check_combine_inputs(z_positive, z_negative)
    if scale == 1.0 or alpha == 0.0:
        return z_positive.clone()
    scalars = combine_scalars(z_positive.dtype, z_negative.dtype, scale, tau, alpha, eps)
    if not compiled or not _COMPILED.wanted(z_positive.numel()) or records_gradient(z_positive, z_negative):
        return combine_eager(z_positive, z_negative, *scalars, norm)
    # (tokens, hidden): tokens are independent, and one token axis lets batch sizes above 1 share the compiled code
    # with any token count (dynamic shapes still compile batch 1 separately: sizes 0 and 1 are specialised)
    hidden = z_positive.shape[-1]
    out = _COMPILED(z_positive.reshape(-1, hidden), z_negative.reshape(-1, hidden), *scalars, norm)
    return out.reshape(z_positive.shape)


def check_combine_inputs(z_positive: torch.Tensor, z_negative: torch.Tensor) -> None:
    """The errors of :func:`nag_combine` for inputs it cannot combine."""
    if z_positive.shape != z_negative.shape:
        raise ValueError(
            f"z_positive {tuple(z_positive.shape)} and z_negative {tuple(z_negative.shape)} must have the same shape"
        )
    if not (z_positive.dtype.is_floating_point and z_negative.dtype.is_floating_point):
        raise TypeError(
            f"nag_combine needs floating-point attention outputs, got {z_positive.dtype} and {z_negative.dtype}"
        )


def _compute_dtype(positive_dtype: torch.dtype, negative_dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision outputs, else the wider of the two dtypes."""
    half = (torch.float16, torch.bfloat16)
    compute_dtype = torch.float32 if positive_dtype in half else positive_dtype
    if negative_dtype not in half and torch.finfo(negative_dtype).bits > torch.finfo(compute_dtype).bits:
        compute_dtype = negative_dtype
    return compute_dtype


def _unscaled(positive_dtype: torch.dtype, negative_dtype: torch.dtype) -> bool:
    """Whether the inputs need no per-token rescaling (both float16: float32 holds every intermediate)."""
    return positive_dtype == torch.float16 and negative_dtype == torch.float16


def combine_scalars(
    positive_dtype: torch.dtype, negative_dtype: torch.dtype, scale: float, tau: float, alpha: float, eps: float
) -> tuple[float, float, float, float, float, float]:
    """The Python numbers :func:`combine_eager` takes after the two tensors: ``(s, 1 / s, tau, alpha, eps, eps / s)``
    with ``s`` the scale capped (absurd scales only, see below) and ``tau`` at the compute dtype's maximum.

    Computed outside the tensor code so that a compiled :func:`combine_eager` sees plain inputs (no Python
    arithmetic on them that would specialize the compiled code to one scale)."""
    info = torch.finfo(_compute_dtype(positive_dtype, negative_dtype))
    bound = torch.finfo(torch.float16).max if _unscaled(positive_dtype, negative_dtype) else 2.0
    # s is capped so that w * s stays finite and, for rescaled tokens (largest entry in [0.5, 1)), so that the
    # largest entries of w = z- / s + ... stay normal numbers with a full mantissa (near s = 0.5 / tiny they would
    # round like subnormals and lose the token's own precision)
    cap = info.max / (4.0 * bound) if bound > 2.0 else min(info.max / (4.0 * bound), 0.5 / info.tiny * info.eps)
    s = min(float(scale), cap)
    return s, 1.0 / s, min(float(tau), info.max), float(alpha), float(eps), float(eps) / s


Scalar = float | torch.Tensor
INF = float("inf")


def token_norm(x: torch.Tensor, order: float) -> torch.Tensor:
    """Each token's (last axis) norm of ``order`` (1, 2 or inf), keeping the axis: ``torch.linalg.vector_norm``'s
    values, in eager code on the CPU from the vectorised ``abs().sum()`` / ``abs().amax()`` (there ``vector_norm``'s
    L1 and max kernels take 3 and 17 times as long; the L1 norm is summed in another order, the maximum is the same).
    Compiled code keeps ``vector_norm``, which inductor fuses itself."""
    if x.device.type == "cpu" and order in (1, INF) and not torch.compiler.is_compiling():
        return x.abs().sum(-1, keepdim=True) if order == 1 else x.abs().amax(-1, keepdim=True)
    return torch.linalg.vector_norm(x, ord=order, dim=-1, keepdim=True)


def combine_eager(
    z_positive: torch.Tensor, z_negative: torch.Tensor, s: Scalar, inverse_s: Scalar, tau: Scalar, alpha: Scalar,
    eps: Scalar, eps_over_s: Scalar, norm: int = 1,
) -> torch.Tensor:
    """The combine in plain PyTorch after the checks and shortcuts of :func:`nag_combine` (the scalars from
    :func:`combine_scalars`): the eager code and the compiled code's fallback.

    Where it can, it runs :func:`combine_plain`, the equation without the per-token rescaling (about a third of the
    operations), whose result has the same bits as :func:`combine_rescaled`'s wherever its norms are far from the
    compute dtype's limits (scaling by a power of two is exact); elsewhere, and in calls traced by
    ``torch.compile``, :func:`combine_rescaled`."""
    checked = _plain_check(z_positive, z_negative, s, tau, alpha, eps_over_s)
    if checked is None:
        return combine_rescaled(z_positive, z_negative, s, inverse_s, tau, alpha, eps, eps_over_s, norm)
    return combine_plain(z_positive, z_negative, s, inverse_s, tau, alpha, eps, eps_over_s, norm, checked=checked)


#: :func:`combine_plain` hands the tokens with a norm outside ``[PLAIN_NORMS]`` to :func:`combine_rescaled`: with ``s``
#: and ``tau`` at most :data:`PLAIN_FACTOR`, every intermediate of the others stays below 2**120 (inside the float32
#: range) and is at most 2**-51 times the rescaled one (no value of the token's own size becomes subnormal).
PLAIN_NORMS = (2.0**-30, 2.0**100)
PLAIN_FACTOR = 2.0**20
#: ... so its results stay below this: an output dtype reaching beyond it needs no saturation there.
PLAIN_OUTPUT_BOUND = 2.0**126


def _plain_check(
    z_positive: torch.Tensor, z_negative: torch.Tensor, s: Scalar, tau: Scalar, alpha: Scalar, eps_over_s: Scalar
) -> bool | None:
    """Whether :func:`combine_plain` may run: None where not (traced by ``torch.compile``, tensor scalars, a zero
    norm floor, ``s`` or ``tau`` beyond :data:`PLAIN_FACTOR`, ``alpha`` outside [0, 1], a device other than the
    CPU), else whether it must check its norms: not for two float16 inputs (float32 holds every intermediate of
    theirs), on the CPU for others (one read of the norms' range: cheap there; on other devices it would wait for the
    device)."""
    tensors = isinstance(s, torch.Tensor) or isinstance(tau, torch.Tensor) or isinstance(alpha, torch.Tensor)
    if tensors or isinstance(eps_over_s, torch.Tensor) or torch.compiler.is_compiling():
        return None
    if records_gradient(z_positive, z_negative):  # (its in-place steps would overwrite what backward needs)
        return None
    # (a zero floor: a zero norm would divide; the rescaled code handles it, and saturates any alpha's result)
    if not (0.0 < eps_over_s and 0.0 <= alpha <= 1.0):
        return None
    if _unscaled(z_positive.dtype, z_negative.dtype):
        return False
    if z_positive.device.type != "cpu" or not (s <= PLAIN_FACTOR and tau <= PLAIN_FACTOR):
        return None
    return True


def combine_plain(
    z_positive: torch.Tensor, z_negative: torch.Tensor, s: float, inverse_s: float, tau: float, alpha: float,
    eps: float, eps_over_s: float, norm: int = 1, *, checked: bool = True,
) -> torch.Tensor:
    """:func:`combine_rescaled` without the per-token rescaling (Python scalars, a positive norm floor): the same
    operations on the same values, so the same result, for tokens whose norms are within :data:`PLAIN_NORMS`.
    ``checked``: tokens beyond that (or not finite) are recomputed by :func:`combine_rescaled`, so that each token's
    result depends on that token alone."""
    out_dtype = z_positive.dtype
    compute_dtype = _compute_dtype(out_dtype, z_negative.dtype)
    positive = z_positive if out_dtype == compute_dtype else z_positive.to(compute_dtype)
    negative = z_negative if z_negative.dtype == compute_dtype else z_negative.to(compute_dtype)
    w = torch.sub(positive, negative).add_(negative, alpha=inverse_s)
    norm_positive = token_norm(positive, norm)
    if norm == 2:
        peak_w = token_norm(w, INF).clamp_min_(torch.finfo(compute_dtype).tiny)
        norm_w = token_norm(w / peak_w, 2).mul_(peak_w)
    else:
        norm_w = token_norm(w, norm)
    beyond, smallest = None, None
    if checked:
        smallest, largest = _norm_range(norm_positive, norm_w)  # (one read for all tokens)
        if not (PLAIN_NORMS[0] <= smallest and largest <= PLAIN_NORMS[1]):  # (rarely; NaN fails both)
            beyond, smallest = _outside_plain_norms(norm_positive, norm_w), None
    if smallest is None or smallest < max(eps, eps_over_s):  # (else both floors leave every norm as it is)
        norm_positive.clamp_min_(eps), norm_w.clamp_min_(eps_over_s)
    limit = norm_positive.mul_(tau).div_(norm_w).clamp_max_(s).mul_(alpha)
    out = blend(w, limit, positive, alpha)
    limit_out = torch.finfo(out_dtype).max
    if limit_out < PLAIN_OUTPUT_BOUND:  # (float16: the guidance may push a value past its range)
        out = out.clamp_(-limit_out, limit_out)
    if out.dtype != out_dtype:
        out = out.to(out_dtype)
    if beyond is not None:
        out, hidden = out.contiguous(), out.shape[-1]  # (inputs with permuted axes give permuted outputs)
        tokens = beyond.reshape(-1).nonzero().squeeze(1)
        out.view(-1, hidden)[tokens] = combine_rescaled(
            z_positive.reshape(-1, hidden)[tokens], z_negative.reshape(-1, hidden)[tokens],
            s, inverse_s, tau, alpha, eps, eps_over_s, norm,
        )
    return out


def _norm_range(norm_positive: torch.Tensor, norm_w: torch.Tensor) -> tuple[float, float]:
    """The smallest and the largest of every token's two norms (one pass; read on the CPU, where the check runs)."""
    smallest, largest = torch.aminmax(torch.cat([norm_positive, norm_w], dim=-1))
    return smallest.item(), largest.item()


def _outside_plain_norms(norm_positive: torch.Tensor, norm_w: torch.Tensor) -> torch.Tensor:
    """Per token, whether a norm is outside :data:`PLAIN_NORMS` (an overflow anywhere before reaches a norm as inf or
    NaN, which fail both comparisons)."""
    low, high = PLAIN_NORMS
    norms = torch.cat([norm_positive, norm_w], dim=-1)
    return norms.ge(low).logical_and_(norms.le(high)).all(dim=-1).logical_not_()


def combine_rescaled(
    z_positive: torch.Tensor, z_negative: torch.Tensor, s: Scalar, inverse_s: Scalar, tau: Scalar, alpha: Scalar,
    eps: Scalar, eps_over_s: Scalar, norm: int = 1,
) -> torch.Tensor:
    """The combine in plain PyTorch with each token rescaled by a power of two (see :func:`nag_combine`), the
    scalars from :func:`combine_scalars` (Python numbers, or 0-d tensors when compiled: see :mod:`nag.compiled`):
    the reference, and the code that is compiled (it has no data-dependent branch)."""
    out_dtype = z_positive.dtype
    compute_dtype = _compute_dtype(out_dtype, z_negative.dtype)
    info = torch.finfo(compute_dtype)

    up: torch.Tensor | None = None
    if _unscaled(out_dtype, z_negative.dtype):
        # float32 holds every intermediate of float16 inputs: no rescaling needed.
        positive, negative = z_positive.to(compute_dtype), z_negative.to(compute_dtype)
        floor_positive: torch.Tensor | float = eps
        floor_w: torch.Tensor | float = eps_over_s
    else:
        # Per token, divide by 2**e with 2**(e-1) <= max|z| < 2**e (e is capped so that 2**e and
        # 2**-e are normal numbers). Powers of two scale exactly; the product is the cast.
        peak = torch.maximum(
            token_norm(z_positive, INF),
            token_norm(z_negative, INF),
        ).to(compute_dtype)
        largest = math.frexp(info.max)[1] - 1
        exponent = torch.frexp(peak)[1].clamp(2 - largest, largest).to(compute_dtype)
        down, up = torch.exp2(-exponent), torch.exp2(exponent)
        positive, negative = torch.mul(z_positive, down), torch.mul(z_negative, down)
        # The floors in scaled units (subnormal, so a few percent off, for tokens beyond ~1e32).
        floor_positive, floor_w = down * eps, down * eps_over_s

    # w = z_tilde / s, free of cancellation when z_negative == z_positive. |w| <= 3 * bound, and
    # s is capped so that w * s stays finite and w keeps its precision (only absurd scales, > ~1e30, are affected).
    recording = records_gradient(z_positive, z_negative)
    if isinstance(inverse_s, torch.Tensor):  # (compiled: the scalar is a tensor)
        w = (positive - negative) + negative * inverse_s
    else:  # (the eager kernel may fuse the multiply-add: one rounding)
        w = torch.sub(positive, negative).add_(negative, alpha=inverse_s)  # (autograd needs neither)
    norm_positive = token_norm(positive, norm).clamp_min(floor_positive)
    if norm == 2:
        # |w| ~ |z_tilde| / s may be small enough for its squares to underflow: scale it first.
        # (|z+| needs no care: its entries are at most 2 after the scaling above, or float16.)
        peak_w = token_norm(w, INF).clamp_min(info.tiny)
        norm_w = token_norm(w / peak_w, 2) * peak_w
    else:
        norm_w = token_norm(w, norm)
    norm_w = norm_w.clamp_min(floor_w)
    # z_tilde * min(r, tau) / r == w * min(s, tau * |z+| / |w|), both norms floored. Per token:
    # a zero |w| (w == 0, so the factor does not matter) takes s; an overflow to inf takes s too.
    limit = torch.where(norm_w > 0, norm_positive * tau / norm_w, s).clamp_max(s)
    out = blend(w, limit * alpha, positive, alpha, in_place=not recording)
    if up is not None:
        out = out * up  # may exceed the range: saturated below
    limit_out = torch.finfo(out_dtype).max
    return out.clamp(-limit_out, limit_out).to(out_dtype)


def blend(
    w: torch.Tensor, weight: torch.Tensor, positive: torch.Tensor, alpha: Scalar, in_place: bool = True
) -> torch.Tensor:
    """``w * weight + (1 - alpha) * positive``, the last step of the combine (``weight``: ``alpha`` times the per-token
    limit). Eager (a Python ``alpha``) in place on ``w``, a temporary of the combine: two passes, no new tensor;
    ``in_place=False`` (autograd records, and the norm of ``w`` needs ``w`` for the backward pass): into a new one."""
    if isinstance(alpha, torch.Tensor):  # (compiled: the scalar is a tensor)
        return torch.addcmul(positive * (1.0 - alpha), w, weight)
    return (w.mul_(weight) if in_place else torch.mul(w, weight)).add_(positive, alpha=1.0 - alpha)


def records_gradient(*tensors: torch.Tensor) -> bool:
    """Whether autograd records an operation on these tensors (grad mode on and one of them requires a gradient):
    the combine then runs eager and out of place, so that a backward pass through it works."""
    return torch.is_grad_enabled() and any(tensor.requires_grad for tensor in tensors)


_COMPILED = CompiledFunction(combine_rescaled, "nag_combine", fallback=combine_eager)
