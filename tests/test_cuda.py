"""CUDA-only checks (``pytest -m cuda``; benchmarks/gpu_check.sh runs them): the compiled (Triton) combine and merge
against the eager code, the fused log-sum-exp kernels against the math, the collapsed padding keys' additive mask
through CUDA's attention, and FLUX.1's in-sequence single blocks. Skipped without a CUDA device."""

from __future__ import annotations

import logging

import pytest
import torch

from nag import kernels
from nag.combine import nag_combine
from nag.fused import merge_and_combine

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SETTINGS = dict(scale=5.0, tau=2.5, alpha=0.5)


@pytest.fixture
def compiled_mode(monkeypatch):
    monkeypatch.delenv("NAG_EAGER", raising=False)


def randn(*shape, dtype=torch.bfloat16, seed=0, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * spread).to("cuda", dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_compiled_combine_on_cuda(compiled_mode, caplog, dtype):
    z_pos, z_neg = randn(2, 1024, 3072, dtype=dtype), randn(2, 1024, 3072, dtype=dtype, seed=1, spread=3.0)
    z_pos[1, 5] = 0
    with caplog.at_level(logging.WARNING, logger="nag"):
        compiled = nag_combine(z_pos, z_neg, **SETTINGS)
    assert not caplog.records, "the compiled combine fell back to eager on CUDA"
    eager = nag_combine(z_pos, z_neg, **SETTINGS, compiled=False)
    tolerance = 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
    torch.testing.assert_close(compiled.float(), eager.float(), rtol=tolerance, atol=tolerance)
    assert torch.equal(compiled[1, 5], z_pos[1, 5]) and torch.isfinite(compiled).all()
    reference = nag_combine(z_pos.cpu().float(), z_neg.cpu().float(), **SETTINGS, compiled=False)
    torch.testing.assert_close(compiled.cpu().float(), reference, rtol=4 * torch.finfo(dtype).eps, atol=1e-3)


def test_compiled_combine_large_bf16_values_stay_finite(compiled_mode):
    z_pos = randn(2, 64, 3072).sign() * 3e38
    z_neg = randn(2, 64, 3072, seed=1).sign() * 3e38
    compiled = nag_combine(z_pos.bfloat16(), z_neg.bfloat16(), **SETTINGS)
    assert torch.isfinite(compiled).all()


def test_compiled_merge_and_combine_on_cuda(compiled_mode, caplog):
    q = randn(2, 1024, 24, 128)
    parts = [kernels.attention_with_lse(q, randn(2, n, 24, 128, seed=s), randn(2, n, 24, 128, seed=s + 1))
             for n, s in ((1024, 2), (128, 4), (77, 6))]
    image, positive, negative = parts
    with caplog.at_level(logging.WARNING, logger="nag"):
        compiled = merge_and_combine([image, positive], [image, negative], **SETTINGS)
    assert not caplog.records, "the compiled merge and combine fell back to eager on CUDA (failed or disagreed)"
    eager = merge_and_combine([image, positive], [image, negative], **SETTINGS, compiled=False)
    torch.testing.assert_close(compiled.float(), eager.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_lse_kernels_agree_with_the_math(monkeypatch, caplog, dtype, head_dim):
    """Each fused kernel taking the dtype passes its self-check here, and attention_with_lse agrees with the math at a
    real size."""
    monkeypatch.setattr(kernels, "_CHECKED", {})
    for name, kernel, dtypes in kernels.LSE_KERNELS["cuda"]:
        if dtypes is None or dtype in dtypes:
            assert kernels._self_check(name, kernel, torch.device("cuda"), dtype, head_dim), name
    q, k, v = (randn(2, n, 8, head_dim, dtype=dtype, seed=s) for n, s in ((1024, 0), (1280, 1), (1280, 2)))
    with caplog.at_level(logging.WARNING, logger="nag"):
        out, lse = kernels.attention_with_lse(q, k, v)
    assert not caplog.records
    expected, expected_lse = kernels._lse_math(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    torch.testing.assert_close(out.float(), expected.transpose(1, 2).float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(lse, expected_lse.transpose(1, 2), rtol=1e-3, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_collapsed_padding_keys_on_cuda(dtype):
    """The padding keys collapsed to one with an additive ``log(count)`` mask attend as all of them do, through SDPA on
    CUDA (whose flash kernel takes no mask: another one must serve it)."""
    from nag.attention.cross import collapse_repeated_keys

    q = randn(2, 1024, 12, 128, dtype=dtype)
    k, v = randn(2, 512, 12, 128, dtype=dtype, seed=1), randn(2, 512, 12, 128, dtype=dtype, seed=2)
    k[0, 40:], v[0, 40:] = k[0, -1], v[0, -1]
    k[1, 100:], v[1, 100:] = k[1, -1], v[1, -1]
    kept_k, kept_v, mask = collapse_repeated_keys(k, v)
    assert kept_k.shape[1] == 101 and mask is not None
    got = kernels.attention(q, kept_k, kept_v, mask)
    expected = kernels.attention(q.double(), k.double(), v.double())
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.double(), expected, rtol=tolerance, atol=tolerance)


def test_flux_single_blocks_in_sequence_on_cuda():
    """FLUX.1's single blocks with the negative text in their sequence give the straightforward path's output on CUDA
    (bfloat16, the tests' tiny pipeline)."""
    pytest.importorskip("transformers")
    import tiny_pipelines as tp

    import nag

    pipe = tp.FACTORIES["flux"]().to("cuda", torch.bfloat16)
    kwargs = dict(tp.no_cfg_kwargs("flux"), output_type="latent")

    def generate(fast):
        with nag.apply(pipe, "blue", fast=fast, **SETTINGS):
            out = pipe(["a cat", "a dog"], generator=torch.Generator("cuda").manual_seed(0), **kwargs)[0]
        return out.float()

    fast, straightforward = generate(True), generate(False)
    scale = float(straightforward.abs().max())  # (bfloat16 rounding at the output's scale)
    torch.testing.assert_close(fast, straightforward, rtol=0, atol=4 * torch.finfo(torch.bfloat16).eps * scale + 2e-2)
