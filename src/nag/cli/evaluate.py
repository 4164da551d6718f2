"""``nag eval``: none / CFG / NAG scored with CLIP score, FID, patch-FID and ImageReward."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from nag import evaluation as ev
from nag import session
from nag.evaluation.generate import get_state

from . import common
from .common import (
    Alpha,
    Debug,
    Device,
    Dtype,
    End,
    Height,
    MinSigma,
    Model,
    Norm,
    Offload,
    Scale,
    Start,
    Steps,
    Tau,
    Width,
    app,
)

__all__ = ["eval_"]

MetricsOpt = Annotated[bool, typer.Option("--metrics/--no-metrics", help="Compute the metrics after generating "
                                          "(--no-metrics: only draw the images and write the manifest).")]


def _methods(methods: str) -> list[str]:
    names = [m.strip() for m in methods.split(",")]
    unknown = [m for m in names if m not in ev.METHODS]
    if unknown or not any(names):
        raise ev.EvalError("Unknown method", f"{', '.join(map(repr, unknown)) or 'no method'} in --methods; "
                           f"methods are {', '.join(ev.METHODS)}.")
    return names


def _device(state: Any, device: str | None) -> str:
    """Under accelerate launch each process has its own device; otherwise --device (or the best one)."""
    if state.num_processes == 1:
        return session.resolve_device(device)
    dev = str(state.device)
    if device is not None and device.split(":")[0] != dev.split(":")[0]:
        common.note(f"under accelerate launch each process uses its own device ({dev}); --device {device} is "
                    "ignored.")
    return dev


def _report(results: dict | None, out: Path, metrics: bool, prompts: int, methods: int) -> None:
    if results is None:  # not the main process
        return
    if not metrics:
        common.out.print(f"wrote {out / 'manifest.json'} ({prompts} prompts x {methods} methods)", markup=False)
        return
    for skipped in results.get("skipped", {}).values():
        common.note(f"{skipped}.")
    common.out.print((out / "results.md").read_text(encoding="utf-8").split("## Per method")[0].rstrip(),
                     markup=False)
    common.out.print(f"wrote {out / 'results.json'} and {out / 'results.md'}", markup=False)


@app.command(name="eval")
def eval_(
    prompts: Annotated[Path, typer.Option("--prompts", help="Prompts: .txt (one a line), .json/.jsonl list, .csv "
                                          "with a 'prompt' column, or a COCO captions JSON.")],
    reference_images: Annotated[Path | None, typer.Option("--reference-images", help="Folder of real images "
                                                             "for FID and patch-FID (COCO val images).")] = None,
    model: Model = session.DEFAULT_MODEL,
    methods: Annotated[str, typer.Option(help="Comma-separated: none (no guidance), cfg (the pipeline's CFG with "
                                         "the negative prompt), nag.")] = "none,cfg,nag",
    negative: Annotated[str, typer.Option("--negative", "-n", help="Negative prompt of the cfg and nag methods.")]
    = ev.DEFAULT_NEGATIVE,
    out: Annotated[Path, typer.Option(help="Output folder: images, manifest.json, results.json, results.md. "
                                      "Running again with the same folder resumes.")] = Path("nag-eval"),
    scale: Scale = None,
    tau: Tau = None,
    alpha: Alpha = None,
    start: Start = 0.0,
    end: End = 1.0,
    norm: Norm = 1,
    min_sigma: MinSigma = 0.0,
    cfg: Annotated[float, typer.Option(help="CFG scale of the cfg method.")] = 4.0,
    steps: Steps = None,
    guidance: Annotated[float | None, typer.Option(help="guidance_scale of the none and nag methods (CFG with "
                                                      "an empty negative on top of NAG). Default: off.")] = None,
    seed: Annotated[int, typer.Option(help="Base seed: prompt i uses seed + i, whatever the number of processes.")]
    = 0,
    width: Width = None,
    height: Height = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Prompts per pipeline call.")] = 1,
    limit: Annotated[int | None, typer.Option(min=1, help="Use the first N prompts (5000: COCO-5K).")] = None,
    clip_model: Annotated[str, typer.Option(help="CLIP model of the CLIP score: Hub id or local folder (offline: "
                                            "see docs/evaluation.md).")] = ev.DEFAULT_CLIP,
    inception: Annotated[Path | None, typer.Option(help="FID feature extractor: the FID Inception weights file, "
                                                      "or a torch.export .pt2 archive. Default: torchmetrics'.")]
    = None,
    image_reward: Annotated[bool, typer.Option("--image-reward/--no-image-reward", help="ImageReward column, when "
                                               "the image-reward package and its checkpoint are available.")] = True,
    fid_size: Annotated[int, typer.Option(help="FID: images resized and centre-cropped to this size.")] = 299,
    patch_size: Annotated[int, typer.Option(help="Patch-FID: centre crop of this size at full resolution.")] = 299,
    metrics: MetricsOpt = True,
    device: Device = None,
    dtype: Dtype = None,
    offload: Offload = False,
    debug: Debug = False,
) -> None:
    """Evaluate none / CFG / NAG with CLIP score, FID, patch-FID and ImageReward (the paper's Table 1).

    Resumable (run again with the same --out); data parallel with
    `accelerate launch --multi_gpu --num_processes N -m nag.cli eval ...`.
    """
    with common.errors(debug):
        try:
            if metrics and reference_images is None:
                raise ev.EvalError("Missing option", "--reference-images is needed for FID and patch-FID "
                                   "(or pass --no-metrics to only generate).")
            prompt_list = ev.read_prompts(prompts, limit)
            if metrics:
                ev.list_images(reference_images)
            names = _methods(methods)
            given = dict(scale=scale, tau=tau, alpha=alpha, start=start, end=end, norm=norm, min_sigma=min_sigma)
            session.check_settings(model, **given)
            session.check_sizes(width, height, None)
            state = get_state()
            loaded = common.load_with_progress(model, _device(state, device), dtype, offload, None)
            nag_settings = session.nag_settings(loaded, **given)
            who = f" (process {state.process_index + 1}/{state.num_processes})" if state.num_processes > 1 else ""
            with common.progress_bar() as progress:
                tasks: dict[str, Any] = {}

                def on_start(method: str, count: int) -> None:
                    tasks[method] = progress.add_task(f"{method}{who}", total=count)

                results = ev.evaluate(
                    loaded.pipe, prompt_list, reference_images or Path("."), out, model=model, methods=names,
                    negative=negative, base_seed=seed, steps=steps or loaded.steps, guidance=guidance, cfg=cfg,
                    nag_settings=nag_settings, width=width, height=height, batch_size=batch_size,
                    clip_model=clip_model, inception=inception, image_reward="auto" if image_reward else "off",
                    fid_size=fid_size, patch_size=patch_size, metrics=metrics, state=state,
                    on_image=lambda method, _i: progress.advance(tasks[method]), on_start=on_start)
        except ev.EvalError as exc:
            raise session.NagCLIError(exc.title, exc.message) from exc
        _report(results, out, metrics, len(prompt_list), len(names))
