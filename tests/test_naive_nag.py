"""Self-test of the naive NAG reference (tests/naive_nag.py) on tiny random-weight diffusers models (CPU, float32)."""

from __future__ import annotations

import functools
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from diffusers import (  # noqa: E402
    FluxTransformer2DModel,
    PixArtTransformer2DModel,
    SanaTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
    WanTransformer3DModel,
)
from naive_nag import (  # noqa: E402
    naive_combine,
    naive_cross_attention_forward,
    naive_flux_forward,
    naive_sd3_forward,
)

TOL = 1e-5
NAG = dict(scale=3.0, tau=2.5, alpha=0.5)
BATCH = 2


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny models: intra-op threading only adds overhead (and spins badly on a loaded machine)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _seeded(seed):
    return torch.Generator().manual_seed(seed)


def _randn(gen, *shape):
    return torch.randn(*shape, generator=gen)


def _perturb(model, seed):
    """Random-weight model: add noise to every parameter so no norm weight is 1, no bias 0, no gate zero-inited."""
    gen = _seeded(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=gen))
    return model.eval()


def _max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


# ----------------------------------------------------------------------------------------------------------------------
# Cases.  Each builder returns a dict with
#   stock():                      stock model output
#   naive(neg, nag, cond_rows):   naive NAG output; neg is None (no negative) or a dict of negative tensors
#   neg_same(rows):               negative tensors equal to the positive ones for the given rows
#   neg_other(rows):              the given rows of a different negative with a different token length
# ----------------------------------------------------------------------------------------------------------------------


def _cross_case(model, kind, fwd, text_key, mask_key, neg_len, neg_dim, with_mask, seed):
    gen = _seeded(seed)

    def stock():
        return model(**fwd, return_dict=False)[0]

    def naive(neg, nag, cond_rows):
        neg = neg or {}
        return naive_cross_attention_forward(
            model, kind, fwd, neg.get("hidden"), neg.get("mask"), cond_rows=cond_rows, **nag
        )

    def neg_same(rows):
        out = {"hidden": fwd[text_key][rows]}
        if with_mask:
            out["mask"] = fwd[mask_key][rows]
        return out

    neg_hidden = _randn(gen, BATCH, neg_len, neg_dim)
    neg_mask = torch.ones(BATCH, neg_len)
    neg_mask[:, -2:] = 0.0
    neg_mask[0, -3] = 0.0

    def neg_other(rows):
        out = {"hidden": neg_hidden[rows]}
        if with_mask:
            out["mask"] = neg_mask[rows]
        return out

    return dict(model=model, stock=stock, naive=naive, neg_same=neg_same, neg_other=neg_other)


def _pos_mask(length):
    mask = torch.ones(BATCH, length)
    mask[0, -1] = 0.0
    mask[1, -3:] = 0.0
    return mask


@functools.cache
def case_unet_sd15():
    torch.manual_seed(0)
    model = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24,
        attention_head_dim=4,
        norm_num_groups=16,
    )
    _perturb(model, 1)
    gen = _seeded(2)
    fwd = dict(
        sample=_randn(gen, BATCH, 4, 8, 8),
        timestep=torch.tensor([10.0, 500.0]),
        encoder_hidden_states=_randn(gen, BATCH, 7, 24),
        encoder_attention_mask=_pos_mask(7),
    )
    return _cross_case(model, "unet", fwd, "encoder_hidden_states", "encoder_attention_mask", 5, 24, True, 3)


@functools.cache
def case_unet_sdxl():
    torch.manual_seed(0)
    model = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 2),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * 6 + 16,
        norm_num_groups=16,
    )
    _perturb(model, 4)
    gen = _seeded(5)
    fwd = dict(
        sample=_randn(gen, BATCH, 4, 8, 8),
        timestep=torch.tensor([10.0, 500.0]),
        encoder_hidden_states=_randn(gen, BATCH, 6, 32),
        added_cond_kwargs={"text_embeds": _randn(gen, BATCH, 16), "time_ids": _randn(gen, BATCH, 6).abs() * 64},
    )
    return _cross_case(model, "unet", fwd, "encoder_hidden_states", None, 9, 32, False, 6)


@functools.cache
def case_pixart():
    torch.manual_seed(0)
    model = PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        cross_attention_dim=16,
        sample_size=8,
        patch_size=2,
        caption_channels=24,
    )
    _perturb(model, 7)
    gen = _seeded(8)
    fwd = dict(
        hidden_states=_randn(gen, BATCH, 4, 8, 8),
        timestep=torch.tensor([10, 500]),
        encoder_hidden_states=_randn(gen, BATCH, 6, 24),
        encoder_attention_mask=_pos_mask(6),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
    )
    return _cross_case(model, "pixart", fwd, "encoder_hidden_states", "encoder_attention_mask", 9, 24, True, 9)


def _sana_case(qk_norm, seed):
    torch.manual_seed(0)
    model = SanaTransformer2DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=2,
        num_cross_attention_heads=2,
        cross_attention_head_dim=8,
        cross_attention_dim=16,
        caption_channels=24,
        sample_size=8,
        patch_size=1,
        qk_norm=qk_norm,
    )
    _perturb(model, seed)
    gen = _seeded(seed + 1)
    fwd = dict(
        hidden_states=_randn(gen, BATCH, 4, 8, 8),
        timestep=torch.tensor([10, 500]),
        encoder_hidden_states=_randn(gen, BATCH, 8, 24),
        encoder_attention_mask=_pos_mask(8),
    )
    return _cross_case(model, "sana", fwd, "encoder_hidden_states", "encoder_attention_mask", 5, 24, True, seed + 2)


@functools.cache
def case_sana():
    return _sana_case(None, 10)


@functools.cache
def case_sana_qknorm():
    return _sana_case("rms_norm_across_heads", 13)


@functools.cache
def case_wan():
    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=32,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    _perturb(model, 16)
    gen = _seeded(17)
    fwd = dict(
        hidden_states=_randn(gen, BATCH, 4, 2, 8, 8),
        timestep=torch.tensor([10, 500]),
        encoder_hidden_states=_randn(gen, BATCH, 7, 16),
    )
    return _cross_case(model, "wan", fwd, "encoder_hidden_states", None, 11, 16, False, 18)


def _flux_case(guidance_embeds, seed):
    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 4, 8),
    )
    _perturb(model, seed)
    gen = _seeded(seed + 1)
    h = w = 4
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    img_ids = img_ids.reshape(h * w, 3)
    txt_len, neg_len = 6, 9
    txt_ids = torch.zeros(txt_len, 3)
    txt_ids[:, 0] = torch.arange(txt_len)  # non-trivial text positions, to exercise per-branch RoPE tables
    pos = dict(
        hidden_states=_randn(gen, BATCH, h * w, 4),
        encoder_hidden_states=_randn(gen, BATCH, txt_len, 32),
        pooled_projections=_randn(gen, BATCH, 32),
        timestep=torch.tensor([0.3, 0.8]),
        img_ids=img_ids,
        txt_ids=txt_ids,
        guidance=torch.tensor([3.5, 2.0]) if guidance_embeds else None,
    )
    neg_hidden = _randn(gen, BATCH, neg_len, 32)
    neg_pooled = _randn(gen, BATCH, 32)
    neg_ids = torch.zeros(neg_len, 3)
    neg_ids[:, 0] = torch.arange(neg_len) * 0.5

    def stock():
        return model(**pos, return_dict=False)[0]

    def naive(neg, nag, cond_rows):
        neg = neg or {}
        return naive_flux_forward(
            model,
            **pos,
            neg_encoder_hidden_states=neg.get("hidden"),
            neg_pooled_projections=neg.get("pooled"),
            neg_txt_ids=neg.get("ids"),
            cond_rows=cond_rows,
            **nag,
        )

    def neg_same(rows):
        return {
            "hidden": pos["encoder_hidden_states"][rows],
            "pooled": pos["pooled_projections"][rows],
            "ids": txt_ids,
        }

    def neg_other(rows):
        return {"hidden": neg_hidden[rows], "pooled": neg_pooled[rows], "ids": neg_ids}

    return dict(stock=stock, naive=naive, neg_same=neg_same, neg_other=neg_other)


@functools.cache
def case_flux():
    return _flux_case(False, 20)


@functools.cache
def case_flux_guidance():
    return _flux_case(True, 23)


def _sd3_case(dual, seed):
    torch.manual_seed(0)
    model = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=3,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=16,
        pooled_projection_dim=24,
        out_channels=4,
        pos_embed_max_size=16,
        dual_attention_layers=(0, 1) if dual else (),
        qk_norm="rms_norm" if dual else None,
    )
    _perturb(model, seed)
    gen = _seeded(seed + 1)
    pos = dict(
        hidden_states=_randn(gen, BATCH, 4, 8, 8),
        encoder_hidden_states=_randn(gen, BATCH, 7, 32),
        pooled_projections=_randn(gen, BATCH, 24),
        timestep=torch.tensor([10.0, 700.0]),
    )
    neg_hidden = _randn(gen, BATCH, 4, 32)
    neg_pooled = _randn(gen, BATCH, 24)

    def stock():
        return model(**pos, return_dict=False)[0]

    def naive(neg, nag, cond_rows):
        neg = neg or {}
        return naive_sd3_forward(
            model,
            **pos,
            neg_encoder_hidden_states=neg.get("hidden"),
            neg_pooled_projections=neg.get("pooled"),
            cond_rows=cond_rows,
            **nag,
        )

    def neg_same(rows):
        return {"hidden": pos["encoder_hidden_states"][rows], "pooled": pos["pooled_projections"][rows]}

    def neg_other(rows):
        return {"hidden": neg_hidden[rows], "pooled": neg_pooled[rows]}

    return dict(stock=stock, naive=naive, neg_same=neg_same, neg_other=neg_other)


@functools.cache
def case_sd3():
    return _sd3_case(False, 26)


@functools.cache
def case_sd35():
    return _sd3_case(True, 29)


CASES = {
    "unet_sd15": case_unet_sd15,
    "unet_sdxl": case_unet_sdxl,
    "pixart": case_pixart,
    "sana": case_sana,
    "sana_qknorm": case_sana_qknorm,
    "wan": case_wan,
    "flux": case_flux,
    "flux_guidance": case_flux_guidance,
    "sd3": case_sd3,
    "sd35_dual": case_sd35,
}


@functools.cache
def _stock(name):
    with torch.no_grad():
        return CASES[name]()["stock"]()


# ----------------------------------------------------------------------------------------------------------------------
# 1. identity settings reproduce the stock output
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
@torch.no_grad()
def test_identity_settings_reproduce_stock(name):
    case = CASES[name]()
    stock = _stock(name)
    assert torch.isfinite(stock).all()

    # no negative at all: the naive re-implementation alone equals the stock model
    out = case["naive"](None, NAG, None)
    assert out.shape == stock.shape
    assert _max_diff(out, stock) < TOL

    # scale = 1: z_tilde = z_pos whatever the negative is
    out = case["naive"](case["neg_other"]([0, 1]), dict(scale=1.0, tau=2.5, alpha=0.5), None)
    assert _max_diff(out, stock) < TOL

    # alpha = 0: output is z_pos
    out = case["naive"](case["neg_other"]([0, 1]), dict(scale=3.0, tau=2.5, alpha=0.0), None)
    assert _max_diff(out, stock) < TOL


# ----------------------------------------------------------------------------------------------------------------------
# 2. negative == positive reproduces the stock output
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
@torch.no_grad()
def test_negative_equal_positive_reproduces_stock(name):
    case = CASES[name]()
    stock = _stock(name)
    out = case["naive"](case["neg_same"]([0, 1]), NAG, None)
    assert _max_diff(out, stock) < TOL
    out = case["naive"](case["neg_same"]([1]), NAG, [1])
    assert _max_diff(out, stock) < TOL


# ----------------------------------------------------------------------------------------------------------------------
# 3. a real negative (different token length) changes the guided rows only
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
@torch.no_grad()
def test_negative_changes_guided_rows_only(name):
    case = CASES[name]()
    stock = _stock(name)
    scale_ref = stock.abs().max().item()

    out_all = case["naive"](case["neg_other"]([0, 1]), NAG, None)
    assert torch.isfinite(out_all).all()
    for row in range(BATCH):
        assert _max_diff(out_all[row], stock[row]) > 1e-3 * max(scale_ref, 1.0), row

    # naive re-implementation without any negative (equal to stock to TOL, checked in test 1)
    plain = case["naive"](None, NAG, None)

    for guided in ([1], [0]):
        out = case["naive"](case["neg_other"](guided), NAG, guided)
        assert torch.isfinite(out).all()
        other = 1 - guided[0]
        # the unguided row is computed exactly as without NAG ...
        assert _max_diff(out[other], plain[other]) < 1e-6
        # ... i.e. as the stock model (up to explicit-softmax vs SDPA rounding)
        assert _max_diff(out[other], stock[other]) < TOL
        assert _max_diff(out[guided[0]], stock[guided[0]]) > 1e-3 * max(scale_ref, 1.0)
        # the guided row does not depend on which other rows are guided
        assert _max_diff(out[guided[0]], out_all[guided[0]]) < TOL

    # no guided rows: stock
    out = case["naive"](case["neg_other"]([]), NAG, [])
    assert _max_diff(out, plain) < 1e-6
    assert _max_diff(out, stock) < TOL


# ----------------------------------------------------------------------------------------------------------------------
# 4. naive_combine properties
# ----------------------------------------------------------------------------------------------------------------------


def test_combine_alpha_zero_is_positive():
    gen = _seeded(40)
    z_pos, z_neg = _randn(gen, 2, 5, 12), _randn(gen, 2, 5, 12)
    out = naive_combine(z_pos, z_neg, scale=4.0, tau=2.5, alpha=0.0)
    torch.testing.assert_close(out, z_pos, atol=0, rtol=0)


@pytest.mark.parametrize("p", [1, 2, float("inf")])
def test_combine_ratio_capped_by_tau(p):
    gen = _seeded(41)
    z_pos, z_neg = _randn(gen, 2, 64, 12), _randn(gen, 2, 64, 12)
    tau = 1.5
    out = naive_combine(z_pos, z_neg, scale=5.0, tau=tau, alpha=1.0, p=p)
    norm = lambda t: torch.linalg.vector_norm(t, ord=p, dim=-1)  # noqa: E731
    ratio = norm(out) / norm(z_pos)
    assert (ratio <= tau * (1 + 1e-5)).all()
    # with scale 5 and an unrelated negative, many tokens hit the cap exactly
    assert torch.isclose(ratio, torch.full_like(ratio, tau), rtol=1e-5).any()
    # tokens below the cap are the plain extrapolation
    z_tilde = 5.0 * z_pos - 4.0 * z_neg
    below = norm(z_tilde) / norm(z_pos) < tau
    torch.testing.assert_close(out[below], z_tilde[below], rtol=1e-5, atol=1e-6)


def test_combine_zero_norm_inputs_are_finite():
    zeros = torch.zeros(1, 3, 8)
    other = torch.randn(1, 3, 8, generator=_seeded(42))
    for z_pos, z_neg in ((zeros, zeros), (zeros, other), (other, other)):
        out = naive_combine(z_pos, z_neg, scale=3.0, tau=2.5, alpha=0.5)
        assert torch.isfinite(out).all()
    # zero positive: extrapolated norm is capped at tau * eps -> output stays tiny
    out = naive_combine(zeros, other, scale=3.0, tau=2.5, alpha=1.0)
    assert out.abs().max() < 1e-4


def test_combine_keeps_dtype_and_identity_at_scale_one():
    gen = _seeded(43)
    z_pos, z_neg = _randn(gen, 2, 5, 12).half(), _randn(gen, 2, 5, 12).half()
    out = naive_combine(z_pos, z_neg, scale=1.0, tau=2.5, alpha=0.7)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, z_pos)


# ----------------------------------------------------------------------------------------------------------------------
# 5. the cross-attention entry point restores the stock processors, also when the forward raises
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["unet_sd15", "pixart", "sana", "wan"])
@torch.no_grad()
def test_cross_attention_processors_restored(name):
    case = CASES[name]()
    model = case["model"]
    before = {n: m.processor for n, m in model.named_modules() if n.endswith("attn2")}
    assert before
    case["naive"](case["neg_other"]([1]), NAG, [1])
    assert {n: m.processor for n, m in model.named_modules() if n.endswith("attn2")} == before

    # an error in the middle of the forward (raised by a pre-hook on the last attn2) still restores them
    last = [m for n, m in model.named_modules() if n.endswith("attn2")][-1]

    def boom(module, args, kwargs):
        raise RuntimeError("boom")

    handle = last.register_forward_pre_hook(boom, with_kwargs=True)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            case["naive"](case["neg_other"]([1]), NAG, [1])
    finally:
        handle.remove()
    assert {n: m.processor for n, m in model.named_modules() if n.endswith("attn2")} == before


# ----------------------------------------------------------------------------------------------------------------------
# 6. the negative's own conditioning is really used
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["unet_sd15", "pixart", "sana", "sana_qknorm"])
@torch.no_grad()
def test_negative_mask_equals_truncation(name):
    """A 0/1 negative mask that drops the last tokens ~ the negative truncated to its kept tokens (bias -10000)."""
    case = CASES[name]()
    neg = case["neg_other"]([0, 1])
    keep = 3
    masked = {"hidden": neg["hidden"], "mask": torch.ones_like(neg["mask"])}
    masked["mask"][:, keep:] = 0.0
    truncated = {"hidden": neg["hidden"][:, :keep], "mask": torch.ones_like(neg["mask"][:, :keep])}
    out_masked = case["naive"](masked, NAG, None)
    out_truncated = case["naive"](truncated, NAG, None)
    assert _max_diff(out_masked, out_truncated) < TOL
    assert _max_diff(out_masked, case["naive"](neg, NAG, None)) > 1e-4


@pytest.mark.parametrize("name", ["flux", "flux_guidance", "sd3", "sd35_dual"])
@torch.no_grad()
def test_negative_pooled_and_ids_matter(name):
    """Joint models: the negative text stream is modulated with its own pooled embedding (and, Flux, own ids)."""
    case = CASES[name]()
    neg = case["neg_other"]([0, 1])
    base = case["naive"](neg, NAG, None)
    other_pooled = dict(neg, pooled=neg["pooled"].flip(0) * 2.0)
    assert _max_diff(case["naive"](other_pooled, NAG, None), base) > 1e-4
    if "ids" in neg:
        other_ids = dict(neg, ids=neg["ids"] + 3.0)
        assert _max_diff(case["naive"](other_ids, NAG, None), base) > 1e-4
