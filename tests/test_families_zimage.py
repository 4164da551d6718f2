"""Z-Image (ZImagePipeline): per-sample lists in and out of the denoiser.

The pipeline encodes each prompt without its padding (a list of tensors of their own lengths), calls the
transformer with lists of latents and captions (with CFG once on ``[conditional, unconditional]``) and gets a
list back; the model joins each sample as ``[image, caption, padding]``, image and caption each padded to a
multiple of 32, the image's rotary positions following each sample's padded caption length. The tests use batch 2
with prompts of different lengths (one caption past 32 tokens, so the padded lengths and the image positions
differ between rows) and negatives shorter and longer than the positives. The fast path (the main blocks on the stock
rows with the negative captions beside them; the image refiner and the final layer on the stock rows) and the
straightforward one (whole negative rows) are both checked against the naive implementation, with CFG (Z-Image base)
and without (Z-Image-Turbo).
"""

from __future__ import annotations

import naive_nag
import pytest
import test_pipelines as tpl
import tiny_pipelines as tp
import torch
from diffusers.models.transformers.transformer_z_image import ZSingleStreamAttnProcessor

import nag

NAME = "zimage"
STRAIGHTFORWARD_ONLY: dict[str, str] = {}  # (Z-Image has a fast path: the main blocks run on the stock rows with the
# negative captions beside them; the image refiner and the final layer run on the stock rows)
SETTINGS = tpl.SETTINGS
# the first caption is longer than 32 tokens (padded to 64), the second shorter (padded to 32)
PROMPTS = ["a red circle on a blue background with a small green square and a yellow star in the corner of it",
           "a small green square"]
NEGATIVES = {"shorter": ["ugly", "blurry"],
             "longer": ["blurry, low quality, ugly watermark text, deformed shapes, extra corners, bad colors, noise",
                        "low quality, watermark text"]}


def record(pipe, cfg=True, prompts=PROMPTS, name=NAME, **overrides):
    return tpl.record(pipe, name, cfg=cfg, prompts=prompts, **overrides)


def rerun(model, inputs):
    with torch.no_grad():
        return model(**{**inputs, "return_dict": False})[0]


def assert_lists_close(got, expected, atol=1e-5):
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=atol)


def test_invariants():
    tpl.check_off_is_bit_identical(NAME)
    tpl.check_negative_equal_to_positive_is_unguided(NAME)
    tpl.check_negative_prompt_changes_the_output(NAME)
    tpl.check_removal_restores_everything(NAME)
    tpl.check_exception_inside_a_generation_leaves_nothing_behind(NAME)


def test_steps_outside_the_window_are_stock():
    pipe = tpl.pipeline(NAME)
    model = tp.denoiser(pipe)
    with nag.apply(pipe, tpl.NEGATIVE, end=0.5, **SETTINGS) as handle:
        _, calls = record(pipe)
        assert handle.guided_calls == 1  # 2 steps: only the first is inside [0, 0.5)
    assert len(calls) == 2
    for a, b in zip(rerun(model, calls[1]["inputs"]), calls[1]["output"]):
        assert torch.equal(a, b)
    with nag.apply(pipe, tpl.NEGATIVE, start=0.5, **SETTINGS) as handle:
        record(pipe)
        assert handle.guided_calls == 1


def test_negative_equal_to_positive_is_unguided_with_different_padded_lengths():
    pipe = tpl.pipeline(NAME)
    reference = tpl.generate(pipe, NAME, prompts=PROMPTS)
    with nag.apply(pipe, PROMPTS, **SETTINGS) as handle:
        out = tpl.generate(pipe, NAME, prompts=PROMPTS)
        assert handle.guided_calls == 2
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-5)


def test_cfg_unconditional_branch_is_untouched():
    """One call per step on [conditional, unconditional]: the unconditional rows come out as stock."""
    pipe = tpl.pipeline(NAME)
    _, stock_calls = record(pipe)
    with nag.apply(pipe, NEGATIVES["longer"], **SETTINGS) as handle:
        _, guided_calls = record(pipe)
        assert handle.guided_calls == 2
    first_stock, first_guided = stock_calls[0]["output"], guided_calls[0]["output"]
    assert len(first_guided) == len(first_stock) == 4  # the negative rows are dropped from the output list
    assert_lists_close(first_guided[2:], first_stock[2:], atol=1e-6)
    for row in (0, 1):
        assert (first_guided[row] - first_stock[row]).abs().max() > 1e-4


def test_guided_without_cfg_on_its_attention_path():
    tpl.check_fast_path_never_calls_the_stock_processor(NAME, fast_path=NAME not in STRAIGHTFORWARD_ONLY)


def test_encoded_captions_have_per_sample_lengths():
    pipe = tpl.pipeline(NAME)
    captions, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False, max_sequence_length=48)
    short, long = pipe.encode_prompt(NEGATIVES["shorter"], do_classifier_free_guidance=False)[0], \
        pipe.encode_prompt(NEGATIVES["longer"], do_classifier_free_guidance=False, max_sequence_length=48)[0]
    assert captions[0].shape[0] > 32 >= captions[1].shape[0]
    assert all(s.shape[0] < c.shape[0] for s, c in zip(short, captions))
    assert long[0].shape[0] > 32 and long[1].shape[0] > captions[1].shape[0]


def negative_captions(pipe, negatives):
    return pipe.encode_prompt(list(negatives), do_classifier_free_guidance=False, max_sequence_length=48)[0]


def naive_output(model, inputs, negative, cond_rows):
    return naive_nag.naive_zimage_forward(model, inputs["x"], inputs["t"], inputs["cap_feats"], negative,
                                          cond_rows=cond_rows, p=1, **SETTINGS)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "straightforward"])
def test_agrees_with_naive_implementation(fast):
    check_agrees_with_naive_implementation(NAME, fast)


def check_agrees_with_naive_implementation(name, fast, naive_output=naive_output):
    """Through the pipeline with CFG ([conditional, unconditional] in one call): the conditional rows guided, the
    unconditional ones stock, for negatives shorter and longer than the positives. ``naive_output(model, inputs,
    negative, cond_rows)``: the naive forward of one recorded call."""
    pipe = tpl.pipeline(name)
    model = tp.denoiser(pipe)
    _, stock_calls = record(pipe, name=name)
    with torch.no_grad():  # the reference itself reproduces the stock model
        assert_lists_close(naive_output(model, stock_calls[0]["inputs"], None, None), stock_calls[0]["output"])
    for kind, negatives in NEGATIVES.items():
        negative = negative_captions(pipe, negatives)
        with nag.apply(pipe, negatives, **SETTINGS, fast=fast) as handle:
            _, calls = record(pipe, name=name)
            assert handle.guided_calls == 2, kind
        assert len(calls) == 2
        with torch.no_grad():
            for call in calls:
                assert_lists_close(call["output"], naive_output(model, call["inputs"], negative, [0, 1]))


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "straightforward"])
def test_batch_with_one_guided_row_agrees_with_naive_implementation(fast):
    """On the denoiser: row 0 unconditional (stock), row 1 guided, captions of different padded lengths,
    precomputed negative tensors shorter and longer (past 32 tokens) than the guided caption."""
    pipe = tpl.pipeline(NAME)
    model = tp.denoiser(pipe)
    _, calls = record(pipe)
    stock_inputs = calls[0]["inputs"]
    inputs = {"x": [stock_inputs["x"][0], stock_inputs["x"][1]], "t": stock_inputs["t"][:2],
              "cap_feats": [stock_inputs["cap_feats"][2], stock_inputs["cap_feats"][0]]}  # uncond 0, cond (long) 0
    guided = inputs["cap_feats"][1]
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        stock = model(**inputs, return_dict=False)[0]
    for length in (guided.shape[0] - 3, 70):
        negative = torch.randn(1, length, guided.shape[1], generator=g)
        with nag.denoiser.apply_to_denoiser(model, {"encoder_hidden_states": negative}, fast=fast,
                                            positive_reference=[guided], **SETTINGS):
            with torch.no_grad():
                out = model(**inputs, return_dict=False)[0]
        with torch.no_grad():
            expected = naive_nag.naive_zimage_forward(
                model, inputs["x"], inputs["t"], inputs["cap_feats"], [negative[0]], cond_rows=[1], p=1, **SETTINGS
            )
        assert_lists_close(out, expected)
        torch.testing.assert_close(out[0], stock[0], rtol=0, atol=1e-6)
        assert (out[1] - stock[1]).abs().max() > 1e-4


def test_num_images_per_prompt_negative_list_and_precomputed_embeddings():
    pipe = tpl.pipeline(NAME)
    with nag.apply(pipe, NEGATIVES["longer"], **SETTINGS) as handle:
        out, calls = record(pipe, num_images_per_prompt=2)
        assert out.shape[0] == 4 and handle.guided_calls == 2
    assert len(calls[0]["output"]) == 8  # [cond x4, uncond x4], the negative rows dropped
    stock, _ = record(pipe, num_images_per_prompt=2)
    assert all((out[i] - stock[i]).abs().max() > 1e-4 for i in range(4))
    # precomputed negative embeddings (a (rows, tokens, width) tensor) act like the encoded negative prompt
    encoded = negative_captions(pipe, ["ugly watermark"])[0]
    with nag.apply(pipe, "ugly watermark", **SETTINGS):
        by_text = tpl.generate(pipe, NAME, prompts=PROMPTS)
    with nag.apply(pipe, negative_prompt_embeds=encoded[None], **SETTINGS):
        by_embeds = tpl.generate(pipe, NAME, prompts=PROMPTS)
    torch.testing.assert_close(by_embeds, by_text, rtol=0, atol=1e-6)
    assert tpl.state_of(pipe) == tpl.state_of(tpl.pipeline(NAME))


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "straightforward"])
def test_turbo_without_cfg_agrees_with_naive_implementation(fast):
    """Z-Image-Turbo style (no CFG: every row guided), negatives shorter and longer than the positives."""
    pipe = tpl.pipeline(NAME)
    model = tp.denoiser(pipe)
    for kind, negatives in NEGATIVES.items():
        negative = negative_captions(pipe, negatives)
        with nag.apply(pipe, negatives, **SETTINGS, fast=fast) as handle:
            _, calls = record(pipe, cfg=False)
            assert handle.guided_calls == 2, kind
        assert len(calls) == 2 and len(calls[0]["inputs"]["cap_feats"]) == 2
        with torch.no_grad():
            for call in calls:
                assert_lists_close(call["output"], naive_output(model, call["inputs"], negative, [0, 1]))


class TokenCounter(tpl.InputShapes):
    """Rows and tokens every image refiner layer, main-layer feed-forward and final layer of a model processes."""

    def __init__(self, model):
        modules = [("noise_refiner", m) for m in model.noise_refiner]
        modules += [("feed_forward", layer.feed_forward) for layer in model.layers]
        modules += [("final_layer", m) for m in model.all_final_layer.values()]
        super().__init__(modules)


def test_fast_path_never_processes_the_negative_rows_image_tokens():
    """fast=True: the image refiner and the final layer see the stock rows only, and the main layers' feed-forward
    the stock rows plus one negative caption per guided row (no image token of theirs); fast=False carries whole
    negative rows through all of them."""
    pipe = tpl.pipeline(NAME)
    model = tp.denoiser(pipe)
    for cfg in (True, False):
        rows = 4 if cfg else 2
        for fast in (True, False):
            with nag.apply(pipe, NEGATIVES["longer"], **SETTINGS, fast=fast):
                counter = TokenCounter(model)  # (after NAG's hooks: what the modules themselves get)
                try:
                    _, calls = record(pipe, cfg=cfg)
                finally:
                    counter.close()
            inputs = calls[0]["inputs"]
            image = 32  # 16 image tokens, padded by the model to 32
            captions = [len(c) + (-len(c)) % 32 for c in inputs["cap_feats"]]
            negatives = [len(c) + (-len(c)) % 32 for c in negative_captions(pipe, NEGATIVES["longer"])]
            full = max(image + n for n in captions + negatives)
            layers, steps = len(model.layers), len(calls)
            if fast:
                stock = max(image + n for n in captions)
                assert counter.seen["noise_refiner"] == [(rows, image)] * len(model.noise_refiner) * steps
                assert counter.seen["final_layer"] == [(rows, full)] * steps
                assert sorted(counter.seen["feed_forward"]) == sorted(
                    [(rows, stock), (2, max(negatives))] * layers * steps
                )
            else:
                assert counter.seen["noise_refiner"] == [(rows + 2, image)] * len(model.noise_refiner) * steps
                assert counter.seen["final_layer"] == [(rows + 2, full)] * steps
                assert counter.seen["feed_forward"] == [(rows + 2, full)] * layers * steps


@pytest.mark.parametrize("change", ["processor", "backend"])
def test_other_processor_or_backend_takes_the_straightforward_path(change):
    """fast=True falls back to the straightforward wrappers (whole negative rows through the main blocks, each stock
    processor called per branch) when the processor is not the stock one or the attention backend is not the
    default, and still agrees with the naive implementation."""
    pipe = tpl.pipeline(NAME)
    model = tp.denoiser(pipe)
    stock = {name: module.processor for name, module in model.named_modules() if hasattr(module, "processor")}
    for name, module in model.named_modules():
        if name.startswith("layers.") and name.endswith(".attention"):
            if change == "processor":
                module.set_processor(tpl.own_processor(ZSingleStreamAttnProcessor))
            else:
                module.processor._attention_backend = "_native_math"
    try:
        negative = negative_captions(pipe, NEGATIVES["longer"])
        with nag.apply(pipe, NEGATIVES["longer"], **SETTINGS) as handle:
            counts = tpl.count_stock_calls(model)
            _, calls = record(pipe)
            assert handle.guided_calls == 2
        assert len(counts) == 2 * len(model.layers) * len(calls)  # negative and positive pass per layer and call
        with torch.no_grad():
            for call in calls:
                assert_lists_close(call["output"], naive_output(model, call["inputs"], negative, [0, 1]))
    finally:
        for name, module in model.named_modules():
            if name in stock:
                module.set_processor(stock[name])
                vars(module.processor).pop("_attention_backend", None)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "straightforward"])
def test_images_of_different_sizes_agree_with_naive_implementation(fast):
    """On the denoiser: rows with images of different sizes (different image spans, and image padding in one of
    them only) and captions of different lengths, both rows guided, negatives of their own lengths."""
    pipe = tpl.pipeline(NAME)
    model = tp.denoiser(pipe)
    g = torch.Generator().manual_seed(3)
    width = model.config.cap_feat_dim
    inputs = {
        "x": [torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 1, 8, 16, generator=g)],
        "t": torch.tensor([0.7, 0.7]),
        "cap_feats": [torch.randn(40, width, generator=g), torch.randn(9, width, generator=g)],
    }
    negative = [torch.randn(5, width, generator=g), torch.randn(70, width, generator=g)]
    with nag.denoiser.apply_to_denoiser(model, {"encoder_hidden_states": negative}, fast=fast, **SETTINGS):
        counts = tpl.count_stock_calls(model)
        with torch.no_grad():
            out = model(**inputs, return_dict=False)[0]
    assert (len(counts) == 0) == fast
    with torch.no_grad():
        expected = naive_nag.naive_zimage_forward(
            model, inputs["x"], inputs["t"], inputs["cap_feats"], negative, p=1, **SETTINGS
        )
        stock = model(**inputs, return_dict=False)[0]
    assert_lists_close(out, expected)
    assert all((a - b).abs().max() > 1e-4 for a, b in zip(out, stock))
