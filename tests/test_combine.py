"""The NAG equation against a direct transcription, and its invariants."""

import itertools

import pytest
import torch

from nag import NAGSettings, nag_combine


def transcribed(z_pos, z_neg, s, tau, alpha, p=1):
    """The equation written out element by element in float64."""
    z_pos, z_neg = z_pos.double(), z_neg.double()
    out = torch.empty_like(z_pos)
    for idx in torch.cartesian_prod(*[torch.arange(n) for n in z_pos.shape[:-1]]):
        idx = tuple(idx.tolist()) if idx.ndim else (int(idx),)
        zp, zn = z_pos[idx], z_neg[idx]
        zt = s * zp - (s - 1) * zn
        norm_p = max(float(zp.abs().pow(p).sum() ** (1 / p)), 1e-6)
        norm_t = max(float(zt.abs().pow(p).sum() ** (1 / p)), 1e-6)
        r = norm_t / norm_p
        out[idx] = alpha * (zt * min(r, tau) / r) + (1 - alpha) * zp
    return out


@pytest.mark.parametrize("p", [1, 2])
def test_matches_transcription(p):
    g = torch.Generator().manual_seed(0)
    z_pos = torch.randn(2, 5, 8, generator=g)
    z_neg = torch.randn(2, 5, 8, generator=g) * 3  # large negatives make the tau cap bind
    out = nag_combine(z_pos, z_neg, 4.0, 2.5, 0.3, norm=p)
    torch.testing.assert_close(out.double(), transcribed(z_pos, z_neg, 4.0, 2.5, 0.3, p), rtol=1e-5, atol=1e-6)


def test_cap_binds_and_ratio_never_exceeds_tau():
    g = torch.Generator().manual_seed(1)
    z_pos = torch.randn(64, 16, generator=g)
    z_neg = -5 * z_pos + torch.randn(64, 16, generator=g)
    out = nag_combine(z_pos, z_neg, 6.0, 2.5, 1.0)  # alpha 1: the normalized feature itself
    ratio = out.abs().sum(-1) / z_pos.abs().sum(-1)
    assert ratio.max() <= 2.5 * (1 + 1e-5)
    assert (ratio > 2.4).all()  # with these inputs the cap is reached for every token


def test_identities():
    g = torch.Generator().manual_seed(2)
    z_pos, z_neg = torch.randn(3, 4, 8, generator=g), torch.randn(3, 4, 8, generator=g)
    assert torch.equal(nag_combine(z_pos, z_neg, 5.0, 2.5, 0.0), z_pos)  # alpha 0
    torch.testing.assert_close(nag_combine(z_pos, z_neg, 1.0, 2.5, 0.7), z_pos)  # scale 1
    torch.testing.assert_close(nag_combine(z_pos, z_pos.clone(), 5.0, 2.5, 0.7), z_pos)  # Z- = Z+


def test_zero_norm_tokens_are_finite():
    z_pos = torch.zeros(2, 3, 8)
    z_neg = torch.zeros(2, 3, 8)
    z_neg[0, 0] = 1.0  # zero positive, non-zero negative
    out = nag_combine(z_pos, z_neg, 5.0, 2.5, 0.5)
    assert torch.isfinite(out).all()
    assert torch.equal(out[1], z_pos[1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_keeps_dtype_and_stays_finite(dtype):
    g = torch.Generator().manual_seed(3)
    z_pos = (torch.randn(2, 4, 64, generator=g) * 3000).to(dtype)  # L1 norms far beyond fp16 range
    z_neg = (torch.randn(2, 4, 64, generator=g) * 3000).to(dtype)
    out = nag_combine(z_pos, z_neg, 5.0, 2.5, 0.5)
    assert out.dtype == dtype and out.shape == z_pos.shape
    assert torch.isfinite(out).all()
    reference = nag_combine(z_pos.float(), z_neg.float(), 5.0, 2.5, 0.5)
    torch.testing.assert_close(out.float(), reference, rtol=1e-2, atol=1.0)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="same shape"):
        nag_combine(torch.zeros(2, 3), torch.zeros(2, 4), 2.0, 2.5, 0.5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(scale=0.5), "scale"),
        (dict(tau=0.0), "tau"),
        (dict(tau=float("inf")), "tau"),
        (dict(alpha=1.5), "alpha"),
        (dict(start=0.5, end=0.5), "start"),
        (dict(end=1.5), "end"),
        (dict(norm=3), "norm"),
    ],
)
def test_settings_validation_names_the_fix(kwargs, match):
    base = dict(scale=3.0, tau=2.5, alpha=0.5)
    with pytest.raises(ValueError, match=match):
        NAGSettings(**{**base, **kwargs})


def test_window():
    s = NAGSettings(scale=3.0, tau=2.5, alpha=0.5, start=0.25, end=0.75)
    assert [s.in_window(i / 4) for i in range(4)] == [False, True, True, False]
    assert s.in_window(None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("p", [1, 2])
def test_plain_path_has_the_rescaled_paths_bits(dtype, p):
    """Inputs far from the dtype's limits skip the per-token rescaling (about a third of the operations): the
    result must have the same bits, at magnitudes from 1e-4 to 1e6 (1e3 in float16), batch 2, every setting kind;
    with a zero token (computed rescaled), without (every norm above the floors, which are then not applied), and
    at magnitudes from 1e-10 (norms below the floor eps, inside the plain range; not float16, where they underflow)."""
    from nag.combine import combine_plain, combine_rescaled, combine_scalars

    g = torch.Generator().manual_seed(3)
    top = 3 if dtype == torch.float16 else 6  # (float16 holds up to 65504)
    cases = []
    for low, high, zero in [(-4, top, True), (-4, top, False), (-10, -4, False)][: 2 if dtype == torch.float16 else 3]:
        magnitudes = torch.logspace(low, high, 11).reshape(1, 11, 1)
        z_pos = (torch.randn(2, 11, 48, generator=g) * magnitudes).to(dtype)
        z_neg = (torch.randn(2, 11, 48, generator=g) * magnitudes * 3).to(dtype)
        if zero:
            z_pos[1, 0] = 0
        cases.append((z_pos, z_neg))
    for (z_pos, z_neg), (scale, tau, alpha) in itertools.product(cases, [(4.0, 2.5, 0.3), (1.5, 1.0, 1.0),
                                                                         (10.0, 3.0, 0.25)]):
        scalars = combine_scalars(dtype, dtype, scale, tau, alpha, 1e-6)
        plain = combine_plain(z_pos, z_neg, *scalars, p)
        assert torch.equal(plain, combine_rescaled(z_pos, z_neg, *scalars, p))
        assert torch.equal(plain, nag_combine(z_pos, z_neg, scale, tau, alpha, norm=p, compiled=False))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tokens_near_the_limits_take_the_rescaled_path(dtype):
    """Tokens with magnitudes near the dtype's limits (where the plain equation's norms overflow) or non-finite
    inputs are computed by the rescaled path, the other tokens of the call by the plain one: the eager combine's
    result is finite and each token's is what it is alone. Tensor scalars (compiled code), a huge tau and other
    devices' tensors never take the plain path; two float16 inputs always do, unchecked."""
    from nag.combine import PLAIN_FACTOR, _plain_check, combine_eager, combine_plain, combine_rescaled, combine_scalars

    g = torch.Generator().manual_seed(4)
    z_pos, z_neg = torch.randn(2, 3, 64, generator=g).to(dtype), torch.randn(2, 3, 64, generator=g).to(dtype)
    scalars = combine_scalars(dtype, dtype, 4.0, 2.5, 0.5, 1e-6)
    z_pos[1, 2] *= 1e37
    out = combine_eager(z_pos, z_neg, *scalars)
    assert torch.isfinite(out).all()
    assert torch.equal(out[1, 2], combine_rescaled(z_pos[1, 2], z_neg[1, 2], *scalars))
    assert torch.equal(out[0], combine_plain(z_pos[0], z_neg[0], *scalars, checked=False))
    assert torch.equal(out[1, :2], combine_plain(z_pos[1, :2], z_neg[1, :2], *scalars, checked=False))
    assert not torch.isfinite(combine_plain(z_pos, z_neg, *scalars, checked=False)[1, 2]).all()  # (why it is needed)
    permuted = z_pos.transpose(1, 2).contiguous().transpose(1, 2)  # (the hidden axis not the innermost in memory)
    torch.testing.assert_close(combine_eager(permuted, z_neg, *scalars), out)  # (sums in another order)
    for bad in (float("inf"), float("nan")):
        z_bad = z_neg.clone()
        z_bad[0, 1] = bad
        out = combine_plain(z_pos, z_bad, *scalars)
        assert torch.equal(out[0, 1], combine_rescaled(z_pos[0, 1], z_bad[0, 1], *scalars)) or (
            out[0, 1].isnan().all() and combine_rescaled(z_pos[0, 1], z_bad[0, 1], *scalars).isnan().all()
        )
    s, _, tau, alpha, _, floor = scalars
    assert _plain_check(z_pos, z_neg, s, tau, alpha, floor) is True
    assert _plain_check(z_pos, z_neg, s, 2 * PLAIN_FACTOR, alpha, floor) is None
    assert _plain_check(z_pos, z_neg, s, torch.tensor(tau), alpha, floor) is None
    assert _plain_check(z_pos, z_neg, s, tau, alpha, 0.0) is None
    assert _plain_check(z_pos, z_neg, s, tau, 1e30, floor) is None  # (nag_combine itself takes any alpha)
    assert _plain_check(z_pos.to("meta"), z_neg.to("meta"), s, tau, alpha, floor) is None
    assert _plain_check(z_pos.half().to("meta"), z_neg.half().to("meta"), s, tau, alpha, floor) is False
    assert _plain_check(z_pos.half(), z_neg.half(), s, tau, alpha, 0.0) is None
    huge_alpha = combine_scalars(dtype, dtype, 4.0, 2.5, 1e38, 1e-6)  # (the result saturates, as documented)
    assert torch.isfinite(combine_eager(z_pos[0], z_neg[0] * 1e3, *huge_alpha)).all()
    zero_w = torch.zeros(2, 8, dtype=torch.float16)  # (z- == z+ == 0: w == 0; with eps = 0 only the rescaled code
    assert torch.equal(nag_combine(zero_w, zero_w, 4.0, 2.5, 0.5, eps=0.0, compiled=False), zero_w)  # is finite)
