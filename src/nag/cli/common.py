"""What every ``nag`` command shares: the Typer app, the consoles, option types, error display
and progress bars. The work itself is in :mod:`nag.session`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from nag import session
from nag.session import NagCLIError

__all__ = ["app", "err", "out", "errors", "progress_bar", "load_with_progress"]

app = typer.Typer(
    name="nag",
    help="Normalized Attention Guidance (NAG) for diffusers pipelines: a negative prompt that works, "
    "also on few-step models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

err = Console(stderr=True, highlight=False)
out = Console(highlight=False)

Model = Annotated[str, typer.Option("--model", "-m", help="builtin:fewstep, builtin:multistep, a local diffusers "
                                    "directory, or a Hugging Face model id.")]
Prompt = Annotated[str, typer.Option("--prompt", "-p", help="What to draw.")]
Negative = Annotated[str, typer.Option("--negative", "-n", help="What to steer away from (the NAG negative "
                                       "prompt). Empty: NAG off.")]
Scale = Annotated[float | None, typer.Option(help="NAG scale s (1 = off; the paper's phi is s - 1). "
                                                "Default: the model family's.")]
Tau = Annotated[float | None, typer.Option(help="NAG tau: cap on the guided feature's norm growth. "
                                              "Default: the family's.")]
Alpha = Annotated[float | None, typer.Option(help="NAG alpha in [0, 1]: blend of guided and positive "
                                                "features. Default: the family's.")]
Start = Annotated[float, typer.Option(help="Fraction of the trajectory (from the noisy end) where NAG starts.")]
End = Annotated[float, typer.Option(help="Fraction of the trajectory where NAG stops (0.25: first quarter only).")]
Norm = Annotated[int, typer.Option(help="Norm order of NAG's ratio: 1 or 2.")]
MinSigma = Annotated[float, typer.Option("--min-sigma", help="NAG is off at the steps whose noise level (the "
                                         "scheduler's sigma) is below this; 0: no bound. Combines with --start/--end.")]
Steps = Annotated[int | None, typer.Option(min=1, help="Sampling steps. Default: the model's.")]
Guidance = Annotated[float | None, typer.Option(help="The pipeline's guidance_scale (CFG; 0 or 1 = off). "
                                                   "Default: the model's.")]
Seed = Annotated[int, typer.Option(help="Random seed; sample i uses seed + i.")]
Width = Annotated[int | None, typer.Option(help="Image width in pixels (multiple of 8). Default: the model's.")]
Height = Annotated[int | None, typer.Option(help="Image height in pixels (multiple of 8). Default: the model's.")]
Frames = Annotated[int | None, typer.Option(help="Video frames (video models only). Default: the model's.")]
NumImages = Annotated[int, typer.Option("--num-images", min=1, help="Samples to draw.")]
BatchSize = Annotated[int, typer.Option("--batch-size", min=1, help="Samples per pipeline call (memory grows "
                                        "with it; 1 gives the same images whatever --num-images is).")]
Device = Annotated[str | None, typer.Option(help="cpu, cuda, cuda:N or mps. Default: cuda > mps > cpu.")]
Dtype = Annotated[str | None, typer.Option(help="float32, float16 or bfloat16. Default: bfloat16 on CUDA "
                                              "where supported, float16 on MPS, float32 on the CPU.")]
Offload = Annotated[bool, typer.Option("--offload", help="Keep weights on the CPU until each part of the model "
                                       "runs (enable_model_cpu_offload); for GPUs short of memory.")]
Lora = Annotated[Path | None, typer.Option(help="A LoRA .safetensors file (or directory) to load into the "
                                              "pipeline.")]
Parallel = Annotated[str | None, typer.Option(help="ulysses or ring: shard each generation's sequence over the "
                                                 "processes of `torchrun --nproc_per_node N -m nag.cli generate` "
                                                 "(diffusers' context parallelism; Flux, Wan).")]
Debug = Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")]


@contextmanager
def errors(debug: bool) -> Iterator[None]:
    """Turn :class:`NagCLIError` (and out-of-memory errors) into a one-paragraph message and exit 1."""
    try:
        yield
    except NagCLIError as exc:
        if debug:
            raise
        fail(exc)
    except Exception as exc:
        if debug or not session.is_oom(exc):
            raise
        fail(session.oom_error(exc))


def fail(exc: NagCLIError) -> None:
    # The message is the user's text and pip commands such as `pip install "x[eval]"`: never markup.
    err.print(f"[bold red]Error:[/] [bold]{escape(exc.title)}[/] - {escape(exc.message)}", soft_wrap=False)
    raise typer.Exit(1)


def note(message: str) -> None:
    err.print(f"note: {message}", markup=False)


@contextmanager
def progress_bar(console: Console = err) -> Iterator[Progress]:
    """A Rich progress display on stderr, shown only on a terminal."""
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=True,
                  disable=not console.is_terminal) as progress:
        yield progress


def load_with_progress(model: str, device: str | None, dtype: str | None, offload: bool,
                       lora: Path | None) -> session.Loaded:
    """Resolve device and dtype, then load ``model`` under a spinner."""
    dev = session.resolve_device(device)
    torch_dtype = session.resolve_dtype(dtype, dev)
    with progress_bar() as progress:
        progress.add_task(f"loading {model} ({dev}, {str(torch_dtype).replace('torch.', '')})", total=None)
        return session.load_model(model, dev, torch_dtype, offload, lora, note=note)


def step_counter(progress: Progress, description: str, total: int | None) -> Any:
    """A progress task and the ``on_step`` callback that advances it."""
    task = progress.add_task(description, total=total)
    return lambda: progress.advance(task)


def settings_text(loaded: session.Loaded, call: dict[str, Any], nag: dict[str, Any], negative: str | None) -> str:
    """One line of what runs: model, device, dtype, sampling and NAG settings."""
    steps = call.get("num_inference_steps") or loaded.default_steps()
    parts = [f"{loaded.model} ({type(loaded.pipe).__name__}) on {loaded.device}, {loaded.dtype}",
             f"{steps} steps" if steps else "the pipeline's steps"]
    if call.get("guidance_scale") is not None:
        parts.append(f"guidance {call['guidance_scale']:g}")
    for key in ("width", "height", "num_frames"):
        if call.get(key) is not None:
            parts.append(f"{key} {call[key]}")
    if session.negative_is_off(negative):
        parts.append("NAG off (empty negative prompt)")
    else:
        parts.append(f"NAG {', '.join(f'{k} {v:g}' for k, v in nag.items())}, negative {negative!r}")
    return "; ".join(parts)
