"""Property-based tests of the NAG combine (``nag.nag_combine``) with hypothesis.

Inputs range over every finite value of each dtype (zeros, subnormals, values at the limit of
float16/bfloat16/float32/float64), shapes with one or more tokens, and the whole legal range of
the settings. Runs are derandomized (the same examples on every run) and keep no database.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from nag import nag_combine

PROPERTY = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    # (the code-path fixture below is set once per test, not per example: nothing in it needs a reset)
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
# numpy carrier for each dtype (bfloat16 is drawn as float32 within bfloat16's range, then cast)
_CARRIER = {torch.float16: np.float16, torch.bfloat16: np.float32, torch.float32: np.float32, torch.float64: np.float64}


def reliability(case: str, expect: str):
    return pytest.mark.reliability(area="numerics (nag_combine)", case=case, expect=expect)


@pytest.fixture(autouse=True, params=["cpu", "other devices"])
def code_path(request, monkeypatch):
    """Every property holds for both of the eager combine's code paths: the CPU's (the equation without the per-token
    rescaling for tokens far from the dtype's limits) and the one every other device takes (a GPU's eager combine:
    every token rescaled), which this machine runs when told that it is not on the CPU."""
    if request.param == "other devices":
        import nag.combine

        monkeypatch.setattr(nag.combine, "_plain_check", lambda *args: None)
    return request.param


@st.composite
def tensor_pairs(draw, dtype=None, max_abs=None, shape=None):
    """``(z_positive, z_negative)`` of one dtype and shape ``(batch, tokens, hidden)``."""
    dtype = dtype or draw(st.sampled_from(DTYPES))
    shape = shape or draw(hnp.array_shapes(min_dims=3, max_dims=3, min_side=1, max_side=6))
    carrier = _CARRIER[dtype]
    limit = float(torch.finfo(dtype).max) if max_abs is None else max_abs
    width = {np.float16: 16, np.float32: 32, np.float64: 64}[carrier]
    elements = st.floats(-limit, limit, allow_nan=False, allow_infinity=False, width=width)
    # Mix in the values that break naive code: zeros, the largest finite values, tiny ones.
    special = st.sampled_from([0.0, limit, -limit, float(torch.finfo(dtype).tiny), 1.0])
    strategy = st.one_of(elements, special) if max_abs is None else elements

    def draw_array():
        return torch.from_numpy(draw(hnp.arrays(carrier, shape, elements=strategy)).astype(carrier)).to(dtype)

    positive = draw_array()
    negative = draw(st.one_of(st.just(None), st.just("zeros"))) if draw(st.booleans()) else None
    if negative == "zeros":
        negative = torch.zeros_like(positive)
    elif negative is None:
        negative = draw_array()
    if draw(st.booleans()):  # some all-zero tokens
        positive[..., 0, :] = 0
    return positive, negative


scales = st.one_of(st.floats(1.0, 100.0), st.sampled_from([1.0, 1.0 + 1e-7, 1e6, 1e30, 1e300]))
taus = st.one_of(st.floats(1e-3, 10.0), st.sampled_from([1e-300, 1.0, 1e300]))
alphas = st.one_of(st.floats(0.0, 1.0), st.sampled_from([0.0, 1e-300, 1.0]))
norms = st.sampled_from([1, 2])


def _safe_norm(x: torch.Tensor, ord: int) -> torch.Tensor:
    """Per-token norm in float64 that does not overflow for values near float64's limit."""
    x = x.double()
    peak = x.abs().amax(-1, keepdim=True).clamp_min(1e-300)
    return torch.linalg.vector_norm(x / peak, ord=ord, dim=-1) * peak[..., 0]


def _token_peak(*tensors: torch.Tensor) -> torch.Tensor:
    return torch.stack([t.double().abs().amax(-1, keepdim=True) for t in tensors]).amax(0)


@reliability("any finite input, any legal setting (zeros, subnormals, fp16/bf16/fp32/fp64 limits)",
             "finite output, dtype and shape of Z+")
@PROPERTY
@given(pair=tensor_pairs(), scale=scales, tau=taus, alpha=alphas, norm=norms)
def test_output_is_finite_with_dtype_and_shape_kept(pair, scale, tau, alpha, norm):
    positive, negative = pair
    out = nag_combine(positive, negative, scale, tau, alpha, norm=norm)
    assert out.dtype == positive.dtype and out.shape == positive.shape
    assert torch.isfinite(out).all(), (positive, negative, out)


@reliability("alpha = 0", "exactly Z+")
@PROPERTY
@given(pair=tensor_pairs(), scale=scales, tau=taus, norm=norms)
def test_alpha_zero_gives_positive(pair, scale, tau, norm):
    positive, negative = pair
    assert torch.equal(nag_combine(positive, negative, scale, tau, 0.0, norm=norm), positive)


@reliability("scale = 1", "exactly Z+ (for any tau)")
@PROPERTY
@given(pair=tensor_pairs(), tau=taus, alpha=alphas, norm=norms)
def test_scale_one_gives_positive(pair, tau, alpha, norm):
    positive, negative = pair
    assert torch.equal(nag_combine(positive, negative, 1.0, tau, alpha, norm=norm), positive)


def _rounding(dtype: torch.dtype, hidden: int) -> tuple[float, float]:
    """(relative error of the output dtype, relative error of the float computation over a token)."""
    compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    return torch.finfo(dtype).eps, (hidden + 8) * torch.finfo(compute).eps


@reliability("Z- = Z+ (tau >= 1)", "Z+ to rounding, for any scale")
@PROPERTY
@given(pair=tensor_pairs(), scale=scales, tau=st.floats(1.0, 10.0), alpha=alphas, norm=norms)
def test_negative_equal_to_positive_gives_positive(pair, scale, tau, alpha, norm):
    positive, _ = pair
    out = nag_combine(positive, positive.clone(), scale, tau, alpha, norm=norm)
    relative, computed = _rounding(positive.dtype, positive.shape[-1])
    tiny = float(torch.finfo(positive.dtype).tiny) * torch.finfo(positive.dtype).eps
    error = (out.double() - positive.double()).abs()
    allowed = 2 * relative * positive.double().abs() + computed * _token_peak(positive) + tiny
    assert (error <= allowed).all(), (positive, out)


@reliability("normalized feature (alpha = 1)", "|Z^|_p <= tau * max(|Z+|_p, eps), to rounding")
@PROPERTY
@given(pair=tensor_pairs(), scale=scales, tau=taus, norm=norms)
def test_norm_ratio_never_exceeds_tau(pair, scale, tau, norm):
    assume(scale != 1.0)  # scale 1 is "off": Z+ whatever tau
    positive, negative = pair
    out = nag_combine(positive, negative, scale, tau, 1.0, norm=norm, eps=1e-6)
    hidden = positive.shape[-1]
    relative, computed = _rounding(positive.dtype, hidden)
    out_norm = _safe_norm(out, norm)
    positive_norm = _safe_norm(positive, norm).clamp_min(1e-6)
    peak = _token_peak(positive, negative)[..., 0]
    slack = hidden * float(torch.finfo(positive.dtype).tiny) + hidden * computed * peak
    assert (out_norm <= tau * positive_norm * (1 + 2 * relative + computed) + slack).all()


@reliability("moderate float32/float64 values", "agrees with the textbook equation evaluated in float64")
@PROPERTY
@given(
    dtype=st.sampled_from([torch.float32, torch.float64]),
    data=st.data(),
    scale=st.floats(1.0, 50.0, exclude_min=True),  # scale 1 is "off": Z+ whatever tau
    tau=st.floats(0.1, 10.0),
    alpha=st.floats(0.0, 1.0),
    norm=norms,
)
def test_agrees_with_the_textbook_equation(dtype, data, scale, tau, alpha, norm):
    positive, negative = data.draw(tensor_pairs(dtype=dtype, max_abs=1e3))
    out = nag_combine(positive, negative, scale, tau, alpha, norm=norm)
    p, n = positive.double(), negative.double()
    guided = scale * p - (scale - 1) * n
    ratio = torch.linalg.vector_norm(guided, ord=norm, dim=-1, keepdim=True).clamp_min(1e-6) / torch.linalg.vector_norm(
        p, ord=norm, dim=-1, keepdim=True
    ).clamp_min(1e-6)
    expected = alpha * guided * ratio.clamp_max(tau) / ratio + (1 - alpha) * p
    eps = torch.finfo(dtype).eps
    atol = 64 * eps * scale * _token_peak(positive, negative) * positive.shape[-1] + 1e-30
    assert ((out.double() - expected).abs() <= atol + 64 * eps * expected.abs()).all()


@reliability("float16 / bfloat16 input", "the float32 result rounded to the input dtype (saturating at its limit)")
@PROPERTY
@given(
    dtype=st.sampled_from([torch.float16, torch.bfloat16]),
    data=st.data(),
    scale=st.floats(1.0, 50.0),
    tau=st.floats(0.1, 10.0),
    alpha=st.floats(0.0, 1.0),
    norm=norms,
)
def test_half_precision_matches_float32(dtype, data, scale, tau, alpha, norm):
    positive, negative = data.draw(tensor_pairs(dtype=dtype))
    out = nag_combine(positive, negative, scale, tau, alpha, norm=norm)
    limit = torch.finfo(dtype).max
    expected = (
        nag_combine(positive.float(), negative.float(), scale, tau, alpha, norm=norm).double().clamp(-limit, limit)
    )
    spacing = torch.finfo(dtype).eps * expected.abs() + float(torch.finfo(dtype).tiny)
    assert ((out.double() - expected).abs() <= spacing).all()


@reliability("a batch of tokens", "each token's result is independent of the others (bit for bit)")
@PROPERTY
@given(pair=tensor_pairs(), scale=st.floats(1.0, 50.0), tau=st.floats(0.1, 10.0), alpha=alphas, norm=norms)
def test_tokens_are_independent(pair, scale, tau, alpha, norm):
    positive, negative = pair
    out = nag_combine(positive, negative, scale, tau, alpha, norm=norm)
    for b in range(positive.shape[0]):
        for t in range(positive.shape[1]):
            alone = nag_combine(
                positive[b : b + 1, t : t + 1], negative[b : b + 1, t : t + 1], scale, tau, alpha, norm=norm
            )
            assert torch.equal(out[b : b + 1, t : t + 1], alone)


@reliability(
    "zero-norm tokens (Z+ = 0 and/or Z- = 0)", "Z+ where both are zero; |out| <= alpha * tau * eps where only Z+ is"
)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", [1, 2])
def test_zero_norm_tokens(dtype, norm):
    positive = torch.zeros(3, 8, dtype=dtype)
    negative = torch.zeros(3, 8, dtype=dtype)
    negative[1] = torch.finfo(dtype).max  # zero positive, the largest negative
    negative[2] = 1.0
    out = nag_combine(positive, negative, 5.0, 2.5, 0.5, norm=norm, eps=1e-6)
    assert torch.isfinite(out).all() and out.dtype == dtype
    assert torch.equal(out[0], positive[0])
    # The eps floor is exact for ordinary tokens; for a token at the dtype's limit it is held in
    # scaled (subnormal) units, good to a few percent. The output itself rounds in its dtype.
    subnormal = float(torch.finfo(dtype).tiny) * torch.finfo(dtype).eps
    bound = 0.5 * 2.5 * 1e-6 * 1.1 + 8 * subnormal + 8 * torch.finfo(dtype).eps * 0.5 * 2.5 * 1e-6
    assert (torch.linalg.vector_norm(out[1:].double(), ord=norm, dim=-1) <= bound).all(), out


@reliability("values at the float16 limit pushed further out by the guidance", "saturates at +-65504, never inf")
def test_float16_saturates_instead_of_overflowing():
    positive = torch.tensor([[60000.0, 1.0]], dtype=torch.float16)
    negative = torch.tensor([[-60000.0, 1.0]], dtype=torch.float16)
    out = nag_combine(positive, negative, 5.0, 2.5, 0.5)
    assert out[0, 0].item() == 65504.0  # the exact result (~1.05e5) is beyond float16
    assert math.isfinite(out[0, 1].item())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
@reliability("values at the bfloat16/float32/float64 limit", "finite, and the small entries still exact")
def test_largest_values_keep_small_entries(dtype):
    big = torch.finfo(dtype).max / 2
    positive = torch.tensor([[big, 1.0]], dtype=dtype)
    negative = torch.tensor([[-big, 1.0]], dtype=dtype)
    out = nag_combine(positive, negative, 5.0, 2.5, 0.5, norm=2)
    assert torch.isfinite(out).all()
    # r = 9 > tau: z_hat = z_tilde * 2.5 / 9; the second entry: 0.5 * 1 + 0.5 * (1 * 2.5 / 9)
    expected = 0.5 + 0.5 * 2.5 / 9
    assert abs(out[0, 1].item() - expected) <= 4 * torch.finfo(dtype).eps * expected
