"""NAG through the whole pipeline path of every supported pipeline (tiny random-weight models).

Each test builds a stock diffusers pipeline, generates with batch 2 (two different prompts),
and checks an invariant or agreement with the independent implementation in ``naive_nag.py``.
"""

from __future__ import annotations

import inspect
from functools import cache

import naive_nag
import pytest
import tiny_pipelines as tp
import torch

import nag

NAMES = [
    "flux",
    "flux_dev",
    "sd3",
    "sd35",
    "sdxl",
    "sd",
    "pixart_sigma",
    "pixart_alpha",
    "sana",
    "sana_sprint",
    "wan",
    "skyreels_v2",
    "ltx",
    "sana_video",
]
PROMPTS = ["a red circle on a blue background", "a small green square"]
NEGATIVE = "blurry, low quality, ugly watermark text"
SETTINGS = dict(scale=3.0, tau=2.5, alpha=0.5)


@cache
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
    hooks = tuple((name, len(m._forward_pre_hooks), len(m._forward_hooks)) for name, m in model.named_modules())
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


def record_calls(model, run, *args, **kwargs):
    """``run(*args, **kwargs)`` with a ``Recorder`` on ``model``: (its result, the recorded calls)."""
    recorder = Recorder(model)
    try:
        out = run(*args, **kwargs)
    finally:
        recorder.close()
    return out, recorder.calls


def record(pipe, name, **overrides):
    return record_calls(tp.denoiser(pipe), generate, pipe, name, **overrides)


def stock(name, cfg=True):
    return generate(pipeline(name), name, cfg=cfg)


def each_configuration(check, names, **arguments):
    """A test (to bind to a ``test_...`` name in a test module) running ``check(name, **arguments)`` for every
    configuration in ``names``, each its own test id."""

    def test(name):
        check(name, **arguments)

    return pytest.mark.parametrize("name", list(names))(test)


def each_configuration_and_path(check, names):
    """A test running ``check(name, fast)`` for every configuration in ``names`` on the fast and the
    straightforward attention paths (test ids ``[name-fast]``, ``[name-straightforward]``)."""

    def test(name, fast):
        check(name, fast)

    test = pytest.mark.parametrize("name", list(names))(test)
    return pytest.mark.parametrize("fast", [True, False], ids=["fast", "straightforward"])(test)


def family_tests(names, straightforward_only):
    """The tests of a family file, for every configuration in ``names``: ``test_invariants``,
    ``test_cfg_unconditional_branch_is_untouched``, ``test_guided_without_cfg_on_its_attention_path`` (the
    configurations in ``straightforward_only`` have no fast path), ``test_agrees_with_naive_implementation`` (through
    the pipeline, CFG on where the pipeline has CFG) and
    ``test_batch_with_one_guided_row_agrees_with_naive_implementation`` (on the denoiser), in that order."""
    return (
        each_configuration(check_invariants, names),
        each_configuration(check_cfg_unconditional_branch_is_untouched, names),
        each_configuration(
            check_fast_path_never_calls_the_stock_processor, names, straightforward_only=straightforward_only
        ),
        each_configuration_and_path(check_agrees_with_naive_implementation, names),
        each_configuration_and_path(check_batch_with_one_guided_row_agrees_with_naive_implementation, names),
    )


# ---------------------------------------------------------------------------------------------
# invariants
# ---------------------------------------------------------------------------------------------


def check_off_is_bit_identical(name):
    pipe = pipeline(name)
    reference = stock(name)
    with nag.apply(pipe, NEGATIVE, scale=1.0):
        assert torch.equal(generate(pipe, name), reference)
    with nag.apply(pipe, NEGATIVE, **{**SETTINGS, "alpha": 0.0}):
        assert torch.equal(generate(pipe, name), reference)
    with nag.apply(pipe):  # no negative
        assert torch.equal(generate(pipe, name), reference)


test_off_is_bit_identical = each_configuration(check_off_is_bit_identical, NAMES)


def check_negative_equal_to_positive_is_unguided(name):
    pipe = pipeline(name)
    reference = stock(name)
    with nag.apply(pipe, PROMPTS[0] if name in tp.SINGLE_PROMPT else PROMPTS, **SETTINGS) as handle:
        out = generate(pipe, name)
        assert handle.guided_calls >= 2
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-5)


test_negative_equal_to_positive_is_unguided = each_configuration(check_negative_equal_to_positive_is_unguided, NAMES)


def check_negative_prompt_changes_the_output(name):
    pipe = pipeline(name)
    reference = stock(name)
    with nag.apply(pipe, NEGATIVE, **SETTINGS) as handle:
        out = generate(pipe, name)
        assert handle.guided_calls == 2  # one guided denoiser call per step
    assert torch.isfinite(out).all()
    assert (out - reference).abs().max() > 1e-3


test_negative_prompt_changes_the_output = each_configuration(check_negative_prompt_changes_the_output, NAMES)


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


test_removal_restores_everything = each_configuration(check_removal_restores_everything, NAMES)


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


test_exception_inside_a_generation_leaves_nothing_behind = each_configuration(
    check_exception_inside_a_generation_leaves_nothing_behind, NAMES
)


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
        cond, uncond = (
            (slice(rows, None), slice(None, rows)) if mode == "batched" else (slice(None, rows), slice(rows, None))
        )
        torch.testing.assert_close(first_guided[uncond], first_stock[uncond], rtol=0, atol=1e-6)
        assert (first_guided[cond] - first_stock[cond]).abs().max() > 1e-4
    else:  # one call per branch: cond first, then uncond
        torch.testing.assert_close(guided_calls[1]["output"], stock_calls[1]["output"], rtol=0, atol=1e-6)
        assert (guided_calls[0]["output"] - stock_calls[0]["output"]).abs().max() > 1e-4


test_cfg_unconditional_branch_is_untouched = each_configuration(
    check_cfg_unconditional_branch_is_untouched, [n for n in NAMES if tp.has_cfg(n)]
)


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


test_steps_outside_the_window_are_stock = each_configuration(check_steps_outside_the_window_are_stock, NAMES)


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


@cache
def family(name):
    """The NAG family of test configuration ``name`` (a family's name that is no configuration stands for itself)."""
    if name in tp.FACTORIES or name in tp.FAMILY_FACTORIES:
        return nag.families.pipeline_spec(pipeline(name)).family
    if name in nag.families.FAMILIES:
        return name
    raise KeyError(f"{name!r} is neither a test configuration nor a NAG family")


# Families with a text mask, and which tokens the random negatives below mask: "suffix" (the valid tokens first: the
# last three of row 0, the last one of the last row) or "ends" (left-padded text: the first token of the last row).
NEGATIVE_MASKS = {
    "pixart": "suffix",
    "sana": "suffix",
    "ltx": "suffix",
    "qwenimage": "suffix",
    "chroma": "suffix",
    "hunyuanvideo": "suffix",
    "lumina2": "suffix",
    "cogview4": "ends",
}


def random_negative(name, call_inputs, length_delta, rows=None, seed=7):
    """Precomputed negative embeddings (``nag.apply`` argument names) for configuration or family ``name``: text of
    another token length than the call's, ``rows`` rows (default: the call's text rows), a pooled embedding where the
    call has one, a partial mask where the family has masks (``NEGATIVE_MASKS``)."""
    g = torch.Generator().manual_seed(seed)
    text = call_inputs["encoder_hidden_states"]
    rows = text.shape[0] if rows is None else rows
    length = text.shape[1] + length_delta
    negative = {"negative_prompt_embeds": torch.randn(rows, length, text.shape[2], generator=g)}
    if call_inputs.get("pooled_projections") is not None:
        pooled = call_inputs["pooled_projections"]
        negative["negative_pooled_prompt_embeds"] = torch.randn(rows, pooled.shape[1], generator=g)
    pattern = NEGATIVE_MASKS.get(family(name))
    if pattern is not None:
        mask = torch.ones(rows, length)
        mask[0, -3:] = 0
        if pattern == "suffix":
            mask[-1, -1:] = 0
        else:
            mask[-1, :1] = 0
        negative["negative_prompt_attention_mask"] = mask
    return negative


def random_negative_for_call(name, length_delta, rows=None):
    """:func:`random_negative` sized from the first denoiser call of a generation of ``name`` without CFG."""
    _, calls = record(pipeline(name), name, cfg=False)
    return random_negative(name, calls[0]["inputs"], length_delta, rows)


def naive_output(name, model, inputs, negative, cond_rows=None):
    """The naive reference (``naive_nag``) of one denoiser call of configuration or family ``name``, guided on
    ``cond_rows`` (None: every row) by ``negative`` (``random_negative``'s names; None: the stock model)."""
    negative = negative or {}
    neg_text = negative.get("negative_prompt_embeds")
    neg_pooled = negative.get("negative_pooled_prompt_embeds")
    neg_mask = negative.get("negative_prompt_attention_mask")
    nag_settings = {**SETTINGS, "p": 1}
    kind = family(name)
    if kind == "flux":
        return naive_nag.naive_flux_forward(
            model,
            inputs["hidden_states"],
            inputs["encoder_hidden_states"],
            inputs["pooled_projections"],
            inputs["timestep"],
            inputs["img_ids"],
            inputs["txt_ids"],
            inputs.get("guidance"),
            neg_text,
            neg_pooled,
            None,
            cond_rows=cond_rows,
            **nag_settings,
        )
    if kind == "sd3":
        return naive_nag.naive_sd3_forward(
            model,
            inputs["hidden_states"],
            inputs["encoder_hidden_states"],
            inputs["pooled_projections"],
            inputs["timestep"],
            neg_text,
            neg_pooled,
            cond_rows=cond_rows,
            **nag_settings,
        )
    if kind == "qwenimage":
        return naive_nag.naive_qwen_forward(
            model,
            inputs["hidden_states"],
            inputs["encoder_hidden_states"],
            inputs.get("encoder_hidden_states_mask"),
            inputs["timestep"],
            inputs["img_shapes"],
            neg_text,
            neg_mask,
            cond_rows=cond_rows,
            **nag_settings,
        )
    if kind == "chroma":
        return naive_nag.naive_chroma_forward(
            model,
            inputs["hidden_states"],
            inputs["encoder_hidden_states"],
            inputs["timestep"],
            inputs["img_ids"],
            inputs["txt_ids"],
            inputs.get("attention_mask"),
            neg_text,
            neg_mask,
            cond_rows=cond_rows,
            **nag_settings,
        )
    if kind == "auraflow":
        return naive_nag.naive_auraflow_forward(
            model,
            inputs["hidden_states"],
            inputs["encoder_hidden_states"],
            inputs["timestep"],
            neg_text,
            cond_rows=cond_rows,
            **nag_settings,
        )
    if kind == "cogview4":
        return naive_nag.naive_cogview4_forward(
            model,
            inputs["hidden_states"],
            inputs["encoder_hidden_states"],
            inputs["timestep"],
            inputs["original_size"],
            inputs["target_size"],
            inputs["crop_coords"],
            inputs.get("attention_mask"),
            neg_text,
            neg_mask,
            cond_rows=cond_rows,
            **nag_settings,
        )
    if kind == "cogvideox":
        return naive_nag.naive_cogvideox_forward(
            model,
            inputs["hidden_states"],
            inputs["encoder_hidden_states"],
            inputs["timestep"],
            inputs.get("image_rotary_emb"),
            neg_text,
            cond_rows=cond_rows,
            ofs=inputs.get("ofs"),
            **nag_settings,
        )
    if kind == "hunyuanvideo":
        return naive_nag.naive_hunyuanvideo_forward(
            model,
            inputs["hidden_states"],
            inputs["timestep"],
            inputs["encoder_hidden_states"],
            inputs["encoder_attention_mask"],
            inputs["pooled_projections"],
            inputs.get("guidance"),
            neg_text,
            neg_mask,
            neg_pooled,
            cond_rows=cond_rows,
            **nag_settings,
        )
    if kind == "flux2":
        return naive_nag.naive_flux2_forward(
            model,
            inputs["hidden_states"],
            inputs["encoder_hidden_states"],
            inputs["timestep"],
            inputs["img_ids"],
            inputs["txt_ids"],
            inputs.get("guidance"),
            neg_text,
            cond_rows=cond_rows,
            **nag_settings,
        )
    if kind == "lumina2":
        return naive_nag.naive_lumina2_forward(
            model,
            inputs["hidden_states"],
            inputs["timestep"],
            inputs["encoder_hidden_states"],
            inputs["encoder_attention_mask"],
            neg_text,
            neg_mask,
            cond_rows=cond_rows,
            **nag_settings,
        )
    if nag.families.FAMILIES[kind].layout != "cross":
        raise KeyError(f"no naive reference here for the {kind!r} family (its test file has its own)")
    kwargs = {k: v for k, v in inputs.items() if k != "return_dict"}
    return naive_nag.naive_cross_attention_forward(
        model, kind, kwargs, neg_text, neg_mask, cond_rows=cond_rows, **nag_settings
    )


def cond_rows_of(name, call_index, batch):
    """The guided rows of recorded call ``call_index`` (of ``batch`` rows) of a guided generation of ``name``, or
    None for a stock (unconditional) call."""
    mode = tp.CFG_INFO[name]["mode"]
    if mode == "sequential":  # one call per branch: conditional first
        return None if call_index % 2 else list(range(batch))
    rows = batch_rows(name)
    return list(range(rows)) if mode == "batched_cond_first" else list(range(batch - rows, batch))


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "straightforward"])
@pytest.mark.parametrize("length_delta", [-3, 5])
@pytest.mark.parametrize("name", NAMES)
def test_agrees_with_naive_implementation(name, length_delta, fast):
    check_agrees_with_naive_implementation(name, fast, length_deltas=(length_delta,))


def check_agrees_with_naive_implementation(name, fast, length_deltas=(-3, 5)):
    """Through the pipeline with CFG where it has CFG: conditional rows guided, unconditional rows or calls stock,
    for precomputed negatives ``length_deltas`` tokens longer than the prompts' (``random_negative``)."""
    pipe = pipeline(name)
    model = tp.denoiser(pipe)
    _, stock_calls = record(pipe, name)
    with torch.no_grad():  # the reference itself reproduces the stock model
        torch.testing.assert_close(
            naive_output(name, model, stock_calls[0]["inputs"], None), stock_calls[0]["output"], rtol=1e-4, atol=1e-5
        )
    for length_delta in length_deltas:
        negative = random_negative(name, stock_calls[0]["inputs"], length_delta, rows=batch_rows(name))
        with nag.apply(pipe, **negative, **SETTINGS, fast=fast):
            _, calls = record(pipe, name)
        assert len(calls) == (4 if tp.CFG_INFO[name]["mode"] == "sequential" else 2)  # 2 steps
        with torch.no_grad():
            for index, call in enumerate(calls):
                cond_rows = cond_rows_of(name, index, call["output"].shape[0])
                expected = naive_output(name, model, call["inputs"], None if cond_rows is None else negative, cond_rows)
                torch.testing.assert_close(call["output"], expected, rtol=1e-4, atol=1e-5)


def denoiser_batch(name):
    """A denoiser call of ``name`` with two rows of different texts (and masks): [unconditional, conditional]
    where the pipeline has CFG, else its two conditional rows."""
    pipe = pipeline(name)
    _, calls = record(pipe, name)
    mode = tp.CFG_INFO[name]["mode"]
    if mode == "sequential":  # one call per branch: cond first
        cond, uncond = calls[0]["inputs"], calls[1]["inputs"]
        pick = lambda key: torch.cat([uncond[key][:1], cond[key][1:]])  # noqa: E731
    elif mode == "batched":  # one call [uncond_0, uncond_1, cond_0, cond_1]: take uncond_0 and cond_1
        cond = calls[0]["inputs"]
        pick = lambda key: cond[key][[0, 3]]  # noqa: E731
    else:  # no CFG: the call's two rows
        cond = calls[0]["inputs"]
        pick = lambda key: cond[key]  # noqa: E731
    inputs = {k: v for k, v in cond.items() if k not in ("return_dict", "joint_attention_kwargs", "attention_kwargs")}
    batch = calls[0]["output"].shape[0]
    for key, value in cond.items():
        if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == batch:
            inputs[key] = pick(key)
    if name == "cogview4":  # the pipeline passes no mask: a partial positive mask, different per row
        mask = torch.ones(inputs["encoder_hidden_states"].shape[:2])
        mask[0, :2] = 0
        mask[1, :5] = 0
        inputs["attention_mask"] = mask
    assert not torch.equal(inputs["encoder_hidden_states"][0], inputs["encoder_hidden_states"][1])
    return tp.denoiser(pipe), inputs


NEGATIVE_KEYS = {
    "negative_prompt_embeds": "encoder_hidden_states",
    "negative_prompt_attention_mask": "encoder_attention_mask",
    "negative_pooled_prompt_embeds": "pooled_projections",
}


def check_batch_with_one_guided_row_agrees_with_naive_implementation(name, fast):
    """On the denoiser: row 0 stock, row 1 guided, different texts (and masks) per row, negatives shorter and
    longer than the guided row's text."""
    model, inputs = denoiser_batch(name)
    for length_delta in (-3, 5):
        negative = random_negative(name, inputs, length_delta, rows=1)
        with nag.denoiser.apply_to_denoiser(
            model,
            {NEGATIVE_KEYS[k]: v for k, v in negative.items()},
            fast=fast,
            positive_reference=inputs["encoder_hidden_states"][1:],
            **SETTINGS,
        ):
            with torch.no_grad():
                out = model(**inputs, return_dict=False)[0]
        with torch.no_grad():
            stock = model(**inputs, return_dict=False)[0]
            expected = naive_output(name, model, inputs, negative, cond_rows=[1])
        assert out.shape == stock.shape
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out[0], stock[0], rtol=0, atol=1e-6)
        assert (out[1] - stock[1]).abs().max() > 1e-4


def check_conditioning_is_left_unguided(name, parts, **overrides):
    """The conditioning reaches every guided call exactly as the pipeline sets it (as in the stock run),
    the negative rows see the guided rows' conditioning (a negative equal to the positive prompt gives
    the stock output on the denoiser), and only the text tells the branches apart.

    ``parts``: ``(argument, index into it)`` of the denoiser calls that carry the conditioning; the first one
    is made to differ between the rows for the denoiser check where the pipeline gives every row the same.
    ``overrides``: call arguments (see ``generate``)."""
    pipe = pipeline(name)
    model = tp.denoiser(pipe)
    _, stock_calls = record(pipe, name, **overrides)
    with nag.apply(pipe, NEGATIVE, **SETTINGS) as handle:
        _, guided_calls = record(pipe, name, **overrides)
        assert handle.guided_calls == 2
    assert len(stock_calls) == len(guided_calls)
    for stock_call, guided_call in zip(stock_calls, guided_calls):
        for key, index in parts:
            assert torch.equal(guided_call["inputs"][key][index], stock_call["inputs"][key][index]), key
    assert (guided_calls[-1]["output"] - stock_calls[-1]["output"]).abs().max() > 1e-4
    # On the denoiser: different conditioning per row, the negative text equal to the conditional row's
    # text -> the stock output (the negative rows carry the guided rows' conditioning, not their own).
    inputs = {k: v for k, v in stock_calls[0]["inputs"].items() if k not in ("return_dict", "attention_kwargs")}
    key, index = parts[0]
    if torch.equal(inputs[key][index][0], inputs[key][index][-1]):
        inputs[key] = inputs[key].clone()
        inputs[key][index][-1] = inputs[key][index][-1].flip(-1) + 0.5
    assert not torch.equal(inputs[key][index][0], inputs[key][index][-1])
    rows = batch_rows(name)
    negative_keys = nag.families.FAMILIES[family(name)].negative_keys
    negative = {k: inputs[k][-rows:] for k in negative_keys if inputs.get(k) is not None}
    with torch.no_grad():
        stock = model(**inputs, return_dict=False)[0]
        with nag.denoiser.apply_to_denoiser(
            model, negative, fast=False, positive_reference=inputs["encoder_hidden_states"][-rows:], **SETTINGS
        ):
            same = model(**inputs, return_dict=False)[0]
    torch.testing.assert_close(same, stock, rtol=0, atol=1e-5)


class InputShapes:
    """Rows and tokens (the first two axes of the first input) every call of the given modules processes, by key;
    ``modules``: ``(key, module)`` pairs; ``close()`` removes the hooks."""

    def __init__(self, modules):
        self.seen = {key: [] for key, _ in modules}
        self._handles = [
            m.register_forward_pre_hook(
                lambda _m, args, kwargs, key=key: self._count(key, args, kwargs), with_kwargs=True
            )
            for key, m in modules
        ]

    def _count(self, key, args, kwargs):
        x = args[0] if args else next(iter(kwargs.values()))
        self.seen[key].append(tuple(x.shape[:2]))

    def close(self):
        for handle in self._handles:
            handle.remove()


class CountingProcessor:
    """Stands in for a stock processor (its attributes, the attention backend included, are the stock one's: NAG
    still sees the stock processor's kind) and appends its module's name to ``counts`` at every call."""

    def __init__(self, stock, counts, name=""):
        self._stock, self._counts, self._name = stock, counts, name

    def __call__(self, *args, **kwargs):
        self._counts.append(self._name)
        return self._stock(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._stock, name)


def count_stock_calls(model):
    """Put a counter around the stock processor inside every NAG wrapper of ``model``; returns the list it appends
    each call's module name to."""
    counts = []
    for name, module in model.named_modules():
        processor = getattr(module, "processor", None)
        if isinstance(processor, nag.attention.NAGProcessor):
            processor.stock = CountingProcessor(processor.stock, counts, name)
    return counts


def own_processor(stock_class):
    """A processor of the user's own: the stock math and signature under another class (NAG must not assume the
    internals of a processor it does not know)."""
    return type(f"Own{stock_class.__name__}", (stock_class,), {})()


def check_fast_path_never_calls_the_stock_processor(name, fast_path=True, straightforward_only=()):
    """In guided calls the fast path does its own attention: each image token is projected once.

    ``fast_path=False`` (or ``name`` in ``straightforward_only``): a family without a fast path, whose
    ``fast=True`` falls back to the straightforward wrappers (each stock processor called per branch); it must
    still guide."""
    fast_path = fast_path and name not in straightforward_only
    pipe = pipeline(name)
    for fast in (True, False):
        with nag.apply(pipe, NEGATIVE, **SETTINGS, fast=fast) as handle:
            counts = []
            for module in tp.denoiser(pipe).modules():
                processor = getattr(module, "processor", None)
                if isinstance(processor, nag.attention.NAGProcessor):
                    stock = processor.stock

                    def counting(*args, _stock=stock, _counts=counts, **kwargs):
                        _counts.append(1)
                        return _stock(*args, **kwargs)

                    processor.stock = counting
            generate(pipe, name, cfg=False)
            assert handle.guided_calls == 2
        assert (len(counts) == 0) == (fast and fast_path), (fast, len(counts))


test_fast_path_never_calls_the_stock_processor = each_configuration(
    check_fast_path_never_calls_the_stock_processor, NAMES
)


def test_wan22_two_experts_are_both_guided():
    """Wan 2.2: `transformer` takes the high-noise steps, `transformer_2` the low-noise ones."""
    from diffusers import WanPipeline

    base = pipeline("wan")
    second = tp.FACTORIES["wan"]().transformer  # same architecture, its own module instances
    with torch.no_grad():
        for p in second.parameters():
            p.mul_(0.9)
    pipe = WanPipeline(
        tokenizer=base.tokenizer,
        text_encoder=base.text_encoder,
        vae=base.vae,
        scheduler=base.scheduler,
        transformer=base.transformer,
        transformer_2=second,
        boundary_ratio=0.5,
    )
    pipe.set_progress_bar_config(disable=True)
    kwargs = {**tp.no_cfg_kwargs("wan"), "num_inference_steps": 4}
    calls = {"transformer": 0, "transformer_2": 0}
    hooks = [
        getattr(pipe, name).register_forward_pre_hook(lambda *a, n=name: calls.__setitem__(n, calls[n] + 1))
        for name in calls
    ]
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
