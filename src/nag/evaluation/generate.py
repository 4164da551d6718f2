"""The generation loop: methods, per-prompt seeds, sharding across processes, resume.

Work is split between the processes of an ``accelerate launch`` (data parallel: every process
holds the whole pipeline and draws a share of the prompts) with accelerate's ``PartialState``;
a plain ``python`` run is one process and does everything. Which images a run still needs is
decided from the files alone (an image exists only once completely written), so an interrupted
run continues where it stopped and a finished image is never drawn twice.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .manifest import check_settings_file, image_path, method_dir, save_image_atomic, write_json_atomic
from .prompts import EvalError, prompts_digest, seed_for

__all__ = ["METHODS", "DEFAULT_NEGATIVE", "Method", "build_methods", "generate_images", "get_state"]

#: The methods ``nag eval`` knows: no guidance, the pipeline's CFG with the negative prompt, NAG.
METHODS: tuple[str, ...] = ("none", "cfg", "nag")
#: The negative prompt of the paper's Table 1.
DEFAULT_NEGATIVE = "Low resolution, blurry"

OnImage = Callable[[str, int], None]


@dataclass(frozen=True)
class Method:
    """One way of sampling: ``call`` are the extra pipeline arguments, ``nag`` the ``nag.apply``
    arguments (None: no NAG)."""

    name: str
    call: dict[str, Any]
    negative: str = ""
    nag: dict[str, Any] | None = None

    def settings(self) -> dict[str, Any]:
        """JSON-able description (recorded with the images and in results.json)."""
        out: dict[str, Any] = {"method": self.name, "pipeline_kwargs": dict(self.call)}
        if self.nag is not None:
            out["nag"] = dict(self.nag)
            out["nag_negative_prompt"] = self.negative
        return out


def _call_params(pipe: Any) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(type(pipe).__call__).parameters)


def build_methods(
    pipe: Any,
    names: Sequence[str] = METHODS,
    *,
    negative: str = DEFAULT_NEGATIVE,
    steps: int | None = None,
    guidance: float | None = None,
    cfg: float = 4.0,
    nag_settings: dict[str, Any] | None = None,
    width: int | None = None,
    height: int | None = None,
    pipeline_kwargs: dict[str, Any] | None = None,
) -> list[Method]:
    """The methods ``names`` for ``pipe``.

    - ``none``: no guidance: ``guidance_scale=0`` (CFG off), or ``guidance`` when given.
    - ``cfg``: the pipeline's CFG with ``negative`` as the negative prompt at scale ``cfg``
      (``true_cfg_scale`` on pipelines that have it, such as Flux; ``guidance_scale`` otherwise).
    - ``nag``: as ``none``, inside ``nag.apply(pipe, negative, **nag_settings)``; with ``guidance``
      the pipeline's own CFG (empty negative) runs on top.

    ``pipeline_kwargs`` (JSON-able values, e.g. ``{"timesteps": [999, 749, 499, 249]}``) are passed
    to every call of every method.
    """
    names = [n.strip() for n in names if n.strip()]
    unknown = [n for n in names if n not in METHODS]
    if unknown or not names:
        raise EvalError("Unknown method", f"{', '.join(map(repr, unknown)) or 'no method'} given; methods are "
                        f"{', '.join(METHODS)} (comma-separated, e.g. --methods none,nag).")
    if len(set(names)) != len(names):
        raise EvalError("Unknown method", f"a method is listed twice in {','.join(names)}.")
    if "nag" in names or "cfg" in names:
        if not negative:
            raise EvalError("No negative prompt", "the cfg and nag methods need a negative prompt (--negative).")
    params = _call_params(pipe)
    if "num_frames" in params:
        raise EvalError("Video models not supported", f"{type(pipe).__name__} makes videos; the image metrics "
                        "(CLIP score, FID, patch-FID, ImageReward) need an image model.")
    true_cfg = "true_cfg_scale" in params
    base: dict[str, Any] = {}
    if "num_inference_steps" in params:
        default = params["num_inference_steps"].default
        base["num_inference_steps"] = int(steps if steps is not None else default)
    if width is not None:
        base["width"] = int(width)
    if height is not None:
        base["height"] = int(height)
    base.update(pipeline_kwargs or {})
    if guidance is not None:
        base["guidance_scale"] = float(guidance)
    elif not true_cfg and "guidance_scale" in params:
        base["guidance_scale"] = 0.0
    methods = []
    for name in names:
        if name == "none":
            methods.append(Method("none", dict(base)))
        elif name == "cfg":
            call = dict(base, negative_prompt=negative)
            call["true_cfg_scale" if true_cfg else "guidance_scale"] = float(cfg)
            methods.append(Method("cfg", call, negative))
        else:
            methods.append(Method("nag", dict(base), negative, resolve_nag(pipe, nag_settings)))
    return methods


def resolve_nag(pipe: Any, given: dict[str, Any] | None) -> dict[str, Any]:
    """``given`` NAG settings completed with the pipeline family's defaults (validated), as
    ``nag.apply`` keyword arguments."""
    from nag.families import pipeline_spec
    from nag.settings import NAGSettings

    given = {k: v for k, v in (given or {}).items() if v is not None}
    unknown = set(given) - {"scale", "tau", "alpha", "start", "end", "norm", "min_sigma"}
    if unknown:
        raise EvalError("Unknown NAG setting", f"{', '.join(sorted(unknown))}; NAG takes scale, tau, alpha, start, "
                        "end, norm, min_sigma.")
    try:
        spec = pipeline_spec(pipe)
    except NotImplementedError as exc:
        raise EvalError("Model family not supported", f"NAG cannot guide {type(pipe).__name__}: {exc}") from exc
    try:
        s = NAGSettings.resolve(spec.defaults, **given)
    except (ValueError, TypeError) as exc:
        raise EvalError("Option out of range", str(exc)) from exc
    return s.apply_kwargs()


def get_state() -> Any:
    """accelerate's ``PartialState`` (the process group an ``accelerate launch`` set up, or one process)."""
    try:
        from accelerate import PartialState
    except ImportError as exc:  # pragma: no cover - accelerate is in the eval extra
        raise EvalError("accelerate not installed", f"`nag eval` shards prompts with accelerate ({exc}). Install "
                        'it with `pip install "nag-diffusion[eval]"`.') from exc
    import os

    import torch

    # accelerate sets up a CPU process group (gloo) only when asked for the CPU: do so when the
    # launcher said --cpu, or when there is no CUDA device to run on.
    use_cpu = os.environ.get("ACCELERATE_USE_CPU", "").strip().lower() in {"1", "true", "yes"}
    return PartialState(cpu=use_cpu or not torch.cuda.is_available())


def fingerprint(method: Method, model: str, prompts: Sequence[str], base_seed: int) -> dict[str, Any]:
    """What decides a method's images: checked against the folder's settings.json on resume."""
    return {"model": model, "prompts_sha256": prompts_digest(prompts), "base_seed": base_seed, **method.settings()}


def generate_images(
    pipe: Any,
    prompts: Sequence[str],
    out_dir: str | Path,
    methods: Sequence[Method],
    *,
    model: str = "pipeline",
    base_seed: int = 0,
    batch_size: int = 1,
    state: Any = None,
    on_image: OnImage | None = None,
    on_start: Callable[[str, int], None] | None = None,
) -> dict[str, dict[str, int]]:
    """Draw every missing image of every method, this process's share of them.

    Per method: every process lists the missing images (after a barrier, so all see the same
    files), groups them into batches of ``batch_size`` consecutive prompt indices and takes its
    contiguous share of the batches (``split_between_processes``). Images are written atomically
    as they are made. Returns, per method, how many images this process drew and how many were
    already there. ``on_image(method, index)`` is called after each image is written;
    ``on_start(method, count)`` before a method's share is drawn.

    Images do not depend on the number of processes: prompt i always uses seed ``base_seed + i``
    and, at ``batch_size`` 1, runs alone.
    """
    import torch

    import nag

    if batch_size < 1:
        raise EvalError("Option out of range", f"--batch-size must be at least 1, got {batch_size}.")
    state = state if state is not None else get_state()
    out_dir = Path(out_dir)
    stats: dict[str, dict[str, int]] = {}
    for method in methods:
        settings = fingerprint(method, model, prompts, base_seed)
        new = check_settings_file(out_dir, method.name, settings)
        state.wait_for_everyone()  # every process has checked; the files are as the last run left them
        if new and state.is_main_process:
            write_json_atomic(method_dir(out_dir, method.name) / "settings.json", settings)
        pending = [i for i in range(len(prompts)) if not image_path(out_dir, method.name, i).is_file()]
        state.wait_for_everyone()  # nobody writes an image before every process has listed the missing ones
        batches = [pending[k:k + batch_size] for k in range(0, len(pending), batch_size)]
        with state.split_between_processes(batches) as mine:
            mine = list(mine)
        stats[method.name] = {"generated": 0, "already_done": len(prompts) - len(pending)}
        if on_start is not None:
            on_start(method.name, sum(len(b) for b in mine))
        if mine:
            guide = nag.apply(pipe, method.negative, **method.nag) if method.nag is not None else nullcontext()
            with guide:
                for batch in mine:
                    generators = [torch.Generator("cpu").manual_seed(seed_for(i, base_seed)) for i in batch]
                    call = dict(method.call)
                    if "negative_prompt" in call:  # some pipelines want a list when the prompt is one
                        call["negative_prompt"] = [call["negative_prompt"]] * len(batch)
                    images = pipe(prompt=[prompts[i] for i in batch], generator=generators, output_type="pil",
                                  **call).images
                    for i, image in zip(batch, images):
                        save_image_atomic(image, image_path(out_dir, method.name, i))
                        stats[method.name]["generated"] += 1
                        if on_image is not None:
                            on_image(method.name, i)
        state.wait_for_everyone()
    return stats
