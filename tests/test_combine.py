"""The NAG equation against a direct transcription, and its invariants."""

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
