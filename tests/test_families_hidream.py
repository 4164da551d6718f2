"""HiDream-I1 (``HiDreamImagePipeline``, family ``hidream``): four text encoders, four kinds of conditioning.

The pipeline encodes each prompt into pooled CLIP-L + CLIP-G embeddings (the modulation, with the timestep), T5
states and the hidden states of every Llama-3 layer, stacked as ``(layers, batch, tokens, width)``: the batch is
on axis 1. Every block attends over ``[image, T5, last Llama-3 layer, the block's own Llama-3 layer]``: double-stream
blocks with separate text projections, then single-stream blocks over the stream the model joins itself; the
feed-forwards are mixtures of experts. There is no text mask: T5 and Llama-3 are padded to ``max_sequence_length``.

NAG's negative rows are whole extra rows (layout ``"concat"``) carrying the negative T5 states, Llama-3 states (along
axis 1) and pooled embeddings; every attention layer gives them the guided rows' image tokens. With the fast path
(``fast=True``) the double- and single-stream blocks run on the stock rows with the negative text beside them and the
final layer on the stock rows, so no image token of the negative rows is processed; ``fast=False`` carries the whole
negative rows through the model. The tiny pipeline has two double and two single blocks with three experts (two
active), CFG batched as ``[uncond, cond]``, batch 2. The invariants and CFG checks are ``test_pipelines``'s; the
agreement checks compare every denoiser call with the naive block-by-block reference in ``naive_nag.py`` on both
paths, with CFG and without, square latents and non-square ones (padded by the model, with a key mask over the image).
"""

from __future__ import annotations

import naive_nag
import pytest
import test_pipelines as tpl
import tiny_pipelines as tp
import torch
from diffusers.models.transformers.transformer_hidream_image import HiDreamAttnProcessor

import nag

NAME = "hidream"
NAMES = [NAME]
STRAIGHTFORWARD_ONLY: dict[str, str] = {}  # (HiDream has a fast path: the double- and single-stream blocks run on the
# stock rows with the negative text beside them, the final layer on the stock rows; no stock processor is called)
SETTINGS = tpl.SETTINGS
# precomputed negative embeddings as HiDreamImagePipeline names them, and the denoiser argument each one feeds
EMBED_NAMES = {"negative_prompt_embeds_t5": "encoder_hidden_states_t5",
               "negative_prompt_embeds_llama3": "encoder_hidden_states_llama3",
               "negative_pooled_prompt_embeds": "pooled_embeds"}
NEGATIVES = ("blurry, low quality, ugly watermark text", "dark")
NON_SQUARE = dict(height=16, width=32)  # 4x10 latents: 10 image tokens, padded to the model's 16 with a key mask


def encode(pipe, prompts):
    """``prompts`` as the pipeline encodes them, by precomputed-negative name."""
    with torch.no_grad():
        out = pipe.encode_prompt(list(prompts), do_classifier_free_guidance=False,
                                 max_sequence_length=tp.call_kwargs(NAME)["max_sequence_length"])
    return dict(zip(EMBED_NAMES, (out[0], out[2], out[4])))


def naive_output(model, inputs, negative, cond_rows):
    """The naive reference for one recorded denoiser call (``negative``: by precomputed-negative name, or None)."""
    negative = negative or {}
    return naive_nag.naive_hidream_forward(
        model, inputs["hidden_states"], inputs["timesteps"], inputs["encoder_hidden_states_t5"],
        inputs["encoder_hidden_states_llama3"], inputs["pooled_embeds"], *(negative.get(k) for k in EMBED_NAMES),
        cond_rows=cond_rows, p=1, **SETTINGS,
    )


def test_prompts_fill_every_stream():
    """The encoded prompts differ in every stream, and the Llama-3 states carry the batch on axis 1."""
    encoded = encode(tpl.pipeline(NAME), tpl.PROMPTS)
    t5, llama, pooled = (encoded[k] for k in EMBED_NAMES)
    layers = tpl.pipeline(NAME).text_encoder_4.config.num_hidden_layers
    assert t5.shape == (2, 16, 32) and llama.shape == (layers, 2, 16, 16) and pooled.shape == (2, 32)
    for stream, axis in ((t5, 0), (llama, 1), (pooled, 0)):
        first, second = stream.unbind(axis)
        assert (first - second).abs().max() > 1e-3


# (the tests that scripts/support_matrix.py reads are parametrized by the configuration's name)
# the invariants, CFG's unconditional branch, NAG alone on its attention path (test_pipelines' checks)
test_invariants = tpl.each_configuration(tpl.check_invariants, NAMES)
test_cfg_unconditional_branch_is_untouched = tpl.each_configuration(
    tpl.check_cfg_unconditional_branch_is_untouched, NAMES
)
test_guided_without_cfg_on_its_attention_path = tpl.each_configuration(
    tpl.check_fast_path_never_calls_the_stock_processor, NAMES, straightforward_only=STRAIGHTFORWARD_ONLY
)


def test_mixture_of_experts_rows_are_independent():
    """The negative rows join the stock rows in every feed-forward: each token is routed on its own, so extra rows
    change neither the stock rows' routing nor their outputs."""
    moe = tpl.pipeline(NAME).transformer.double_stream_blocks[0].block.ff_i
    g = torch.Generator().manual_seed(3)
    stock_rows, extra_rows = torch.randn(2, 16, 32, generator=g), torch.randn(3, 16, 32, generator=g)
    with torch.no_grad():
        routing, _, _ = moe.gate(stock_rows)
        extended_routing, _, _ = moe.gate(torch.cat([stock_rows, extra_rows]))
        out, extended_out = moe(stock_rows), moe(torch.cat([stock_rows, extra_rows]))
    assert torch.equal(extended_routing[: routing.shape[0]].sort(-1).values, routing.sort(-1).values)
    assert len(routing.unique()) == len(moe.experts)  # every expert takes some tokens
    torch.testing.assert_close(extended_out[:2], out, rtol=0, atol=1e-6)


@pytest.mark.parametrize("cfg", [True, False], ids=["cfg", "no_cfg"])
@pytest.mark.parametrize("fast", [True, False], ids=["fast", "straightforward"])
@pytest.mark.parametrize("name", NAMES)
def test_agrees_with_naive_implementation(name, fast, cfg):
    """Through the pipeline, with CFG on ([uncond, cond] rows, the conditional ones guided) and off (HiDream-I1-Fast
    style: every row guided): negatives encoded by the pipeline (one per prompt), precomputed random ones, and
    non-square latents (the model's image key mask)."""
    pipe = tpl.pipeline(name)
    model = pipe.transformer
    _, stock_calls = tpl.record(pipe, name, cfg=cfg)
    with torch.no_grad():  # the reference itself reproduces the stock model
        torch.testing.assert_close(
            naive_output(model, stock_calls[0]["inputs"], None, None), stock_calls[0]["output"], rtol=1e-4, atol=1e-5
        )
    encoded = encode(pipe, NEGATIVES)
    g = torch.Generator().manual_seed(7)
    random = {name: torch.randn(value.shape, generator=g) for name, value in encoded.items()}
    cases = [
        ("encoded", dict(negative_prompt=list(NEGATIVES)), encoded, {}),
        ("precomputed", random, random, {}),
        ("non-square", dict(negative_prompt=list(NEGATIVES)), encoded, NON_SQUARE),
    ]
    rows, guided = (4, [2, 3]) if cfg else (2, [0, 1])
    for kind, arguments, negative, size in cases:
        _, stock_calls = tpl.record(pipe, name, cfg=cfg, **size)
        with nag.apply(pipe, **arguments, **SETTINGS, fast=fast) as handle:
            counts = tpl.count_stock_calls(model)
            _, calls = tpl.record(pipe, name, cfg=cfg, **size)
            assert handle.guided_calls == 2, kind
        assert len(calls) == 2 and calls[0]["output"].shape[0] == rows, kind
        assert (len(counts) == 0) == fast, kind  # the fast path does all attention itself, in every block
        height, width = calls[0]["inputs"]["hidden_states"].shape[-2:]
        assert (height != width) == bool(size), kind  # non-square: padded by the model, a key mask over the image
        with torch.no_grad():
            for call in calls:
                expected = naive_output(model, call["inputs"], negative, guided)
                torch.testing.assert_close(call["output"], expected, rtol=1e-4, atol=1e-5, msg=kind)
        # the first step's inputs are the stock ones: the unconditional rows come out as stock, the others guided
        torch.testing.assert_close(
            calls[0]["output"][: rows - 2], stock_calls[0]["output"][: rows - 2], rtol=0, atol=1e-6, msg=kind
        )
        assert (calls[0]["output"][rows - 2 :] - stock_calls[0]["output"][rows - 2 :]).abs().max() > 1e-3, kind


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "straightforward"])
@pytest.mark.parametrize("name", NAMES)
def test_batch_with_one_guided_row_agrees_with_naive_implementation(name, fast):
    """On the denoiser: row 0 unconditional (stock), row 1 guided, different texts per row; one negative row
    (the Llama-3 states with their batch on axis 1); non-square latents (the model's image key mask)."""
    pipe = tpl.pipeline(name)
    model = pipe.transformer
    _, calls = tpl.record(pipe, name, **NON_SQUARE)
    recorded = calls[0]["inputs"]  # [uncond_0, uncond_1, cond_0, cond_1]: take uncond_0 and cond_1
    inputs = {
        k: recorded[k][[0, 3]] for k in ("hidden_states", "timesteps", "encoder_hidden_states_t5", "pooled_embeds")
    }
    inputs["encoder_hidden_states_llama3"] = recorded["encoder_hidden_states_llama3"][:, [0, 3]]
    negative = {
        name: value[:, 1:] if name == "negative_prompt_embeds_llama3" else value[1:]
        for name, value in encode(pipe, NEGATIVES).items()
    }
    keys = {
        name: key if key != "encoder_hidden_states_t5" else "encoder_hidden_states" for name, key in EMBED_NAMES.items()
    }
    with nag.denoiser.apply_to_denoiser(
        model,
        {keys[k]: v for k, v in negative.items()},
        fast=fast,
        positive_reference=inputs["encoder_hidden_states_t5"][1:],
        **SETTINGS,
    ):
        counts = tpl.count_stock_calls(model)
        with torch.no_grad():
            out = model(**inputs, return_dict=False)[0]
    assert (len(counts) == 0) == fast
    with torch.no_grad():
        stock = model(**inputs, return_dict=False)[0]
        expected = naive_output(model, inputs, negative, [1])
    assert out.shape == stock.shape
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[0], stock[0], rtol=0, atol=1e-6)
    assert (out[1] - stock[1]).abs().max() > 1e-4


def test_num_images_per_prompt_and_precomputed_negatives_per_prompt():
    """Two images per prompt: precomputed negatives, one per prompt or one for all, are repeated per image (the
    Llama-3 states along axis 1) and act like the same negative prompts given as text."""
    pipe = tpl.pipeline(NAME)
    stock = tpl.generate(pipe, NAME, num_images_per_prompt=2, output_type="latent")
    for negative in (list(NEGATIVES), NEGATIVES[0]):
        encoded = encode(pipe, [negative] if isinstance(negative, str) else negative)
        with nag.apply(pipe, negative, **SETTINGS) as handle:
            by_text = tpl.generate(pipe, NAME, num_images_per_prompt=2, output_type="latent")
            assert by_text.shape[0] == 4 and handle.guided_calls == 2
        with nag.apply(pipe, **encoded, **SETTINGS) as handle:
            by_embeds = tpl.generate(pipe, NAME, num_images_per_prompt=2, output_type="latent")
            assert handle.guided_calls == 2
        # (the text encoders see batches of other sizes: float rounding apart)
        torch.testing.assert_close(by_embeds, by_text, rtol=0, atol=1e-5)
        assert (by_text - stock).abs().max() > 1e-3
    assert tpl.state_of(pipe) == tpl.state_of(tpl.pipeline(NAME))


def test_precomputed_embeddings_are_checked():
    """Missing, misshapen or mismatched precomputed negatives get a clear error that names what to change, and
    leave nothing behind."""
    pipe = tpl.pipeline(NAME)
    before = tpl.state_of(pipe)
    encoded = encode(pipe, NEGATIVES)
    with pytest.raises(TypeError, match="negative_prompt_embeds_t5"):  # the common name is not HiDream's
        nag.apply(pipe, negative_prompt_embeds=encoded["negative_prompt_embeds_t5"])
    with pytest.raises(ValueError, match="negative_prompt_embeds_llama3"):
        nag.apply(
            pipe,
            negative_prompt_embeds_t5=encoded["negative_prompt_embeds_t5"],
            negative_pooled_prompt_embeds=encoded["negative_pooled_prompt_embeds"],
        )
    with pytest.raises(ValueError, match=r"4 dimensions \(layers, rows, tokens, width\)"):
        nag.apply(pipe, **{**encoded, "negative_prompt_embeds_llama3": encoded["negative_prompt_embeds_llama3"][0]})
    with pytest.raises(ValueError, match="text_emb_dim"):
        nag.apply(pipe, **{**encoded, "negative_pooled_prompt_embeds": encoded["negative_pooled_prompt_embeds"][:, :8]})
    assert tpl.state_of(pipe) == before
    # HiDream attends to its whole text without a mask: texts of another length than the prompt's cannot be padded
    shorter_t5 = {**encoded, "negative_prompt_embeds_t5": encoded["negative_prompt_embeds_t5"][:, :-2]}
    shorter_llama = {**encoded, "negative_prompt_embeds_llama3": encoded["negative_prompt_embeds_llama3"][:, :, :-2]}
    for negative, match in ((shorter_t5, "max_sequence_length"), (shorter_llama, "encoder_hidden_states_llama3")):
        with nag.apply(pipe, **negative, **SETTINGS):
            with pytest.raises(ValueError, match=match):
                tpl.generate(pipe, NAME, output_type="latent")
        assert tpl.state_of(pipe) == before
    assert torch.equal(tpl.generate(pipe, NAME), tpl.stock(NAME))


class TokenCounter(tpl.InputShapes):
    """Rows and tokens (the input shape's first two axes) every counted module of the model processes, by key."""

    def __init__(self, model):
        modules = [
            (key, getattr(b.block, attr))
            for b in model.double_stream_blocks
            for key, attr in (("double_image_ff", "ff_i"), ("double_text_ff", "ff_t"))
        ]
        modules += [("double_image_query", b.block.attn1.to_q) for b in model.double_stream_blocks]
        modules += [("single_ff", b.block.ff_i) for b in model.single_stream_blocks]
        modules += [("single_query", b.block.attn1.to_q) for b in model.single_stream_blocks]
        modules += [("final_layer", model.final_layer)]
        super().__init__(modules)


@pytest.mark.parametrize("cfg", [True, False], ids=["cfg", "no_cfg"])
def test_fast_path_never_processes_the_negative_rows_image_tokens(cfg):
    """fast=True: the image side of the double-stream blocks (queries, mixture-of-experts feed-forward) and the final
    layer see the stock rows only, and the single-stream blocks the stock rows plus one negative text per guided row
    (no image token of theirs); fast=False carries whole negative rows through all of them and projects the guided
    rows' image tokens once more for the negative pass."""
    pipe = tpl.pipeline(NAME)
    model = pipe.transformer
    rows, negatives = (4, 2) if cfg else (2, 2)
    for fast in (True, False):
        with nag.apply(pipe, list(NEGATIVES), **SETTINGS, fast=fast):
            counter = TokenCounter(model)  # (after NAG's hooks: what the modules themselves get)
            try:
                _, calls = tpl.record(pipe, NAME, cfg=cfg)
            finally:
                counter.close()
        image, text = 16, 16 + 2 * 16  # 4x4 patches; T5 + last Llama-3 layer + the block's own Llama-3 layer
        doubles, singles, steps = len(model.double_stream_blocks), len(model.single_stream_blocks), len(calls)
        seen = {key: sorted(value) for key, value in counter.seen.items()}
        if fast:
            expected = {
                "double_image_ff": [(rows, image)] * doubles,
                "double_image_query": [(rows, image)] * doubles,
                "double_text_ff": [(rows, text), (negatives, text)] * doubles,
                "single_ff": [(rows, image + text), (negatives, text)] * singles,
                "single_query": [(rows, image + text), (negatives, text)] * singles,
                "final_layer": [(rows, image)],
            }
        else:
            expected = {
                "double_image_ff": [(rows + negatives, image)] * doubles,
                "double_image_query": [(rows, image), (negatives, image)] * doubles,
                "double_text_ff": [(rows + negatives, text)] * doubles,
                "single_ff": [(rows + negatives, image + text)] * singles,
                "single_query": [(rows, image + text), (negatives, image + text)] * singles,
                "final_layer": [(rows + negatives, image)],
            }
        assert seen == {key: sorted(value * steps) for key, value in expected.items()}, fast


@pytest.mark.parametrize("change", ["processor", "backend"])
def test_other_processor_or_backend_takes_the_straightforward_path(change):
    """fast=True falls back to the straightforward wrappers (whole negative rows through the blocks, each stock
    processor called per branch) when the processor is not the stock one or the attention backend is not the
    default, and still agrees with the naive implementation (non-square latents: the image key mask)."""
    pipe = tpl.pipeline(NAME)
    model = pipe.transformer
    stock = {name: module.processor for name, module in model.named_modules() if hasattr(module, "processor")}
    for name, module in model.named_modules():
        if name.endswith(".attn1"):
            if change == "processor":
                module.set_processor(tpl.own_processor(HiDreamAttnProcessor))
            else:
                module.processor._attention_backend = "_native_math"
    try:
        encoded = encode(pipe, NEGATIVES)
        with nag.apply(pipe, list(NEGATIVES), **SETTINGS) as handle:
            counts = tpl.count_stock_calls(model)
            _, calls = tpl.record(pipe, NAME, **NON_SQUARE)
            assert handle.guided_calls == 2
        layers = len(model.double_stream_blocks) + len(model.single_stream_blocks)
        assert len(counts) == 2 * layers * len(calls)  # negative and positive pass per layer and call
        with torch.no_grad():
            for call in calls:
                torch.testing.assert_close(
                    call["output"], naive_output(model, call["inputs"], encoded, [2, 3]), rtol=1e-4, atol=1e-5
                )
    finally:
        for name, module in model.named_modules():
            if name in stock:
                module.set_processor(stock[name])
                vars(module.processor).pop("_attention_backend", None)
