"""Further text-conditioned families: CogView4, CogVideoX, HunyuanVideo (and the families below them in this file).

Every configuration runs the invariant checks of ``test_pipelines`` (tiny random-weight pipelines, batch 2
with prompts of different lengths where the pipeline allows it, CFG on) and agrees with the naive
block-by-block reference in ``naive_nag`` for negatives shorter and longer than the positive, with partial
masks where the family has masks. Image conditioning (control images) is left as the pipeline sets it.
"""

from __future__ import annotations

from collections import Counter

import pytest
import test_pipelines as tpl
import tiny_pipelines as tp
import torch
from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0
from diffusers.models.transformers.transformer_cogview4 import CogView4AttnProcessor
from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0

import nag

NAMES = ["cogview4", "cogvideox", "hunyuanvideo"]
# Configurations without a NAG-aware fast path (none here: every family's blocks run on the stock rows with fast=True,
# the negative text beside them; no stock processor is called in guided calls).
STRAIGHTFORWARD_ONLY: dict[str, str] = {}
SETTINGS = tpl.SETTINGS


# test_invariants, CFG, NAG alone on its attention path, agreement with the naive reference through the pipeline
# and on the denoiser with one guided row of two (test_pipelines.family_tests)
(test_invariants, test_cfg_unconditional_branch_is_untouched, test_guided_without_cfg_on_its_attention_path,
 test_agrees_with_naive_implementation, test_batch_with_one_guided_row_agrees_with_naive_implementation) = \
    tpl.family_tests(NAMES, STRAIGHTFORWARD_ONLY)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "straightforward"])
def test_cogvideox_with_text_positions_pads_the_negative_to_the_model_text_length(fast):
    """CogVideoX 2b style: sincos positions over [max_text_seq_length text, video] (zero on the text part). A
    shorter negative is padded to the model's text length; each branch attends over its own tokens only."""
    _, inputs = tpl.denoiser_batch("cogvideox")
    model = tp._tiny_cogvideox_transformer(rotary=False, seed=4)
    inputs = {**inputs, "image_rotary_emb": None}
    negative = tpl.random_negative("cogvideox", inputs, -5, rows=1)
    with nag.denoiser.apply_to_denoiser(model, {"encoder_hidden_states": negative["negative_prompt_embeds"]}, fast=fast,
                                        positive_reference=inputs["encoder_hidden_states"][1:], **SETTINGS):
        with torch.no_grad():
            out = model(**inputs, return_dict=False)[0]
    with torch.no_grad():
        stock = model(**inputs, return_dict=False)[0]
        expected = tpl.naive_output("cogvideox", model, inputs, negative, cond_rows=[1])
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[0], stock[0], rtol=0, atol=1e-6)
    assert (out[1] - stock[1]).abs().max() > 1e-4


# ---------------------------------------------------------------------------------------------
# HunyuanVideo: the fast path keeps the video at the stock batch
# ---------------------------------------------------------------------------------------------


def _watch_rows(model):
    """``(rows, tokens)`` of the first input of every call to the modules that see video tokens (the patch embedding,
    whose input is the latents ``(B, C, F, H, W)``: rows and channels; the double blocks' video and text
    feed-forwards, the single blocks' MLP input projection, the final norm), by module name."""
    watched = (
        "x_embedder",
        "norm_out",
        *(
            f"transformer_blocks.{i}.{part}"
            for i in range(len(model.transformer_blocks))
            for part in ("ff", "ff_context")
        ),
        *(f"single_transformer_blocks.{i}.proj_mlp" for i in range(len(model.single_transformer_blocks))),
    )
    return tpl.InputShapes([(name, module) for name, module in model.named_modules() if name in watched])


def _hunyuanvideo_guided_call(fast, length_delta=5):
    """One denoiser call (row 0 stock, row 1 guided by a negative ``length_delta`` tokens longer than the call's text,
    partial masks): the output, the naive reference's, the rows seen by the video-side modules, the stock processors'
    calls."""
    model, inputs = tpl.denoiser_batch("hunyuanvideo")
    negative = tpl.random_negative("hunyuanvideo", inputs, length_delta, rows=1)
    with nag.denoiser.apply_to_denoiser(
        model,
        {tpl.NEGATIVE_KEYS[k]: v for k, v in negative.items()},
        fast=fast,
        positive_reference=inputs["encoder_hidden_states"][1:],
        **SETTINGS,
    ):
        counts = tpl.count_stock_calls(model)
        shapes = _watch_rows(model)  # (after NAG's hooks: the inputs the modules compute on)
        try:
            with torch.no_grad():
                out = model(**inputs, return_dict=False)[0]
        finally:
            shapes.close()
    with torch.no_grad():
        expected = tpl.naive_output("hunyuanvideo", model, inputs, negative, cond_rows=[1])
    return model, inputs, out, expected, shapes.seen, counts


@pytest.mark.parametrize("length_delta", [-3, 5])
@pytest.mark.parametrize("fast", [True, False], ids=["fast", "straightforward"])
def test_hunyuanvideo_fast_path_runs_the_video_at_the_stock_batch(fast, length_delta):
    """Batch of 2, one guided row: with the fast path every video-side module sees the 2 stock rows only (the negative
    row's text: the double blocks' text feed-forward and the single blocks' MLP on its text alone); the
    straightforward path carries a third, whole negative row. Both agree with the naive reference."""
    model, inputs, out, expected, seen, counts = _hunyuanvideo_guided_call(fast, length_delta)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    video = inputs["hidden_states"].shape[2:].numel()  # (patch size 1)
    text = max(inputs["encoder_hidden_states"].shape[1], inputs["encoder_hidden_states"].shape[1] + length_delta)
    rows = 2 if fast else 3
    assert [r for r, _ in seen["x_embedder"]] == [rows] and seen["norm_out"] == [(rows, video)]
    for i in range(len(model.transformer_blocks)):
        assert seen[f"transformer_blocks.{i}.ff"] == [(rows, video)]
        assert seen[f"transformer_blocks.{i}.ff_context"] == [(3, text)]
    for i in range(len(model.single_transformer_blocks)):
        expected_calls = [(1, text), (2, video + text)] if fast else [(3, video + text)]
        assert sorted(seen[f"single_transformer_blocks.{i}.proj_mlp"]) == expected_calls
    assert (len(counts) == 0) == fast


@pytest.mark.parametrize(
    "change",
    ["backend", "transformer_blocks.1.attn", "single_transformer_blocks.0.attn", "single_transformer_blocks.1.attn"],
)
def test_hunyuanvideo_other_processor_or_backend_takes_the_straightforward_path(change):
    """fast=True gives the negative rows their own copy of the video (no row split) where the fast attention cannot
    serve them: with a processor of the user's own in any block, or another attention backend, the video stream
    enters the blocks at the whole batch (as on the straightforward path); single blocks whose attention the fast path
    serves still run on the stock rows, the others on whole rows (the video copied for the negative rows again after
    a split one). The modules it cannot serve call their stock processor once per branch; the result agrees with the
    naive reference."""
    model, _ = tpl.denoiser_batch("hunyuanvideo")
    stock = {name: module.processor for name, module in model.named_modules() if hasattr(module, "processor")}
    for name, module in model.named_modules():
        if change == "backend" and name.endswith(".attn") and "transformer_blocks" in name:
            module.processor._attention_backend = "_native_math"
        elif name == change:
            module.set_processor(tpl.own_processor(HunyuanVideoAttnProcessor2_0))
    try:
        _, _, out, expected, seen, counts = _hunyuanvideo_guided_call(fast=True)
    finally:
        for name, module in model.named_modules():
            if name in stock:
                module.set_processor(stock[name])
                vars(module.processor).pop("_attention_backend", None)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    assert [r for r, _ in seen["x_embedder"]] == [3]
    assert all(calls == [(3, calls[0][1])] for name, calls in seen.items() if name.endswith(".ff"))
    for i in range(len(model.single_transformer_blocks)):
        split = change != "backend" and change != f"single_transformer_blocks.{i}.attn"
        assert [rows for rows, _ in sorted(seen[f"single_transformer_blocks.{i}.proj_mlp"])] == (
            [1, 2] if split else [3]
        )
    assert seen["norm_out"][0][0] == (2 if split else 3)  # (after the last single block)
    # the negative and the positive pass in the double blocks (whole rows) and the single blocks not split
    straightforward = {f"transformer_blocks.{i}.attn" for i in range(len(model.transformer_blocks))}
    straightforward |= {
        f"single_transformer_blocks.{i}.attn"
        for i in range(len(model.single_transformer_blocks))
        if change in ("backend", f"single_transformer_blocks.{i}.attn")
    }
    assert Counter(counts) == {name: 2 for name in straightforward}


# ---------------------------------------------------------------------------------------------
# CogView4: the fast path keeps the image at the stock batch
# ---------------------------------------------------------------------------------------------


def _cogview4_guided_call(fast, length_delta=5):
    """One denoiser call (row 0 stock, row 1 guided by a negative ``length_delta`` tokens longer than the call's text,
    partial masks on both): the output, the naive reference's, ``(rows, tokens)`` of every call to the patch
    embedding's image projection, the blocks' feed-forwards, the final norm and the output projection, and the stock
    processors' calls."""
    model, inputs = tpl.denoiser_batch("cogview4")
    negative = tpl.random_negative("cogview4", inputs, length_delta, rows=1)
    watched = (
        "patch_embed.proj",
        "norm_out",
        "proj_out",
        *(f"transformer_blocks.{i}.ff" for i in range(len(model.transformer_blocks))),
    )
    with nag.denoiser.apply_to_denoiser(
        model,
        {tpl.NEGATIVE_KEYS[k]: v for k, v in negative.items()},
        fast=fast,
        positive_reference=inputs["encoder_hidden_states"][1:],
        **SETTINGS,
    ):
        counts = tpl.count_stock_calls(model)
        # (after NAG's hooks: the inputs the modules compute on)
        shapes = tpl.InputShapes([(name, module) for name, module in model.named_modules() if name in watched])
        try:
            with torch.no_grad():
                out = model(**inputs, return_dict=False)[0]
        finally:
            shapes.close()
    with torch.no_grad():
        expected = tpl.naive_output("cogview4", model, inputs, negative, cond_rows=[1])
        stock = model(**inputs, return_dict=False)[0]
    return model, inputs, out, expected, stock, shapes.seen, counts


@pytest.mark.parametrize("length_delta", [-3, 5])
@pytest.mark.parametrize("fast", [True, False], ids=["fast", "straightforward"])
def test_cogview4_fast_path_runs_the_image_at_the_stock_batch(fast, length_delta):
    """Batch of 2, one guided row, partial masks: with the fast path every image-side module sees the 2 stock rows
    only, and the negative row's text passes the feed-forward on its own; the straightforward path carries a third,
    whole negative row. Both agree with the naive reference; the stock row is stock."""
    model, inputs, out, expected, stock, seen, counts = _cogview4_guided_call(fast, length_delta)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[0], stock[0], rtol=0, atol=1e-6)
    image = inputs["hidden_states"].shape[2:].numel() // model.config.patch_size**2
    text = max(inputs["encoder_hidden_states"].shape[1], inputs["encoder_hidden_states"].shape[1] + length_delta)
    rows = 2 if fast else 3
    assert seen["patch_embed.proj"] == [(rows, image)]
    assert seen["norm_out"] == [(rows, image)] and seen["proj_out"] == [(2 if fast else 3, image)]
    for i in range(len(model.transformer_blocks)):
        calls = [(1, text), (2, image), (2, text)] if fast else [(3, image), (3, text)]
        assert sorted(seen[f"transformer_blocks.{i}.ff"]) == sorted(calls)
    assert (len(counts) == 0) == fast


@pytest.mark.parametrize("change", ["backend", "transformer_blocks.0.attn1", "transformer_blocks.1.attn1"])
def test_cogview4_other_processor_or_backend_takes_the_straightforward_path(change):
    """fast=True gives the negative rows their own copy of the image where the fast attention cannot serve them: with
    a processor of the user's own in any block, or another attention backend, the image enters the blocks at the whole
    batch; blocks whose attention the fast path serves still run on the stock rows (the image copied for the negative
    rows again before a block it cannot serve). Those it cannot serve call their stock processor once per branch; the
    result agrees with the naive reference."""
    model, _ = tpl.denoiser_batch("cogview4")
    stock = {name: module.processor for name, module in model.named_modules() if hasattr(module, "processor")}
    for name, module in model.named_modules():
        if change == "backend" and name.endswith(".attn1"):
            module.processor._attention_backend = "_native_math"
        elif name == change:
            module.set_processor(tpl.own_processor(CogView4AttnProcessor))
    try:
        _, _, out, expected, _, seen, counts = _cogview4_guided_call(fast=True)
    finally:
        for name, module in model.named_modules():
            if name in stock:
                module.set_processor(stock[name])
                vars(module.processor).pop("_attention_backend", None)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    assert seen["patch_embed.proj"][0][0] == 3
    blocks = len(model.transformer_blocks)
    straightforward = {
        f"transformer_blocks.{i}.attn1" for i in range(blocks) if change in ("backend", f"transformer_blocks.{i}.attn1")
    }
    for i in range(blocks):
        rows = [rows for rows, _ in sorted(seen[f"transformer_blocks.{i}.ff"])]
        assert rows == ([3, 3] if f"transformer_blocks.{i}.attn1" in straightforward else [1, 2, 2])
    last_split = f"transformer_blocks.{blocks - 1}.attn1" not in straightforward  # (the image leaves it at 2 rows)
    assert seen["norm_out"][0][0] == seen["proj_out"][0][0] == (2 if last_split else 3)
    assert Counter(counts) == {name: 2 for name in straightforward}


# ---------------------------------------------------------------------------------------------
# CogVideoX: the fast path runs the blocks on the stock rows
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("change", [None, "backend", "transformer_blocks.0.attn1"])
@pytest.mark.parametrize("fast", [True, False], ids=["fast", "straightforward"])
def test_cogvideox_fast_path_runs_the_blocks_on_the_stock_rows(fast, change):
    """Batch of 2, one guided row, a negative longer than the call's text: with the fast path every block's
    feed-forward sees the 2 stock rows [text, video] and the negative row's text alone, and no stock processor runs;
    a block with a processor of the user's own, or another attention backend, takes the straightforward wrapper on
    whole rows (the stock processor once per branch). Every variant agrees with the naive reference."""
    model, inputs = tpl.denoiser_batch("cogvideox")
    negative = tpl.random_negative("cogvideox", inputs, 5, rows=1)
    stock = {name: module.processor for name, module in model.named_modules() if hasattr(module, "processor")}
    for name, module in model.named_modules():
        if change == "backend" and name.endswith(".attn1"):
            module.processor._attention_backend = "_native_math"
        elif name == change:
            module.set_processor(tpl.own_processor(CogVideoXAttnProcessor2_0))
    shapes = tpl.InputShapes([])
    try:
        with nag.denoiser.apply_to_denoiser(
            model,
            {tpl.NEGATIVE_KEYS[k]: v for k, v in negative.items()},
            fast=fast,
            positive_reference=inputs["encoder_hidden_states"][1:],
            **SETTINGS,
        ):
            counts = tpl.count_stock_calls(model)
            shapes = tpl.InputShapes([(name, module) for name, module in model.named_modules() if name.endswith(".ff")])
            with torch.no_grad():
                out = model(**inputs, return_dict=False)[0]
    finally:
        shapes.close()
        for name, module in model.named_modules():
            if name in stock:
                module.set_processor(stock[name])
                vars(module.processor).pop("_attention_backend", None)
    with torch.no_grad():
        expected = tpl.naive_output("cogvideox", model, inputs, negative, cond_rows=[1])
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    text = inputs["encoder_hidden_states"].shape[1] + 5
    frames, _, height, width = inputs["hidden_states"].shape[1:]
    joined = text + frames * (height // 2) * (width // 2)
    straightforward = {
        f"transformer_blocks.{i}.attn1"
        for i in range(len(model.transformer_blocks))
        if not fast or change in ("backend", f"transformer_blocks.{i}.attn1")
    }
    for i in range(len(model.transformer_blocks)):
        split = f"transformer_blocks.{i}.attn1" not in straightforward
        assert sorted(shapes.seen[f"transformer_blocks.{i}.ff"]) == (
            [(1, text), (2, joined)] if split else [(3, joined)]
        )
    assert Counter(counts) == {name: 2 for name in straightforward}
