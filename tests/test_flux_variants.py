"""Flux image-to-image, inpainting, fill, control, Kontext editing and Kontext inpainting pipelines: the
same transformer sees extra image tokens or channels; NAG guides the image stream, never the reference image as
text, and agrees with the naive implementation."""

from __future__ import annotations

from functools import cache

import pytest
import test_pipelines as tpl
import tiny_pipelines as tp
import torch
from test_pipelines import PROMPTS, SETTINGS, state_of

import nag


@cache
def variant(name):
    import diffusers
    from diffusers import FluxTransformer2DModel

    components = tp.FACTORIES["flux"]().components
    if name in ("control", "fill"):  # control: + 16 control-image channels; fill: + 16 masked-image + 16 mask
        with tp._seeded(5):
            components["transformer"] = FluxTransformer2DModel(
                patch_size=1,
                in_channels=32 if name == "control" else 48,
                out_channels=16,
                num_layers=1,
                num_single_layers=1,
                attention_head_dim=16,
                num_attention_heads=2,
                joint_attention_dim=32,
                pooled_projection_dim=32,
                axes_dims_rope=(4, 4, 8),
            ).eval()
    cls = {
        "img2img": "FluxImg2ImgPipeline",
        "inpaint": "FluxInpaintPipeline",
        "control": "FluxControlPipeline",
        "kontext": "FluxKontextPipeline",
        "fill": "FluxFillPipeline",
        "kontext_inpaint": "FluxKontextInpaintPipeline",
    }[name]
    pipeline_class = getattr(diffusers, cls)
    accepted = pipeline_class._get_signature_keys(pipeline_class)[0]
    pipe = pipeline_class(**{k: v for k, v in components.items() if k in accepted})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def image(seed, channels=3):
    return torch.rand(2, channels, 16, 16, generator=torch.Generator().manual_seed(seed))


def call_kwargs(name):
    kwargs = dict(height=16, width=16, max_sequence_length=16, num_inference_steps=4, output_type="pt")
    if name == "img2img":
        kwargs.update(image=image(1), strength=0.75)
    elif name == "inpaint":
        kwargs.update(image=image(1), mask_image=(image(2, 1) > 0.5).float(), strength=0.9)
    elif name == "control":
        kwargs.update(control_image=image(3))
    elif name == "kontext":
        kwargs.update(image=image(4), _auto_resize=False, max_area=16 * 16)
    elif name == "fill":
        kwargs.update(image=image(1), mask_image=(image(2, 1) > 0.5).float())
    elif name == "kontext_inpaint":
        kwargs.update(
            image=image(1),
            mask_image=(image(2, 1) > 0.5).float(),
            image_reference=image(4),
            strength=0.9,
            _auto_resize=False,
            max_area=16 * 16,
        )
    return kwargs


def generate(pipe, name):
    out = pipe(prompt=PROMPTS, generator=torch.Generator("cpu").manual_seed(0), **call_kwargs(name))
    return tp.output_tensor(out)


VARIANTS = ["img2img", "inpaint", "control", "kontext", "fill", "kontext_inpaint"]


@pytest.mark.parametrize("name", VARIANTS)
def test_invariants(name):
    pipe = variant(name)
    stock = generate(pipe, name)
    before = state_of(pipe)
    with nag.apply(pipe, "blurry, watermark", scale=1.0):
        assert torch.equal(generate(pipe, name), stock)
    with nag.apply(pipe, PROMPTS, **SETTINGS):
        torch.testing.assert_close(generate(pipe, name), stock, rtol=0, atol=1e-5)
    with nag.apply(pipe, "blurry, watermark", **SETTINGS) as handle:
        guided = generate(pipe, name)
        steps = handle.guided_calls
    assert steps == pipe._num_timesteps  # every denoising step of the (possibly shortened) schedule
    assert (guided - stock).abs().max() > 1e-3
    assert state_of(pipe) == before
    assert torch.equal(generate(pipe, name), stock)


@pytest.mark.parametrize("name", VARIANTS)
def test_agrees_with_naive_implementation(name):
    pipe = variant(name)
    model = pipe.transformer
    g = torch.Generator().manual_seed(7)
    negative = {
        "negative_prompt_embeds": torch.randn(2, 11, model.config.joint_attention_dim, generator=g),
        "negative_pooled_prompt_embeds": torch.randn(2, model.config.pooled_projection_dim, generator=g),
    }
    with nag.apply(pipe, **negative, **SETTINGS):
        _, calls = tpl.record_calls(model, generate, pipe, name)
    assert calls
    with torch.no_grad():
        for call in calls:
            expected = tpl.naive_output("flux", model, call["inputs"], negative)
            torch.testing.assert_close(call["output"], expected, rtol=1e-4, atol=1e-5)


def test_img2img_window_counts_the_skipped_start():
    """strength 0.5 of 4 steps starts half-way: with end=0.5 no step is guided, with start=0.5 all."""
    pipe = variant("img2img")
    kwargs = {**call_kwargs("img2img"), "strength": 0.5}
    with nag.apply(pipe, "blurry", end=0.5, **SETTINGS) as handle:
        pipe(prompt=PROMPTS, generator=torch.Generator().manual_seed(0), **kwargs)
        assert handle.guided_calls == 0
    with nag.apply(pipe, "blurry", start=0.5, **SETTINGS) as handle:
        pipe(prompt=PROMPTS, generator=torch.Generator().manual_seed(0), **kwargs)
        assert handle.guided_calls == 2


def test_single_blocks_with_another_processor_or_backend_take_the_straightforward_path():
    """Flux single-stream blocks leave the fast path (which does its own attention) where the stock processor is
    not diffusers' FluxAttnProcessor or the attention backend is not the default: there the block carries whole
    rows and the user's processor runs for both branches; the result agrees with the naive reference."""
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    class OwnFluxProcessor(FluxAttnProcessor):  # another tool's processor with the stock signature
        calls = 0

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
            type(self).calls += 1
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

    pipe = tp.FACTORIES["flux"]()
    model = tp.denoiser(pipe)
    model.single_transformer_blocks[0].attn.set_processor(OwnFluxProcessor())
    _, stock_calls = tpl.record(pipe, "flux")
    negative = tpl.random_negative("flux", stock_calls[0]["inputs"], 5)
    OwnFluxProcessor.calls = 0
    with nag.apply(pipe, **negative, **SETTINGS) as handle:
        _, calls = tpl.record(pipe, "flux", true_cfg_scale=1.0)
        assert handle.guided_calls == 2
    assert OwnFluxProcessor.calls == 2 * 2  # both branches, in each guided call
    with torch.no_grad():
        for call in calls:
            expected = tpl.naive_output("flux", model, call["inputs"], negative, [0, 1])
            torch.testing.assert_close(call["output"], expected, rtol=1e-4, atol=1e-5)


# The single-stream blocks' two fast paths: where every row is guided the negative text rides in the block's
# sequence ([text, negative text, image]); where only some rows are (a CFG batch on the denoiser), it takes the
# block's text path beside the stock rows. Both agree with the naive implementation.
test_batch_with_one_guided_row_agrees_with_naive_implementation = tpl.each_configuration_and_path(
    tpl.check_batch_with_one_guided_row_agrees_with_naive_implementation, ["flux"]
)


def single_block_attention_lengths(model, run):
    """The token counts the single-stream blocks' attention gets in ``run()``."""
    lengths = []
    hooks = [
        block.attn.register_forward_pre_hook(
            lambda module, args, kwargs: lengths.append(kwargs["hidden_states"].shape[1]), with_kwargs=True
        )
        for block in model.single_transformer_blocks
    ]
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    return lengths


@pytest.mark.parametrize("rows_guided", ["every", "one"])
def test_single_blocks_carry_the_negative_text_in_their_sequence_where_every_row_is_guided(rows_guided):
    model, inputs = tpl.denoiser_batch("flux")
    text_len, image_len = inputs["encoder_hidden_states"].shape[1], inputs["hidden_states"].shape[1]
    guided = slice(None) if rows_guided == "every" else slice(1, None)
    negative = {
        "encoder_hidden_states": inputs["encoder_hidden_states"][guided].flip(1),
        "pooled_projections": inputs["pooled_projections"][guided].flip(-1),
    }
    with torch.no_grad(), nag.apply_to_denoiser(
        model, negative, positive_reference=inputs["encoder_hidden_states"][guided], **SETTINGS
    ):
        lengths = single_block_attention_lengths(model, lambda: model(**inputs, return_dict=False))
    expected = text_len * (2 if rows_guided == "every" else 1) + image_len
    assert lengths == [expected] * len(model.single_transformer_blocks)


def test_lora_on_the_single_blocks_loaded_while_applied():
    """A LoRA on the single blocks' output projection and MLP, added while NAG is applied, wraps the modules NAG's
    in-sequence hooks sit on: the blocks then take the path beside the stock rows, which calls the wrapped modules.
    A negative equal to the prompt gives the stock output with the LoRA; another negative gives what the
    straightforward path gives."""
    from peft import LoraConfig

    pipe = tp.FACTORIES["flux"]()
    with nag.apply(pipe, tpl.NEGATIVE, **SETTINGS) as handle:
        before = tpl.generate(pipe, "flux")
        torch.manual_seed(0)
        pipe.transformer.add_adapter(
            LoraConfig(r=4, lora_alpha=4, target_modules=["proj_out", "proj_mlp"], init_lora_weights=False)
        )
        fast = tpl.generate(pipe, "flux")
        assert handle.guided_calls >= 2
    assert (fast - before).abs().max() > 1e-3  # the LoRA acts
    with nag.apply(pipe, tpl.NEGATIVE, **SETTINGS, fast=False):
        straightforward = tpl.generate(pipe, "flux")
    torch.testing.assert_close(fast, straightforward, rtol=1e-4, atol=1e-5)
    stock = tpl.generate(pipe, "flux")
    with nag.apply(pipe, PROMPTS[0] if "flux" in tp.SINGLE_PROMPT else PROMPTS, **SETTINGS):
        torch.testing.assert_close(tpl.generate(pipe, "flux"), stock, rtol=0, atol=1e-5)
