"""NAG on the variants of a model users switch on: half precision, and the switches of diffusers that change the
attention processors or the model around them (attention slicing, the classic processor, fused QKV projections,
FreeU).

Half precision is checked where rounding has not yet been amplified by the sampler: the denoiser's output at the
first step, which sees the same inputs in every run. There the fast paths must agree with the straightforward path
(each stock processor once per branch), and a negative equal to the prompt must give the stock output, both within a
few units of the dtype's rounding (of the output's largest entry), while a real negative moves it by more.
"""

from __future__ import annotations

import pytest
import tiny_pipelines as tp
import torch
from test_pipelines import NEGATIVE, PROMPTS, SETTINGS, generate

import nag


def reliability(case: str, expect: str):
    return pytest.mark.reliability(area="composition", case=case, expect=expect)


def first_step_output(pipe, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The denoiser's output at the first call of a generation without CFG (float32 copy), and the generation's."""
    denoiser, outputs = tp.denoiser(pipe), []

    def keep_first(module, args, kwargs, output):
        if not outputs:
            sample = output[0] if isinstance(output, tuple) else getattr(output, "sample", output)
            outputs.append(sample.detach().float().clone())

    hook = denoiser.register_forward_hook(keep_first, with_kwargs=True)
    try:
        final = generate(pipe, name, cfg=False)
    finally:
        hook.remove()
    return outputs[0], final


def own_prompts(name: str):
    return PROMPTS[0] if name in tp.SINGLE_PROMPT else list(PROMPTS)


@reliability(
    "half precision (pipe.to(torch.bfloat16) / torch.float16, or float32 weights under torch.autocast(bfloat16))",
    "finite output; at the first step the fast path agrees with the straightforward one and a negative equal to the "
    "prompt gives the stock output, within 4 units of the dtype's rounding, while a real negative moves it by more "
    "than one",
)
@pytest.mark.parametrize("dtype, autocast", [(torch.bfloat16, False), (torch.float16, False), (torch.bfloat16, True)],
                         ids=["bfloat16", "float16", "autocast-bfloat16"])
@pytest.mark.parametrize("name", ["sd", "sdxl", "flux", "sd3", "pixart_sigma", "sana", "wan"])
@pytest.mark.filterwarnings("ignore")
def test_half_precision(name, dtype, autocast, record_property):
    pipe = tp.FACTORIES[name]()
    if not autocast:
        pipe.to(dtype)
    with torch.autocast("cpu", dtype=dtype, enabled=autocast):
        stock, _ = first_step_output(pipe, name)
        with nag.apply(pipe, NEGATIVE, **SETTINGS):
            fast, final = first_step_output(pipe, name)
        with nag.apply(pipe, NEGATIVE, fast=False, **SETTINGS):
            straightforward, _ = first_step_output(pipe, name)
        with nag.apply(pipe, own_prompts(name), **SETTINGS):
            unguided, _ = first_step_output(pipe, name)
        again = first_step_output(pipe, name)[0]

    unit = torch.finfo(dtype).eps * float(stock.abs().max())  # one rounding of the output's largest entry
    effect = float((fast - stock).abs().max()) / unit
    paths = float((fast - straightforward).abs().max()) / unit
    same = float((unguided - stock).abs().max()) / unit
    record_property("observed", f"NAG's effect {effect:.1f} units; fast vs straightforward {paths:.2f}; "
                                f"negative = prompt vs stock {same:.2f}")
    assert torch.isfinite(final).all()
    assert effect > 1.0, effect
    assert paths <= 4.0, paths
    assert same <= 4.0, same
    assert torch.equal(again, stock), "NAG left the pipeline changed"


def factory(name: str):
    """A tiny pipeline by name; ``sd35_large``: SD3 with SD3.5-Large's RMS q/k norms (no dual attention, whose
    self-attention diffusers' fused processor cannot run)."""
    return tp.sd3(qk_norm="rms_norm") if name == "sd35_large" else tp.FACTORIES[name]()


def family_name(name: str) -> str:
    """The name the tiny pipelines' call settings go by."""
    return "sd3" if name == "sd35_large" else name


def _slicing(pipe):
    pipe.enable_attention_slicing(1)


def _classic_processor(pipe):
    from diffusers.models.attention_processor import AttnProcessor

    tp.denoiser(pipe).set_attn_processor(AttnProcessor())


def _fused_projections(pipe):
    tp.denoiser(pipe).fuse_qkv_projections()


def _freeu(pipe):
    pipe.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)


VARIANTS = [
    pytest.param("sd", _slicing, id="sd-attention-slicing"),
    pytest.param("sd", _classic_processor, id="sd-classic-AttnProcessor"),
    pytest.param("sd", _fused_projections, id="sd-fused-qkv"),
    pytest.param("sdxl", _fused_projections, id="sdxl-fused-qkv"),
    pytest.param("sdxl", _freeu, id="sdxl-freeu"),
    pytest.param("flux", _fused_projections, id="flux-fused-qkv"),
    pytest.param("sd3", _fused_projections, id="sd3-fused-qkv"),
    pytest.param("sd35_large", _fused_projections, id="sd35-large-qk-norms-fused-qkv"),
    pytest.param("pixart_sigma", _fused_projections, id="pixart-fused-qkv"),
]


@reliability(
    "model switches set before nag.apply: attention slicing, the classic AttnProcessor, fuse_qkv_projections, FreeU",
    "NAG guides the switched model: fast path = straightforward path and negative = prompt gives the switched "
    "model's stock output (1e-5); after removal the switched model generates as before",
)
@pytest.mark.parametrize(("name", "switch"), VARIANTS)
def test_model_switches(name, switch, record_property):
    pipe, name = factory(name), family_name(name)
    switch(pipe)
    stock = generate(pipe, name, cfg=False)
    with nag.apply(pipe, NEGATIVE, **SETTINGS):
        fast = generate(pipe, name, cfg=False)
    with nag.apply(pipe, NEGATIVE, fast=False, **SETTINGS):
        straightforward = generate(pipe, name, cfg=False)
    with nag.apply(pipe, own_prompts(name), **SETTINGS):
        unguided = generate(pipe, name, cfg=False)
    effect = float((fast - stock).abs().max())
    record_property("observed", f"NAG's effect {effect:.1e}; fast vs straightforward "
                                f"{float((fast - straightforward).abs().max()):.1e}")
    assert effect > 1e-3
    torch.testing.assert_close(fast, straightforward, rtol=0, atol=1e-5)
    torch.testing.assert_close(unguided, stock, rtol=0, atol=1e-5)
    assert torch.equal(generate(pipe, name, cfg=False), stock)


@reliability(
    "attention slicing switched on while NAG is applied",
    "RuntimeError at the next generation: remove NAG, switch, apply again; the pipeline generates as before",
)
def test_switch_while_applied():
    pipe = tp.FACTORIES["sd"]()
    stock = generate(pipe, "sd", cfg=False)
    handle = nag.apply(pipe, NEGATIVE, **SETTINGS)
    pipe.enable_attention_slicing(1)
    with pytest.raises(RuntimeError, match=r"replaced after nag.apply.*nag.remove\(pipe\)"):
        generate(pipe, "sd", cfg=False)
    handle.remove()
    torch.testing.assert_close(generate(pipe, "sd", cfg=False), stock, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["sd", "sdxl", "sd3", "sd35_large", "pixart_sigma"])
def test_fused_projections_take_the_fast_path(name, monkeypatch):
    """fuse_qkv_projections (a speed-up diffusers documents) sets FusedAttnProcessor2_0 / FusedJointAttnProcessor2_0:
    NAG's fast paths serve them (the text's keys and values through the fused projection), instead of running every
    image token through attention twice."""
    from nag.attention import base, cross, joint

    pipe, name = factory(name), family_name(name)
    tp.denoiser(pipe).fuse_qkv_projections()
    fused = []

    def record(function, label):
        def recorded(attn, *args):
            fused.append((label, getattr(attn, "fused_projections", False)))
            return function(attn, *args)
        return recorded

    def straightforward(self, *args):
        raise AssertionError(f"{type(self).__name__} took the straightforward path")

    monkeypatch.setattr(cross, "text_keys_values", record(cross.text_keys_values, "cross"))
    monkeypatch.setattr(joint, "text_qkv", record(base.text_qkv, "joint"))
    for cls in (cross.CrossAttentionNAG, joint.JointAttentionNAG):  # (what the fast paths fall back to)
        monkeypatch.setattr(cls, "guided", straightforward)
    with nag.apply(pipe, NEGATIVE, **SETTINGS):
        generate(pipe, name, cfg=False)
    assert fused and all(is_fused for _, is_fused in fused), fused
