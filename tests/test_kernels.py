"""The fast paths' attention pieces (nag.kernels) against plain softmax attention written here."""

from __future__ import annotations

import math

import pytest
import torch

from nag.kernels import (
    attention_with_lse,
    attention_with_lse_and_key_bias,
    attention_with_lse_over_valid_keys,
    merge_attention,
)


def reference(q, k, v, key_mask=None):
    """Softmax attention and its log-sum-exp, (B, L, H, D) layout, explicit float64 math."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / math.sqrt(q.shape[-1])
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask.bool()[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    weights = torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)
    out = torch.einsum("bhqk,bkhd->bqhd", weights, v.double())
    return out, lse.transpose(1, 2)


def tensors(seed, keys=7):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(3, 5, 2, 8, generator=g), torch.randn(3, keys, 2, 8, generator=g),
            torch.randn(3, keys, 2, 8, generator=g))


def test_attention_with_lse_matches_softmax_attention():
    q, k, v = tensors(0)
    out, lse = attention_with_lse(q, k, v)
    expected, expected_lse = reference(q, k, v)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), expected_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["prefix", "holes"])
def test_valid_keys_only(kind):
    """Prefix masks (per-row valid lengths, one row with none) and masks with holes; a row without a valid key
    contributes nothing when merged."""
    q, k, v = tensors(1)
    if kind == "prefix":
        mask = torch.arange(7)[None, :] < torch.tensor([[7], [3], [0]])
    else:
        mask = torch.tensor([[1, 0, 1, 1, 0, 1, 1], [0, 0, 0, 1, 0, 0, 1], [0] * 7]).bool()
    out, lse = attention_with_lse_over_valid_keys(q, k, v, mask)
    expected, expected_lse = reference(q, k, v, mask)
    torch.testing.assert_close(out[:2].double(), expected[:2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse[:2].double(), expected_lse[:2], rtol=1e-5, atol=1e-5)
    assert torch.equal(out[2], torch.zeros_like(out[2])) and bool(torch.isinf(lse[2]).all())
    # merged with attention over other keys: the union's attention; the empty row: the other keys' alone
    q2, k2, v2 = tensors(2, keys=4)
    other, other_lse = attention_with_lse(q, k2, v2)
    merged = merge_attention(other, other_lse, out, lse)
    union, _ = reference(q, torch.cat([k2, k], dim=1), torch.cat([v2, v], dim=1),
                         torch.cat([torch.ones(3, 4, dtype=torch.bool), mask], dim=1))
    torch.testing.assert_close(merged.double(), union, rtol=1e-5, atol=1e-5)


def test_no_mask_is_plain_attention_with_lse():
    q, k, v = tensors(3)
    out, lse = attention_with_lse_over_valid_keys(q, k, v, None)
    expected, expected_lse = attention_with_lse(q, k, v)
    assert torch.equal(out, expected) and torch.equal(lse, expected_lse)


def biased_reference(q, k, v, key_bias):
    """Softmax attention with an additive (B, Lk) key bias and its log-sum-exp, explicit float64 math (a row
    without a finite bias: zero output, -inf)."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / math.sqrt(q.shape[-1])
    scores = scores + key_bias.double()[:, None, None, :]
    lse = torch.logsumexp(scores, dim=-1)
    weights = torch.nan_to_num(torch.exp(scores - lse.unsqueeze(-1)), nan=0.0)
    return torch.einsum("bhqk,bkhd->bqhd", weights, v.double()), lse.transpose(1, 2)


NEG = float("-inf")
KEY_BIASES = {
    # a tokenizer's float 0/1 mask as SDPA adds it: one or two runs per row
    "prefix": torch.tensor([[1.0] * 7, [1, 1, 1, 0, 0, 0, 0], [0.0] * 7]),
    # any values, -inf dropping keys; row 1 has more runs than the kernel path takes (explicit math)
    "runs": torch.tensor([[0.5, 0.5, NEG, NEG, -2.0, -2.0, 3.0], [1, -1, 1, -1, 1, NEG, 2], [0.25] * 7]),
    # a boolean mask as biases: row 2 drops every key
    "masked": torch.tensor([[0, NEG, 0, 0, NEG, 0, 0], [NEG, NEG, NEG, 0, 0, 0, 0], [NEG] * 7]),
}


@pytest.mark.parametrize("kind", list(KEY_BIASES))
def test_additive_key_bias(kind):
    """Per-key additive biases: the kernel runs (bias added to each run's log-sum-exp) and the explicit math agree
    with the float64 reference; merged with attention over other keys they give the union's attention."""
    q, k, v = tensors(4)
    bias = KEY_BIASES[kind]
    out, lse = attention_with_lse_and_key_bias(q, k, v, bias)
    expected, expected_lse = biased_reference(q, k, v, bias)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), expected_lse, rtol=1e-5, atol=1e-5)
    math_out, math_lse = attention_with_lse_and_key_bias(q, k, v, bias, max_runs=0)  # every row: explicit math
    torch.testing.assert_close(math_out.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(math_lse.double(), expected_lse, rtol=1e-5, atol=1e-5)
    q2, k2, v2 = tensors(5, keys=4)
    other, other_lse = attention_with_lse(q, k2, v2)
    merged = merge_attention(other, other_lse, out, lse)
    union, _ = biased_reference(q, torch.cat([k2, k], dim=1), torch.cat([v2, v], dim=1),
                                torch.cat([torch.zeros(3, 4), bias], dim=1))
    torch.testing.assert_close(merged.double(), union, rtol=1e-5, atol=1e-5)


def test_key_bias_none_or_zero_is_plain_attention_with_lse():
    q, k, v = tensors(6)
    expected, expected_lse = attention_with_lse(q, k, v)
    out, lse = attention_with_lse_and_key_bias(q, k, v, None)
    assert torch.equal(out, expected) and torch.equal(lse, expected_lse)
    out, lse = attention_with_lse_and_key_bias(q, k, v, torch.zeros(3, 7))
    assert torch.equal(out, expected) and torch.equal(lse, expected_lse)
    bias = torch.ones(3, 7)  # a bias shared by every key shifts the log-sum-exp only
    out, lse = attention_with_lse_and_key_bias(q, k, v, bias)
    assert torch.equal(out, expected) and torch.equal(lse, expected_lse + 1)
    assert torch.equal(bias, torch.ones(3, 7))  # (the input is left as it was)


@pytest.fixture
def fresh_checks(monkeypatch):
    """The kernels' self-checks forgotten before and after the test."""
    from nag import kernels
    monkeypatch.setattr(kernels, "_CHECKED", {})
    return kernels


def wrong_lse(qt, kt, vt):
    """A kernel with the wrong convention: log-sum-exp in base 2."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qt, kt, vt)[:2]
    return out, lse / math.log(2)


def raising(qt, kt, vt):
    raise RuntimeError("no kernel image for this device\nmore")


@pytest.mark.parametrize("kernel, problem", [(wrong_lse, "disagrees"), (raising, "failed (RuntimeError: no kernel")])
def test_lse_kernel_that_fails_its_self_check_is_replaced_by_the_math(fresh_checks, monkeypatch, caplog, kernel,
                                                                       problem):
    monkeypatch.setitem(fresh_checks.LSE_KERNELS, "cpu", (("patched", kernel, None),))
    q, k, v = tensors(7)
    expected, expected_lse = reference(q, k, v)
    with caplog.at_level("WARNING", logger="nag"):
        for _ in range(2):
            out, lse = attention_with_lse(q, k, v)
            torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(lse.double(), expected_lse, rtol=1e-5, atol=1e-5)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and problem in messages[0] and "patched" in messages[0]
    assert "head size 8" in messages[0] and "more" not in messages[0]


def test_lse_kernel_is_checked_once_per_dtype_and_head_size(fresh_checks, monkeypatch, caplog):
    calls = []

    def counting(qt, kt, vt):
        calls.append((qt.dtype, qt.shape[-1], qt.shape[2]))
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qt, kt, vt)[:2]

    monkeypatch.setitem(fresh_checks.LSE_KERNELS, "cpu", (("counting", counting, None),))
    q, k, v = tensors(8)
    with caplog.at_level("WARNING", logger="nag"):
        attention_with_lse(q, k, v)
        attention_with_lse(q, k, v)
        assert calls == [(torch.float32, 8, 24), (torch.float32, 8, 5), (torch.float32, 8, 5)]  # check, then two uses
        attention_with_lse(q[..., :4], k[..., :4], v[..., :4])  # another head size: checked again
        out, _ = attention_with_lse(q.bfloat16(), k.bfloat16(), v.bfloat16())  # another dtype: checked again
    assert [c[2] for c in calls[3:]] == [24, 5, 24, 5] and not caplog.records
    assert out.dtype == torch.bfloat16
