"""The fast paths' attention pieces (nag.kernels) against plain softmax attention written here."""

from __future__ import annotations

import math

import pytest
import torch

from nag.kernels import attention_with_lse, attention_with_lse_over_valid_keys, merge_attention


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
