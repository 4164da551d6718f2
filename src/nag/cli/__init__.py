"""The ``nag`` command: generate with Normalized Attention Guidance, compare it with CFG, list models.

    nag generate --prompt "a large star on a gray background" --negative "red" --out star.png
    nag generate --prompts prompts.jsonl --negative "blurry" --num-images 4 --out runs/stars
    nag compare  --prompt "a large star on a gray background" --negative "red" --out grid.png
    nag eval     --prompts captions.txt --reference-images coco/val2014 --methods none,nag --out runs/eval
    nag generate --model black-forest-labs/FLUX.1-schnell --prompt "a fox" --negative "blurry" --offload
    nag models
    nag --version

Without ``--model`` the built-in tiny model (``builtin:fewstep``) is used: it runs offline on a
CPU in seconds. ``--model`` also takes ``builtin:multistep``, a local diffusers directory, or a
Hugging Face model id (downloaded, or read from the local cache when offline).

Errors the user can act on (unknown model, no weights offline, a pipeline NAG does not support,
out-of-range options, an output name that does not fit, out of memory, a missing extra) are
printed as one paragraph without a traceback; ``--debug`` shows the traceback.

One module per command; what the command line shares with the web UI is :mod:`nag.session`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import typer

from nag.grid import make_grid
from nag.session import NagCLIError, load_model, resolve_device, resolve_dtype, version

from . import compare as _compare
from . import evaluate as _evaluate
from . import generate as _generate
from . import models as _models
from . import web as _web
from .common import app, out

__all__ = ["app", "main", "NagCLIError", "make_grid", "resolve_device", "resolve_dtype", "load_model",
           "column_labels"]

column_labels = _compare.column_labels
# The command modules register themselves on `app` when imported.
_COMMANDS = (_compare, _evaluate, _generate, _models, _web)


def _show_version(value: bool) -> None:
    if value:
        out.print(f"nag {version()}", markup=False)
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool | None, typer.Option("--version", callback=_show_version, is_eager=True,
                                                          help="Show the version and exit.")] = None) -> None:
    """Normalized Attention Guidance (NAG) for diffusers pipelines: a negative prompt that works, also on
    few-step models."""


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``nag`` console script."""
    app(args=list(argv) if argv is not None else None, prog_name="nag")

