"""Backpropagation through NAG: with autograd recording (the weights requiring gradients, as in training or in
gradient-based guidance), the gradients of a denoiser call agree with those of the naive reference
(``naive_nag``, plain PyTorch differentiated by autograd), on both attention paths, for a batch with one stock and
one guided row, over two calls in a row (nothing kept from the first call's graph)."""

from __future__ import annotations

import pytest
import tiny_pipelines as tp
import torch
from test_pipelines import (
    NEGATIVE,
    NEGATIVE_KEYS,
    PROMPTS,
    SETTINGS,
    denoiser_batch,
    each_configuration_and_path,
    naive_output,
    pipeline,
    random_negative,
)

import nag


def _text_key_weight(model: torch.nn.Module) -> torch.nn.Parameter:
    """The key projection of the first attention to text: the negative text's path to the output."""
    for name, parameter in model.named_parameters():
        if name.endswith(("attn2.to_k.weight", "attn.add_k_proj.weight")):
            return parameter
    raise LookupError("no text key projection found")


def _gradients(model, inputs, negative, forward):
    """Gradients of a fixed random projection of ``forward``'s output w.r.t. the latents, the negative text and the
    text key projection."""
    latent_key = "hidden_states" if "hidden_states" in inputs else "sample"
    latents = inputs[latent_key].clone().requires_grad_(True)
    negative_text = negative["negative_prompt_embeds"].clone().requires_grad_(True)
    weight = _text_key_weight(model)
    weight.grad = None
    out = forward({**inputs, latent_key: latents}, {**negative, "negative_prompt_embeds": negative_text})
    projection = torch.randn(out.shape, generator=torch.Generator().manual_seed(11))
    (out * projection).sum().backward()
    return out.detach(), latents.grad, negative_text.grad, weight.grad.clone()


def check_gradients_agree_with_naive_implementation(name, fast):
    model, inputs = denoiser_batch(name)
    negative = random_negative(name, inputs, -3, rows=1)
    model.requires_grad_(True)
    try:
        expected = _gradients(
            model, inputs, negative, lambda call, neg: naive_output(name, model, call, neg, cond_rows=[1])
        )
        with nag.denoiser.apply_to_denoiser(
            model,
            {NEGATIVE_KEYS[k]: v for k, v in negative.items()},
            fast=fast,
            positive_reference=inputs["encoder_hidden_states"][1:],
            **SETTINGS,
        ) as handle:

            def guided(call, neg):
                handle.set_negative(
                    {NEGATIVE_KEYS[k]: v for k, v in neg.items()}, call["encoder_hidden_states"][1:]
                )
                return model(**call, return_dict=False)[0]

            for _ in range(2):  # (the second call must not reuse anything of the first one's graph)
                got = _gradients(model, inputs, negative, guided)
                for value, reference in zip(got, expected):
                    scale = float(reference.abs().max())
                    assert scale > 0
                    torch.testing.assert_close(value, reference, rtol=1e-3, atol=1e-4 * scale)
    finally:
        model.requires_grad_(False)


test_gradients_agree_with_naive_implementation = each_configuration_and_path(
    check_gradients_agree_with_naive_implementation, ["sd", "pixart_sigma", "flux", "sd3"]
)


def test_combine_backward_matches_naive():
    """``nag_combine`` itself under autograd (which runs it eager), both norms: its input gradients are the naive
    equation's."""
    from naive_nag import naive_combine

    g = torch.Generator().manual_seed(2)
    for p in (1, 2):
        z_pos = torch.randn(2, 7, 48, generator=g, requires_grad=True)
        z_neg = torch.randn(2, 7, 48, generator=g, requires_grad=True)
        weight = torch.randn(2, 7, 48, generator=g)
        (nag.nag_combine(z_pos, z_neg, 4.0, 2.5, 0.5, norm=p) * weight).sum().backward()
        got = z_pos.grad.clone(), z_neg.grad.clone()
        z_pos.grad = z_neg.grad = None
        (naive_combine(z_pos, z_neg, 4.0, 2.5, 0.5, p=p) * weight).sum().backward()
        for value, reference in zip(got, (z_pos.grad, z_neg.grad)):
            torch.testing.assert_close(value, reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["qwenimage", "zimage", "hunyuanvideo", "chroma", "ltx2", "wan"])
def test_pipeline_gradients_agree_between_paths(name):
    """A whole pipeline call run with autograd recording (the pipeline's own no-grad decorator bypassed, one
    attention weight requiring a gradient): NAG's fast and straightforward paths give the same output and the same
    gradient of that weight, for families without a naive reference here."""
    pipe = pipeline(name)
    model = tp.denoiser(pipe)
    weight = next(p for n, p in model.named_parameters() if n.endswith(("to_q.weight", "to_qkv.weight", "qkv.weight")))
    call = type(pipe).__call__
    call = getattr(call, "__wrapped__", call)
    results = []
    for fast in (True, False):
        prompt = PROMPTS[0] if name in tp.SINGLE_PROMPT else list(PROMPTS)  # (Z-Image rewrites the list it is given)
        weight.grad = None
        weight.requires_grad_(True)
        try:
            with nag.apply(pipe, NEGATIVE, fast=fast, **SETTINGS), torch.enable_grad():
                out = tp.output_tensor(
                    call(pipe, prompt=prompt, generator=torch.Generator("cpu").manual_seed(0), **tp.no_cfg_kwargs(name))
                )
                projection = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
                (out.float() * projection).sum().backward()
        finally:
            weight.requires_grad_(False)
        results.append((out.detach(), weight.grad))
    (fast_out, fast_grad), (out, grad) = results
    torch.testing.assert_close(fast_out, out, rtol=1e-4, atol=1e-5)
    assert grad.abs().max() > 0
    torch.testing.assert_close(fast_grad, grad, rtol=1e-3, atol=2e-3 * float(grad.abs().max()))


def test_inference_mode_call_then_autograd_call():
    """A call in inference mode, then one with autograd on the same handle: nothing the first call kept (the negative
    keys/values, the text projection's output) enters the second one's graph."""
    model, inputs = denoiser_batch("pixart_sigma")
    negative = random_negative("pixart_sigma", inputs, -3, rows=1)
    with nag.denoiser.apply_to_denoiser(
        model, {NEGATIVE_KEYS[k]: v for k, v in negative.items()},
        positive_reference=inputs["encoder_hidden_states"][1:], **SETTINGS,
    ):
        with torch.inference_mode():
            first = model(**inputs, return_dict=False)[0]
        model.requires_grad_(True)
        try:
            second = model(**inputs, return_dict=False)[0]
            second.sum().backward()
            assert _text_key_weight(model).grad is not None
        finally:
            model.requires_grad_(False)
            model.zero_grad(set_to_none=True)
    torch.testing.assert_close(second.detach(), first.clone(), rtol=1e-5, atol=1e-6)
