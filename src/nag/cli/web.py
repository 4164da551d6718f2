"""``nag ui``: serve the Gradio web UI (:mod:`nag.ui`, which imports :mod:`nag.session`, never the CLI)."""

from __future__ import annotations

from typing import Annotated

import typer

from nag import session
from nag import ui as web_ui

from . import common
from .common import Debug, Device, Dtype, Model, Offload, app

__all__ = ["ui"]


@app.command()
def ui(
    model: Model = session.DEFAULT_MODEL,
    host: Annotated[str, typer.Option(help="Address to serve on (0.0.0.0: every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to serve on.")] = 7860,
    device: Device = None,
    dtype: Dtype = None,
    offload: Offload = False,
    debug: Debug = False,
) -> None:
    """A web UI (Gradio): prompt, negative prompt and NAG controls, the result beside the unguided one."""
    with common.errors(debug):
        # Everything that can fail is checked before the address is printed.
        session.require("gradio", "ui", "The web UI")
        session.resolve_dtype(dtype, session.resolve_device(device))
        common.out.print(f"NAG web UI on http://{host}:{port} (Ctrl+C to stop)", markup=False)
        web_ui.launch(model, host, port, device, dtype, offload)
