"""``nag generate``: one prompt to PNGs or an MP4, or a prompt file to a folder (``--prompts``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from nag import session

from . import batch, common, output
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
    NumImages,
    Offload,
    Parallel,
    Scale,
    Seed,
    Start,
    Steps,
    Tau,
    Width,
    app,
)

__all__ = ["generate"]

OptionalPrompt = Annotated[str | None, typer.Option("--prompt", "-p", help="What to draw (or --prompts FILE).")]
PromptsFile = Annotated[Path | None, typer.Option("--prompts", help="Many prompts: .txt (one a line), .jsonl "
                                                     "or .csv with a prompt and optional negative and seed per "
                                                     "line; --out is then a folder (resumable, shardable with "
                                                     "accelerate launch).")]
Out = Annotated[Path | None, typer.Option(help="Output file: .png/.jpg/.webp for images, .mp4 for video; with "
                                             "--num-images N, files NAME-0 ... NAME-(N-1). Default: nag.png / "
                                             "nag.mp4. With --prompts: the output folder (default nag-out).")]


@app.command()
def generate(
    prompt: OptionalPrompt = None,
    prompts: PromptsFile = None,
    negative: Negative = "",
    model: Model = session.DEFAULT_MODEL,
    scale: Scale = None,
    tau: Tau = None,
    alpha: Alpha = None,
    start: Start = 0.0,
    end: End = 1.0,
    norm: Norm = 1,
    min_sigma: MinSigma = 0.0,
    steps: Steps = None,
    guidance: Guidance = None,
    seed: Seed = 0,
    width: Width = None,
    height: Height = None,
    frames: Frames = None,
    num_images: NumImages = 1,
    batch_size: BatchSize = 1,
    out: Out = None,
    device: Device = None,
    dtype: Dtype = None,
    offload: Offload = False,
    lora: Lora = None,
    parallel: Parallel = None,
    debug: Debug = False,
) -> None:
    """Generate images or a video with NAG steering away from --negative (an empty one: NAG off)."""
    with common.errors(debug):
        options = batch.Options(negative=negative, scale=scale, tau=tau, alpha=alpha, start=start, end=end,
                                norm=norm, min_sigma=min_sigma, steps=steps, guidance=guidance, seed=seed,
                                width=width, height=height, frames=frames, num_images=num_images,
                                batch_size=batch_size)
        session.check_settings(model, **options.settings())
        session.check_sizes(width, height, frames)
        if prompts is not None:
            if prompt is not None:
                raise session.NagCLIError("Conflicting options", "pass either --prompt or --prompts, not both.")
            if parallel is not None:
                raise session.NagCLIError("Conflicting options", "--parallel shards one generation over the "
                                          "processes; --prompts already splits the prompts between them.")
            batch.run(prompts, out or Path("nag-out"), model, options, device, dtype, offload, lora)
            return
        if prompt is None:
            raise session.NagCLIError("Missing option", "pass --prompt TEXT (what to draw) or --prompts FILE.")
        _one_prompt(prompt, out, model, options, device, dtype, offload, lora, parallel)


def _one_prompt(prompt: str, out: Path | None, model: str, options: batch.Options, device: str | None,
                dtype: str | None, offload: bool, lora: Path | None, parallel: str | None = None) -> None:
    rank, _ = session.parallel_rank(parallel)
    if out is not None:
        output.check_out(out)
    began = time.perf_counter()
    loaded = common.load_with_progress(model, session.parallel_device(device, parallel), dtype, offload, lora)
    session.enable_parallel(loaded, parallel)
    out = out or Path("nag.mp4" if loaded.is_video else "nag.png")
    output.check_kind(out, loaded.is_video, model)
    if warning := session.vocabulary_warning(loaded, prompt, options.negative):
        common.note(warning)
    call, settings = options.call(loaded), options.nag(loaded)
    seeds = list(range(options.seed, options.seed + options.num_images))
    with common.progress_bar() as progress, session.guide(loaded.pipe, options.negative, settings):
        on_step = common.step_counter(progress, "generating", batch.total_steps(loaded, call, seeds, options))
        results = session.run_pipeline(loaded, prompt, seeds, options.batch_size, on_step, **call)
    if rank:  # every process holds the whole result under --parallel: the first one writes it
        return
    paths = [output.numbered(out, i, len(results)) for i in range(len(results))]
    output.write_all(paths, results)
    for path in paths:
        common.out.print(f"wrote {path}", markup=False)
    common.out.print(f"ran {common.settings_text(loaded, call, settings, options.negative)}; seeds "
                     f"{seeds[0]}..{seeds[-1]}; {len(results)} {'videos' if loaded.is_video else 'images'} in "
                     f"{time.perf_counter() - began:.1f} s", markup=False)
