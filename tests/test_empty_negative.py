"""The one rule for the negative prompt, at the API: ``nag.apply(pipe, "")`` is off, as an empty
negative prompt is in ``nag generate``, ``nag compare`` and the web UI (tests/test_cli_errors.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import nag
from nag.toy import load_pipeline


def _draw(pipe) -> np.ndarray:
    return pipe("a red star", num_inference_steps=2, guidance_scale=0.0, output_type="np",
                generator=torch.Generator().manual_seed(0)).images[0]


@pytest.mark.parametrize("negative", ["", "  "])
def test_apply_with_an_empty_negative_is_stock(negative):
    pipe = load_pipeline("fewstep")
    pipe.set_progress_bar_config(disable=True)
    stock = _draw(pipe)
    with nag.apply(pipe, "red", scale=6.0):
        assert not np.array_equal(_draw(pipe), stock)  # a real negative acts
    with nag.apply(pipe, negative, scale=6.0):
        np.testing.assert_array_equal(_draw(pipe), stock)
