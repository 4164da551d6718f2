"""Bad inputs at ``nag.apply`` / ``handle.update`` / generation time, and pipelines NAG cannot drive.

Every rejected input must raise an error whose message names the fix, and leave the pipeline
exactly as it was. The observed message is recorded for ``docs/reliability.md``.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import tiny_pipelines as tp
import torch
from test_pipelines import NEGATIVE, SETTINGS, generate, pipeline, state_of

import nag
import nag.checks
import nag.pipeline


def reliability(area: str, case: str, expect: str):
    return pytest.mark.reliability(area=area, case=case, expect=expect)


def observe(record_property, error: BaseException) -> None:
    """Record what the user sees (for the table)."""
    record_property("observed", f"{type(error).__name__}: {error}")


def _flux_width() -> int:
    return pipeline("flux").transformer.config.joint_attention_dim


# (case, apply kwargs (a callable for lazily built tensors), error, message pattern)
BAD_APPLY = [
    ("scale < 1", dict(scale=0.5), ValueError, r"scale.*>= 1.*phi"),
    ("scale NaN", dict(scale=float("nan")), ValueError, "scale.*finite"),
    ("scale inf", dict(scale=float("inf")), ValueError, "scale.*finite"),
    ("scale as a string", dict(scale="5"), ValueError, "scale.*finite number"),
    ("scale as a tensor", dict(scale=torch.tensor(5.0)), ValueError, r"float\(value\)"),
    ("tau = 0", dict(tau=0.0), ValueError, r"tau.*> 0"),
    ("tau < 0", dict(tau=-1.0), ValueError, r"tau.*> 0"),
    ("tau inf", dict(tau=float("inf")), ValueError, "tau.*finite"),
    ("tau NaN", dict(tau=float("nan")), ValueError, "tau.*finite"),
    ("alpha < 0", dict(alpha=-0.1), ValueError, r"alpha.*\[0, 1\]"),
    ("alpha > 1", dict(alpha=1.5), ValueError, r"alpha.*\[0, 1\]"),
    ("alpha NaN", dict(alpha=float("nan")), ValueError, "alpha.*finite"),
    ("start < 0", dict(start=-0.1), ValueError, r"start.*\[0, 1\]"),
    ("end > 1", dict(end=1.5), ValueError, r"end.*\[0, 1\]"),
    ("start = end", dict(start=0.5, end=0.5), ValueError, "start.*smaller than.*end"),
    ("start > end", dict(start=0.8, end=0.2), ValueError, "start.*smaller than.*end"),
    ("norm not in {1, 2}", dict(norm=3), ValueError, r"norm.*1.*or 2"),
    ("norm = True", dict(norm=True), ValueError, "norm"),
    ("norm as a string", dict(norm="l2"), ValueError, "norm"),
    ("negative prompt not a string", dict(negative_prompt=3), TypeError, "negative_prompt must be a string"),
    ("negative prompt list with a non-string", dict(negative_prompt=["ok", 3]), TypeError, "list of strings"),
    ("empty negative prompt list", dict(negative_prompt=[]), TypeError, "non-empty list"),
    ("negative_prompt_2 without negative_prompt", dict(negative_prompt_2="x"), ValueError, "without negative_prompt"),
    ("negative_prompt_2 not a string", dict(negative_prompt="x", negative_prompt_2=3), TypeError,
     "negative_prompt_2 must be a string"),
    ("a negative prompt for an encoder the pipeline lacks (negative_prompt_3 on Flux)",
     dict(negative_prompt="x", negative_prompt_3="y"), TypeError, "encode_prompt takes no prompt_3"),
    (
        "negative prompt and embeddings together",
        lambda: dict(negative_prompt="x", negative_prompt_embeds=torch.zeros(1, 4, _flux_width())),
        ValueError,
        "either",
    ),
    (
        "negative embeddings: wrong number of dimensions",
        lambda: dict(negative_prompt_embeds=torch.zeros(4, _flux_width())),
        ValueError,
        r"3 dimensions \(rows, tokens, width\)",
    ),
    (
        "negative embeddings: integer dtype (token ids)",
        lambda: dict(
            negative_prompt_embeds=torch.zeros(1, 4, _flux_width(), dtype=torch.long),
            negative_pooled_prompt_embeds=torch.zeros(1, 32),
        ),
        TypeError,
        "floating-point.*not token ids",
    ),
    (
        "negative embeddings: complex dtype",
        lambda: dict(
            negative_prompt_embeds=torch.zeros(1, 4, _flux_width(), dtype=torch.complex64),
            negative_pooled_prompt_embeds=torch.zeros(1, 32),
        ),
        TypeError,
        "floating-point",
    ),
    (
        "negative embeddings: meta device (no data)",
        lambda: dict(
            negative_prompt_embeds=torch.zeros(1, 4, _flux_width(), device="meta"),
            negative_pooled_prompt_embeds=torch.zeros(1, 32),
        ),
        ValueError,
        "meta device.*materialized",
    ),
    (
        "negative embeddings: zero tokens",
        lambda: dict(
            negative_prompt_embeds=torch.zeros(1, 0, _flux_width()), negative_pooled_prompt_embeds=torch.zeros(1, 32)
        ),
        ValueError,
        "empty.*at least one",
    ),
    (
        "negative embeddings: NaN values",
        lambda: dict(
            negative_prompt_embeds=torch.full((1, 4, _flux_width()), float("nan")),
            negative_pooled_prompt_embeds=torch.zeros(1, 32),
        ),
        ValueError,
        "NaN or inf",
    ),
    (
        "negative embeddings: wrong hidden width",
        lambda: dict(
            negative_prompt_embeds=torch.zeros(1, 4, _flux_width() + 16),
            negative_pooled_prompt_embeds=torch.zeros(1, 32),
        ),
        ValueError,
        r"width 48 but .* expects 32 \(config.joint_attention_dim\): expected shape \('rows', 'tokens', 32\)",
    ),
    (
        "negative pooled embeddings: wrong width",
        lambda: dict(
            negative_prompt_embeds=torch.zeros(1, 4, _flux_width()), negative_pooled_prompt_embeds=torch.zeros(1, 7)
        ),
        ValueError,
        r"negative_pooled_prompt_embeds.*width 7.*expects 32 \(config.pooled_projection_dim\)",
    ),
    (
        "negative embeddings without the pooled ones (Flux)",
        lambda: dict(negative_prompt_embeds=torch.zeros(1, 4, _flux_width())),
        ValueError,
        "negative_pooled_prompt_embeds",
    ),
    (
        "a negative input the pipeline does not take",
        dict(negative_prompt_attention_mask=torch.ones(1, 4)),
        TypeError,
        "accepts",
    ),
    (
        "negative embeddings not a tensor",
        lambda: dict(negative_prompt_embeds=[[0.0]], negative_pooled_prompt_embeds=torch.zeros(1, 32)),
        TypeError,
        "must be a torch.Tensor",
    ),
]


@pytest.mark.parametrize(
    "make, error, match",
    [
        pytest.param(
            make,
            error,
            match,
            id=case,
            marks=reliability("bad input at nag.apply", case, f"{error.__name__} naming the fix; pipeline untouched"),
        )
        for case, make, error, match in BAD_APPLY
    ],
)
def test_bad_input_at_apply(make, error, match, record_property):
    pipe = pipeline("flux")
    before = state_of(pipe)
    kwargs = make() if callable(make) else make
    with pytest.raises(error, match=match) as info:
        nag.apply(pipe, **kwargs)
    observe(record_property, info.value)
    assert state_of(pipe) == before
    assert nag.pipeline._HANDLES.get(pipe) is None


@reliability(
    "bad input at nag.apply",
    "mask length differs from the embeddings' (PixArt)",
    "ValueError naming the expected shape",
)
def test_mask_shape_must_match_the_embeddings(record_property):
    pipe = pipeline("pixart_sigma")
    before = state_of(pipe)
    width = pipe.transformer.config.caption_channels
    with pytest.raises(ValueError, match=r"expected \(2, 5\)") as info:
        nag.apply(
            pipe, negative_prompt_embeds=torch.zeros(2, 5, width), negative_prompt_attention_mask=torch.ones(2, 7)
        )
    observe(record_property, info.value)
    assert state_of(pipe) == before


@reliability("bad input at nag.apply", "settings given as numpy scalars", "accepted, stored as Python numbers")
def test_numpy_scalars_are_accepted():
    pipe = pipeline("sd")
    with nag.apply(
        pipe, NEGATIVE, scale=np.float32(3.0), tau=np.float64(2.5), alpha=np.float32(0.5), norm=np.int64(2)
    ) as handle:
        settings = handle.settings
        assert (type(settings.scale), type(settings.norm)) == (float, int)
        out = generate(pipe, "sd")
    with nag.apply(pipe, NEGATIVE, scale=3.0, tau=2.5, alpha=0.5, norm=2):
        assert torch.equal(generate(pipe, "sd"), out)


@reliability(
    "bad input at handle.update", "invalid or unknown setting", "ValueError / TypeError; settings in force unchanged"
)
@pytest.mark.parametrize(
    "changes, error",
    [
        (dict(tau=0), ValueError),
        (dict(scale=0.2), ValueError),
        (dict(start=0.9, end=0.1), ValueError),
        (dict(scle=3), TypeError),
        (dict(eps=0.1), TypeError),
    ],
)
def test_bad_update_keeps_the_settings(changes, error, record_property):
    pipe = pipeline("sd")
    with nag.apply(pipe, NEGATIVE, **SETTINGS) as handle:
        settings = handle.settings
        with pytest.raises(error) as info:
            handle.update(**changes)
        observe(record_property, info.value)
        assert handle.settings == settings


@reliability(
    "bad input at generation",
    "negative prompt list length differs from the prompts",
    "ValueError at the call naming both counts; NAG stays installed and usable",
)
@pytest.mark.parametrize("name", ["sd", "flux", "wan"])
def test_negative_prompt_count_mismatch(name, record_property):
    pipe = pipeline(name)
    reference = None
    with nag.apply(pipe, ["blurry", "watermark", "a third"], **SETTINGS) as handle:
        with pytest.raises(ValueError, match="negative_prompt has 3 entries but the call has 2 prompts") as info:
            generate(pipe, name)
        observe(record_property, info.value)
        handle.negative_prompt = ["blurry", "watermark"]
        out = generate(pipe, name)
    with nag.apply(pipe, ["blurry", "watermark"], **SETTINGS):
        reference = generate(pipe, name)
    assert torch.equal(out, reference)


@reliability(
    "bad input at generation",
    "negative embeddings narrower than this call's prompt embeddings (denoiser config silent on the width)",
    "ValueError at the call naming the expected shape",
)
def test_width_checked_against_the_prompt_embeddings(monkeypatch, record_property):
    pipe = pipeline("sd")
    monkeypatch.setattr(nag.checks, "expected_widths", lambda denoiser: {})
    width = pipe.unet.config.cross_attention_dim
    with nag.apply(pipe, negative_prompt_embeds=torch.zeros(1, 5, width - 8), **SETTINGS):
        with pytest.raises(
            ValueError, match=rf"width {width - 8} but this call's prompt embeddings have width {width}"
        ) as info:
            generate(pipe, "sd")
        observe(record_property, info.value)
    assert state_of(pipe) == state_of(pipeline("sd"))


@reliability(
    "bad input at generation",
    "negative embeddings of another width given to nag.apply_to_denoiser",
    "ValueError at the denoiser call naming the expected shape; after remove the denoiser is stock",
)
@pytest.mark.parametrize("name", ["sdxl", "flux"])
def test_denoiser_negative_of_another_width(name, record_property):
    """A bare denoiser knows no encoder to check the negative against: its first guided call compares the negative
    text with the call's text (cross-attention and joint layouts)."""
    pipe = pipeline(name)
    model = tp.denoiser(pipe)
    captured = {}
    hook = model.register_forward_pre_hook(
        lambda module, args, kwargs: captured.setdefault("call", (args, dict(kwargs))), with_kwargs=True
    )
    generate(pipe, name, cfg=False)
    hook.remove()
    args, kwargs = captured["call"]
    text = kwargs["encoder_hidden_states"]
    with torch.no_grad():
        expected = model(*args, **kwargs)[0]
    negative = {"encoder_hidden_states": torch.randn(1, 5, text.shape[-1] + 3)}
    if "pooled_projections" in kwargs:
        negative["pooled_projections"] = kwargs["pooled_projections"][:1]
    handle = nag.apply_to_denoiser(model, negative, **SETTINGS)
    expected_shape = rf"has \(rows, tokens, {text.shape[-1]}\): they must agree after the token axis"
    with pytest.raises(ValueError, match=expected_shape) as info, torch.no_grad():
        model(*args, **kwargs)
    observe(record_property, info.value)
    handle.remove()
    with torch.no_grad():
        assert torch.equal(model(*args, **kwargs)[0], expected)


@reliability(
    "bad input at nag.apply",
    "negative embeddings on another device than the model",
    "accepted and moved to the model's device at use (only meta tensors, which hold no data, are refused)",
)
def test_embeddings_on_another_device_are_moved():
    # A CPU-only machine has one real device: a tensor that claims another one is emulated by
    # checking the move: the stored embeddings are used through `.to(device)`.
    pipe = pipeline("sd")
    width = pipe.unet.config.cross_attention_dim
    negative = torch.randn(1, 6, width, generator=torch.Generator().manual_seed(3))
    with nag.apply(pipe, negative_prompt_embeds=negative, **SETTINGS) as handle:
        out = generate(pipe, "sd")
        assert handle.guided_calls == 2
    with nag.apply(pipe, negative_prompt_embeds=negative.double(), **SETTINGS):  # another dtype: cast at use
        torch.testing.assert_close(generate(pipe, "sd"), out, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# pipelines NAG cannot drive
# ---------------------------------------------------------------------------------------------


@reliability("pipeline", "already carrying NAG", "RuntimeError: remove first; the first NAG keeps working")
def test_applying_twice(record_property):
    pipe = pipeline("sd")
    with nag.apply(pipe, NEGATIVE, **SETTINGS):
        reference = generate(pipe, "sd")
        with pytest.raises(RuntimeError, match=r"already carries NAG; call nag.remove\(pipe\)") as info:
            nag.apply(pipe, "something else", scale=5.0)
        observe(record_property, info.value)
        assert torch.equal(generate(pipe, "sd"), reference)


@reliability(
    "pipeline", "a second pipeline sharing the first one's denoiser", "RuntimeError: remove NAG from the first"
)
def test_shared_denoiser(record_property):
    pipe = pipeline("sd")
    twin = type(pipe)(**pipe.components)
    with nag.apply(pipe, NEGATIVE, **SETTINGS):
        with pytest.raises(RuntimeError, match="already carries NAG.*sharing") as info:
            nag.apply(twin, NEGATIVE)
        observe(record_property, info.value)


@reliability("pipeline", "unsupported pipeline class", "NotImplementedError listing the supported pipelines")
def test_unsupported_pipeline(record_property):
    from diffusers import DDPMPipeline

    pipe = DDPMPipeline(unet=pipeline("sd").unet, scheduler=pipeline("sd").scheduler)
    with pytest.raises(NotImplementedError, match="Supported pipelines: .*FluxPipeline") as info:
        nag.apply(pipe, NEGATIVE)
    observe(record_property, info.value)


@reliability(
    "pipeline",
    "supported pipeline class with a denoiser of another architecture",
    "NotImplementedError naming the expected denoiser",
)
def test_swapped_denoiser(record_property):
    pipe = tp.FACTORIES["sd"]()
    pipe.unet = pipeline("wan").transformer  # not a UNet
    with pytest.raises(NotImplementedError, match="is a WanTransformer3DModel.*supports UNet2DConditionModel") as info:
        nag.apply(pipe, NEGATIVE)
    observe(record_property, info.value)


@reliability("pipeline", "denoiser not loaded (None)", "ValueError: NAG needs the denoiser")
def test_missing_denoiser(record_property):
    pipe = tp.FACTORIES["sd"]()
    pipe.unet = None
    with pytest.raises(ValueError, match="has no `unet`; NAG needs the denoiser loaded") as info:
        nag.apply(pipe, NEGATIVE)
    observe(record_property, info.value)


def _cross_attention_modules(model):
    return [m for n, m in model.named_modules() if n.endswith("attn2")]


class _OpaqueProcessor:
    """Another tool's processor that hides its arguments behind ``*args, **kwargs``."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, attn, *args, **kwargs):
        return self.inner(attn, *args, **kwargs)


@reliability(
    "attention patched by another tool",
    "processor taking only *args/**kwargs",
    "TypeError at nag.apply naming the module and how to restore diffusers' processors",
)
def test_opaque_foreign_processor_is_refused(record_property):
    pipe = tp.FACTORIES["sd"]()
    for module in _cross_attention_modules(pipe.unet):
        module.set_processor(_OpaqueProcessor(module.processor))
    before = state_of(pipe)
    with pytest.raises(
        TypeError,
        match=r"_OpaqueProcessor that takes no named \['hidden_states', "
        r"'encoder_hidden_states'\].*set_default_attn_processor",
    ) as info:
        nag.apply(pipe, NEGATIVE)
    observe(record_property, info.value)
    assert state_of(pipe) == before


@reliability("attention patched by another tool", "processor that is not callable", "TypeError at nag.apply")
def test_non_callable_processor_is_refused(record_property):
    pipe = tp.FACTORIES["sd"]()
    module = _cross_attention_modules(pipe.unet)[0]
    module.processor = object()
    with pytest.raises(TypeError, match="not callable") as info:
        nag.apply(pipe, NEGATIVE)
    observe(record_property, info.value)


@reliability(
    "attention patched by another tool",
    "processor keeping the stock signature (a subclass that also records calls)",
    "works: same output as NAG over diffusers' processor",
)
@pytest.mark.parametrize("name", ["sd", "flux"])
def test_foreign_processor_with_the_stock_signature_works(name):
    pipe = tp.FACTORIES[name]()
    model = tp.denoiser(pipe)
    with nag.apply(pipe, NEGATIVE, **SETTINGS):
        reference = generate(pipe, name)
    calls = []
    for module_name, module in model.named_modules():
        processor = getattr(module, "processor", None)
        if processor is None or not (module_name.endswith("attn2") or module_name.endswith(".attn")):
            continue
        stock_cls = type(processor)

        class Recording(stock_cls):  # another tool's processor: same signature, calls the stock code
            def __call__(self, attn, *args, **kwargs):
                calls.append(1)
                return super().__call__(attn, *args, **kwargs)

            __call__.__signature__ = inspect.signature(stock_cls.__call__)  # as functools.wraps would

        module.set_processor(Recording())
    stock_with_tool = generate(pipe, name, cfg=False)
    with nag.apply(pipe, NEGATIVE, **SETTINGS) as handle:
        out = generate(pipe, name)
        assert handle.guided_calls == 2
    assert calls  # the foreign processors ran
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(generate(pipe, name, cfg=False), stock_with_tool, rtol=0, atol=0)  # still installed


@reliability(
    "attention patched by another tool",
    "processors replaced after nag.apply (set_attn_processor)",
    "RuntimeError at the next generation: remove, set the processors, apply again",
)
def test_processors_replaced_after_apply(record_property):
    from diffusers.models.attention_processor import AttnProcessor2_0

    pipe = tp.FACTORIES["sd"]()
    handle = nag.apply(pipe, NEGATIVE, **SETTINGS)
    pipe.unet.set_attn_processor(AttnProcessor2_0())
    with pytest.raises(RuntimeError, match=r"was replaced after nag.apply.*nag.remove\(pipe\)") as info:
        generate(pipe, "sd")
    observe(record_property, info.value)
    handle.remove()
    nag.apply(pipe, NEGATIVE, **SETTINGS).remove()  # after removal, applying again works


class _ManualProjectionProcessor:
    """A processor with the stock signature that applies the output projection by hand
    (``F.linear`` on the weights) instead of calling ``attn.to_out[0]``."""

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs
    ):
        import torch.nn.functional as F

        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch = hidden_states.shape[0]
        q = attn.to_q(hidden_states).view(batch, -1, attn.heads, attn.inner_dim // attn.heads).transpose(1, 2)
        k = attn.to_k(context).view(batch, -1, attn.heads, attn.inner_dim // attn.heads).transpose(1, 2)
        v = attn.to_v(context).view(batch, -1, attn.heads, attn.inner_dim // attn.heads).transpose(1, 2)
        z = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, -1, attn.inner_dim)
        projection = attn.to_out[0]
        out = F.linear(z, projection.weight, projection.bias)
        return attn.to_out[1](out) / attn.rescale_output_factor


@reliability(
    "attention patched by another tool",
    "processor with the stock signature that never calls attn.to_out[0]",
    "a clear error (NAG cannot see the attention output to guide it)",
)
def test_processor_that_skips_the_output_projection():
    pipe = tp.FACTORIES["sd"]()
    for module in _cross_attention_modules(pipe.unet):
        module.set_processor(_ManualProjectionProcessor())
    stock = generate(pipe, "sd")
    with nag.apply(pipe, NEGATIVE, **SETTINGS):
        with pytest.raises(RuntimeError, match="to_out"):
            out = generate(pipe, "sd")
            assert not torch.equal(out, stock), "NAG silently did nothing"
