"""The compiled combine and merge (nag.compiled, nag.fused) against the eager code, and their fallbacks."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from torch._dynamo.utils import counters

from nag import combine as combine_module
from nag import compiled as compiled_module
from nag.combine import combine_eager, nag_combine
from nag.compiled import CompiledFunction, _renamed
from nag.fused import merge_and_combine, merge_parts
from nag.kernels import attention_with_lse, merge_attention

SETTINGS = dict(scale=5.0, tau=2.5, alpha=0.5)


@pytest.fixture
def compiled_mode(monkeypatch):
    """The compiled code on (tests/conftest.py turns it off for the rest of the suite), for inputs of any size."""
    monkeypatch.delenv("NAG_EAGER", raising=False)
    monkeypatch.setattr(compiled_module, "MIN_ELEMENTS", 0)


def pair(shape, dtype=torch.float32, seed=0, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    z_pos = torch.randn(*shape, generator=g) * spread
    z_neg = torch.randn(*shape, generator=g) * 3 * spread  # the tau cap binds for some tokens
    return z_pos.to(dtype), z_neg.to(dtype)


def both(*args, **kwargs):
    """nag_combine compiled and eager."""
    return nag_combine(*args, **kwargs), nag_combine(*args, **kwargs, compiled=False)


@pytest.mark.parametrize("norm", [1, 2])
def test_compiled_combine_matches_eager_float32(compiled_mode, norm):
    for shape in [(2, 64, 96), (3, 37, 40), (2, 200, 96)]:  # batch >= 2, odd sizes, a second token count
        z_pos, z_neg = pair(shape)
        z_pos[1, 3] = 0  # a zero-norm token: z_positive, never NaN
        z_neg[1, 3] = 0
        compiled, eager = both(z_pos, z_neg, **SETTINGS, norm=norm)
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
        assert torch.equal(compiled[1, 3], z_pos[1, 3])
    for settings in [dict(scale=2.0, tau=1.0, alpha=1.0), dict(scale=1e30, tau=1e30, alpha=0.25)]:
        compiled, eager = both(z_pos, z_neg, **settings, norm=norm)
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_compiled_combine_half_precision(compiled_mode, dtype):
    """Half inputs: norms in float32, so compiled and eager agree to the output's rounding and both stay near the
    float32 result of the same inputs; L1 norms far beyond float16's range do not overflow."""
    z_pos, z_neg = pair((2, 48, 256), dtype, spread=3000.0)
    compiled, eager = both(z_pos, z_neg, **SETTINGS)
    assert compiled.dtype == dtype and torch.isfinite(compiled).all()
    ulp = torch.finfo(dtype).eps
    torch.testing.assert_close(compiled.float(), eager.float(), rtol=2 * ulp, atol=1e-3)
    reference = nag_combine(z_pos.float(), z_neg.float(), **SETTINGS, compiled=False)
    torch.testing.assert_close(compiled.float(), reference, rtol=4 * ulp, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_compiled_combine_large_values_stay_finite(compiled_mode, dtype):
    limit = torch.finfo(dtype).max
    z_pos, z_neg = pair((2, 8, 64), torch.float32)
    z_pos = (z_pos.sign() * limit * 0.9).to(dtype)
    z_neg = (z_neg.sign() * limit * 0.9).to(dtype)
    compiled, eager = both(z_pos, z_neg, **SETTINGS)
    assert torch.isfinite(compiled).all()
    torch.testing.assert_close(compiled.double(), eager.double(), rtol=4 * torch.finfo(dtype).eps, atol=0)


def test_static_code_for_the_first_shapes_then_one_dynamic_compile(compiled_mode, monkeypatch):
    """The first shapes get code of their own, later ones share one dynamic-shape compile (any token count or batch
    size above 1); other settings reuse the code (they are not baked into it)."""
    fresh = CompiledFunction(_renamed(combine_eager, "test"), "nag_combine", static_shapes=2)
    monkeypatch.setattr(combine_module, "_COMPILED", fresh)

    def graphs_after(*shapes):
        before = counters["stats"]["unique_graphs"]
        for shape in shapes:
            z_pos, z_neg = pair(shape)
            for settings in (SETTINGS, dict(scale=3.0, tau=100.0, alpha=0.25)):
                compiled, eager = both(z_pos, z_neg, **settings)
                torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
        return counters["stats"]["unique_graphs"] - before

    assert graphs_after((2, 64, 96), (2, 64, 96), (2, 33, 96)) == 2  # two static shapes
    assert graphs_after((2, 65, 96)) == 1  # the dynamic compile
    assert graphs_after((3, 130, 96), (2, 7, 96), (2, 64, 96)) == 0  # (the last: its static code)


def failing(*args, **kwargs):
    raise RuntimeError("backend exploded\nsecond line")


def test_compile_failure_falls_back_with_one_warning(compiled_mode, monkeypatch, caplog):
    compiled_function = combine_module._COMPILED
    monkeypatch.setattr(compiled_function, "_failed", set())
    monkeypatch.setattr(compiled_function, "compiled", lambda args: failing)
    z_pos, z_neg = pair((2, 16, 32))
    with caplog.at_level(logging.WARNING, logger="nag"):
        first = nag_combine(z_pos, z_neg, **SETTINGS)
        second = nag_combine(z_pos * 2, z_neg, **SETTINGS)
    eager = nag_combine(z_pos, z_neg, **SETTINGS, compiled=False)
    assert torch.equal(first, eager)
    assert torch.equal(second, nag_combine(z_pos * 2, z_neg, **SETTINGS, compiled=False))
    warnings = [r for r in caplog.records if "nag_combine" in r.getMessage()]
    assert len(warnings) == 1
    assert "backend exploded" in warnings[0].getMessage() and "second line" not in warnings[0].getMessage()
    # another dtype is tried (and fails) on its own: one more warning
    with caplog.at_level(logging.WARNING, logger="nag"):
        nag_combine(z_pos.double(), z_neg.double(), **SETTINGS)
    assert len([r for r in caplog.records if "nag_combine" in r.getMessage()]) == 2



def test_compiled_code_checks_itself_at_first_use(compiled_mode, monkeypatch, caplog):
    """The first compiled call for a device and dtypes also runs the eager code and compares: compiled code that
    gives another result (a miscompile on a device never used before) is dropped there with one warning, and that
    call and the later ones return the eager result without running it again."""
    compiled_function = combine_module._COMPILED
    monkeypatch.setattr(compiled_function, "_failed", set())
    monkeypatch.setattr(compiled_function, "_checked", set())
    runs = []

    def miscompiled(*args):
        runs.append(1)
        return combine_eager(*(arg.item() if isinstance(arg, torch.Tensor) and arg.dim() == 0 else arg
                               for arg in args)) * 1.5

    monkeypatch.setattr(compiled_function, "compiled", lambda args: miscompiled)
    z_pos, z_neg = pair((2, 16, 32))
    with caplog.at_level(logging.WARNING, logger="nag"):
        first = nag_combine(z_pos, z_neg, **SETTINGS)
        second = nag_combine(z_pos * 2, z_neg, **SETTINGS)
    assert torch.equal(first, nag_combine(z_pos, z_neg, **SETTINGS, compiled=False))
    assert torch.equal(second, nag_combine(z_pos * 2, z_neg, **SETTINGS, compiled=False))
    assert len(runs) == 1
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "disagrees with the eager code" in warnings[0] and "cpu:torch.float32" in warnings[0]


def test_compiled_code_that_agrees_is_checked_once(compiled_mode, monkeypatch, caplog):
    compiled_function = combine_module._COMPILED
    monkeypatch.setattr(compiled_function, "_failed", set())
    monkeypatch.setattr(compiled_function, "_checked", set())
    eager_runs = []
    fallback = compiled_function.fallback
    monkeypatch.setattr(compiled_function, "fallback", lambda *args: eager_runs.append(1) or fallback(*args))
    z_pos, z_neg = pair((2, 16, 32))
    with caplog.at_level(logging.WARNING, logger="nag"):
        for scale in (2.0, 3.0, 5.0):
            torch.testing.assert_close(nag_combine(z_pos, z_neg, scale=scale, tau=2.5, alpha=0.5),
                                       nag_combine(z_pos, z_neg, scale=scale, tau=2.5, alpha=0.5, compiled=False))
        nag_combine(z_pos.double(), z_neg.double(), **SETTINGS)  # other dtypes: checked on their own
    assert len(eager_runs) == 2 and not caplog.records


def test_disagreement_is_rounding_proof_and_sees_wrong_results():
    from nag.compiled import disagreement

    expected = torch.randn(4, 8, 16)
    assert disagreement(expected + 1e-6, expected) == ""
    assert disagreement(expected * 1.01, expected) != ""
    half = expected.bfloat16()
    assert disagreement((half.float() * 1.01).bfloat16(), half) == ""  # (about a unit of bfloat16's rounding)
    assert disagreement(half * 2, half) != ""
    with_nan = expected.clone()
    with_nan[0, 0, 0] = float("nan")
    assert disagreement(with_nan, expected) != "" and disagreement(expected, with_nan) != ""
    assert disagreement(with_nan, with_nan) == ""
    assert disagreement(expected[:2], expected) != "" and disagreement(expected.double(), expected) != ""

def test_eager_forced_by_environment_and_inside_a_compile(monkeypatch, caplog):
    """NAG_EAGER=1, or a call traced by the user's torch.compile, never reaches the compiled code."""
    monkeypatch.setattr(combine_module._COMPILED, "compiled", lambda args: pytest.fail("compiled code used"))
    z_pos, z_neg = pair((2, 16, 32))
    eager = nag_combine(z_pos, z_neg, **SETTINGS, compiled=False)
    monkeypatch.setenv("NAG_EAGER", "1")
    assert torch.equal(nag_combine(z_pos, z_neg, **SETTINGS), eager)
    monkeypatch.delenv("NAG_EAGER")
    torch._dynamo.reset()
    traced = torch.compile(lambda a, b: nag_combine(a, b, **SETTINGS) * 1.0, backend="eager", fullgraph=True)
    with caplog.at_level(logging.WARNING, logger="nag"):
        torch.testing.assert_close(traced(z_pos, z_neg), eager, rtol=1e-6, atol=1e-6)
    assert not caplog.records
    torch._dynamo.reset()


def attention_parts(seed, dtype=torch.float32, batch=2, queries=24, heads=3, head_dim=16, keys=(20, 7, 5)):
    """Image-query attention over three disjoint key sets (image, positive text, negative text): ``(out, lse)``
    each, and the queries, keys and values."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, queries, heads, head_dim, generator=g)
    kv = [(torch.randn(batch, n, heads, head_dim, generator=g), torch.randn(batch, n, heads, head_dim, generator=g))
          for n in keys]
    parts = [attention_with_lse(q.to(dtype), k.to(dtype), v.to(dtype)) for k, v in kv]
    return parts, q, kv


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_and_combine_eager_is_merge_attention_then_nag_combine(dtype):
    (image, positive, negative), _, _ = attention_parts(0, dtype)
    got = merge_and_combine([image, positive], [image, negative], **SETTINGS, compiled=False)
    z_pos = merge_attention(*image, *positive).flatten(2)
    z_neg = merge_attention(*image, *negative).flatten(2)
    assert got.shape == z_pos.shape and got.dtype == dtype
    assert torch.equal(got, nag_combine(z_pos, z_neg, **SETTINGS, compiled=False))
    assert torch.equal(merge_and_combine([image, positive], [image, negative], 1.0, 2.5, 0.5), z_pos)  # no guidance


def test_merge_parts_is_attention_over_the_union():
    """Three parts, one of them without keys for every query (-inf), merge to attention over all their keys."""
    parts, q, kv = attention_parts(1, keys=(20, 7, 5))
    empty = (torch.zeros_like(parts[0][0]), torch.full_like(parts[0][1], float("-inf")))
    merged = merge_parts([parts[0], empty, parts[1], parts[2]])
    union, _ = attention_with_lse(q, torch.cat([k for k, _ in kv], 1), torch.cat([v for _, v in kv], 1))
    torch.testing.assert_close(merged, union.flatten(2), rtol=1e-5, atol=1e-5)
    assert torch.equal(merge_parts([empty, empty]), empty[0].flatten(2))


def test_merge_parts_with_a_complete_first_part_skips_only_the_empty_pair_test():
    """``first_complete`` (the first part has a key for every query): the same bits, an empty later part included;
    without it, two empty parts in a row would give NaN, which the default guards against."""
    parts, _, _ = attention_parts(5, keys=(20, 7, 5))
    empty = (torch.zeros_like(parts[0][0]), torch.full_like(parts[0][1], float("-inf")))
    for sequence in ([parts[0], empty, parts[1], parts[2]], [parts[0], parts[1]], [parts[0], parts[2], empty]):
        assert torch.equal(merge_parts(sequence, first_complete=True), merge_parts(sequence))
    assert merge_parts([empty, empty], first_complete=True).isnan().all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_merge_and_combine_matches_eager(compiled_mode, dtype):
    for seed, keys in [(2, (20, 7, 5)), (3, (33, 11, 1))]:  # a second size: no new compile needed
        (image, positive, negative), _, _ = attention_parts(seed, dtype, queries=24 + seed, keys=keys)
        bias = torch.full_like(image[1], -0.5)  # a mask's bias shared by the image keys, added by the caller
        positive_parts, negative_parts = [image, positive], [(image[0], image[1] + bias), negative]
        compiled = merge_and_combine(positive_parts, negative_parts, **SETTINGS)
        eager = merge_and_combine(positive_parts, negative_parts, **SETTINGS, compiled=False)
        tolerance = 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
        torch.testing.assert_close(compiled.float(), eager.float(), rtol=tolerance, atol=tolerance)


def test_merge_and_combine_checks_its_parts():
    (image, positive, _), _, _ = attention_parts(4)
    with pytest.raises(ValueError, match="at least one"):
        merge_and_combine([image], [], **SETTINGS)
    short = (positive[0][:, :5], positive[1][:, :5])
    with pytest.raises(ValueError, match="same shape"):
        merge_and_combine([image, short], [image, positive], **SETTINGS)
    assert math.isfinite(float(merge_and_combine([image], [positive], **SETTINGS).sum()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_combine_over_any_finite_input(compiled_mode, dtype):
    """Drawn inputs over each dtype's whole finite range (zeros, subnormals, the limits) and legal settings: the
    compiled result is finite and agrees with the eager one to rounding."""
    from hypothesis import given
    from test_combine_properties import PROPERTY, alphas, scales, taus, tensor_pairs

    @PROPERTY
    @given(pair=tensor_pairs(dtype=dtype, shape=(2, 3, 16)), scale=scales, tau=taus, alpha=alphas)
    def check(pair, scale, tau, alpha):
        compiled, eager = both(*pair, scale, tau, alpha)
        assert torch.isfinite(compiled).all()
        # Rounding, relative to each token's largest value in or out: the two codes round w = (z+ - z-) + z- / s in
        # another order (the eager kernel fuses the multiply-add), the guidance scales w's rounding up where z+ - z-
        # cancels, and the blend with z+ may cancel too; so allow a few dozen units.
        scale_of = torch.stack([t.double().abs().amax(-1, keepdim=True) for t in (eager, *pair)]).amax(0)
        assert ((compiled.double() - eager.double()).abs() <= 64 * torch.finfo(dtype).eps * scale_of).all()

    check()


def test_small_inputs_run_eager(monkeypatch):
    """Below MIN_ELEMENTS (the toy model's sizes) the compile would cost more than it saves: eager code."""
    monkeypatch.delenv("NAG_EAGER", raising=False)
    monkeypatch.setattr(combine_module._COMPILED, "compiled", lambda args: pytest.fail("compiled code used"))
    z_pos, z_neg = pair((2, 64, 96))
    assert z_pos.numel() < compiled_module.MIN_ELEMENTS
    assert torch.equal(nag_combine(z_pos, z_neg, **SETTINGS), nag_combine(z_pos, z_neg, **SETTINGS, compiled=False))
