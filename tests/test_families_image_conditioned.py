"""Image-conditioned pipelines of supported families: HunyuanVideo and HunyuanVideo 1.5 image-to-video, LTX-2
image-to-video and frame conditions, Z-Image image-to-image, inpainting and ControlNet (also inpainting).

Every configuration runs the invariant checks of ``test_pipelines`` (tiny random-weight pipelines, batch 2 with
prompts of different lengths) and agrees with its family's naive reference, on the fast and the straightforward
paths. ``test_conditioning_is_left_unguided`` shows that the image conditioning reaches the denoiser exactly as
the pipeline sets it (and, where the negative text travels as whole extra rows, that those rows carry the guided
rows' conditioning).

- HunyuanVideo image-to-video, ``latent_concat`` and ``token_replace`` (the first latent frame modulated as at
  timestep 0; the naive reference follows it): the image also enters the Llava prompt encoding, and the negative
  prompt is encoded with the same image. Its true CFG encodes the negative prompts with one black image, which
  fails for a batch of two prompts without NAG too: the CFG check runs one prompt, the other checks two prompts
  without CFG.
- HunyuanVideo 1.5 image-to-video: the image as latent channels and SigLIP embeddings the model joins before the
  text (the negative rows carry the guided rows' copies); CFG through a guider (``test_families_hunyuan``).
- LTX-2: the image (and a keyframe) as clean latent tokens; the text through the pipeline's ``connectors``.
- Z-Image: the image as the starting latents (and, inpainting, the kept region blended back by the pipeline).
  ControlNet: the control image enters the ControlNet, whose hints the transformer adds to its whole [image,
  caption] sequence; the negative rows get the ControlNet's hints for their own caption (``nag.control``), and the
  naive reference runs the stock ControlNet on each sample and on each negative caption.
"""

from __future__ import annotations

import inspect
from functools import cache

import pytest
import test_families_hunyuan as thf
import test_families_ltx2 as tl2
import test_families_zimage as tzi
import test_pipelines as tpl
import tiny_pipelines as tp
import torch
import torch.nn.functional as F

import nag

NAMES = ["hunyuanvideo_i2v", "hunyuanvideo_i2v_token_replace", "hunyuanvideo15_i2v", "ltx2_i2v", "ltx2_condition",
         "zimage_img2img", "zimage_inpaint", "zimage_controlnet", "zimage_controlnet_inpaint"]
CONTROLNETS = ["zimage_controlnet", "zimage_controlnet_inpaint"]
# Every family here has a fast path (Z-Image: the main layers run on the stock rows, the negative captions beside
# them; HunyuanVideo and HunyuanVideo 1.5: the video stream at the stock batch, the negative text beside it).
STRAIGHTFORWARD_ONLY: dict[str, str] = {}
SETTINGS = tpl.SETTINGS
ALL = slice(None)


test_invariants = tpl.each_configuration(tpl.check_invariants, NAMES)
test_guided_without_cfg_on_its_attention_path = tpl.each_configuration(
    tpl.check_fast_path_never_calls_the_stock_processor, NAMES, straightforward_only=STRAIGHTFORWARD_ONLY)


def hunyuanvideo_i2v_cfg_call(name):
    """True CFG runs one prompt (see ``tp.CFG_INFO``): its first image, a negative prompt for the CFG branch."""
    return dict(prompts=tpl.PROMPTS[:1], image=tp.call_kwargs(name)["image"][:1], true_cfg_scale=4.0,
                negative_prompt="deformed")


@pytest.mark.parametrize("name", NAMES)
def test_cfg_unconditional_branch_is_untouched(name):
    if name.startswith("hunyuanvideo_i2v"):  # one call per branch, conditional first
        tpl.check_cfg_unconditional_branch_is_untouched(name, mode="sequential", **hunyuanvideo_i2v_cfg_call(name))
    elif name == "hunyuanvideo15_i2v":  # a CFG guider, one call per branch, conditional first
        thf.check_cfg_unconditional_branch_is_untouched(name)
    else:
        tpl.check_cfg_unconditional_branch_is_untouched(name)


# ---------------------------------------------------------------------------------------------
# agreement with the naive reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "straightforward"])
@pytest.mark.parametrize("name", NAMES)
def test_agrees_with_naive_implementation(name, fast):
    if name.startswith("hunyuanvideo_i2v"):
        tpl.check_agrees_with_naive_implementation(name, fast)
    elif name == "hunyuanvideo15_i2v":
        thf.check_agrees_with_naive_implementation(name, fast)
    elif name.startswith("ltx2"):
        tl2.check_agrees_with_naive_implementation(name, fast)
    elif name in CONTROLNETS:
        controlnet = tpl.pipeline(name).controlnet
        recorder = tpl.Recorder(controlnet)
        try:
            tzi.check_agrees_with_naive_implementation(
                name, fast, naive_output=controlnet_naive_output(controlnet, recorder)
            )
        finally:
            recorder.close()
    else:
        tzi.check_agrees_with_naive_implementation(name, fast)


def pipeline_controlnet_call(calls, inputs):
    """The recorded ControlNet call the pipeline made for the denoiser call ``inputs`` (same latents, timestep and
    captions)."""
    return next(
        c["inputs"]
        for c in calls
        if len(c["inputs"]["x"]) == len(inputs["x"])
        and all(torch.equal(a, b) for key in ("x", "cap_feats") for a, b in zip(c["inputs"][key], inputs[key]))
        and torch.equal(c["inputs"]["t"], inputs["t"])
    )


def controlnet_naive_output(controlnet, recorder):
    def naive_output(model, inputs, negative, cond_rows):
        control = pipeline_controlnet_call(recorder.calls, inputs)
        return tzi.naive_nag.naive_zimage_forward(
            model,
            inputs["x"],
            inputs["t"],
            inputs["cap_feats"],
            negative,
            cond_rows=cond_rows,
            p=1,
            **SETTINGS,
            controlnet=controlnet,
            control_context=control["control_context"],
            conditioning_scale=control["conditioning_scale"],
        )

    return naive_output


def test_hunyuanvideo_i2v_with_cfg_agrees_with_naive_implementation():
    """True CFG (one prompt): the conditional calls guided as the naive reference says, the unconditional ones
    (their negative prompt encoded with a black image) stock."""
    name = "hunyuanvideo_i2v_token_replace"
    pipe = tpl.pipeline(name)
    model = tp.denoiser(pipe)
    call = hunyuanvideo_i2v_cfg_call(name)
    _, stock_calls = tpl.record(pipe, name, **call)
    negative = tpl.random_negative(name, stock_calls[0]["inputs"], 4)
    with nag.apply(pipe, **negative, **SETTINGS):
        _, calls = tpl.record(pipe, name, **call)
    assert len(calls) == 4
    with torch.no_grad():
        for index, recorded in enumerate(calls):
            guided = index % 2 == 0
            expected = tpl.naive_output(
                name, model, recorded["inputs"], negative if guided else None, [0] if guided else None
            )
            torch.testing.assert_close(recorded["output"], expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(calls[1]["output"], stock_calls[1]["output"], rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# image conditioning
# ---------------------------------------------------------------------------------------------


@cache
def ltx2_first_frame_tokens(name):
    return (32 // tpl.pipeline(name).vae_spatial_compression_ratio) ** 2


def conditioning_parts(name):
    """``(denoiser argument, index into it)`` that carry the image conditioning in every call."""
    if name == "hunyuanvideo_i2v":  # the encoded image and its mask: latent channels 4: of (B, C, F, H, W)
        return [("hidden_states", (ALL, slice(4, None)))]
    if name == "hunyuanvideo_i2v_token_replace":  # the encoded image: the first latent frame
        return [("hidden_states", (ALL, ALL, slice(0, 1)))]
    if name == "hunyuanvideo15_i2v":  # latent channels 4: (the encoded first frame and its mask), SigLIP embeddings
        return [("hidden_states", (ALL, slice(4, None))), ("image_embeds", (ALL,))]
    first = (ALL, slice(0, ltx2_first_frame_tokens(name)))  # packed (B, tokens, C), frame-major
    parts = [("hidden_states", first), ("timestep", first)]  # the clean first frame: timestep 0 there
    if name == "ltx2_condition":  # the keyframe's tokens follow the video tokens, with their own positions
        parts.append(("video_coords", (ALL,)))
    return parts


@pytest.mark.parametrize("name", NAMES)
def test_conditioning_is_left_unguided(name):
    if name in CONTROLNETS:
        check_controlnet_conditioning_is_left_unguided(name)
        return
    if name.startswith("zimage"):
        check_zimage_conditioning_is_left_unguided(name)
        return
    tpl.check_conditioning_is_left_unguided(name, conditioning_parts(name))
    if name.startswith("ltx2"):  # the first frame of the result is the encoded image, as stock
        pipe = tpl.pipeline(name)
        stock = tpl.generate(pipe, name, output_type="latent")
        with nag.apply(pipe, tpl.NEGATIVE, **SETTINGS):
            guided = tpl.generate(pipe, name, output_type="latent")
        assert stock.ndim == 5  # (B, C, F, H, W) latents
        assert torch.equal(guided[:, :, :1], stock[:, :, :1])
        assert (guided[:, :, 1:] - stock[:, :, 1:]).abs().max() > 1e-4


def check_zimage_conditioning_is_left_unguided(name):
    """The encoded image is the starting point (the first call's latents, as stock); inpainting: the kept region
    of the result is the encoded image's, as stock, the repainted region guided."""
    pipe = tpl.pipeline(name)
    stock, stock_calls = tpl.record(pipe, name, output_type="latent")
    with nag.apply(pipe, tpl.NEGATIVE, **SETTINGS) as handle:
        guided, guided_calls = tpl.record(pipe, name, output_type="latent")
        assert handle.guided_calls == 2
    assert torch.equal(tpl.stacked(guided_calls[0]["inputs"]["x"]), tpl.stacked(stock_calls[0]["inputs"]["x"]))
    if name != "zimage_inpaint":
        assert (guided - stock).abs().max() > 1e-4
        return
    mask = tp.call_kwargs(name)["mask_image"]
    repainted = F.interpolate(mask, size=stock.shape[-2:], mode="nearest").expand_as(stock) > 0.5
    assert torch.equal(guided[~repainted], stock[~repainted])
    assert (guided[repainted] - stock[repainted]).abs().max() > 1e-4


def test_negative_prompt_is_encoded_with_the_image():
    """HunyuanVideo image-to-video: the negative prompt's Llava encoding sees the generation's images (their vision
    tokens), as the prompt's does."""
    name = "hunyuanvideo_i2v"
    pipe = tpl.pipeline(name)
    seen = []
    original = type(pipe)._get_llama_prompt_embeds

    def spy(self, image, prompt, *args, **kwargs):
        seen.append((list(prompt) if isinstance(prompt, (list, tuple)) else [prompt], image))
        return original(self, image, prompt, *args, **kwargs)

    pipe._get_llama_prompt_embeds = spy.__get__(pipe)
    try:
        with nag.apply(pipe, tpl.NEGATIVE, **SETTINGS):
            tpl.generate(pipe, name)
    finally:
        del pipe._get_llama_prompt_embeds
    assert [texts for texts, _ in seen] == [tpl.PROMPTS, [tpl.NEGATIVE] * 2]
    assert seen[1][1] is seen[0][1] and len(seen[0][1]) == 2
    # encoded with the image, the negative's first tokens are the image's vision tokens, as the prompt's
    with torch.no_grad():
        positive = pipe.encode_prompt(image=seen[0][1], prompt=tpl.PROMPTS, **_encode_kwargs(name))[0]
        negative = pipe.encode_prompt(image=seen[0][1], prompt=[tpl.NEGATIVE] * 2, **_encode_kwargs(name))[0]
    image_tokens = tp._LLAVA_IMAGE_TOKENS // 2  # every second one kept (image_embed_interleave 2)
    torch.testing.assert_close(negative[:, :image_tokens], positive[:, :image_tokens], rtol=0, atol=0)


def _encode_kwargs(name):
    kwargs = tp.call_kwargs(name)
    return dict(
        prompt_template=kwargs["prompt_template"],
        max_sequence_length=kwargs["max_sequence_length"],
        image_embed_interleave=2,
    )


class Arrivals:
    """The denoiser's arguments as they reach the model, after every pre-hook (NAG's included)."""

    def __init__(self, model):
        self.signature = inspect.signature(model.forward)
        self.calls = []
        self._handle = model.register_forward_pre_hook(self._arrive, with_kwargs=True)

    def _arrive(self, module, args, kwargs):
        self.calls.append(tpl.snapshot(dict(self.signature.bind_partial(*args, **kwargs).arguments)))

    def close(self):
        self._handle.remove()


def check_controlnet_conditioning_is_left_unguided(name):
    """The control reaches the ControlNet exactly as stock in every step, and the ControlNet's hints reach the
    transformer's stock rows exactly as the pipeline passes them (bit-identical in the first step, whose inputs are
    the stock run's; zero padding after them). The negative rows get the hints of a ControlNet call on the guided
    rows' latents, timestep and control with the negative captions: the control is never text."""
    pipe = tpl.pipeline(name)
    model, controlnet = tp.denoiser(pipe), pipe.controlnet
    stock_control = tpl.Recorder(controlnet)
    try:
        _, stock_calls = tpl.record(pipe, name)
    finally:
        stock_control.close()
    with nag.apply(pipe, tpl.NEGATIVE, **SETTINGS) as handle:
        control, arrivals = tpl.Recorder(controlnet), Arrivals(model)
        try:
            _, guided_calls = tpl.record(pipe, name)
        finally:
            control.close()
            arrivals.close()
        assert handle.guided_calls == 2
    rows = len(tpl.PROMPTS)  # [conditional, unconditional] rows: the first ones guided
    batch = 2 * rows
    assert len(stock_calls) == len(guided_calls) == len(arrivals.calls) == 2
    assert len(control.calls) == 4  # per step: the pipeline's call, then NAG's for the negative rows
    for step in range(2):
        stock_cn, guided_cn, negative_cn = (
            stock_control.calls[step],
            control.calls[2 * step],
            control.calls[2 * step + 1],
        )
        assert torch.equal(guided_cn["inputs"]["control_context"], stock_cn["inputs"]["control_context"])
        # the transformer's stock rows: the pipeline's hints; the negative rows: the ControlNet's for their captions
        arrived, passed = arrivals.calls[step], guided_calls[step]["inputs"]
        assert len(arrived["cap_feats"]) == batch + rows
        assert all(torch.equal(a, b) for a, b in zip(arrived["cap_feats"], passed["cap_feats"]))
        negative_captions = arrived["cap_feats"][batch:]
        assert all(torch.equal(a, b) for a, b in zip(negative_cn["inputs"]["cap_feats"], negative_captions))
        assert all(torch.equal(a, b) for a, b in zip(negative_cn["inputs"]["x"], passed["x"][:rows]))
        assert torch.equal(negative_cn["inputs"]["t"], passed["t"][:rows])
        assert torch.equal(negative_cn["inputs"]["control_context"], guided_cn["inputs"]["control_context"][:rows])
        for layer, hints in passed["controlnet_block_samples"].items():
            extended, own = arrived["controlnet_block_samples"][layer], negative_cn["output"][layer]
            assert extended.shape[0] == batch + rows
            assert torch.equal(extended[:batch, : hints.shape[1]], hints)
            assert not extended[:batch, hints.shape[1] :].any()
            assert torch.equal(extended[batch:, : own.shape[1]], own)
            if step == 0:  # the same inputs as the stock run: the stock hints
                assert torch.equal(hints, stock_control.calls[0]["output"][layer])
    assert (tpl.stacked(guided_calls[-1]["output"]) - tpl.stacked(stock_calls[-1]["output"])).abs().max() > 1e-4
    # different control for the two prompts: the hints of the stock rows differ, so a mix-up would show
    hints = stock_control.calls[0]["output"][0]
    assert (hints[0] - hints[1]).abs().max() > 1e-3


def test_controlnet_hints_must_come_from_the_latest_controlnet_call():
    """Direct calls: hints that are not the latest ControlNet call's output, or come from a call on other latents,
    get a clear error (NAG could not give the negative rows theirs); removal takes the ControlNet's hooks off."""
    name = "zimage_controlnet"
    pipe = tpl.pipeline(name)
    model, controlnet = tp.denoiser(pipe), pipe.controlnet
    _, calls = tpl.record(pipe, name)
    inputs = {k: v for k, v in calls[0]["inputs"].items() if k in ("x", "t", "cap_feats")}
    other_x = [x + 0.5 for x in inputs["x"]]
    control = tpl.Recorder(controlnet)
    try:
        tpl.generate(pipe, name)
    finally:
        control.close()
    control_inputs = control.calls[0]["inputs"]
    hooks = len(controlnet._forward_hooks), len(model._forward_pre_hooks)
    negative = tzi.negative_captions(pipe, ["ugly"])[0][None]
    with nag.apply(pipe, negative_prompt_embeds=negative, **SETTINGS), torch.no_grad():
        hints = controlnet(**control_inputs)
        copied = {k: v.clone() + 1.0 for k, v in hints.items()}
        with pytest.raises(RuntimeError, match="not the output of the latest ZImageControlNetModel call"):
            model(**inputs, controlnet_block_samples=copied)
        hints = controlnet(**control_inputs)
        with pytest.raises(RuntimeError, match="other `x` than this ZImageTransformer2DModel call"):
            model(**{**inputs, "x": other_x}, controlnet_block_samples=hints)
        hints = controlnet(**control_inputs)
        out = model(**inputs, controlnet_block_samples=hints, return_dict=False)[0]
        assert len(out) == len(inputs["x"])
    assert (len(controlnet._forward_hooks), len(model._forward_pre_hooks)) == hooks


def test_bare_denoiser_with_controlnet_hints_is_refused():
    """NAG on the bare Z-Image transformer (no pipeline, so no ControlNet attachment) cannot give its negative rows
    the ControlNet's hints for their own captions: a guided call carrying hints gets a clear error that says what to
    do; the same call without hints, or unguided, runs."""
    name = "zimage_controlnet"
    pipe = tpl.pipeline(name)
    model, controlnet = tp.denoiser(pipe), pipe.controlnet
    control = tpl.Recorder(controlnet)
    try:
        _, calls = tpl.record(pipe, name)
    finally:
        control.close()
    inputs = {k: v for k, v in calls[0]["inputs"].items() if k in ("x", "t", "cap_feats")}
    negative = {"encoder_hidden_states": tzi.negative_captions(pipe, ["ugly"])}
    with torch.no_grad():
        hints = controlnet(**control.calls[0]["inputs"])
        stock = model(**inputs, controlnet_block_samples=hints, return_dict=False)[0]
        with nag.denoiser.apply_to_denoiser(model, negative, **SETTINGS):
            with pytest.raises(ValueError, match="apply NAG to the pipeline"):
                model(**inputs, controlnet_block_samples=hints)
            assert len(model(**inputs, return_dict=False)[0]) == len(inputs["x"])
        after = model(**inputs, controlnet_block_samples=hints, return_dict=False)[0]
    assert all(torch.equal(a, b) for a, b in zip(after, stock))
