"""NAG with what users combine it with: control models, LoRA, VAE tiling, step callbacks, several images per prompt,
perturbed-attention guidance.

For each combination, on tiny random-weight pipelines (a batch of two prompts, classifier-free guidance on): it runs,
NAG off (scale 1) is bit-identical to stock, a negative equal to the prompt gives the unguided output, a real negative
moves the output, and removing NAG leaves the pipeline stock. The control models get random output projections (as
built from a UNet or transformer they start at zero and would have no effect); each test checks the feature has one.
"""

from __future__ import annotations

from functools import cache

import pytest
import test_pipelines as tpl
import tiny_pipelines as tp
import torch

import nag

CONTROL_IMAGE = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def reliability(case: str, expect: str):
    return pytest.mark.reliability(area="composition", case=case, expect=expect)


def check_guides(pipe, name, fast=True, **overrides):
    """The four invariants with ``overrides`` on every call; returns the stock output."""
    reference = tpl.generate(pipe, name, **overrides)
    with nag.apply(pipe, tpl.NEGATIVE, scale=1.0, fast=fast):
        assert torch.equal(tpl.generate(pipe, name, **overrides), reference)
    with nag.apply(pipe, list(tpl.PROMPTS), **tpl.SETTINGS, fast=fast) as handle:
        same = tpl.generate(pipe, name, **overrides)
        assert handle.guided_calls == 2
    torch.testing.assert_close(same, reference, rtol=0, atol=1e-5)
    with nag.apply(pipe, tpl.NEGATIVE, **tpl.SETTINGS, fast=fast) as handle:
        guided = tpl.generate(pipe, name, **overrides)
        assert handle.guided_calls == 2
    assert torch.isfinite(guided).all() and (guided - reference).abs().max() > 1e-3
    assert torch.equal(tpl.generate(pipe, name, **overrides), reference)
    return reference


def _randomize(model: torch.nn.Module, marker: str, seed: int = 0) -> torch.nn.Module:
    """Random weights for the zero-initialised output projections of a control model (names containing ``marker``)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter_name, parameter in model.named_parameters():
            if marker in parameter_name:
                parameter.copy_(torch.randn(parameter.shape, generator=g) * 0.3)
    return model.eval()


def _components(pipe, *drop: str) -> dict:
    return {k: v for k, v in pipe.components.items() if k not in ("image_encoder", *drop)}


@cache
def controlnet_pipeline(name: str):
    from diffusers import (
        ControlNetModel,
        FluxControlNetModel,
        FluxControlNetPipeline,
        StableDiffusionControlNetPipeline,
        StableDiffusionXLControlNetPipeline,
    )

    base = tp.FACTORIES[name]()
    if name == "flux":
        config = base.transformer.config
        controlnet = FluxControlNetModel.from_transformer(
            base.transformer, num_layers=1, num_single_layers=1, attention_head_dim=config.attention_head_dim,
            num_attention_heads=config.num_attention_heads,
        )
        pipe = FluxControlNetPipeline(
            **_components(base, "feature_extractor"), controlnet=_randomize(controlnet, "controlnet_")
        )
    else:
        # (one downsampling step in the hint encoder: 16 pixels -> the tiny UNet's 8x8 latents)
        controlnet = ControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels=(4, 8))
        cls = StableDiffusionControlNetPipeline if name == "sd" else StableDiffusionXLControlNetPipeline
        extra = {"add_watermarker": False, "feature_extractor": None} if name == "sdxl" else {}
        pipe = cls(**{**_components(base), **extra}, controlnet=_randomize(controlnet, "controlnet_"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def control_kwargs(name: str, scale: float = 1.0) -> dict:
    image = {"control_image": CONTROL_IMAGE} if name == "flux" else {"image": CONTROL_IMAGE}
    return {**image, "controlnet_conditioning_scale": scale}


@reliability("ControlNet (SD, SDXL, Flux)", "the hints act under NAG; the four invariants hold; SD/SDXL's defaults")
@pytest.mark.parametrize("name", ["sd", "sdxl", "flux"])
def test_controlnet(name, caplog):
    pipe = controlnet_pipeline(name)
    reference = check_guides(pipe, name, **control_kwargs(name))
    assert (tpl.generate(pipe, name, **control_kwargs(name, 0.0)) - reference).abs().max() > 1e-3
    # registered with the base pipeline's tuned defaults (not the generic path)
    assert nag.families.pipeline_spec(pipe).defaults == nag.families.pipeline_spec(tpl.pipeline(name)).defaults
    assert "no tuned defaults" not in caplog.text


@reliability("SDXL ControlNet: encode_prompt's outputs as precomputed negatives", "accepted; the images of the text")
def test_sdxl_controlnet_precomputed_negatives():
    pipe = controlnet_pipeline("sdxl")
    overrides = control_kwargs("sdxl")
    with nag.apply(pipe, tpl.NEGATIVE, **tpl.SETTINGS):
        expected = tpl.generate(pipe, "sdxl", **overrides)
    embeds, _, pooled, _ = pipe.encode_prompt([tpl.NEGATIVE] * 2, do_classifier_free_guidance=False)
    with nag.apply(pipe, negative_prompt_embeds=embeds, negative_pooled_prompt_embeds=pooled, **tpl.SETTINGS):
        torch.testing.assert_close(tpl.generate(pipe, "sdxl", **overrides), expected, rtol=1e-5, atol=1e-5)


@cache
def adapter_pipeline():
    """SD with a T2I-Adapter. The diffusers UNet adds an adapter feature after a down block's first attention, or after
    the whole block (past its downsampler) when it has none: the tiny UNet gets cross-attention in its first block so
    that the adapter's features (8x8, then 4x4) meet the latents at their sizes."""
    from diffusers import StableDiffusionAdapterPipeline, T2IAdapter, UNet2DConditionModel

    base = tp.FACTORIES["sd"]()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=(2, 4), norm_num_groups=8,
    ).eval()
    adapter = T2IAdapter(in_channels=3, channels=[16, 32], num_res_blocks=1, downscale_factor=2).eval()
    pipe = StableDiffusionAdapterPipeline(**_components(base, "unet"), unet=unet, adapter=adapter)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@reliability("T2I-Adapter (SD)", "the adapter's features act under NAG; the four invariants hold")
def test_t2i_adapter():
    pipe = adapter_pipeline()
    images = CONTROL_IMAGE.repeat(2, 1, 1, 1)  # (this pipeline takes one control image per prompt)
    reference = check_guides(pipe, "sd", image=images)
    without = tpl.generate(pipe, "sd", image=images, adapter_conditioning_scale=0.0)
    assert (without - reference).abs().max() > 1e-3


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)


@cache
def lora_pipeline():
    """SD with two random LoRA adapters on every attention projection, ``a`` active."""
    pipe = tp.FACTORIES["sd"]()
    for seed, adapter in enumerate(("a", "b")):
        torch.manual_seed(seed)
        pipe.unet.add_adapter(lora_config(), adapter_name=adapter)
    pipe.set_adapters(["a"])
    return pipe


def lora_state_dict(pipe, adapter: str, factor: float = 1.0) -> dict[str, torch.Tensor]:
    """An adapter's weights in the layout ``load_lora_weights`` takes (``lora_B`` scaled by ``factor``)."""
    from peft.utils import get_peft_model_state_dict

    weights = get_peft_model_state_dict(pipe.unet, adapter_name=adapter)
    return {f"unet.{k}": v * (factor if "lora_B" in k else 1.0) for k, v in weights.items()}


class _LoraDisabled:
    """The pipeline's LoRA layers off for the block, back on after it (also on a failure)."""

    def __init__(self, pipe):
        self.pipe = pipe

    def __enter__(self):
        self.pipe.disable_lora()

    def __exit__(self, *exc):
        self.pipe.enable_lora()


@reliability("LoRA (peft) on SD", "the LoRA acts under NAG (fast and straightforward paths); the four invariants hold")
@pytest.mark.parametrize("fast", [True, False], ids=["fast", "straightforward"])
def test_lora(fast):
    pipe = lora_pipeline()
    reference = check_guides(pipe, "sd", fast=fast)
    with _LoraDisabled(pipe):
        assert (tpl.generate(pipe, "sd") - reference).abs().max() > 1e-3


@reliability(
    "LoRA: set_adapters / weights / disable_lora / fuse_lora while NAG is applied",
    "each state's output is stock's for it (negative = prompt); NAG keeps guiding",
)
def test_lora_switching_while_applied():
    pipe = lora_pipeline()
    states = {
        "a": lambda: pipe.set_adapters(["a"]),
        "b": lambda: pipe.set_adapters(["b"]),
        "a+b": lambda: pipe.set_adapters(["a", "b"], [0.5, 0.7]),
        "none": pipe.disable_lora,
    }
    try:
        stock = {}
        for label, enter in states.items():
            enter()
            stock[label] = tpl.generate(pipe, "sd")
            pipe.enable_lora()
        assert len({round(float(v.sum()), 4) for v in stock.values()}) == len(stock)  # each state differs
        pipe.set_adapters(["a"])
        with nag.apply(pipe, list(tpl.PROMPTS), **tpl.SETTINGS) as handle:
            for label, enter in states.items():
                enter()
                torch.testing.assert_close(tpl.generate(pipe, "sd"), stock[label], rtol=0, atol=1e-5)
                pipe.enable_lora()
            pipe.set_adapters(["a"])
            pipe.fuse_lora()
            fused = tpl.generate(pipe, "sd")
            pipe.unfuse_lora()
            assert handle.guided_calls == 2
        torch.testing.assert_close(fused, stock["a"], rtol=0, atol=1e-5)
        with nag.apply(pipe, tpl.NEGATIVE, **tpl.SETTINGS):
            pipe.set_adapters(["b"])
            assert (tpl.generate(pipe, "sd") - stock["b"]).abs().max() > 1e-3
    finally:
        pipe.enable_lora()
        pipe.set_adapters(["a"])


@reliability(
    "LoRA: load_lora_weights and hot-swap (hotswap=True) while NAG is applied",
    "the new weights act at the next generation; negative = prompt gives their stock output",
)
def test_lora_loading_and_hotswap_while_applied():
    weights = lora_state_dict(lora_pipeline(), "b")
    swapped = lora_state_dict(lora_pipeline(), "b", factor=-2.0)
    pipe = tp.FACTORIES["sd"]()
    pipe.enable_lora_hotswap(target_rank=8)
    pipe.load_lora_weights(dict(weights), adapter_name="h")
    first = tpl.generate(pipe, "sd")
    pipe.load_lora_weights(dict(swapped), adapter_name="h", hotswap=True)
    second = tpl.generate(pipe, "sd")
    assert (first - second).abs().max() > 1e-3
    pipe.load_lora_weights(dict(weights), adapter_name="h", hotswap=True)
    with nag.apply(pipe, list(tpl.PROMPTS), **tpl.SETTINGS):
        torch.testing.assert_close(tpl.generate(pipe, "sd"), first, rtol=0, atol=1e-5)
        pipe.load_lora_weights(dict(swapped), adapter_name="h", hotswap=True)
        torch.testing.assert_close(tpl.generate(pipe, "sd"), second, rtol=0, atol=1e-5)
        pipe.load_lora_weights(dict(weights), adapter_name="new")  # a further adapter, loaded while applied
        pipe.set_adapters(["new"])
        torch.testing.assert_close(tpl.generate(pipe, "sd"), first, rtol=0, atol=1e-5)
    check_guides(pipe, "sd")


@reliability("VAE tiling (pipe.vae.enable_tiling)", "the four invariants hold (the VAE is not NAG's)")
def test_vae_tiling():
    pipe = tp.FACTORIES["sd"]()
    untiled = tpl.generate(pipe, "sd")
    pipe.vae.enable_tiling()
    pipe.vae.tile_sample_min_size, pipe.vae.tile_latent_min_size = 8, 4  # tiles smaller than the tiny 16px images
    reference = check_guides(pipe, "sd")
    assert (reference - untiled).abs().max() > 1e-3  # tiling took effect


def _edit_latents(pipe, step, timestep, tensors):
    return {"latents": tensors["latents"] * 0.8 + 0.1}


@reliability("callback_on_step_end that edits the latents", "the four invariants hold; every step is guided")
@pytest.mark.parametrize("name", ["sd", "flux"])
def test_callback_editing_latents(name):
    pipe = tpl.pipeline(name)
    edit = dict(callback_on_step_end=_edit_latents, callback_on_step_end_tensor_inputs=["latents"])
    reference = check_guides(pipe, name, **edit)
    assert (reference - tpl.stock(name)).abs().max() > 1e-3


@reliability("callback_on_step_end that interrupts (pipe._interrupt)", "the next generation is guided from its start")
def test_callback_interrupt_then_next_generation():
    pipe = tpl.pipeline("sd")
    reference = tpl.stock("sd")

    def interrupt(pipe_, step, timestep, tensors):
        pipe_._interrupt = True
        return {}

    with nag.apply(pipe, list(tpl.PROMPTS), **tpl.SETTINGS) as handle:
        tpl.generate(pipe, "sd", callback_on_step_end=interrupt)
        assert handle.guided_calls == 1
        torch.testing.assert_close(tpl.generate(pipe, "sd"), reference, rtol=0, atol=1e-5)
        assert handle.guided_calls == 2
    with nag.apply(pipe, tpl.NEGATIVE, **tpl.SETTINGS) as handle:
        tpl.generate(pipe, "sd", callback_on_step_end=interrupt)
        guided = tpl.generate(pipe, "sd")
    with nag.apply(pipe, tpl.NEGATIVE, **tpl.SETTINGS):
        assert torch.equal(tpl.generate(pipe, "sd"), guided)


@reliability(
    "callback_on_step_end that replaces prompt_embeds mid-generation",
    "known limit: NAG guides the rows carrying the encoded prompt, so steps after the swap run unguided",
)
def test_callback_replacing_prompt_embeds(record_property):
    pipe = tpl.pipeline("sd")
    embeds, negative = pipe.encode_prompt(["a tall yellow tree", "a dog"], "cpu", 1, True, ["deformed"] * 2)
    swap = torch.cat([negative, embeds])

    def replace_prompt(pipe_, step, timestep, tensors):
        return {"prompt_embeds": swap}

    edit = dict(callback_on_step_end=replace_prompt, callback_on_step_end_tensor_inputs=["prompt_embeds"])
    reference = tpl.generate(pipe, "sd", **edit)
    with nag.apply(pipe, tpl.NEGATIVE, scale=1.0):
        assert torch.equal(tpl.generate(pipe, "sd", **edit), reference)
    with nag.apply(pipe, tpl.NEGATIVE, **tpl.SETTINGS) as handle:
        guided = tpl.generate(pipe, "sd", **edit)
        assert handle.guided_calls == 1  # the first step only: the later text matches no encoded prompt
    assert (guided - reference).abs().max() > 1e-3
    record_property("observed", f"guided denoiser calls: {handle.guided_calls} of 2")


@reliability(
    "num_images_per_prompt=2 with two prompts and one negative per prompt",
    "each image is guided by its own prompt's negative",
)
@pytest.mark.parametrize("name", ["sd", "flux", "sd3"])
def test_images_per_prompt_follow_their_prompts_negative(name):
    pipe = tpl.pipeline(name)
    reference = tpl.generate(pipe, name, num_images_per_prompt=2)
    assert reference.shape[0] == 4
    with nag.apply(pipe, [tpl.PROMPTS[0], tpl.NEGATIVE], **tpl.SETTINGS) as handle:
        out = tpl.generate(pipe, name, num_images_per_prompt=2)
        assert handle.guided_calls == 2
    # images 0 and 1 (the first prompt's) have their prompt as negative: unguided; images 2 and 3 are guided
    torch.testing.assert_close(out[:2], reference[:2], rtol=0, atol=1e-5)
    assert all((out[i] - reference[i]).abs().max() > 1e-3 for i in (2, 3))
    with nag.apply(pipe, list(tpl.PROMPTS), **tpl.SETTINGS):
        torch.testing.assert_close(tpl.generate(pipe, name, num_images_per_prompt=2), reference, rtol=0, atol=1e-5)


@reliability(
    "perturbed-attention guidance (StableDiffusionPAGPipeline)",
    "generic path; the four invariants hold with PAG on and off",
)
@pytest.mark.parametrize("pag_scale", [3.0, 0.0])
def test_perturbed_attention_guidance(pag_scale):
    from diffusers import StableDiffusionPAGPipeline

    pipe = StableDiffusionPAGPipeline(**tpl.pipeline("sd").components, pag_applied_layers=["mid"])
    pipe.set_progress_bar_config(disable=True)
    check_guides(pipe, "sd", pag_scale=pag_scale)
