"""NAG through the whole pipeline path of every supported pipeline (tiny random-weight models).

Each test builds a stock diffusers pipeline, generates with batch 2 (two different prompts),
and checks an invariant or agreement with the independent implementation in ``naive_nag.py``.
"""

from __future__ import annotations

import inspect
from functools import lru_cache

import pytest
import torch

import naive_nag
import nag
import tiny_pipelines as tp

NAMES = ["flux", "flux_dev", "sd3", "sd35", "sdxl", "sd", "pixart_sigma", "pixart_alpha", "sana", "sana_sprint", "wan", "skyreels_v2", "ltx", "sana_video"]
PROMPTS = ["a red circle on a blue background", "a small green square"]
NEGATIVE = "blurry, low quality, ugly watermark text"
SETTINGS = dict(scale=3.0, tau=2.5, alpha=0.5)


@lru_cache(maxsize=None)
def pipeline(name):
    return {**tp.FACTORIES, **tp.FAMILY_FACTORIES}[name]()


def batch_rows(name):
    """Samples a generation of ``name`` makes (its conditional rows per denoiser call)."""
    return 1 if name in tp.SINGLE_PROMPT else len(PROMPTS)


def generate(pipe, name, cfg=True, prompts=PROMPTS, **overrides):
    kwargs = tp.call_kwargs(name) if cfg else tp.no_cfg_kwargs(name)
    if cfg and tp.CFG_INFO[name].get("needs_negative_prompt"):
        kwargs["negative_prompt"] = ["deformed"] * len(prompts)  # true CFG needs its own negative prompt
    kwargs.update(overrides)
    prompt = prompts[0] if name in tp.SINGLE_PROMPT else list(prompts)
    if name in tp.SINGLE_PROMPT and "negative_prompt" in kwargs:
        kwargs["negative_prompt"] = kwargs["negative_prompt"][0]
    out = pipe(prompt=prompt, generator=torch.Generator("cpu").manual_seed(0), **kwargs)
    return tp.output_tensor(out)


def state_of(pipe):
    """Everything NAG could leave behind: processors, hooks, instance attributes."""
    model = tp.denoiser(pipe)
    processors = tuple((name, id(getattr(m, "processor", None))) for name, m in model.named_modules())
    hooks = tuple(
        (name, len(m._forward_pre_hooks), len(m._forward_hooks)) for name, m in model.named_modules()
    )
    return processors, hooks, tuple(sorted(pipe.__dict__))


def snapshot(value):
    """A copy of a call argument or output: tensors cloned, also inside lists, tuples and dicts (Z-Image's
    per-sample lists, ControlNet hints)."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (list, tuple)):
        return type(value)(snapshot(v) for v in value)
    if isinstance(value, dict):
        return {k: snapshot(v) for k, v in value.items()}
    return value


def stacked(output):
    """A denoiser output as one tensor (Z-Image's list of per-sample outputs of one size stacked)."""
    return torch.stack(list(output)) if isinstance(output, (list, tuple)) else output


class Recorder:
    """Records every denoiser call: the stock arguments (by name) and the output (tensors copied, also the
    per-sample lists of Z-Image)."""

    def __init__(self, model):
        self.model = model
        self.signature = inspect.signature(model.forward)
        self.calls = []
        self._handles = [
            model.register_forward_pre_hook(self._before, with_kwargs=True, prepend=True),
            model.register_forward_hook(self._after),
        ]

    def _before(self, module, args, kwargs):
        bound = self.signature.bind_partial(*args, **kwargs)
        self.calls.append({"inputs": {k: snapshot(v) for k, v in bound.arguments.items()}})

    def _after(self, module, args, output):
        sample = output[0] if isinstance(output, tuple) else getattr(output, "sample", output)
        self.calls[-1]["output"] = snapshot(sample)

    def close(self):
        for handle in self._handles:
            handle.remove()


def record(pipe, name, **overrides):
    recorder = Recorder(tp.denoiser(pipe))
    try:
        out = generate(pipe, name, **overrides)
    finally:
        recorder.close()
    return out, recorder.calls


def stock(name, cfg=True):
    return generate(pipeline(name), name, cfg=cfg)


# ---------------------------------------------------------------------------------------------
# invariants
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_off_is_bit_identical(name):
    check_off_is_bit_identical(name)


def check_off_is_bit_identical(name):
    pipe = pipeline(name)
    reference = stock(name)
    with nag.apply(pipe, NEGATIVE, scale=1.0):
        assert torch.equal(generate(pipe, name), reference)
    with nag.apply(pipe, NEGATIVE, **{**SETTINGS, "alpha": 0.0}):
        assert torch.equal(generate(pipe, name), reference)
    with nag.apply(pipe):  # no negative
        assert torch.equal(generate(pipe, name), reference)


@pytest.mark.parametrize("name", NAMES)
def test_negative_equal_to_positive_is_unguided(name):
    check_negative_equal_to_positive_is_unguided(name)


def check_negative_equal_to_positive_is_unguided(name):
    pipe = pipeline(name)
    reference = stock(name)
    with nag.apply(pipe, PROMPTS[0] if name in tp.SINGLE_PROMPT else PROMPTS, **SETTINGS) as handle:
        out = generate(pipe, name)
        assert handle.guided_calls >= 2
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_negative_prompt_changes_the_output(name):
    check_negative_prompt_changes_the_output(name)


def check_negative_prompt_changes_the_output(name):
    pipe = pipeline(name)
    reference = stock(name)
    with nag.apply(pipe, NEGATIVE, **SETTINGS) as handle:
        out = generate(pipe, name)
        assert handle.guided_calls == 2  # one guided denoiser call per step
    assert torch.isfinite(out).all()
    assert (out - reference).abs().max() > 1e-3


@pytest.mark.parametrize("name", NAMES)
def test_removal_restores_everything(name):
    check_removal_restores_everything(name)


def check_removal_restores_everything(name):
    pipe = pipeline(name)
    before = state_of(pipe)
    reference = stock(name)

    handle = nag.apply(pipe, NEGATIVE, **SETTINGS)
    assert state_of(pipe) != before
    generate(pipe, name)
    handle.remove()
    assert state_of(pipe) == before
    assert torch.equal(generate(pipe, name), reference)

    nag.apply(pipe, NEGATIVE, **SETTINGS)
    nag.remove(pipe)
    assert state_of(pipe) == before

    with nag.apply(pipe, NEGATIVE, **SETTINGS):
        generate(pipe, name)
    assert state_of(pipe) == before
    assert torch.equal(generate(pipe, name), reference)


@pytest.mark.parametrize("name", NAMES)
def test_exception_inside_a_generation_leaves_nothing_behind(name):
    check_exception_inside_a_generation_leaves_nothing_behind(name)


def check_invariants(name):
    """The invariants every pipeline keeps (each check below also runs on its own in this file)."""
    check_off_is_bit_identical(name)
    check_negative_equal_to_positive_is_unguided(name)
    check_negative_prompt_changes_the_output(name)
    check_removal_restores_everything(name)
    check_exception_inside_a_generation_leaves_nothing_behind(name)
    check_steps_outside_the_window_are_stock(name)


def check_exception_inside_a_generation_leaves_nothing_behind(name):
    """The failure is raised in the first text-attention module NAG wraps, on its second call."""
    pipe = pipeline(name)
    before = state_of(pipe)
    reference = stock(name)
    model = tp.denoiser(pipe)
    family = nag.families.FAMILIES[nag.families.pipeline_spec(pipe).family]
    text_attention = next(m for n, m in model.named_modules() if family.attention_role(n, m) is not None)
    calls = []

    def fail_on_second_call(module, args, kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated failure inside the denoiser")

    failure = text_attention.register_forward_pre_hook(fail_on_second_call, with_kwargs=True)
    try:
        with pytest.raises(RuntimeError, match="simulated failure"):
            with nag.apply(pipe, NEGATIVE, **SETTINGS):
                generate(pipe, name)
    finally:
        failure.remove()
    assert state_of(pipe) == before
    assert torch.equal(generate(pipe, name), reference)


@pytest.mark.parametrize("name", [n for n in NAMES if tp.has_cfg(n)])
def test_cfg_unconditional_branch_is_untouched(name):
    check_cfg_unconditional_branch_is_untouched(name)


def check_cfg_unconditional_branch_is_untouched(name, pipe=None, mode=None, **overrides):
    """``pipe``: another pipeline of ``name`` (e.g. with a CFG guider); ``mode``: its CFG arrangement when
    it is not ``name``'s (``tp.CFG_INFO``); ``overrides``: call arguments (see ``generate``)."""
    pipe = pipeline(name) if pipe is None else pipe
    _, stock_calls = record(pipe, name, **overrides)
    with nag.apply(pipe, NEGATIVE, **SETTINGS):
        _, guided_calls = record(pipe, name, **overrides)
    mode = tp.CFG_INFO[name]["mode"] if mode is None else mode
    if mode in ("batched", "batched_cond_first"):  # one call; the first step has the same inputs in both runs
        rows = len(overrides.get("prompts", [None] * batch_rows(name)))
        first_stock, first_guided = stacked(stock_calls[0]["output"]), stacked(guided_calls[0]["output"])
        assert first_guided.shape == first_stock.shape
        cond, uncond = (slice(rows, None), slice(None, rows)) if mode == "batched" else (slice(None, rows), slice(rows, None))
        torch.testing.assert_close(first_guided[uncond], first_stock[uncond], rtol=0, atol=1e-6)
        assert (first_guided[cond] - first_stock[cond]).abs().max() > 1e-4
    else:  # one call per branch: cond first, then uncond
        torch.testing.assert_close(guided_calls[1]["output"], stock_calls[1]["output"], rtol=0, atol=1e-6)
        assert (guided_calls[0]["output"] - stock_calls[0]["output"]).abs().max() > 1e-4


@pytest.mark.parametrize("name", NAMES)
def test_steps_outside_the_window_are_stock(name):
    check_steps_outside_the_window_are_stock(name)


def check_steps_outside_the_window_are_stock(name):
    pipe = pipeline(name)
    model = tp.denoiser(pipe)
    with nag.apply(pipe, NEGATIVE, end=0.5, **SETTINGS) as handle:
        _, calls = record(pipe, name)
        assert handle.guided_calls == 1  # 2 steps: only the first is inside [0, 0.5)
    late = calls[len(calls) // 2 :]  # the second step's calls
    with torch.no_grad():
        for call in late:
            out = model(**{**call["inputs"], "return_dict": False})[0]
            assert torch.equal(stacked(out), stacked(call["output"]))
    with nag.apply(pipe, NEGATIVE, start=0.5, **SETTINGS) as handle:
        record(pipe, name)
        assert handle.guided_calls == 1


@pytest.mark.parametrize("name", ["sd", "flux", "pixart_sigma"])
def test_num_images_per_prompt_and_negative_list(name):
    pipe = pipeline(name)
    with nag.apply(pipe, ["blurry", "watermark text"], **SETTINGS) as handle:
        out = generate(pipe, name, num_images_per_prompt=2)
        assert out.shape[0] == 4 and handle.guided_calls == 2
    with nag.apply(pipe, ["blurry", "watermark text", "a third one"], **SETTINGS):
        with pytest.raises(ValueError, match="negative_prompt has 3 entries"):
            generate(pipe, name)
    assert state_of(pipe) == state_of(pipeline(name))


# ---------------------------------------------------------------------------------------------
# agreement with the naive implementation, through the pipeline path
# ---------------------------------------------------------------------------------------------

KIND = {"sd": "unet", "sdxl": "unet", "pixart_sigma": "pixart", "pixart_alpha": "pixart", "sana": "sana",
        "sana_sprint": "sana", "wan": "wan", "ltx": "ltx", "skyreels_v2": "skyreels_v2", "sana_video": "sana",
        "ltx_i2v": "ltx", "ltx_condition": "ltx", "wan_vace": "wan_vace"}


def random_negative(name, call_inputs, length_delta):
    """Negative embeddings of a different token length (and a partial mask where the family has masks)."""
    g = torch.Generator().manual_seed(7)
    text = call_inputs["encoder_hidden_states"]
    rows = batch_rows(name)
    length = text.shape[1] + length_delta
    negative = {"negative_prompt_embeds": torch.randn(rows, length, text.shape[2], generator=g)}
    if name.startswith(("flux", "sd3")):
        pooled = call_inputs["pooled_projections"]
        negative["negative_pooled_prompt_embeds"] = torch.randn(rows, pooled.shape[1], generator=g)
    if name.startswith(("pixart", "sana", "ltx", "qwen")):  # sana_video too
        mask = torch.ones(rows, length)
        mask[0, -3:] = 0
        mask[1, -1:] = 0
        negative["negative_prompt_attention_mask"] = mask
    return negative


def naive_output(name, model, inputs, negative, cond_rows):
    neg_text = None if negative is None else negative["negative_prompt_embeds"]
    neg_pooled = None if negative is None else negative.get("negative_pooled_prompt_embeds")
    if name.startswith("flux"):
        return naive_nag.naive_flux_forward(
            model, inputs["hidden_states"], inputs["encoder_hidden_states"], inputs["pooled_projections"],
            inputs["timestep"], inputs["img_ids"], inputs["txt_ids"], inputs.get("guidance"),
            neg_text, neg_pooled, None, cond_rows=cond_rows, **{**SETTINGS, "p": 1},
        )
    if name.startswith("sd3"):
        return naive_nag.naive_sd3_forward(
            model, inputs["hidden_states"], inputs["encoder_hidden_states"], inputs["pooled_projections"],
            inputs["timestep"], neg_text, neg_pooled, cond_rows=cond_rows, **{**SETTINGS, "p": 1},
        )
    neg_mask = None if negative is None else negative.get("negative_prompt_attention_mask")
    if name.startswith("qwen"):
        return naive_nag.naive_qwen_forward(
            model, inputs["hidden_states"], inputs["encoder_hidden_states"], inputs.get("encoder_hidden_states_mask"),
            inputs["timestep"], inputs["img_shapes"], neg_text, neg_mask, cond_rows=cond_rows, **{**SETTINGS, "p": 1},
        )
    kwargs = {k: v for k, v in inputs.items() if k != "return_dict"}
    return naive_nag.naive_cross_attention_forward(
        model, KIND[name], kwargs, neg_text, neg_mask, cond_rows=cond_rows, **{**SETTINGS, "p": 1}
    )


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "straightforward"])
@pytest.mark.parametrize("length_delta", [-3, 5])
@pytest.mark.parametrize("name", NAMES)
def test_agrees_with_naive_implementation(name, length_delta, fast):
    check_agrees_with_naive_implementation(name, length_delta, fast)


def check_agrees_with_naive_implementation(name, length_delta, fast):
    pipe = pipeline(name)
    model = tp.denoiser(pipe)
    _, stock_calls = record(pipe, name)
    negative = random_negative(name, stock_calls[0]["inputs"], length_delta)
    with nag.apply(pipe, **negative, **SETTINGS, fast=fast):
        _, calls = record(pipe, name)
    rows = batch_rows(name)
    mode = tp.CFG_INFO[name]["mode"]
    with torch.no_grad():
        for index, call in enumerate(calls):
            batch = call["output"].shape[0]
            if mode == "sequential" and index % 2 == 1:
                expected = naive_output(name, model, call["inputs"], None, None)  # uncond call: stock
            else:
                cond_rows = list(range(batch - rows, batch))
                expected = naive_output(name, model, call["inputs"], negative, cond_rows)
            torch.testing.assert_close(call["output"], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_fast_path_never_calls_the_stock_processor(name):
    check_fast_path_never_calls_the_stock_processor(name)


def check_fast_path_never_calls_the_stock_processor(name, fast_path=True):
    """``fast_path=False``: a family without a fast path, whose ``fast=True`` falls back to the
    straightforward wrappers (each stock processor called per branch); it must still guide."""
    """In guided calls the fast path does its own attention: each image token is projected once."""
    pipe = pipeline(name)
    for fast in (True, False):
        with nag.apply(pipe, NEGATIVE, **SETTINGS, fast=fast) as handle:
            counts = []
            for module in tp.denoiser(pipe).modules():
                processor = getattr(module, "processor", None)
                if isinstance(processor, nag.attention.NAGProcessor):
                    stock = processor.stock

                    def counting(*args, _stock=stock, **kwargs):
                        counts.append(1)
                        return _stock(*args, **kwargs)

                    processor.stock = counting
            generate(pipe, name, cfg=False)
            assert handle.guided_calls == 2
        assert (len(counts) == 0) == (fast and fast_path), (fast, len(counts))


def test_wan22_two_experts_are_both_guided():
    """Wan 2.2: `transformer` takes the high-noise steps, `transformer_2` the low-noise ones."""
    from diffusers import WanPipeline

    base = pipeline("wan")
    second = tp.FACTORIES["wan"]().transformer  # same architecture, its own module instances
    with torch.no_grad():
        for p in second.parameters():
            p.mul_(0.9)
    pipe = WanPipeline(tokenizer=base.tokenizer, text_encoder=base.text_encoder, vae=base.vae,
                       scheduler=base.scheduler, transformer=base.transformer, transformer_2=second,
                       boundary_ratio=0.5)
    pipe.set_progress_bar_config(disable=True)
    kwargs = {**tp.no_cfg_kwargs("wan"), "num_inference_steps": 4}
    calls = {"transformer": 0, "transformer_2": 0}
    hooks = [getattr(pipe, name).register_forward_pre_hook(lambda *a, n=name: calls.__setitem__(n, calls[n] + 1))
             for name in calls]
    stock = tp.output_tensor(pipe(prompt=PROMPTS, generator=torch.Generator().manual_seed(0), **kwargs))
    for hook in hooks:
        hook.remove()
    assert calls["transformer"] > 0 and calls["transformer_2"] > 0 and sum(calls.values()) == 4
    before = state_of(pipe), [id(getattr(m, "processor", None)) for m in second.modules()]
    with nag.apply(pipe, NEGATIVE, **SETTINGS) as handle:
        guided = tp.output_tensor(pipe(prompt=PROMPTS, generator=torch.Generator().manual_seed(0), **kwargs))
        assert handle.guided_calls == 4  # every step, on either expert
    assert (guided - stock).abs().max() > 1e-3
    assert (state_of(pipe), [id(getattr(m, "processor", None)) for m in second.modules()]) == before
