"""A NAG-enabled denoiser under torch.compile gives the eager NAG result, in either order: a UNet, and models whose
text projection NAG runs on the negative tokens once per generation (PixArt with its text mask, Wan), and FLUX.1 (its
single blocks carry the negative text in their sequence)."""

from __future__ import annotations

import pytest
import tiny_pipelines as tp
import torch

import nag

PROMPTS = ["a red circle on a blue background", "a small green square"]


def generate(pipe, name="sd"):
    kwargs = tp.no_cfg_kwargs(name, num_inference_steps=3)
    out = pipe(prompt=PROMPTS, generator=torch.Generator("cpu").manual_seed(0), **kwargs)
    return tp.output_tensor(out)


@pytest.mark.parametrize("name", ["sd", "pixart_sigma", "wan", "flux"])
@pytest.mark.parametrize("order", ["compile-then-apply", "apply-then-compile"])
def test_compiled_denoiser(order, name):
    torch._dynamo.reset()
    pipe = tp.FACTORIES[name]()
    attribute = "unet" if name == "sd" else "transformer"
    stock = generate(pipe, name)
    with nag.apply(pipe, "blurry, watermark", scale=3.0, alpha=0.5):
        eager = generate(pipe, name)
    assert (eager - stock).abs().max() > 1e-3

    if order == "compile-then-apply":
        setattr(pipe, attribute, torch.compile(getattr(pipe, attribute), backend="aot_eager"))
        handle = nag.apply(pipe, "blurry, watermark", scale=3.0, alpha=0.5)
    else:
        handle = nag.apply(pipe, "blurry, watermark", scale=3.0, alpha=0.5)
        getattr(pipe, attribute).compile(backend="aot_eager")
    compiled = generate(pipe, name)
    assert handle.guided_calls == 3
    handle.remove()
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-5)
    torch.testing.assert_close(generate(pipe, name), stock, rtol=0, atol=1e-5)  # the compiled model still works
    torch._dynamo.reset()


def test_compiled_denoiser_with_the_compiled_combine(monkeypatch, caplog):
    """With the combine's own compiled code on (NAG_EAGER unset), a denoiser the user compiles gives the eager NAG
    result: inside the user's trace the combine's eager code is traced (no compile nested in a compile, no
    fallback warning)."""
    torch._dynamo.reset()
    pipe = tp.FACTORIES["sd"]()
    with nag.apply(pipe, "blurry, watermark", scale=3.0, alpha=0.5):
        eager = generate(pipe)
    monkeypatch.delenv("NAG_EAGER", raising=False)
    monkeypatch.setattr("nag.compiled.MIN_ELEMENTS", 0)  # (the tiny model's calls would run eager anyway)
    pipe.unet = torch.compile(pipe.unet, backend="aot_eager")
    with caplog.at_level("WARNING", logger="nag"), nag.apply(pipe, "blurry, watermark", scale=3.0, alpha=0.5):
        compiled = generate(pipe)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-5)
    assert not [r for r in caplog.records if "compiling" in r.getMessage()]
    torch._dynamo.reset()


def test_compiling_the_denoiser_traces_none_of_nags_own_hooks():
    """NAG's denoiser hooks (its per-generation state, the calling thread) run eagerly inside a compiled denoiser:
    torch.compile neither traces them nor warns about what it cannot trace there."""
    import warnings

    torch._dynamo.reset()
    pipe = tp.FACTORIES["sd"]()
    pipe.unet = torch.compile(pipe.unet, backend="aot_eager")
    with warnings.catch_warnings(record=True) as caught, nag.apply(pipe, "blurry, watermark"):
        warnings.simplefilter("always")
        generate(pipe)
    assert not [w for w in caught if "Dynamo" in str(w.message)], [str(w.message)[:120] for w in caught]
    torch._dynamo.reset()
