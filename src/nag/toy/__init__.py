"""A built-in tiny text-to-image model, to see and measure NAG offline in seconds on a CPU.

    import torch, nag
    from nag.toy import DEFAULT_NAG, load_pipeline

    pipe = load_pipeline("fewstep")                       # a stock diffusers StableDiffusionPipeline
    with nag.apply(pipe, "red", **DEFAULT_NAG):           # scale 3, tau 1.25, alpha 1
        images = pipe("a large star on a gray background", num_inference_steps=4, guidance_scale=0.0,
                      generator=torch.Generator().manual_seed(0)).images

The model draws 32x32 images of the procedural world of :mod:`nag.toy.dataset` (shapes, colours,
counts, sizes, positions and the white, black and gray backgrounds) from captions such as "a large
red star on a gray background"; :mod:`nag.toy.vocabulary` lists the words it knows. Two checkpoints
ship with the package, in diffusers format:

- ``"multistep"``: the base model (rectified flow, DPM-Solver++; 25 steps with CFG 4, NAG beside it);
- ``"fewstep"``: distilled from it for 1 to 4 Euler steps with guidance baked in (like
  FLUX.1-schnell): use it with ``guidance_scale=0``.

:mod:`nag.toy.probes` reads the attributes back from generated images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

__all__ = [
    "load_pipeline", "weights_dir", "VARIANTS", "DEFAULT_STEPS", "DEFAULT_GUIDANCE", "DEFAULT_NAG", "NAG_DEFAULTS",
]

VARIANTS: tuple[str, ...] = ("multistep", "fewstep")
#: Default number of sampling steps per variant.
DEFAULT_STEPS: dict[str, int] = {"multistep": 25, "fewstep": 4}
#: Guidance scale the variant is meant to be used with (0: CFG off).
DEFAULT_GUIDANCE: dict[str, float] = {"multistep": 4.0, "fewstep": 0.0}
#: NAG settings per checkpoint (the demo, the CLI and the web UI use them). The UNet is trained from
#: scratch, so the published family defaults (tuned on real models) do not carry over; these were chosen
#: by ``benchmarks/tune_toy.py`` on seeds that neither the tests nor ``benchmarks/quality_toy.py`` use:
#: the few-step checkpoint with CFG off, the multi-step one together with its CFG.
NAG_DEFAULTS: dict[str, dict[str, float]] = {
    "fewstep": {"scale": 3.0, "tau": 1.25, "alpha": 1.0},
    "multistep": {"scale": 10.0, "tau": 2.5, "alpha": 0.25},
}
#: The few-step checkpoint's NAG settings (the default model's).
DEFAULT_NAG: dict[str, float] = NAG_DEFAULTS["fewstep"]

_WEIGHTS = Path(__file__).resolve().parent / "weights"


def weights_dir(variant: str = "fewstep") -> Path:
    """The diffusers directory of a shipped checkpoint."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    path = _WEIGHTS / variant
    if not (path / "model_index.json").exists():
        raise FileNotFoundError(
            f"the {variant} checkpoint is missing from {path}; reinstall the package, or run the scripts "
            "in training/ (see training/README.md) to make it"
        )
    return path


def load_pipeline(
    variant: str = "fewstep",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    progress_bar: bool = False,
) -> Any:
    """Load a shipped checkpoint as a stock ``diffusers.StableDiffusionPipeline``, offline.

    Args:
        variant: ``"fewstep"`` (1-4 steps, ``guidance_scale=0``) or ``"multistep"``.
        device: where to put it.
        dtype: the weights are stored in float16 (the VAE in float32); float32 is right on CPU.
        progress_bar: show diffusers' per-step progress bar.
    """
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    path = weights_dir(variant)
    # A local load of a few megabytes: no "loading components" / "loading weights" bars, and no notices
    # about optional image-processor backends (the model has no image processor). Restored afterwards.
    levels = diffusers_logging.get_verbosity(), transformers_logging.get_verbosity()
    bars = diffusers_logging.is_progress_bar_enabled(), transformers_logging.is_progress_bar_enabled()
    for log in (diffusers_logging, transformers_logging):
        log.set_verbosity_error()
        log.disable_progress_bar()
    try:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(path, dtype=dtype, local_files_only=True)
    finally:
        for log, level, enabled in zip((diffusers_logging, transformers_logging), levels, bars):
            log.set_verbosity(level)
            if enabled:
                log.enable_progress_bar()
    pipe.set_progress_bar_config(disable=not progress_bar)
    return pipe.to(device)
