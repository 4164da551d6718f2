"""Smoke tests for the tiny offline pipelines in ``tiny_pipelines.py``."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import tiny_pipelines as tp  # noqa: E402

PROMPTS = ["a red circle on a blue background", "blurry, low quality"]
OTHER = "a small green square"
NEGATIVE = "ugly watermark text"


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    # Tiny models: one thread is fastest and avoids oversubscription when test runs share the CPUs.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


_CACHE: dict = {}


def pipeline(name):
    if name not in _CACHE:
        _CACHE[name] = tp.FACTORIES[name]()
    return _CACHE[name]


def generate(name, prompts, cfg=True, seed=0, **overrides):
    pipe = pipeline(name)
    kwargs = tp.call_kwargs(name) if cfg else tp.no_cfg_kwargs(name)
    kwargs.update(tp.negative_kwargs(name, NEGATIVE, len(prompts)))
    kwargs.update(overrides)
    out = pipe(prompt=list(prompts), generator=torch.Generator("cpu").manual_seed(seed), **kwargs)
    return tp.output_tensor(out)


def test_factories_complete():
    expected = {"flux", "flux_dev", "sd3", "sdxl", "sd", "pixart_sigma", "pixart_alpha", "sana", "sana_sprint", "wan"}
    assert expected <= set(tp.FACTORIES)
    every = set(tp.FACTORIES) | set(tp.FAMILY_FACTORIES)
    assert not set(tp.FACTORIES) & set(tp.FAMILY_FACTORIES)
    assert every == set(tp.CFG_INFO) == set(tp._BASE_KWARGS)


@pytest.mark.parametrize("make", [tp.make_clip_tokenizer, tp.make_t5_tokenizer, tp.make_gemma_tokenizer])
def test_tokenizers(make):
    tok = make()
    a, b = tok(PROMPTS).input_ids
    assert a != b
    enc = tok(PROMPTS + ["a cat"], padding="max_length", max_length=16, truncation=True)
    counts = [sum(m) for m in enc.attention_mask]
    assert len(set(counts)) == 3, counts
    # every character of these prompts is in the vocabulary (CLIP's unk is also its eos/pad)
    for ids in tok(PROMPTS + [OTHER, NEGATIVE], add_special_tokens=False).input_ids:
        assert tok.unk_token_id not in ids


@pytest.mark.parametrize("name", list(tp.FACTORIES))
def test_pipeline(name):
    pipe = pipeline(name)
    assert type(pipe).__module__.startswith("diffusers.")
    assert tp.denoiser(pipe) is (pipe.unet if hasattr(pipe, "unet") else pipe.transformer)
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in tp.denoiser(pipe).parameters())

    modes = [True, False] if tp.has_cfg(name) else [True]
    for cfg in modes:
        x = generate(name, PROMPTS, cfg=cfg)
        assert x.shape[0] == 2
        assert x.dtype == torch.float32
        assert torch.isfinite(x).all()
        # determinism: same seed, same output
        assert torch.equal(x, generate(name, PROMPTS, cfg=cfg))
        # prompt dependence: same noise (row 0 same prompt), row 1 with a different prompt
        y = generate(name, [PROMPTS[0], OTHER], cfg=cfg)
        torch.testing.assert_close(y[0], x[0], atol=1e-4, rtol=1e-4)
        assert (y[1] - x[1]).abs().max() > 1e-3

    if tp.has_cfg(name):
        # CFG actually changes the result
        assert (generate(name, PROMPTS, cfg=True) - generate(name, PROMPTS, cfg=False)).abs().max() > 1e-3


def test_build_is_deterministic():
    a, b = tp.sd3(), tp.sd3()
    for (n1, p1), (n2, p2) in zip(tp.denoiser(a).named_parameters(), tp.denoiser(b).named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)
    for p1, p2 in zip(a.text_encoder_3.parameters(), b.text_encoder_3.parameters()):
        assert torch.equal(p1, p2)


def test_build_keeps_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tp.sd()
    assert torch.equal(torch.rand(3), expected)
