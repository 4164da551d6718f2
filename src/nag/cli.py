"""The ``nag`` command: generate with Normalized Attention Guidance, compare it with CFG, list models.

    nag generate --prompt "a star on a white background" --negative "yellow" --out star.png
    nag compare  --prompt "a star on a white background" --negative "yellow" --out grid.png
    nag eval     --prompts captions.txt --reference-images coco/val2014 --methods none,nag --out runs/eval
    nag generate --model black-forest-labs/FLUX.1-schnell --prompt "a fox" --negative "blurry" --offload
    nag models

Without ``--model`` the built-in tiny model (``builtin:fewstep``) is used: it runs offline on a
CPU in seconds. ``--model`` also takes ``builtin:multistep``, a local diffusers directory, or a
Hugging Face model id (downloaded, or read from the local cache when offline).

Errors the user can act on (unknown model, no weights offline, a pipeline NAG does not support,
out-of-range options, out of memory) are printed as one paragraph without a traceback;
``--debug`` shows the traceback.
"""

from __future__ import annotations

import inspect
import math
import os
import re
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from typing_extensions import Annotated

from nag.toy import DEFAULT_NAG

__all__ = ["app", "main", "NagCLIError", "make_grid", "resolve_device", "resolve_dtype", "COMPARE_LABELS"]

BUILTIN_PREFIX = "builtin:"
DEFAULT_MODEL = "builtin:fewstep"
#: NAG settings for the built-in tiny model (``nag.toy.DEFAULT_NAG``; ``python -m nag.demo`` uses them too).
BUILTIN_NAG = dict(DEFAULT_NAG)
#: Column labels of ``nag compare``.
COMPARE_LABELS = ("no guidance", "CFG", "NAG")
#: Grid layout of ``nag compare``: label strip height, padding, minimum cell size in pixels.
HEADER, PAD, MIN_CELL = 28, 6, 128
#: Frames per second of written videos.
FPS = 16

app = typer.Typer(
    name="nag",
    help="Normalized Attention Guidance (NAG) for diffusers pipelines: a negative prompt that works, "
    "also on few-step models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_err = Console(stderr=True, highlight=False)
_out = Console(highlight=False)


class NagCLIError(Exception):
    """An error the user can act on: printed as one paragraph, without a traceback."""

    def __init__(self, title: str, message: str) -> None:
        super().__init__(f"{title}: {message}")
        self.title = title
        self.message = message


# --------------------------------------------------------------------------------------------------
# Device, dtype
# --------------------------------------------------------------------------------------------------


def resolve_device(device: str | None) -> str:
    """``device`` if given (checked to exist), else the best available one: cuda > mps > cpu."""
    import torch

    if device is None or device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    kind = device.split(":")[0]
    available = {
        "cpu": True,
        "cuda": torch.cuda.is_available(),
        "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available(),
    }
    if kind not in available:
        raise NagCLIError("Unknown device", f"--device {device!r} is not one of auto, cpu, cuda, cuda:N, mps.")
    if not available[kind]:
        raise NagCLIError(
            "Device not available",
            f"--device {device} was asked for, but this torch build ({torch.__version__}) cannot use it on this "
            "machine. Omit --device to pick the best available device automatically, or pass --device cpu.",
        )
    return device


_DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
           "bfloat16": "bfloat16", "bf16": "bfloat16"}


def resolve_dtype(dtype: str | None, device: str) -> Any:
    """``dtype`` if given, else bfloat16 on CUDA where supported (float16 otherwise), float16 on MPS,
    float32 on the CPU."""
    import torch

    if dtype is None or dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.startswith("mps"):
            return torch.float16
        return torch.float32
    name = _DTYPES.get(dtype.lower())
    if name is None:
        raise NagCLIError("Unknown dtype", f"--dtype {dtype!r} is not one of auto, float32, float16, bfloat16.")
    return getattr(torch, name)


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


@dataclass
class Loaded:
    """A loaded pipeline and what the commands need to know about it."""

    pipe: Any
    model: str
    builtin: bool
    device: str
    nag_defaults: dict[str, float] = field(default_factory=dict)
    steps: int | None = None
    guidance: float | None = None

    @property
    def is_video(self) -> bool:
        return "num_frames" in _call_params(self.pipe)

    @property
    def has_true_cfg(self) -> bool:
        return "true_cfg_scale" in _call_params(self.pipe)


def _call_params(pipe: Any) -> set[str]:
    return set(inspect.signature(type(pipe).__call__).parameters)


@contextmanager
def _quiet_loading() -> Iterator[None]:
    """diffusers/transformers logging at error level while loading (no 'loading components' noise)."""
    import warnings

    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    levels = dlog.get_verbosity(), tlog.get_verbosity()
    for log in (dlog, tlog):
        log.set_verbosity_error()
        log.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        for log, level in zip((dlog, tlog), levels):
            log.set_verbosity(level)
            log.enable_progress_bar()


def _is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _no_weights(model: str, detail: str) -> NagCLIError:
    return NagCLIError(
        "No weights available offline",
        f"the model {model!r} is not a local directory and is not in the local Hugging Face cache "
        f"({detail}). Download it once while online (`huggingface-cli download {model}`, or run this command "
        "without HF_HUB_OFFLINE=1), or pass --model a local diffusers directory; the built-in tiny model "
        "(--model builtin:fewstep) needs no download.",
    )


def _load_pretrained(model: str, dtype: Any) -> Any:
    """``DiffusionPipeline.from_pretrained`` with its failures turned into :class:`NagCLIError`."""
    from diffusers import DiffusionPipeline

    path = Path(model).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise NagCLIError(
                "Not a diffusers pipeline",
                f"{str(path)!r} exists but has no model_index.json, so it is not a diffusers pipeline directory. "
                "Pass the folder that `pipe.save_pretrained(...)` wrote (or a Hugging Face model id).",
            )
        with _quiet_loading():
            return DiffusionPipeline.from_pretrained(path, dtype=dtype, local_files_only=True)

    from huggingface_hub.utils import HFValidationError, validate_repo_id

    looks_like_path = model.startswith((".", "/", "~")) or os.sep in model.strip("/").replace("/", "", 1)
    try:
        validate_repo_id(model)
    except HFValidationError:
        looks_like_path = True
    if looks_like_path:
        raise _unknown_model(model, "it is neither an existing directory nor a valid Hugging Face model id")

    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        with _quiet_loading():
            return DiffusionPipeline.from_pretrained(model, dtype=dtype, local_files_only=_is_offline())
    except GatedRepoError as exc:
        raise NagCLIError(
            "Model needs access",
            f"{model!r} is a gated model on the Hugging Face Hub: accept its licence on its model page and log in "
            "(`huggingface-cli login`, or set HF_TOKEN), then run the command again.",
        ) from exc
    except RepositoryNotFoundError as exc:
        raise _unknown_model(model, "the Hugging Face Hub has no such model (or it is private)") from exc
    except OSError as exc:
        text = str(exc)
        if any(s in text for s in ("not fully cached", "outgoing traffic has been disabled", "offline",
                                    "Cannot reach", "couldn't connect", "Connection")):
            detail = "HF_HUB_OFFLINE is set" if _is_offline() else "the Hub could not be reached"
            raise _no_weights(model, detail) from exc
        raise


def _unknown_model(model: str, why: str) -> NagCLIError:
    from nag.toy import VARIANTS

    builtins = ", ".join(BUILTIN_PREFIX + v for v in VARIANTS)
    return NagCLIError(
        "Unknown model",
        f"{model!r}: {why}. --model takes a built-in model ({builtins}), a local diffusers directory "
        "(what `pipe.save_pretrained` writes), or a Hugging Face model id such as "
        "black-forest-labs/FLUX.1-schnell; `nag models` lists the supported pipeline families.",
    )


def _check_supported(pipe: Any) -> None:
    """Refuse a pipeline NAG cannot guide, before any sampling."""
    from nag.families import pipeline_spec

    try:
        pipeline_spec(pipe)
    except NotImplementedError as exc:
        raise NagCLIError(
            "Model family not supported",
            f"the model loads as {type(pipe).__name__}, which NAG cannot guide: {exc} "
            "Run `nag models` for the supported families.",
        ) from exc


def load_model(
    model: str,
    device: str,
    dtype: Any,
    offload: bool = False,
    lora: Optional[Path] = None,
) -> Loaded:
    """Load ``model`` (a ``builtin:`` id, a local directory or a Hub id) onto ``device``.

    ``offload`` uses ``enable_model_cpu_offload`` on an accelerator (weights stay on the CPU until
    each component runs); ``lora`` is loaded with ``pipe.load_lora_weights``.
    """
    if model.startswith(BUILTIN_PREFIX):
        from nag import toy

        variant = model[len(BUILTIN_PREFIX):]
        if variant not in toy.VARIANTS:
            raise _unknown_model(model, f"there is no built-in model {variant!r}")
        try:
            toy.weights_dir(variant)
        except FileNotFoundError as exc:
            raise NagCLIError(
                "No weights available offline",
                f"the built-in tiny model {model!r} has no weights in this installation ({exc}). Reinstall the "
                "package from a complete checkout, or pass --model a local diffusers directory or a Hugging Face "
                "model id.",
            ) from exc
        with _quiet_loading():
            pipe = toy.load_pipeline(variant, device="cpu", dtype=dtype)
        loaded = Loaded(pipe, model, True, device, dict(BUILTIN_NAG),
                        toy.DEFAULT_STEPS[variant], toy.DEFAULT_GUIDANCE[variant])
    else:
        pipe = _load_pretrained(model, dtype)
        loaded = Loaded(pipe, model, False, device)

    _check_supported(pipe)
    if lora is not None:
        _load_lora(pipe, lora)
    if offload and device != "cpu":
        pipe.enable_model_cpu_offload(device=device)
    else:
        if offload:
            _err.print("note: --offload has no effect on the CPU; running without it.")
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return loaded


def _load_lora(pipe: Any, lora: Path) -> None:
    if not hasattr(pipe, "load_lora_weights"):
        raise NagCLIError(
            "LoRA not supported",
            f"{type(pipe).__name__} cannot load LoRA weights (it has no `load_lora_weights`). Run without --lora.",
        )
    if not lora.exists():
        raise NagCLIError("LoRA file not found", f"--lora {str(lora)!r} does not exist. Pass a .safetensors LoRA "
                          "file, or the directory that holds pytorch_lora_weights.safetensors.")
    try:
        if lora.is_file():
            pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
        else:
            pipe.load_lora_weights(str(lora))
    except (ValueError, KeyError, OSError, RuntimeError) as exc:
        raise NagCLIError(
            "LoRA does not fit",
            f"--lora {str(lora)!r} could not be loaded into {type(pipe).__name__} ({str(exc).splitlines()[0][:300]}). "
            "Check that the LoRA was trained for this model.",
        ) from exc


# --------------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------------


def _defaults_for(model: str) -> Any:
    """Family defaults for ``model`` read from its model_index.json when local, else generic ones;
    used to validate the NAG options before loading any weights."""
    import json

    from nag.families import GENERIC_DEFAULTS, PIPELINES
    from nag.settings import FamilyDefaults

    if model.startswith(BUILTIN_PREFIX):
        return FamilyDefaults(**BUILTIN_NAG)
    index = Path(model).expanduser() / "model_index.json"
    if index.is_file():
        try:
            spec = PIPELINES.get(json.loads(index.read_text()).get("_class_name", ""))
        except (OSError, ValueError):
            spec = None
        if spec is not None:
            return spec.defaults
    return GENERIC_DEFAULTS


def check_settings(model: str, scale: float | None, tau: float | None, alpha: float | None,
                   start: float, end: float, norm: int) -> Any:
    """Validated NAG settings (``nag.NAGSettings``); an out-of-range option raises :class:`NagCLIError`."""
    from nag.settings import NAGSettings

    try:
        return NAGSettings.resolve(_defaults_for(model), scale=scale, tau=tau, alpha=alpha,
                                   start=start, end=end, norm=norm)
    except (ValueError, TypeError) as exc:
        message = re.sub(r"`(scale|tau|alpha|start|end|norm)`", r"--\1", str(exc).replace("NAG `", "`"))
        raise NagCLIError("Option out of range", f"{message.rstrip('.')}. See `nag generate --help`.") from exc


def _check_sizes(width: int | None, height: int | None, frames: int | None) -> None:
    for name, value in (("--width", width), ("--height", height)):
        if value is not None and (value < 8 or value % 8):
            raise NagCLIError("Option out of range", f"{name} must be a positive multiple of 8, got {value}.")
    if frames is not None and frames < 1:
        raise NagCLIError("Option out of range", f"--frames must be at least 1, got {frames}.")


# --------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------


@contextmanager
def _progress() -> Iterator[Progress]:
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=_err, transient=True,
                  disable=not _err.is_terminal) as progress:
        yield progress


def _oom_error(exc: BaseException) -> NagCLIError:
    return NagCLIError(
        "Out of memory",
        f"the device ran out of memory ({str(exc).splitlines()[0][:200]}). Try --offload (keeps the weights on "
        "the CPU until each part of the model runs), fewer --num-images, a smaller --width/--height or fewer "
        "--frames, or --dtype bfloat16/float16 on a GPU.",
    )


def _is_oom(exc: BaseException) -> bool:
    import torch

    oom_types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                                  getattr(torch.cuda, "OutOfMemoryError", None)) if t is not None)
    return isinstance(exc, oom_types) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


def run_pipeline(loaded: Loaded, prompt: str, seed: int, num: int, progress: Progress | None,
                 description: str, **kwargs: Any) -> list[Any]:
    """Call the pipeline for ``num`` samples (seeds ``seed`` ... ``seed + num - 1``).

    Returns PIL images, or for video pipelines one ``(frames, H, W, 3)`` uint8 array per sample.
    """
    import numpy as np
    import torch

    pipe = loaded.pipe
    params = _call_params(pipe)
    steps = kwargs.get("num_inference_steps")
    if steps is None and "num_inference_steps" in params:
        steps = inspect.signature(type(pipe).__call__).parameters["num_inference_steps"].default
    call = {k: v for k, v in kwargs.items() if v is not None}
    call["generator"] = [torch.Generator("cpu").manual_seed(seed + i) for i in range(num)]
    call["output_type"] = "np" if loaded.is_video else "pil"
    task = None
    if progress is not None and "callback_on_step_end" in params:
        total = int(steps) if isinstance(steps, int) else None
        task = progress.add_task(description, total=total)

        def on_step(_pipe: Any, _i: int, _t: Any, callback_kwargs: dict) -> dict:
            progress.advance(task)
            return callback_kwargs

        call["callback_on_step_end"] = on_step
    try:
        out = pipe([prompt] * num, **call)
    except Exception as exc:
        if _is_oom(exc):
            raise _oom_error(exc) from exc
        raise
    finally:
        if task is not None:
            progress.remove_task(task)
    if loaded.is_video:
        frames = out.frames
        return [(np.clip(np.asarray(v, dtype=np.float32), 0, 1) * 255).round().astype(np.uint8) for v in frames]
    return list(out.images)


def _sampling_kwargs(loaded: Loaded, steps: int | None, guidance: float | None, width: int | None,
                     height: int | None, frames: int | None) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"num_inference_steps": steps or loaded.steps, "width": width, "height": height}
    guidance = loaded.guidance if guidance is None else guidance
    if guidance is not None:
        kwargs["guidance_scale"] = guidance
    if frames is not None:
        if not loaded.is_video:
            raise NagCLIError("Option not applicable", f"--frames is for video models; {type(loaded.pipe).__name__} "
                              "makes images. Omit --frames.")
        kwargs["num_frames"] = frames
    return kwargs


def _nag_kwargs(loaded: Loaded, scale: float | None, tau: float | None, alpha: float | None) -> dict[str, float]:
    """The NAG options given on the command line over the model's own defaults (None: nag.apply's)."""
    given = {k: v for k, v in (("scale", scale), ("tau", tau), ("alpha", alpha)) if v is not None}
    return {**loaded.nag_defaults, **given}


def _numbered(out: Path, index: int, count: int) -> Path:
    return out if count == 1 else out.with_name(f"{out.stem}-{index}{out.suffix}")


def write_video(path: Path, frames: Any, fps: int = FPS) -> None:
    """Write ``(frames, H, W, 3)`` uint8 frames as an H.264 MP4 (imageio with its bundled ffmpeg)."""
    import imageio.v2 as imageio
    import numpy as np

    frames = np.asarray(frames)
    # H.264 wants even sizes: pad by one pixel where needed.
    h, w = frames.shape[1:3]
    frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    imageio.mimwrite(path, list(frames), fps=fps, codec="libx264", macro_block_size=1)


# --------------------------------------------------------------------------------------------------
# Grid
# --------------------------------------------------------------------------------------------------


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def cell_size(image_size: tuple[int, int]) -> tuple[int, int]:
    """The size an image gets in a grid: upscaled by a whole factor to at least ``MIN_CELL`` wide."""
    w, h = image_size
    factor = max(1, math.ceil(MIN_CELL / w))
    return w * factor, h * factor


def grid_size(image_size: tuple[int, int], columns: int, rows: int) -> tuple[int, int]:
    """The (width, height) of :func:`make_grid`'s result."""
    cw, ch = cell_size(image_size)
    return PAD + columns * (cw + PAD), HEADER + rows * (ch + PAD)


def make_grid(columns: dict[str, list[Any]]) -> Any:
    """A labelled grid: one column per entry of ``columns`` (label -> images), one row per sample.

    Labels sit in a ``HEADER``-pixel strip above each column, centred; images are upscaled with
    nearest neighbour to :func:`cell_size`.
    """
    from PIL import Image, ImageDraw

    images = list(columns.values())
    rows = len(images[0])
    cw, ch = cell_size(images[0][0].size)
    grid = Image.new("RGB", grid_size(images[0][0].size, len(columns), rows), "white")
    draw = ImageDraw.Draw(grid)
    font = _font(16)
    for c, (label, column) in enumerate(columns.items()):
        x = PAD + c * (cw + PAD)
        draw.text((x + cw // 2, HEADER // 2), label, fill="black", font=font, anchor="mm")
        for r, image in enumerate(column):
            grid.paste(image.convert("RGB").resize((cw, ch), Image.NEAREST), (x, HEADER + r * (ch + PAD)))
    return grid


# --------------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------------

Model = Annotated[str, typer.Option("--model", "-m", help="builtin:fewstep, builtin:multistep, a local diffusers "
                                    "directory, or a Hugging Face model id.")]
Prompt = Annotated[str, typer.Option("--prompt", "-p", help="What to draw.")]
Negative = Annotated[str, typer.Option("--negative", "-n", help="What to steer away from (the NAG negative prompt).")]
Scale = Annotated[Optional[float], typer.Option(help="NAG scale s (1 = off; the paper's phi is s - 1). "
                                                "Default: the model family's.")]
Tau = Annotated[Optional[float], typer.Option(help="NAG tau: cap on the guided feature's norm growth. "
                                              "Default: the family's.")]
Alpha = Annotated[Optional[float], typer.Option(help="NAG alpha in [0, 1]: blend of guided and positive "
                                                "features. Default: the family's.")]
Start = Annotated[float, typer.Option(help="Fraction of the trajectory (from the noisy end) where NAG starts.")]
End = Annotated[float, typer.Option(help="Fraction of the trajectory where NAG stops (0.25: first quarter only).")]
Norm = Annotated[int, typer.Option(help="Norm order of NAG's ratio: 1 or 2.")]
Steps = Annotated[Optional[int], typer.Option(min=1, help="Sampling steps. Default: the model's.")]
Guidance = Annotated[Optional[float], typer.Option(help="The pipeline's guidance_scale (CFG; 0 or 1 = off). "
                                                   "Default: the model's.")]
Seed = Annotated[int, typer.Option(help="Random seed; sample i uses seed + i.")]
Width = Annotated[Optional[int], typer.Option(help="Image width in pixels (multiple of 8). Default: the model's.")]
Height = Annotated[Optional[int], typer.Option(help="Image height in pixels (multiple of 8). Default: the model's.")]
Frames = Annotated[Optional[int], typer.Option(help="Video frames (video models only). Default: the model's.")]
NumImages = Annotated[int, typer.Option("--num-images", min=1, help="Samples to draw.")]
Device = Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:N or mps. Default: cuda > mps > cpu.")]
Dtype = Annotated[Optional[str], typer.Option(help="float32, float16 or bfloat16. Default: bfloat16 on CUDA "
                                              "where supported, float16 on MPS, float32 on the CPU.")]
Offload = Annotated[bool, typer.Option("--offload", help="Keep weights on the CPU until each part of the model "
                                       "runs (enable_model_cpu_offload); for GPUs short of memory.")]
Lora = Annotated[Optional[Path], typer.Option(help="A LoRA .safetensors file (or directory) to load into the "
                                              "pipeline.")]
Debug = Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")]


@contextmanager
def _errors(debug: bool) -> Iterator[None]:
    """Turn :class:`NagCLIError` (and out-of-memory errors) into a one-paragraph message and exit 1."""
    try:
        yield
    except NagCLIError as exc:
        if debug:
            raise
        _fail(exc)
    except Exception as exc:
        if debug:
            raise
        if _is_oom(exc):
            _fail(_oom_error(exc))
        raise


def _fail(exc: NagCLIError) -> None:
    _err.print(f"[bold red]Error:[/] [bold]{exc.title}[/] - {exc.message}", soft_wrap=False)
    raise typer.Exit(1)


def _load_with_progress(model: str, device: str | None, dtype: str | None, offload: bool,
                        lora: Optional[Path]) -> Loaded:
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    with _progress() as progress:
        progress.add_task(f"loading {model} ({dev}, {str(torch_dtype).replace('torch.', '')})", total=None)
        return load_model(model, dev, torch_dtype, offload, lora)


@app.command()
def generate(
    prompt: Prompt,
    negative: Negative = "",
    model: Model = DEFAULT_MODEL,
    scale: Scale = None,
    tau: Tau = None,
    alpha: Alpha = None,
    start: Start = 0.0,
    end: End = 1.0,
    norm: Norm = 1,
    steps: Steps = None,
    guidance: Guidance = None,
    seed: Seed = 0,
    width: Width = None,
    height: Height = None,
    frames: Frames = None,
    num_images: NumImages = 1,
    out: Annotated[Optional[Path], typer.Option(help="Output file: PNG for images, MP4 for video; with "
                                                "--num-images N, files NAME-0 ... NAME-(N-1). Default: "
                                                "nag.png / nag.mp4.")] = None,
    device: Device = None,
    dtype: Dtype = None,
    offload: Offload = False,
    lora: Lora = None,
    debug: Debug = False,
) -> None:
    """Generate images (PNG) or a video (MP4) with NAG steering away from --negative."""
    import nag

    with _errors(debug):
        settings = check_settings(model, scale, tau, alpha, start, end, norm)
        _check_sizes(width, height, frames)
        loaded = _load_with_progress(model, device, dtype, offload, lora)
        kwargs = _sampling_kwargs(loaded, steps, guidance, width, height, frames)
        nag_kwargs = _nag_kwargs(loaded, scale, tau, alpha)
        guide = nag.apply(loaded.pipe, negative, start=settings.start, end=settings.end, norm=settings.norm,
                          **nag_kwargs) if negative else nullcontext()
        with _progress() as progress, guide:
            results = run_pipeline(loaded, prompt, seed, num_images, progress, "generating", **kwargs)
        out = out or Path("nag.mp4" if loaded.is_video else "nag.png")
        out.parent.mkdir(parents=True, exist_ok=True)
        written = []
        for i, result in enumerate(results):
            path = _numbered(out, i, len(results))
            if loaded.is_video:
                write_video(path, result)
            else:
                result.save(path)
            written.append(path)
        for path in written:
            _out.print(f"wrote {path}")


@app.command()
def compare(
    prompt: Prompt,
    negative: Negative,
    model: Model = DEFAULT_MODEL,
    scale: Scale = None,
    tau: Tau = None,
    alpha: Alpha = None,
    start: Start = 0.0,
    end: End = 1.0,
    norm: Norm = 1,
    cfg: Annotated[float, typer.Option(help="CFG scale of the CFG column (the negative prompt as its "
                                       "unconditional branch).")] = 4.0,
    steps: Steps = None,
    guidance: Guidance = None,
    seed: Seed = 0,
    width: Width = None,
    height: Height = None,
    frames: Frames = None,
    num_images: Annotated[int, typer.Option("--num-images", min=1, help="Rows of the grid (seeds seed, "
                                            "seed + 1, ...).")] = 1,
    out: Annotated[Optional[Path], typer.Option(help="Output: a PNG grid, or an MP4 side by side for video. "
                                                "Default: nag_compare.png / .mp4.")] = None,
    device: Device = None,
    dtype: Dtype = None,
    offload: Offload = False,
    lora: Lora = None,
    debug: Debug = False,
) -> None:
    """The same prompt and seeds without guidance, with CFG and with NAG, as one labelled grid (or video)."""
    import nag

    with _errors(debug):
        check_settings(model, scale, tau, alpha, start, end, norm)
        if cfg < 1:
            raise NagCLIError("Option out of range", f"--cfg must be > 1 for the CFG column to use guidance, got {cfg}.")
        _check_sizes(width, height, frames)
        loaded = _load_with_progress(model, device, dtype, offload, lora)
        base = _sampling_kwargs(loaded, steps, guidance, width, height, frames)
        if not loaded.has_true_cfg and guidance is None:
            base["guidance_scale"] = 0.0  # "no guidance": CFG off, unless --guidance asks otherwise
        cfg_kwargs = dict(base, negative_prompt=[negative] * num_images)
        cfg_kwargs["true_cfg_scale" if loaded.has_true_cfg else "guidance_scale"] = cfg
        nag_kwargs = _nag_kwargs(loaded, scale, tau, alpha)
        columns: dict[str, list[Any]] = {}
        with _progress() as progress:
            columns[COMPARE_LABELS[0]] = run_pipeline(loaded, prompt, seed, num_images, progress, "no guidance", **base)
            columns[COMPARE_LABELS[1]] = run_pipeline(loaded, prompt, seed, num_images, progress, "CFG", **cfg_kwargs)
            with nag.apply(loaded.pipe, negative, start=start, end=end, norm=norm, **nag_kwargs):
                columns[COMPARE_LABELS[2]] = run_pipeline(loaded, prompt, seed, num_images, progress, "NAG", **base)
        out = out or Path("nag_compare.mp4" if loaded.is_video else "nag_compare.png")
        out.parent.mkdir(parents=True, exist_ok=True)
        if loaded.is_video:
            from PIL import Image
            import numpy as np

            n_frames = min(len(v) for col in columns.values() for v in col)
            video = [np.asarray(make_grid({label: [Image.fromarray(v[f]) for v in col]
                                           for label, col in columns.items()})) for f in range(n_frames)]
            write_video(out, np.stack(video))
        else:
            make_grid(columns).save(out)
        _out.print(f"wrote {out} (columns: {', '.join(columns)}; rows: seeds {seed}..{seed + num_images - 1})")


@app.command()
def models(debug: Debug = False) -> None:
    """Supported pipeline families with their default NAG scale/tau/alpha/end, and the built-in models."""
    import nag

    with _errors(debug):
        table = Table(title="Pipelines NAG supports (defaults: nag.supported_pipelines())")
        for name in ("pipeline", "model", "family", "scale", "tau", "alpha", "end", "few-step"):
            table.add_column(name, justify="right" if name in {"scale", "tau", "alpha", "end"} else "left",
                             overflow="fold")
        for name, info in nag.supported_pipelines().items():
            table.add_row(name, info["label"], info["family"], f"{info['scale']:g}", f"{info['tau']:g}",
                          f"{info['alpha']:g}", "1", "yes" if info["few_step"] else "no")
        from nag.toy import DEFAULT_STEPS, VARIANTS

        for variant in VARIANTS:
            table.add_row(f"{BUILTIN_PREFIX}{variant}", f"built-in tiny model, {DEFAULT_STEPS[variant]} steps",
                          "unet", f"{BUILTIN_NAG['scale']:g}", f"{BUILTIN_NAG['tau']:g}", f"{BUILTIN_NAG['alpha']:g}",
                          "1", "yes" if variant == "fewstep" else "no")
        _out.print(table)
        _out.print("Other pipelines whose denoiser cross-attends to the text work through the generic path "
                   "(scale 3, tau 2.5, alpha 0.5).")


MetricsOpt = Annotated[bool, typer.Option("--metrics/--no-metrics", help="Compute the metrics after generating "
                                          "(--no-metrics: only draw the images and write the manifest).")]


@app.command(name="eval")
def eval_(
    prompts: Annotated[Path, typer.Option("--prompts", help="Prompts: .txt (one a line), .json/.jsonl list, .csv "
                                          "with a 'prompt' column, or a COCO captions JSON.")],
    reference_images: Annotated[Optional[Path], typer.Option("--reference-images", help="Folder of real images "
                                                             "for FID and patch-FID (COCO val images).")] = None,
    model: Model = DEFAULT_MODEL,
    methods: Annotated[str, typer.Option(help="Comma-separated: none (no guidance), cfg (the pipeline's CFG with "
                                         "the negative prompt), nag.")] = "none,cfg,nag",
    negative: Annotated[str, typer.Option("--negative", "-n", help="Negative prompt of the cfg and nag methods.")]
    = "Low resolution, blurry",
    out: Annotated[Path, typer.Option(help="Output folder: images, manifest.json, results.json, results.md. "
                                      "Running again with the same folder resumes.")] = Path("nag-eval"),
    scale: Scale = None,
    tau: Tau = None,
    alpha: Alpha = None,
    start: Start = 0.0,
    end: End = 1.0,
    norm: Norm = 1,
    cfg: Annotated[float, typer.Option(help="CFG scale of the cfg method.")] = 4.0,
    steps: Steps = None,
    guidance: Annotated[Optional[float], typer.Option(help="guidance_scale of the none and nag methods (CFG with "
                                                      "an empty negative on top of NAG). Default: off.")] = None,
    seed: Annotated[int, typer.Option(help="Base seed: prompt i uses seed + i, whatever the number of processes.")]
    = 0,
    width: Width = None,
    height: Height = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Prompts per pipeline call.")] = 1,
    limit: Annotated[Optional[int], typer.Option(min=1, help="Use the first N prompts (5000: COCO-5K).")] = None,
    clip_model: Annotated[str, typer.Option(help="CLIP model of the CLIP score: Hub id or local folder.")]
    = "openai/clip-vit-large-patch14",
    inception: Annotated[Optional[Path], typer.Option(help="FID feature extractor: the FID Inception weights file, "
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
    with _errors(debug):
        try:
            from nag import evaluation as ev
        except ImportError as exc:  # pragma: no cover - the package imports without the metric libraries
            raise NagCLIError("Evaluation not installed", f"{exc}. Install it with "
                              '`pip install "nag-diffusion[eval]"`.') from exc
        try:
            if metrics and reference_images is None:
                raise ev.EvalError("Missing option", "--reference-images is needed for FID and patch-FID "
                                   "(or pass --no-metrics to only generate).")
            prompt_list = ev.read_prompts(prompts, limit)
            if metrics:
                ev.list_images(reference_images)
            names = [m.strip() for m in methods.split(",")]
            unknown = [m for m in names if m not in ev.METHODS]
            if unknown or not any(names):
                raise ev.EvalError("Unknown method", f"{', '.join(map(repr, unknown)) or 'no method'} in --methods; "
                                   f"methods are {', '.join(ev.METHODS)}.")
            check_settings(model, scale, tau, alpha, start, end, norm)
            _check_sizes(width, height, None)
            from nag.evaluation.generate import get_state

            state = get_state()
            if state.num_processes > 1:
                dev = str(state.device)
                if device is not None and device.split(":")[0] != dev.split(":")[0]:
                    _err.print(f"note: under accelerate launch each process uses its own device ({dev}); "
                               f"--device {device} is ignored.")
            else:
                dev = resolve_device(device)
            loaded = _load_with_progress(model, dev, dtype, offload, None)
            nag_settings = {**_nag_kwargs(loaded, scale, tau, alpha), "start": start, "end": end, "norm": norm}
            who = f" (process {state.process_index + 1}/{state.num_processes})" if state.num_processes > 1 else ""
            with _progress() as progress:
                tasks: dict[str, Any] = {}

                def on_start(method: str, count: int) -> None:
                    tasks[method] = progress.add_task(f"{method}{who}", total=count)

                def on_image(method: str, _index: int) -> None:
                    progress.advance(tasks[method])

                results = ev.evaluate(
                    loaded.pipe, prompt_list, reference_images or Path("."), out, model=model, methods=names,
                    negative=negative, base_seed=seed, steps=steps or loaded.steps, guidance=guidance, cfg=cfg,
                    nag_settings=nag_settings, width=width, height=height, batch_size=batch_size,
                    clip_model=clip_model, inception=inception, image_reward="auto" if image_reward else "off",
                    fid_size=fid_size, patch_size=patch_size, metrics=metrics, state=state,
                    on_image=on_image, on_start=on_start)
        except ev.EvalError as exc:
            raise NagCLIError(exc.title, exc.message) from exc
        if results is None:
            return
        if not metrics:
            _out.print(f"wrote {out / 'manifest.json'} ({len(prompt_list)} prompts x {len(names)} methods)")
            return
        for note in results.get("skipped", {}).values():
            _err.print(f"note: {note}.")
        _out.print((out / "results.md").read_text(encoding="utf-8").split("## Per method")[0].rstrip(), markup=False)
        _out.print(f"wrote {out / 'results.json'} and {out / 'results.md'}")


@app.command()
def ui(
    model: Model = DEFAULT_MODEL,
    host: Annotated[str, typer.Option(help="Address to serve on (0.0.0.0: every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to serve on.")] = 7860,
    device: Device = None,
    dtype: Dtype = None,
    offload: Offload = False,
    debug: Debug = False,
) -> None:
    """A web UI (Gradio): prompt, negative prompt and NAG controls, the result beside the unguided one."""
    with _errors(debug):
        try:
            from nag import ui as web
        except ImportError as exc:
            raise NagCLIError("Web UI not installed", f"`nag ui` needs Gradio ({exc}). Install it with "
                              '`pip install "nag-diffusion[ui]"`.') from exc
        resolve_dtype(dtype, resolve_device(device))  # reject bad options before serving
        _out.print(f"NAG web UI on http://{host}:{port} (Ctrl+C to stop)")
        web.launch(model, host, port, device, dtype, offload)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``nag`` console script."""
    app(args=list(argv) if argv is not None else None, prog_name="nag")


if __name__ == "__main__":
    main(sys.argv[1:])
