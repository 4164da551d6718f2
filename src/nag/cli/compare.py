"""``nag compare``: the same prompt and seeds without guidance, with CFG and with NAG, as one
labelled grid (or a side-by-side video) titled with the prompt, negative prompt and settings."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from nag import session
from nag.grid import make_grid

from . import common, output
from .batch import Options, total_steps
from .common import (
    Alpha,
    BatchSize,
    Debug,
    Device,
    Dtype,
    End,
    Frames,
    Guidance,
    Height,
    Lora,
    MinSigma,
    Model,
    Negative,
    Norm,
    Offload,
    Prompt,
    Scale,
    Seed,
    Start,
    Steps,
    Tau,
    Width,
    app,
)

__all__ = ["compare", "column_labels"]

CfgOpt = Annotated[float, typer.Option(help="CFG scale of the CFG column (the negative prompt as its "
                                       "unconditional branch); must be > 1, since CFG at 1 is no guidance.")]
Rows = Annotated[int, typer.Option("--num-images", min=1, help="Rows of the grid (seeds seed, seed + 1, ...).")]
Out = Annotated[Path | None, typer.Option(help="Output: an image grid (.png/.jpg/.webp), or a video side by "
                                             "side (.mp4) for video models. Default: nag_compare.png / .mp4.")]


def column_labels(cfg: float, nag: dict[str, Any]) -> tuple[str, str, str]:
    """The grid's column labels: no guidance, CFG at its scale, NAG at its scale."""
    return "no guidance", f"CFG {cfg:g}", f"NAG {nag['scale']:g}"


def _check(negative: str, cfg: float) -> None:
    if session.negative_is_off(negative):
        raise session.NagCLIError("No negative prompt", "an empty --negative turns NAG off (the rule everywhere), "
                                  "so every column would show the prompt alone. Pass what to steer away from, "
                                  "e.g. --negative \"blurry\".")
    if cfg <= 1:
        raise session.NagCLIError("Option out of range", f"--cfg must be > 1 for the CFG column to guide (CFG at "
                                  f"scale {cfg:g} is no guidance), got {cfg:g}.")


def _title(prompt: str, negative: str, loaded: session.Loaded, call: dict[str, Any], cfg: float,
           nag: dict[str, Any]) -> str:
    steps = call.get("num_inference_steps") or loaded.default_steps()
    return (f'prompt: "{prompt}"   negative: "{negative}"\n'
            f"{loaded.model}, {steps} steps; CFG {cfg:g}; NAG " + ", ".join(f"{k} {v:g}" for k, v in nag.items()))


def _columns(loaded: session.Loaded, prompt: str, negative: str, seeds: list[int], options: Options,
             guidance: float | None, cfg: float, nag: dict[str, Any]) -> dict[str, list[Any]]:
    base = options.call(loaded)
    if not loaded.has_true_cfg and guidance is None:
        base["guidance_scale"] = 0.0  # "no guidance": CFG off, unless --guidance asks otherwise
    cfg_call = dict(base, negative_prompt=negative)
    cfg_call["true_cfg_scale" if loaded.has_true_cfg else "guidance_scale"] = cfg
    labels = column_labels(cfg, nag)
    runs = ((labels[0], base, None), (labels[1], cfg_call, None), (labels[2], base, negative))
    columns: dict[str, list[Any]] = {}
    with common.progress_bar() as progress:
        for label, call, nag_negative in runs:
            on_step = common.step_counter(progress, label, total_steps(loaded, call, seeds, options))
            with session.guide(loaded.pipe, nag_negative, nag):
                columns[label] = session.run_pipeline(loaded, prompt, seeds, options.batch_size, on_step, **call)
    return columns


def _video_grid(columns: dict[str, list[Any]], rows: list[str], title: str) -> Any:
    import numpy as np
    from PIL import Image

    n_frames = min(len(v) for col in columns.values() for v in col)
    return np.stack([np.asarray(make_grid({label: [Image.fromarray(v[f]) for v in col]
                                           for label, col in columns.items()}, rows, title))
                     for f in range(n_frames)])


@app.command()
def compare(
    prompt: Prompt,
    negative: Negative,
    model: Model = session.DEFAULT_MODEL,
    scale: Scale = None,
    tau: Tau = None,
    alpha: Alpha = None,
    start: Start = 0.0,
    end: End = 1.0,
    norm: Norm = 1,
    min_sigma: MinSigma = 0.0,
    cfg: CfgOpt = 4.0,
    steps: Steps = None,
    guidance: Guidance = None,
    seed: Seed = 0,
    width: Width = None,
    height: Height = None,
    frames: Frames = None,
    num_images: Rows = 1,
    batch_size: BatchSize = 1,
    out: Out = None,
    device: Device = None,
    dtype: Dtype = None,
    offload: Offload = False,
    lora: Lora = None,
    debug: Debug = False,
) -> None:
    """The same prompt and seeds without guidance, with CFG and with NAG, as one labelled grid (or video)."""
    with common.errors(debug):
        options = Options(negative=negative, scale=scale, tau=tau, alpha=alpha, start=start, end=end, norm=norm,
                          min_sigma=min_sigma, steps=steps, guidance=guidance, seed=seed, width=width, height=height,
                          frames=frames, num_images=num_images, batch_size=batch_size)
        session.check_settings(model, **options.settings())
        _check(negative, cfg)
        session.check_sizes(width, height, frames)
        if out is not None:
            output.check_out(out)
        began = time.perf_counter()
        loaded = common.load_with_progress(model, device, dtype, offload, lora)
        out = out or Path("nag_compare.mp4" if loaded.is_video else "nag_compare.png")
        output.check_kind(out, loaded.is_video, model)
        if warning := session.vocabulary_warning(loaded, prompt, negative):
            common.note(warning)
        nag = options.nag(loaded)
        seeds = list(range(seed, seed + num_images))
        columns = _columns(loaded, prompt, negative, seeds, options, guidance, cfg, nag)
        title = _title(prompt, negative, loaded, options.call(loaded), cfg, nag)
        rows = [f"seed {s}" for s in seeds]
        grid = _video_grid(columns, rows, title) if loaded.is_video else make_grid(columns, rows, title)
        output.write_all([out], [grid])
        common.out.print(f"wrote {out} (columns: {', '.join(columns)}; rows: seeds {seeds[0]}..{seeds[-1]})",
                         markup=False)
        common.out.print(f"ran {common.settings_text(loaded, options.call(loaded), nag, negative)}; CFG column "
                         f"{cfg:g}; {time.perf_counter() - began:.1f} s", markup=False)
