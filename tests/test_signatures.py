"""ArgumentBinder gives what ``inspect.Signature.bind(...).arguments`` gives, errors included."""

from __future__ import annotations

import inspect

import pytest

from nag.signatures import ArgumentBinder


def processor(attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
    """diffusers' AttnProcessor2_0 shape: deprecated ``*args``/``**kwargs`` after the named ones."""


def joint(attn, hidden_states, encoder_hidden_states=None, *, image_rotary_emb=None):
    """Named only, one keyword-only argument."""


def positional_only(attn, hidden_states, /, mask=None):
    """Positional-only parameters: the general path."""


CALLS = [
    ((1, 2), {}),
    ((1,), {"hidden_states": 2, "encoder_hidden_states": 3}),
    ((1, 2, 3), {"attention_mask": 4}),
    ((1, 2, 3, 4, 5), {}),  # an extra positional one: *args
    ((1, 2), {"scale": 0.5}),  # an unknown name: **kwargs where there is one, else TypeError
    ((1, 2), {"image_rotary_emb": 7}),
    ((1,), {}),  # a required one missing: TypeError
    ((1, 2), {"hidden_states": 3}),  # given twice: TypeError
    ((1, 2, 3, 4, 5, 6, 7), {}),
    ((), {"attn": 1, "hidden_states": 2}),
]


@pytest.mark.parametrize("function", [processor, joint, positional_only])
@pytest.mark.parametrize("args, kwargs", CALLS)
def test_binder_agrees_with_signature_bind(function, args, kwargs):
    signature = inspect.signature(function)
    try:
        expected = dict(signature.bind(*args, **kwargs).arguments)
    except TypeError as error:
        with pytest.raises(TypeError, match=str(error).split("'")[0]):
            ArgumentBinder(signature).bind(*args, **kwargs)
        return
    got = ArgumentBinder(signature).bind(*args, **kwargs)
    assert got == expected
