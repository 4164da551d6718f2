"""What the command line and the web UI share: load a pipeline, pick device and dtype, build the
NAG settings, run one generation, and turn failures into one-paragraph errors.

Neither front end imports the other; both import this module. Nothing here prints: callers
decide how to show progress (``on_step``) and errors (:class:`NagCLIError`'s title and message).

The rule for the negative prompt is the same everywhere: an empty (or blank) negative prompt
means NAG is off, and the output is the pipeline's own (:func:`guide`).
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nag.toy import DEFAULT_NAG, NAG_DEFAULTS

__all__ = [
    "NagCLIError", "Loaded", "BUILTIN_PREFIX", "DEFAULT_MODEL", "BUILTIN_NAG", "FEW_STEP", "resolve_device",
    "resolve_dtype", "load_model", "check_settings", "check_sizes", "nag_settings", "sampling_kwargs", "guide",
    "negative_is_off", "run_pipeline", "is_oom", "oom_error", "require", "install_hint", "version",
    "PARALLEL_MODES", "parallel_rank", "parallel_device", "enable_parallel",
]

BUILTIN_PREFIX = "builtin:"
DEFAULT_MODEL = "builtin:fewstep"
#: NAG settings for the default built-in model (``nag.toy.DEFAULT_NAG``, the few-step checkpoint's; the
#: multi-step one has its own, ``nag.toy.NAG_DEFAULTS``).
BUILTIN_NAG = dict(DEFAULT_NAG)
#: Distribution name on the package index (install hints name it with the extra).
DISTRIBUTION = "nag-diffusion"

#: Few-step checkpoints of the supported pipelines and how to run them (what `nag models` shows).
#: The pipeline specs describe architectures, not checkpoints, so a distilled checkpoint of a
#: multi-step family is listed here.
FEW_STEP: dict[str, str] = {
    "FluxPipeline": "FLUX.1-schnell: 4 steps, guidance 0",
    "StableDiffusion3Pipeline": "SD3.5-Large-Turbo: 4 steps, guidance 0",
    "StableDiffusionXLPipeline": "DMD2, SDXL-Lightning: 4 steps, guidance 0",
    "WanPipeline": "CausVid / lightx2v LoRA: scale 11, tau 3.5, alpha 0.5",
    "WanImageToVideoPipeline": "lightx2v LoRA: scale 11, tau 3.5, alpha 0.5",
    "ZImagePipeline": "Z-Image Turbo: 8 steps, guidance 0",
}


class NagCLIError(Exception):
    """An error the user can act on: printed as one paragraph, without a traceback."""

    def __init__(self, title: str, message: str) -> None:
        super().__init__(f"{title}: {message}")
        self.title = title
        self.message = message


def version() -> str:
    """The installed package version (the source tree's when run from a checkout)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    import nag

    try:
        return dist_version(DISTRIBUTION)
    except PackageNotFoundError:
        return nag.__version__


def install_hint(extra: str) -> str:
    """The pip command that installs ``extra`` (shown verbatim: callers must not parse it as markup)."""
    return f'pip install "{DISTRIBUTION}[{extra}]"'


def require(module: str, extra: str, what: str) -> None:
    """Import ``module`` now, so a missing optional dependency stops ``what`` before it starts."""
    try:
        importlib.import_module(module)
    except ImportError as exc:
        raise NagCLIError(f"{what} not installed", f"{what} needs the {extra} extra ({exc}). Install it with "
                          f"`{install_hint(extra)}`.") from exc


# --------------------------------------------------------------------------------------------------
# Device, dtype
# --------------------------------------------------------------------------------------------------


def _mps_available() -> bool:
    import torch

    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def resolve_device(device: str | None) -> str:
    """``device`` if given (checked to exist), else the best available one: cuda > mps > cpu."""
    import torch

    if device is None or device == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if _mps_available() else "cpu"
    kind = device.split(":")[0]
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": _mps_available()}
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
        return torch.float16 if device.startswith("mps") else torch.float32
    name = _DTYPES.get(dtype.lower())
    if name is None:
        raise NagCLIError("Unknown dtype", f"--dtype {dtype!r} is not one of auto, float32, float16, bfloat16.")
    return getattr(torch, name)


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def _call_params(pipe: Any) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(type(pipe).__call__).parameters)


@dataclass
class Loaded:
    """A loaded pipeline and what the front ends need to know about it."""

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

    @property
    def dtype(self) -> str:
        dtype = getattr(self.pipe, "dtype", None)
        return str(dtype).replace("torch.", "") if dtype is not None else "?"

    def default_steps(self) -> int | None:
        """The steps a call runs when none are given: the model's own, else the pipeline's default."""
        if self.steps is not None:
            return self.steps
        default = _call_params(self.pipe).get("num_inference_steps")
        return default.default if default is not None and isinstance(default.default, int) else None


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
        f"({detail}). Download it once while online (`hf download {model}`, or run this command "
        "without HF_HUB_OFFLINE=1), or pass --model a local diffusers directory; the built-in tiny model "
        "(--model builtin:fewstep) needs no download.",
    )


def _unknown_model(model: str, why: str) -> NagCLIError:
    from nag.toy import VARIANTS

    builtins = ", ".join(BUILTIN_PREFIX + v for v in VARIANTS)
    return NagCLIError(
        "Unknown model",
        f"{model!r}: {why}. --model takes a built-in model ({builtins}), a local diffusers directory "
        "(what `pipe.save_pretrained` writes), or a Hugging Face model id such as "
        "black-forest-labs/FLUX.1-schnell; `nag models` lists the supported pipeline families.",
    )


def _load_local(path: Path, dtype: Any) -> Any:
    from diffusers import DiffusionPipeline

    if not (path / "model_index.json").is_file():
        raise NagCLIError(
            "Not a diffusers pipeline",
            f"{str(path)!r} exists but has no model_index.json, so it is not a diffusers pipeline directory. "
            "Pass the folder that `pipe.save_pretrained(...)` wrote (or a Hugging Face model id).",
        )
    with _quiet_loading():
        return DiffusionPipeline.from_pretrained(path, dtype=dtype, local_files_only=True)


def _check_hub_id(model: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    looks_like_path = model.startswith((".", "/", "~")) or os.sep in model.strip("/").replace("/", "", 1)
    try:
        validate_repo_id(model)
    except HFValidationError:
        looks_like_path = True
    if looks_like_path:
        raise _unknown_model(model, "it is neither an existing directory nor a valid Hugging Face model id")


def _load_pretrained(model: str, dtype: Any) -> Any:
    """``DiffusionPipeline.from_pretrained`` with its failures turned into :class:`NagCLIError`."""
    from diffusers import DiffusionPipeline
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    path = Path(model).expanduser()
    if path.exists():
        return _load_local(path, dtype)
    _check_hub_id(model)
    try:
        with _quiet_loading():
            return DiffusionPipeline.from_pretrained(model, dtype=dtype, local_files_only=_is_offline())
    except GatedRepoError as exc:
        raise NagCLIError(
            "Model needs access",
            f"{model!r} is a gated model on the Hugging Face Hub: accept its licence on its model page and log in "
            "(`hf auth login`, or set HF_TOKEN), then run the command again.",
        ) from exc
    except RepositoryNotFoundError as exc:
        raise _unknown_model(model, "the Hugging Face Hub has no such model (or it is private)") from exc
    except OSError as exc:
        text = str(exc)
        if any(s in text for s in ("not fully cached", "outgoing traffic has been disabled", "offline",
                                    "Cannot reach", "couldn't connect", "Connection")):
            raise _no_weights(model, "HF_HUB_OFFLINE is set" if _is_offline() else
                              "the Hub could not be reached") from exc
        raise


def _load_builtin(model: str, device: str, dtype: Any) -> Loaded:
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
    return Loaded(pipe, model, True, device, dict(toy.NAG_DEFAULTS[variant]), toy.DEFAULT_STEPS[variant],
                  toy.DEFAULT_GUIDANCE[variant])


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


def load_model(model: str, device: str, dtype: Any, offload: bool = False, lora: Path | None = None,
               note: Callable[[str], None] = lambda _msg: None) -> Loaded:
    """Load ``model`` (a ``builtin:`` id, a local directory or a Hub id) onto ``device``.

    ``offload`` uses ``enable_model_cpu_offload`` on an accelerator (weights stay on the CPU until
    each component runs); ``lora`` is loaded with ``pipe.load_lora_weights``; ``note`` receives
    remarks for the user (such as an option that has no effect).
    """
    if model.startswith(BUILTIN_PREFIX):
        loaded = _load_builtin(model, device, dtype)
    else:
        loaded = Loaded(_load_pretrained(model, dtype), model, False, device)
    pipe = loaded.pipe
    _check_supported(pipe)
    if lora is not None:
        _load_lora(pipe, lora)
    if offload and device != "cpu":
        pipe.enable_model_cpu_offload(device=device)
    else:
        if offload:
            note("--offload has no effect on the CPU; running without it.")
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
        return FamilyDefaults(**NAG_DEFAULTS.get(model[len(BUILTIN_PREFIX):], BUILTIN_NAG))
    index = Path(model).expanduser() / "model_index.json"
    if index.is_file():
        try:
            spec = PIPELINES.get(json.loads(index.read_text()).get("_class_name", ""))
        except (OSError, ValueError):
            spec = None
        if spec is not None:
            return spec.defaults
    return GENERIC_DEFAULTS


def _resolve(defaults: Any, settings: dict[str, Any]) -> Any:
    from nag.settings import NAGSettings

    try:
        return NAGSettings.resolve(defaults, **settings)
    except (ValueError, TypeError) as exc:
        # the engine names its arguments `scale`, `min_sigma`, ...; the user typed --scale, --min-sigma, ...
        message = re.sub(r"`(scale|tau|alpha|start|end|norm|min_sigma)`", lambda m: "--" + m[1].replace("_", "-"),
                         str(exc).replace("NAG `", "`"))
        raise NagCLIError("Option out of range", f"{message.rstrip('.')}. See `nag generate --help`.") from exc


def check_settings(model: str, **settings: Any) -> Any:
    """Validated NAG settings before loading (``nag.NAGSettings``; ``settings``: ``nag.apply``'s keyword arguments
    scale, tau, alpha, start, end, norm, min_sigma, None for a default); out of range: :class:`NagCLIError`."""
    return _resolve(_defaults_for(model), settings)


def nag_settings(loaded: Loaded, **settings: Any) -> dict[str, Any]:
    """The ``nag.apply`` settings for the loaded pipeline: its family's defaults (the built-in
    model's own), overridden by the values given; every value explicit, so it can be reported
    (``min_sigma`` only where it bounds anything)."""
    from nag.families import pipeline_spec
    from nag.settings import FamilyDefaults

    defaults = FamilyDefaults(**loaded.nag_defaults) if loaded.nag_defaults else pipeline_spec(loaded.pipe).defaults
    return _resolve(defaults, settings).apply_kwargs()


def check_sizes(width: int | None, height: int | None, frames: int | None) -> None:
    for name, value in (("--width", width), ("--height", height)):
        if value is not None and (value < 8 or value % 8):
            raise NagCLIError("Option out of range", f"{name} must be a positive multiple of 8, got {value}.")
    if frames is not None and frames < 1:
        raise NagCLIError("Option out of range", f"--frames must be at least 1, got {frames}.")


def sampling_kwargs(loaded: Loaded, steps: int | None, guidance: float | None, width: int | None,
                    height: int | None, frames: int | None) -> dict[str, Any]:
    """Pipeline call arguments: the given values over the model's defaults (None: the pipeline's)."""
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


def negative_is_off(negative: str | None) -> bool:
    """The one rule for the negative prompt: empty or blank means NAG is off."""
    return negative is None or not negative.strip()


def guide(pipe: Any, negative: str | None, settings: dict[str, Any]) -> AbstractContextManager:
    """``nag.apply(pipe, negative, **settings)``, or nothing when the negative prompt is off."""
    import nag

    return nullcontext() if negative_is_off(negative) else nag.apply(pipe, negative, **settings)


# --------------------------------------------------------------------------------------------------
# Context parallelism (one generation sharded over the processes of torchrun / accelerate launch)
# --------------------------------------------------------------------------------------------------

PARALLEL_MODES = ("ulysses", "ring")


def parallel_rank(mode: str | None) -> tuple[int, int]:
    """``(rank, processes)`` of a ``--parallel`` run, from the launcher's environment; ``(0, 1)`` without one."""
    if mode is None:
        return 0, 1
    if mode not in PARALLEL_MODES:
        raise NagCLIError("Unknown --parallel", f"--parallel takes {' or '.join(PARALLEL_MODES)}, not {mode!r}.")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world < 2:
        raise NagCLIError(
            "Not launched in parallel",
            "--parallel shards each generation over the processes of `torchrun --nproc_per_node N -m nag.cli "
            "generate ...` (or `accelerate launch --num_processes N -m nag.cli generate ...`); this process runs "
            "alone. Launch it that way, or drop --parallel.",
        )
    return int(os.environ.get("RANK", "0")), world


def parallel_device(device: str | None, mode: str | None) -> str | None:
    """Under ``--parallel``, each process's own GPU (``cuda:LOCAL_RANK``) unless a device was named."""
    import torch

    if mode is None or device not in (None, "cuda") or not torch.cuda.is_available():
        return device
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"


def enable_parallel(loaded: Loaded, mode: str | None) -> None:
    """Shard the denoiser's sequence over the launched processes with diffusers' context parallelism
    (``mode``: ``"ulysses"`` or ``"ring"``; None: nothing), refusing what NAG cannot guide that way."""
    if mode is None:
        return
    import torch.distributed as dist
    from diffusers import ContextParallelConfig

    from nag.families import family_of
    from nag.hooks.parallel import refusal

    _, world = parallel_rank(mode)
    denoiser = getattr(loaded.pipe, "transformer", None)
    if denoiser is None or getattr(denoiser, "_cp_plan", None) is None:
        raise NagCLIError(
            "No context parallelism for this model",
            f"{type(loaded.pipe).__name__}'s denoiser declares no context-parallel plan in the installed "
            "diffusers; run it without --parallel.",
        )
    if not dist.is_initialized():
        dist.init_process_group("nccl" if str(loaded.device).startswith("cuda") else "gloo")
    try:
        denoiser.enable_parallelism(config=ContextParallelConfig(**{f"{mode}_degree": world}))
    except (ValueError, RuntimeError) as exc:
        raise NagCLIError("Context parallelism failed", f"diffusers' enable_parallelism refused: {exc}") from exc
    reason = refusal(denoiser, family_of(denoiser))
    if reason:
        raise NagCLIError("NAG under --parallel", reason)


# --------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------


def oom_error(exc: BaseException) -> NagCLIError:
    return NagCLIError(
        "Out of memory",
        f"the device ran out of memory ({str(exc).splitlines()[0][:200] or type(exc).__name__}). Try a smaller "
        "--batch-size (images drawn per pipeline call), --offload (keeps the weights on the CPU until each part "
        "of the model runs), a smaller --width/--height or fewer --frames, or --dtype bfloat16/float16 on a GPU.",
    )


#: How allocation failures read: CUDA/MPS ("out of memory") and torch's CPU allocator.
_OOM_TEXT = ("out of memory", "can't allocate memory", "not enough memory")


def is_oom(exc: BaseException) -> bool:
    import torch

    oom_types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                                  getattr(torch.cuda, "OutOfMemoryError", None)) if t is not None)
    if isinstance(exc, (MemoryError, *oom_types)):
        return True
    return isinstance(exc, RuntimeError) and any(s in str(exc).lower() for s in _OOM_TEXT)


OnStep = Callable[[], None]


def _call_once(loaded: Loaded, prompt: str, seeds: Sequence[int], on_step: OnStep | None,
               call: dict[str, Any]) -> list[Any]:
    import numpy as np
    import torch

    call = dict(call, generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
                output_type="np" if loaded.is_video else "pil")
    if "negative_prompt" in call:  # some pipelines want a list when the prompt is one
        call["negative_prompt"] = [call["negative_prompt"]] * len(seeds)
    if on_step is not None and "callback_on_step_end" in _call_params(loaded.pipe):
        def step_end(_pipe: Any, _i: int, _t: Any, callback_kwargs: dict) -> dict:
            on_step()
            return callback_kwargs

        call["callback_on_step_end"] = step_end
    try:
        out = loaded.pipe([prompt] * len(seeds), **call)
    except Exception as exc:
        if is_oom(exc):
            raise oom_error(exc) from exc
        raise
    if loaded.is_video:
        return [(np.clip(np.asarray(v, dtype=np.float32), 0, 1) * 255).round().astype(np.uint8)
                for v in out.frames]
    return list(out.images)


def vocabulary_warning(loaded: Loaded, prompt: str, negative: str | None) -> str | None:
    """For the built-in model, a paragraph naming the prompt's words it was not trained on (else None)."""
    from nag.toy.vocabulary import prompt_warning

    return prompt_warning(prompt, negative) if loaded.builtin else None


def run_pipeline(loaded: Loaded, prompt: str, seeds: Sequence[int], batch_size: int = 1,
                 on_step: OnStep | None = None, **kwargs: Any) -> list[Any]:
    """One sample per seed, drawn ``batch_size`` per pipeline call (memory grows with the batch).

    Returns PIL images, or for video pipelines one ``(frames, H, W, 3)`` uint8 array per sample.
    ``on_step`` is called after every denoising step of every call; ``kwargs`` (None values
    dropped) go to every call.
    """
    if batch_size < 1:
        raise NagCLIError("Option out of range", f"--batch-size must be at least 1, got {batch_size}.")
    call = {k: v for k, v in kwargs.items() if v is not None}
    results: list[Any] = []
    for k in range(0, len(seeds), batch_size):
        results += _call_once(loaded, prompt, seeds[k:k + batch_size], on_step, call)
    return results
