"""``evaluate``: generate with every method, then compute the metrics and write the reports."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .generate import DEFAULT_NEGATIVE, METHODS, OnImage, build_methods, fingerprint, generate_images, get_state
from .manifest import MANIFEST, build_manifest, image_path, write_json_atomic
from .metrics import DEFAULT_CLIP, compute_metrics, load_metric_nets
from .prompts import EvalError, list_images, read_prompts
from .report import versions, write_reports

__all__ = ["evaluate"]


def _preflight(state: Any, load: Callable[[], Any]) -> Any:
    """Run ``load`` on the main process; if it fails, every process raises the same error (rather than
    the others waiting for ever at the next barrier)."""
    value, error = None, None
    if state.is_main_process:
        try:
            value = load()
        except EvalError as exc:
            error = (exc.title, exc.message)
        except Exception as exc:  # noqa: BLE001 - re-raised below on the main process
            error = ("Metric networks could not be loaded", f"{type(exc).__name__}: {exc}")
            if state.num_processes == 1:
                raise
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        box = [error]
        broadcast_object_list(box, from_process=0)
        error = box[0]
    if error is not None:
        raise EvalError(*error)
    return value


def evaluate(
    pipe: Any,
    prompts: Sequence[str] | str | Path,
    reference_images: str | Path,
    out_dir: str | Path,
    *,
    model: str = "pipeline",
    methods: Sequence[str] = METHODS,
    negative: str = DEFAULT_NEGATIVE,
    base_seed: int = 0,
    steps: int | None = None,
    guidance: float | None = None,
    cfg: float = 4.0,
    nag_settings: dict[str, Any] | None = None,
    width: int | None = None,
    height: int | None = None,
    pipeline_kwargs: dict[str, Any] | None = None,
    batch_size: int = 1,
    limit: int | None = None,
    clip_model: Any = DEFAULT_CLIP,
    inception: Any = None,
    image_reward: Any = "auto",
    fid_size: int = 299,
    patch_size: int = 299,
    metric_batch_size: int = 32,
    metrics: bool = True,
    state: Any = None,
    on_image: OnImage | None = None,
    on_start: Callable[[str, int], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any] | None:
    """Evaluate ``pipe`` on ``prompts`` with ``methods`` against the images in ``reference_images``.

    Every process of an ``accelerate launch`` calls this with the same arguments; each draws its
    share of the missing images (see :func:`nag.evaluation.generate_images`). After a barrier the
    main process writes ``manifest.json``, computes the metrics and writes ``results.json`` and
    ``results.md`` into ``out_dir``, and returns the results; the other processes return None.
    ``metrics=False`` only generates and writes the manifest.

    ``pipeline_kwargs`` go to every pipeline call (e.g. custom ``timesteps``). ``nag_settings`` are
    ``nag.apply`` keyword arguments (scale, tau, alpha, start, end, norm); omitted ones are the
    pipeline family's defaults. The metric networks (``clip_model``, ``inception``,
    ``image_reward``) are described in :mod:`nag.evaluation.metrics`.
    """
    state = state if state is not None else get_state()
    log = log or (lambda _msg: None)
    prompt_list = read_prompts(prompts, limit) if isinstance(prompts, (str, Path)) else list(prompts)[:limit]
    if not prompt_list:
        raise EvalError("No prompts", "the prompt list is empty.")
    reference = list_images(reference_images) if metrics else []
    method_objs = build_methods(pipe, methods, negative=negative, steps=steps, guidance=guidance, cfg=cfg,
                                nag_settings=nag_settings, width=width, height=height,
                                pipeline_kwargs=pipeline_kwargs)
    out_dir = Path(out_dir)
    device = getattr(state, "device", "cpu")
    nets = None
    if metrics:
        log("loading the metric networks")
        nets = _preflight(state, lambda: load_metric_nets(clip_model, inception, image_reward, fid_size=fid_size,
                                                          patch_size=patch_size, device=device))
    generate_images(pipe, prompt_list, out_dir, method_objs, model=model, base_seed=base_seed,
                    batch_size=batch_size, state=state, on_image=on_image, on_start=on_start)
    if not state.is_main_process:
        return None

    settings = {m.name: fingerprint(m, model, prompt_list, base_seed) for m in method_objs}
    manifest = build_manifest(out_dir, prompt_list, settings, base_seed)
    write_json_atomic(out_dir / MANIFEST, manifest)
    missing = {name: sum(e["file"] is None for e in entry["images"]) for name, entry in manifest["methods"].items()}
    if any(missing.values()):
        raise EvalError("Images missing", f"after generation some images are missing ({missing}); run the same "
                        "command again to draw them.")
    if nets is None:
        return {"manifest": manifest}

    log("computing the metrics")
    generated = {m.name: [(p, image_path(out_dir, m.name, i)) for i, p in enumerate(prompt_list)]
                 for m in method_objs}
    scores = compute_metrics(nets, generated, reference, fid_size=fid_size, patch_size=patch_size,
                             batch_size=metric_batch_size, device=device)
    steps_used = next((m.call.get("num_inference_steps") for m in method_objs), None)
    results: dict[str, Any] = {
        "model": model,
        "steps": steps_used,
        "prompts": len(prompt_list),
        "reference_images": len(reference),
        "protocol": {"negative_prompt": negative, "base_seed": base_seed, **nets.describe},
        "methods": {
            m.name: {
                "metrics": scores[m.name],
                "counts": {"images": len(prompt_list), "reference_images": len(reference)},
                "settings": m.settings(),
            }
            for m in method_objs
        },
        "skipped": dict(nets.skipped),
        "versions": versions(),
        "run": {"processes": state.num_processes},
    }
    write_reports(out_dir, results)
    return results
