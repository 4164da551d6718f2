"""NAG with adapters users load into a pipeline: IP-Adapter (SD, SDXL, Flux) and its processors.

An IP-Adapter makes the UNet pass its cross-attention ``(text, [image embeddings])`` and puts
``IPAdapterAttnProcessor2_0`` on every ``attn2``. NAG guides the text only: the image-prompt attention is added to the
combined text attention as the processor adds it, unguided. On Flux, ``FluxIPAdapterAttnProcessor`` on the double
blocks returns the image queries' attention to the image-prompt tokens, which the block adds after its MLP: NAG guides
the joint text attention and passes that term through, unguided. The tiny models get an IP-Adapter with random weights
built from shapes (no checkpoint); the image embeddings are passed as ``ip_adapter_image_embeds``.
"""

from __future__ import annotations

from functools import cache

import naive_nag
import pytest
import test_pipelines as tpl
import tiny_pipelines as tp
import torch

import nag
from nag.attention.joint import image_prompt_term as _image_prompt_term

IMAGE_EMBED_WIDTH = 16


def reliability(case: str, expect: str):
    return pytest.mark.reliability(area="composition", case=case, expect=expect)


def random_image_projection(width: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """An IP-Adapter checkpoint's ``image_proj``: the image embedding to 4 tokens of ``width``, layer-normed."""
    return {
        "proj.weight": torch.randn(width * 4, IMAGE_EMBED_WIDTH, generator=g) * 0.2,
        "proj.bias": torch.zeros(width * 4),
        "norm.weight": torch.ones(width),
        "norm.bias": torch.zeros(width),
    }


def add_ip_adapter(pipe, seed: int = 5):
    """Load an IP-Adapter with random weights into ``pipe.unet`` the way ``load_ip_adapter`` does (its state dict
    layout: an image projection, and ``to_k_ip``/``to_v_ip`` for each cross-attention processor in order)."""
    unet = pipe.unet
    width, channels = unet.config.cross_attention_dim, unet.config.block_out_channels
    g = torch.Generator().manual_seed(seed)
    image_proj = random_image_projection(width, g)
    weights, key = {}, 1
    for name in unet.attn_processors:
        if not name.endswith("attn2.processor"):
            continue
        if name.startswith("mid_block"):
            hidden = channels[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(channels))[int(name[len("up_blocks.")])]
        else:
            hidden = channels[int(name[len("down_blocks.")])]
        weights[f"{key}.to_k_ip.weight"] = torch.randn(hidden, width, generator=g) * 0.3
        weights[f"{key}.to_v_ip.weight"] = torch.randn(hidden, width, generator=g) * 0.3
        key += 2
    unet._load_ip_adapter_weights([{"image_proj": image_proj, "ip_adapter": weights}], low_cpu_mem_usage=False)
    return pipe


@cache
def ip_pipeline(name):
    return add_ip_adapter(tp.FACTORIES[name]())


def image_embeds(cfg: bool = True) -> list[torch.Tensor]:
    """``ip_adapter_image_embeds``: one image prompt (the pipeline repeats it for every prompt and image; under CFG it
    expects ``[negative, positive]`` stacked)."""
    positive = torch.randn(1, 1, IMAGE_EMBED_WIDTH, generator=torch.Generator().manual_seed(3))
    return [torch.cat([torch.zeros_like(positive), positive]) if cfg else positive]


def generate(pipe, name, **overrides):
    return tpl.generate(pipe, name, ip_adapter_image_embeds=image_embeds(), **overrides)


def record(pipe, name, **overrides):
    return tpl.record_calls(pipe.unet, generate, pipe, name, **overrides)


@reliability("IP-Adapter on SD / SDXL", "text guided, image prompt unguided; agrees with the naive reference")
@pytest.mark.parametrize("fast", [True, False], ids=["fast", "straightforward"])
@pytest.mark.parametrize("name", ["sd", "sdxl"])
def test_ip_adapter_agrees_with_naive_reference(name, fast):
    pipe = ip_pipeline(name)
    model = pipe.unet
    _, stock_calls = record(pipe, name)
    inputs = stock_calls[0]["inputs"]
    assert inputs["added_cond_kwargs"]["image_embeds"] is not None
    with torch.no_grad():  # the reference's IP-Adapter processor reproduces the stock one
        torch.testing.assert_close(
            tpl.naive_output(name, model, inputs, None), stock_calls[0]["output"], rtol=1e-4, atol=1e-5
        )
    negative = tpl.random_negative(name, inputs, 5, rows=2)
    with nag.apply(pipe, **negative, **tpl.SETTINGS, fast=fast) as handle:
        _, calls = record(pipe, name)
        assert handle.guided_calls == 2
    with torch.no_grad():
        for call in calls:
            cond_rows = tpl.cond_rows_of(name, 0, call["output"].shape[0])
            expected = tpl.naive_output(name, model, call["inputs"], negative, cond_rows)
            torch.testing.assert_close(call["output"], expected, rtol=1e-4, atol=1e-5)
            unguided = tpl.naive_output(name, model, call["inputs"], None)
            assert not torch.allclose(call["output"][cond_rows], unguided[cond_rows], atol=1e-3)


@reliability("IP-Adapter on SD / SDXL", "off is bit-identical; a negative equal to the prompt is unguided")
@pytest.mark.parametrize("fast", [True, False], ids=["fast", "straightforward"])
@pytest.mark.parametrize("name", ["sd", "sdxl"])
def test_ip_adapter_invariants(name, fast):
    pipe = ip_pipeline(name)
    reference = generate(pipe, name)
    with nag.apply(pipe, tpl.NEGATIVE, scale=1.0, fast=fast):
        assert torch.equal(generate(pipe, name), reference)
    with nag.apply(pipe, list(tpl.PROMPTS), **tpl.SETTINGS, fast=fast) as handle:
        same = generate(pipe, name)
        assert handle.guided_calls >= 2
    torch.testing.assert_close(same, reference, rtol=0, atol=1e-5)
    with nag.apply(pipe, tpl.NEGATIVE, **tpl.SETTINGS, fast=fast):
        assert not torch.allclose(generate(pipe, name), reference, atol=1e-3)
    assert torch.equal(generate(pipe, name), reference)


@reliability("IP-Adapter on SD / SDXL", "the image prompt keeps its effect under NAG; its scale is honoured")
def test_ip_adapter_scale_is_honoured_under_nag():
    """The image-prompt term is the processor's: its scale still steers the output, also with NAG applied; at scale
    0 the output is NAG's on the text alone."""
    name = "sd"
    pipe = ip_pipeline(name)
    try:
        with nag.apply(pipe, tpl.NEGATIVE, **tpl.SETTINGS):
            with_image = generate(pipe, name)
            pipe.set_ip_adapter_scale(0.0)
            without_image = generate(pipe, name)
    finally:
        pipe.set_ip_adapter_scale(1.0)
    assert not torch.allclose(with_image, without_image, atol=1e-3)
    plain = tp.FACTORIES[name]()  # the same UNet weights without an IP-Adapter
    with nag.apply(plain, tpl.NEGATIVE, **tpl.SETTINGS):
        text_only = tpl.generate(plain, name)
    torch.testing.assert_close(without_image, text_only, rtol=0, atol=1e-5)


@reliability("IP-Adapter on SD / SDXL", "a processor that cannot take the image prompt: refused at nag.apply")
def test_ip_adapter_with_foreign_processor_is_refused_at_apply():
    from diffusers.models.attention_processor import AttnProcessor2_0

    pipe = add_ip_adapter(tp.FACTORIES["sd"]())
    name, module = next((n, m) for n, m in pipe.unet.named_modules() if n.endswith("attn2"))
    module.set_processor(AttnProcessor2_0())
    before = tpl.state_of(pipe)
    expected = rf"IP-Adapter.*`unet\.{name}` has a AttnProcessor2_0.*load_ip_adapter"
    with pytest.raises(NotImplementedError, match=expected):
        nag.apply(pipe, tpl.NEGATIVE)
    assert tpl.state_of(pipe) == before


@reliability("IP-Adapter on SD / SDXL", "pipe.load_ip_adapter / unload_ip_adapter while NAG is applied: clear error")
@pytest.mark.parametrize("method", ["load_ip_adapter", "unload_ip_adapter"])
def test_ip_adapter_loading_while_applied_is_refused(method, record_property):
    pipe = ip_pipeline("sd")
    reference = generate(pipe, "sd")
    with nag.apply(pipe, tpl.NEGATIVE, **tpl.SETTINGS):
        with pytest.raises(RuntimeError, match=rf"pipe\.{method} replaces .* nag\.remove\(pipe\) first") as error:
            getattr(pipe, method)() if method == "unload_ip_adapter" else pipe.load_ip_adapter("any", "", "any")
        record_property("observed", str(error.value))
    assert torch.equal(generate(pipe, "sd"), reference)  # IP-Adapter still loaded, NAG gone


@reliability("IP-Adapter on SD / SDXL", "the processor's weights follow the UNet (dtype/device) while NAG is applied")
def test_ip_adapter_weights_follow_the_unet():
    pipe = add_ip_adapter(tp.FACTORIES["sd"]())
    processor = next(p for p in pipe.unet.attn_processors.values() if hasattr(p, "to_k_ip"))
    with nag.apply(pipe, tpl.NEGATIVE, **tpl.SETTINGS):
        pipe.to(torch.float64)  # the IP-Adapter processors are not in the module tree while wrapped
        out = generate(pipe, "sd", output_type="latent")
    assert processor.to_k_ip[0].weight.dtype == torch.float64
    assert out.dtype == torch.float64 and torch.isfinite(out).all()


def add_flux_ip_adapter(pipe, seed: int = 5):
    """Load an IP-Adapter with random weights into ``pipe.transformer`` the way ``load_ip_adapter`` does (its state
    dict layout: an image projection to 4 tokens of the text width, ``to_k_ip``/``to_v_ip`` for each double block):
    ``FluxIPAdapterAttnProcessor`` on the double blocks, ``encoder_hid_proj`` projecting the image embeddings."""
    model = pipe.transformer
    width, inner = model.config.joint_attention_dim, model.inner_dim
    g = torch.Generator().manual_seed(seed)
    image_proj = random_image_projection(width, g)
    weights = {}
    for index in range(len(model.transformer_blocks)):
        for kind in ("k", "v"):
            weights[f"{index}.to_{kind}_ip.weight"] = torch.randn(inner, width, generator=g) * 0.3
            weights[f"{index}.to_{kind}_ip.bias"] = torch.randn(inner, generator=g) * 0.1
    model._load_ip_adapter_weights([{"image_proj": image_proj, "ip_adapter": weights}], low_cpu_mem_usage=False)
    return pipe


def flux_generate(pipe, **overrides):
    """Two prompts, true CFG (a second, unguided call a step), one image prompt; under true CFG FluxPipeline also
    wants the negative branch's image prompt (zeros here, as it would encode a blank image)."""
    positive = torch.randn(1, 1, IMAGE_EMBED_WIDTH, generator=torch.Generator().manual_seed(3))
    return tpl.generate(pipe, "flux", ip_adapter_image_embeds=[positive],
                        negative_ip_adapter_image_embeds=[torch.zeros_like(positive)], **overrides)


def naive_flux_with_image_prompt(model, inputs, negative, cond_rows):
    """The naive Flux reference of one recorded call, its image-prompt tokens projected as the model projects them."""
    embeds = inputs["joint_attention_kwargs"]["ip_adapter_image_embeds"]
    keys = ("negative_prompt_embeds", "negative_pooled_prompt_embeds")
    return naive_nag.naive_flux_forward(
        model, inputs["hidden_states"], inputs["encoder_hidden_states"], inputs["pooled_projections"],
        inputs["timestep"], inputs["img_ids"], inputs["txt_ids"], inputs.get("guidance"),
        *(negative[key] if negative else None for key in keys),
        None, cond_rows=cond_rows, ip_hidden_states=model.encoder_hid_proj(embeds), p=1, **tpl.SETTINGS,
    )


@reliability("IP-Adapter on Flux", "text guided, image prompt unguided; agrees with the naive reference")
@pytest.mark.parametrize("fast", [True, False], ids=["fast", "straightforward"])
def test_flux_ip_adapter_agrees_with_naive_reference(fast, monkeypatch):
    from nag.attention import joint

    terms = []  # the fast path computes the image-prompt term itself (no fallback to the straightforward path)
    monkeypatch.setattr(joint, "image_prompt_term", lambda *a: terms.append(1) or _image_prompt_term(*a))
    pipe = add_flux_ip_adapter(tp.FACTORIES["flux"]())
    model = pipe.transformer
    _, stock_calls = tpl.record_calls(model, flux_generate, pipe)
    inputs = stock_calls[0]["inputs"]
    assert inputs["hidden_states"].shape[0] == 2
    with torch.no_grad():  # the reference's image-prompt term reproduces the stock processor's
        torch.testing.assert_close(naive_flux_with_image_prompt(model, inputs, None, None), stock_calls[0]["output"],
                                   rtol=1e-4, atol=1e-5)
    negative = tpl.random_negative("flux", inputs, 5, rows=2)
    with nag.apply(pipe, **negative, **tpl.SETTINGS, fast=fast) as handle:
        _, calls = tpl.record_calls(model, flux_generate, pipe)
        assert handle.guided_calls == 2  # the conditional call of each of the 2 steps; true CFG's calls stock
    assert len(calls) == 4 and len(terms) == (2 * len(model.transformer_blocks) if fast else 0)
    with torch.no_grad():
        for index, call in enumerate(calls):
            cond_rows = tpl.cond_rows_of("flux", index, 2)
            expected = naive_flux_with_image_prompt(model, call["inputs"], cond_rows and negative, cond_rows)
            torch.testing.assert_close(call["output"], expected, rtol=1e-4, atol=1e-5)
            if cond_rows is not None:
                unguided = naive_flux_with_image_prompt(model, call["inputs"], None, None)
                assert not torch.allclose(call["output"], unguided, atol=1e-3)


@reliability("IP-Adapter on Flux", "off is bit-identical; a negative equal to the prompt is unguided")
@pytest.mark.parametrize("fast", [True, False], ids=["fast", "straightforward"])
def test_flux_ip_adapter_invariants(fast):
    pipe = add_flux_ip_adapter(tp.FACTORIES["flux"]())
    reference = flux_generate(pipe)
    with nag.apply(pipe, tpl.NEGATIVE, scale=1.0, fast=fast):
        assert torch.equal(flux_generate(pipe), reference)
    with nag.apply(pipe, list(tpl.PROMPTS), **tpl.SETTINGS, fast=fast) as handle:
        same = flux_generate(pipe)
        assert handle.guided_calls == 2
    torch.testing.assert_close(same, reference, rtol=0, atol=1e-5)
    with nag.apply(pipe, tpl.NEGATIVE, **tpl.SETTINGS, fast=fast):
        assert not torch.allclose(flux_generate(pipe), reference, atol=1e-3)
    assert torch.equal(flux_generate(pipe), reference)


@reliability("IP-Adapter on Flux", "the image prompt keeps its effect under NAG; its scale is honoured")
@pytest.mark.parametrize("fast", [True, False], ids=["fast", "straightforward"])
def test_flux_ip_adapter_scale_is_honoured_under_nag(fast):
    """At IP scale 0 the output is NAG's on the text alone (the same transformer without an IP-Adapter)."""
    pipe = add_flux_ip_adapter(tp.FACTORIES["flux"]())
    with nag.apply(pipe, tpl.NEGATIVE, **tpl.SETTINGS, fast=fast):
        with_image = flux_generate(pipe)
        pipe.set_ip_adapter_scale(0.5)
        half = flux_generate(pipe)
        pipe.set_ip_adapter_scale(0.0)
        without_image = flux_generate(pipe)
    assert not torch.allclose(with_image, half, atol=1e-3)
    assert not torch.allclose(half, without_image, atol=1e-3)
    plain = tp.FACTORIES["flux"]()  # the same transformer weights without an IP-Adapter
    with nag.apply(plain, tpl.NEGATIVE, **tpl.SETTINGS, fast=fast):
        text_only = tpl.generate(plain, "flux")
    torch.testing.assert_close(without_image, text_only, rtol=0, atol=1e-5)
