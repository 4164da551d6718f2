"""Precomputed negatives in each pipeline's own format.

For every tiny pipeline: the negative prompt encoded with the pipeline's own ``encode_prompt`` (the settings the
pipeline's call uses, one negative per prompt), its outputs passed to ``nag.apply`` unchanged under the pipeline's
names for them (tensors, per-prompt lists, masks), give the same images as passing the negative prompt as text.
"""

from __future__ import annotations

import inspect

import pytest
import test_pipelines as tpl
import tiny_pipelines as tp
import torch

import nag
from nag.checks import NEGATIVE_EMBED_NAMES

NAMES = sorted({**tp.FACTORIES, **tp.FAMILY_FACTORIES})


def encode_settings(pipe, name):
    """The arguments the pipeline's call gives ``encode_prompt`` (recorded from a stock generation)."""
    signature = inspect.signature(pipe.encode_prompt)
    seen = []

    def spy(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        seen.append(dict(bound.arguments))
        return original(*args, **kwargs)

    original = pipe.encode_prompt
    pipe.__dict__["encode_prompt"] = spy
    try:
        tpl.generate(pipe, name)
    finally:
        del pipe.__dict__["encode_prompt"]
    return seen[0]


def encoded_negative(pipe, name, prompts, further=None):
    """The negative prompt encoded by the pipeline's ``encode_prompt`` as a user would: the call's settings, the
    negative as the prompt (one per prompt), no classifier-free guidance; the outputs named as ``nag.apply`` (and the
    pipeline's own call) take them. ``further``: texts for the further encoders (``{"prompt_2": text}``)."""
    spec = nag.families.pipeline_spec(pipe)
    call = encode_settings(pipe, name)
    for parameter in call:
        if "embeds" in parameter or "attention_mask" in parameter or parameter.startswith("negative_"):
            call[parameter] = None
        elif parameter == "num_images_per_prompt" or parameter == "num_videos_per_prompt":
            call[parameter] = 1
    call.update(prompt=[tpl.NEGATIVE] * prompts)
    call.update({key: [text] * prompts for key, text in (further or {}).items()})
    call.update({k: False for k in ("do_classifier_free_guidance",) if k in call})
    call.update({k: v for k, v in spec.negative_overrides.items() if k in call})
    outputs = pipe.encode_prompt(**call)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    names = spec.encode_outputs or ("encoder_hidden_states",)
    parameters = inspect.signature(type(pipe).__call__).parameters
    accepted = spec.negative_embed_names or NEGATIVE_EMBED_NAMES
    negative = {}
    text = outputs[0]
    for key, value in zip(names, outputs):
        if key is None and isinstance(value, torch.Tensor) and value.ndim == 2 and isinstance(text, torch.Tensor):
            # an output NAG does not use that the pipeline's call takes beside the embeddings: passed on all the same
            mask = value.shape == text.shape[:2]
            unused = "negative_prompt_attention_mask" if mask else "negative_pooled_prompt_embeds"
            if unused in parameters and unused not in negative and value.shape[0] == text.shape[0]:
                negative[unused] = value
            continue
        if key is None or value is None:
            continue
        candidates = [n for n, k in accepted.items() if k == key]
        if not candidates:  # an output that is no text conditioning (Qwen-Image 2.1's image mask)
            continue
        negative[next((n for n in candidates if n in parameters), candidates[0])] = value
    return negative


@pytest.mark.parametrize("name", NAMES)
def test_encoded_negative_gives_the_images_of_the_text(name):
    pipe = tpl.pipeline(name)
    prompts = tpl.batch_rows(name)
    with nag.apply(pipe, [tpl.NEGATIVE] * prompts, **tpl.SETTINGS) as handle:
        expected = tpl.generate(pipe, name)
        assert handle.guided_calls >= 2
    negative = encoded_negative(pipe, name, prompts)
    with nag.apply(pipe, **negative, **tpl.SETTINGS) as handle:
        out = tpl.generate(pipe, name)
        assert handle.guided_calls >= 2
    # (the same computation; the precomputed tensors' memory layout may change the last bits of some kernels)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


FURTHER_TEXTS = {"prompt_2": "a watermark", "prompt_3": "text and letters", "prompt_4": "a frame"}
FURTHER_ENCODERS = [
    name for name in NAMES if "prompt_2" in inspect.signature(type(tpl.pipeline(name)).encode_prompt).parameters
]


@pytest.mark.parametrize("name", FURTHER_ENCODERS)
def test_negative_prompt_for_each_encoder(name):
    """``negative_prompt_2`` (``_3``, ``_4``) reach the further text encoders as ``prompt_2`` (...) reach them in the
    pipeline's ``encode_prompt``: the same images as the negative encoded that way and passed precomputed; they
    change the images where they change the encoding (diffusers' HunyuanVideo encodes ``prompt`` with its CLIP
    whatever ``prompt_2`` is: there they change nothing, in the pipeline's own CFG either)."""
    pipe = tpl.pipeline(name)
    prompts = tpl.batch_rows(name)
    parameters = inspect.signature(pipe.encode_prompt).parameters
    further = {key: text for key, text in FURTHER_TEXTS.items() if key in parameters}
    with nag.apply(pipe, tpl.NEGATIVE, **{"negative_" + key: text for key, text in further.items()},
                   **tpl.SETTINGS) as handle:
        out = tpl.generate(pipe, name)
        assert handle.guided_calls >= 2
    encoded = encoded_negative(pipe, name, prompts, further)
    with nag.apply(pipe, **encoded, **tpl.SETTINGS):
        expected = tpl.generate(pipe, name)
    with nag.apply(pipe, tpl.NEGATIVE, **tpl.SETTINGS):
        one_text = tpl.generate(pipe, name)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    plain = encoded_negative(pipe, name, prompts)
    encoding_changes = any(not torch.equal(encoded[key], plain[key]) for key in encoded)
    assert (float((out - one_text).abs().max()) > 1e-4) == encoding_changes

