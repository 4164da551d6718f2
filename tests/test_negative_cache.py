"""What the cross-attention fast path computes once per generation from the negative prompt, and that it changes
nothing: the negative tokens' text projection (``ModuleKind.TEXT_PROJECTION``) and the negative keys/values without
the keys every guided row masks (``drop_masked_keys``), each row's trailing run of one repeated key kept as one
(``collapse_repeated_keys``)."""

from __future__ import annotations

import math

import pytest
import tiny_pipelines as tp
import torch

import nag
from nag.attention.cross import collapse_repeated_keys, drop_masked_keys

PROMPTS = ["a red circle on a blue background", "a small green square"]
SETTINGS = dict(scale=3.0, tau=2.5, alpha=0.5)


def naive_attention(q, k, v, mask):
    """Softmax attention written out: ``q (rows, queries, heads, dim)``, ``k``/``v`` ``(rows, keys, heads, dim)``,
    ``mask`` ``(rows, heads, queries, keys)`` boolean (True: attended) or additive, or None."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.double()
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v.double())


def padded_mask(valid, keys, heads, queries, kind):
    """Each row's first ``valid[row]`` keys attended, the rest padding: boolean or additive as diffusers builds it."""
    attended = torch.arange(keys)[None, :] < torch.tensor(valid)[:, None]
    attended = attended[:, None, None, :].expand(len(valid), heads, queries, keys)
    if kind == "bool":
        return attended
    masked = {"-1e4": -10000.0, "-inf": float("-inf")}[kind]
    return torch.zeros(attended.shape).masked_fill(~attended, masked)


@pytest.mark.parametrize("kind", ["bool", "-1e4", "-inf"])
def test_dropped_keys_leave_the_attention_unchanged(kind):
    rows, keys, heads, queries, dim = 3, 12, 2, 5, 8
    g = torch.Generator().manual_seed(0)
    q = torch.randn(rows, queries, heads, dim, generator=g) * 3
    k, v = (torch.randn(rows, keys, heads, dim, generator=g) * 3 for _ in range(2))
    mask = padded_mask([3, 7, 5], keys, heads, queries, kind)
    kept_k, kept_v, kept_mask = drop_masked_keys(k, v, mask)
    assert kept_k.shape[1] == kept_v.shape[1] == 7  # the longest row's valid keys
    assert kept_mask is not None and kept_mask.shape[-1] == 7  # rows 0 and 2 still mask some of them
    expected = naive_attention(q, k, v, mask)
    torch.testing.assert_close(naive_attention(q, kept_k, kept_v, kept_mask), expected, rtol=0, atol=1e-12)
    assert kept_k.dtype == k.dtype and kept_mask.dtype == mask.dtype


@pytest.mark.parametrize("kind", ["bool", "-1e4"])
def test_keys_all_valid_after_dropping_need_no_mask(kind):
    k = v = torch.randn(2, 9, 2, 4)
    kept_k, kept_v, kept_mask = drop_masked_keys(k, v, padded_mask([4, 4], 9, 2, 1, kind))
    assert kept_mask is None
    torch.testing.assert_close(kept_k, k[:, :4], rtol=0, atol=0)


def test_nothing_is_dropped_where_a_row_attends_to_no_key():
    """A row whose every key is masked spreads its softmax over all of them: dropping any would change it."""
    k = v = torch.randn(2, 6, 1, 4)
    mask = padded_mask([3, 0], 6, 1, 1, "-1e4")
    assert drop_masked_keys(k, v, mask)[0] is k
    assert drop_masked_keys(k, v, None)[2] is None
    kept = drop_masked_keys(k, v, torch.zeros(2, 1, 1, 6))  # an additive mask of zeros masks nothing
    assert kept[0] is k


#: the text projection of each pipeline's denoiser, and whether the negative text comes after the prompt's tokens
#: (cross layout) or after the stock rows (joint and concat layouts)
PROJECTIONS = {
    "pixart_sigma": ("caption_projection", "tokens"),
    "sana": ("caption_projection", "tokens"),
    "ltx": ("caption_projection", "tokens"),
    "wan": ("condition_embedder.text_embedder", "tokens"),
    "flux": ("context_embedder", "rows"),
    "sd3": ("context_embedder", "rows"),
    "qwenimage": ("txt_in", "rows"),
    "chroma": ("context_embedder", "rows"),
    "flux2_klein": ("context_embedder", "rows"),
    "auraflow": ("context_embedder", "rows"),
}


@pytest.mark.parametrize("name", sorted(PROJECTIONS))
def test_the_negative_text_is_projected_once_per_generation(name):
    """Each generation projects the negative text in its first guided call only; the output equals the
    straightforward path's, which projects it in every guided call (CFG on where the pipeline has it), also for a
    second generation with another negative prompt (nothing kept from the first)."""
    pipe = {**tp.FACTORIES, **tp.FAMILY_FACTORIES}[name]()
    kwargs = tp.call_kwargs(name, output_type="latent", num_inference_steps=3)  # (latents: each negative shows)
    path, part = PROJECTIONS[name]
    projection = tp.denoiser(pipe).get_submodule(path)
    sizes: list[int] = []

    def generate(negative, fast):
        sizes.clear()
        with nag.apply(pipe, negative, **SETTINGS, fast=fast) as handle:
            # (registered after NAG's hooks: it sees the text the projection computes on)
            axis = 1 if part == "tokens" else 0
            counter = projection.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[axis]))
            try:
                out = pipe(prompt=PROMPTS, generator=torch.Generator("cpu").manual_seed(0), **kwargs)
            finally:
                counter.remove()
            guided = handle.guided_calls
        assert guided >= 3
        return tp.output_tensor(out), list(sizes), guided

    results = {}
    for negative in ("blurry, low quality, ugly watermark text", "dark"):
        results[negative], fast_sizes, guided = generate(negative, fast=True)
        reference, straightforward_sizes, _ = generate(negative, fast=False)
        # float32 rounding at the latents' scale (the tiny PixArt-Sigma's reach hundreds)
        scale = max(1.0, reference.abs().max().item())
        torch.testing.assert_close(results[negative], reference, rtol=0, atol=1e-6 * scale)
        # the negative part: its tokens (padded to the prompt's length), or one row per prompt
        negative_part = kwargs["max_sequence_length"] if part == "tokens" else len(PROMPTS)
        assert max(fast_sizes) == max(straightforward_sizes)
        assert fast_sizes.count(max(fast_sizes)) == 1
        assert sum(straightforward_sizes) - sum(fast_sizes) == (guided - 1) * negative_part
    assert (results["dark"] - results["blurry, low quality, ugly watermark text"]).abs().max() > 1e-3


def test_padded_negative_keys_are_dropped_in_a_pipeline():
    """PixArt-Sigma pads the negative prompt to the encoder's length and masks the padding: the negative keys kept for
    the generation are its valid tokens only, and no mask is left (one negative row, every kept key valid)."""
    pipe = tp.FACTORIES["pixart_sigma"]()
    negative = "dark"
    encoded = pipe.encode_prompt(
        negative, do_classifier_free_guidance=False, max_sequence_length=16, clean_caption=False
    )
    valid = int(encoded[1].sum())
    kept = []
    with nag.apply(pipe, negative, **SETTINGS) as handle:
        watch = tp.denoiser(pipe).register_forward_hook(
            lambda *_: kept.extend(handle.runtime.negative_kv.values()) if not kept else None
        )
        pipe(prompt=PROMPTS, generator=torch.Generator("cpu").manual_seed(0), **tp.call_kwargs("pixart_sigma"))
        watch.remove()
        # nothing is kept after the generation's loop
        assert not handle.runtime.negative_kv and not handle.runtime.negative_text_outputs
    assert kept and 0 < valid < 16
    for key, value, mask in kept:
        assert key.shape[1] == value.shape[1] == valid and mask is None


def test_repeated_trailing_keys_collapse_to_the_same_attention():
    """Rows padded with one repeated key and value (runs of 9, 7 and 1): the keys kept are the shorter run's row's
    distinct ones plus one, the additive mask weights each run's copies, and the attention equals the float64 softmax
    over all keys."""
    rows, keys, heads, queries, dim = 3, 12, 2, 5, 8
    g = torch.Generator().manual_seed(1)
    q = torch.randn(rows, queries, heads, dim, generator=g) * 3
    k, v = (torch.randn(rows, keys, heads, dim, generator=g) * 3 for _ in range(2))
    k[0, 3:], v[0, 3:] = k[0, -1], v[0, -1]  # a run of 9
    k[1, 5:], v[1, 5:] = k[1, -1], v[1, -1]  # a run of 7
    kept_k, kept_v, mask = collapse_repeated_keys(k, v)
    assert mask is None and kept_k is k  # row 2 has no run: nothing worth collapsing
    broken_k, broken_v = k[:2].clone(), v[:2].clone()
    broken_k[1, 8] += 1.0  # row 1's key at the middle is its last one, but its run is broken after it: a run of 3
    kept_k, kept_v, mask = collapse_repeated_keys(broken_k, broken_v)
    assert mask is None and kept_k is broken_k
    k2, v2 = k[:2], v[:2]
    kept_k, kept_v, mask = collapse_repeated_keys(k2, v2)
    assert kept_k.shape[1] == kept_v.shape[1] == 6 and mask.shape == (2, 1, 1, 6)  # row 1: 5 distinct keys + 1
    expected = naive_attention(q[:2], k2, v2, None)
    torch.testing.assert_close(naive_attention(q[:2], kept_k, kept_v, mask), expected, rtol=0, atol=1e-6)
    got = torch.nn.functional.scaled_dot_product_attention(
        q[:2].transpose(1, 2), kept_k.transpose(1, 2), kept_v.transpose(1, 2), attn_mask=mask
    ).transpose(1, 2)
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-5)


def test_zero_padded_negative_keys_collapse_in_a_pipeline():
    """Wan pads the negative prompt's embeddings with zeros to the encoder's length, unmasked: the padding projects to
    one repeated key, kept as one with its weight; the output is the straightforward path's."""
    pipe = tp.FACTORIES["wan"]()
    kept = []

    def generate(fast):
        with nag.apply(pipe, "dark", fast=fast, **SETTINGS) as handle:
            watch = tp.denoiser(pipe).register_forward_hook(
                lambda *_: kept.extend(handle.runtime.negative_kv.values()) if not kept and fast else None
            )
            out = pipe(prompt=PROMPTS, generator=torch.Generator("cpu").manual_seed(0), **tp.no_cfg_kwargs("wan"))
            watch.remove()
        return tp.output_tensor(out)

    fast, straightforward = generate(True), generate(False)
    encoded = pipe.encode_prompt("dark", do_classifier_free_guidance=False, max_sequence_length=16)[0]
    padded = encoded.shape[1]
    assert kept
    for key, value, mask in kept:
        assert key.shape[1] == value.shape[1] < padded // 2 and mask is not None
    torch.testing.assert_close(fast, straightforward, rtol=0, atol=1e-5 * float(straightforward.abs().max()))
