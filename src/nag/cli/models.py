"""``nag models``: the supported pipelines, their NAG defaults and their few-step checkpoints."""

from __future__ import annotations

from rich.table import Table

import nag
from nag import session
from nag.toy import DEFAULT_STEPS, NAG_DEFAULTS, VARIANTS

from . import common
from .common import Debug, app

__all__ = ["models", "few_step_text"]

COLUMNS = ("pipeline", "model", "family", "scale", "tau", "alpha", "end", "few-step")


def few_step_text(name: str, info: dict) -> str:
    """What the few-step column says for pipeline class ``name``: its known few-step checkpoints and
    their settings, "yes" for a pipeline that is few-step by design, else "no"."""
    if name in session.FEW_STEP:
        return session.FEW_STEP[name]
    return "yes" if info["few_step"] else "no"


@app.command()
def models(debug: Debug = False) -> None:
    """Supported pipeline families with their default NAG scale/tau/alpha/end, their few-step checkpoints,
    and the built-in models."""
    with common.errors(debug):
        table = Table(title="Pipelines NAG supports (defaults: nag.supported_pipelines())")
        for name in COLUMNS:
            table.add_column(name, justify="right" if name in {"scale", "tau", "alpha", "end"} else "left",
                             overflow="fold")
        for name, info in nag.supported_pipelines().items():
            table.add_row(name, info["label"], info["family"], f"{info['scale']:g}", f"{info['tau']:g}",
                          f"{info['alpha']:g}", "1", few_step_text(name, info))
        for variant in VARIANTS:
            nag_defaults = NAG_DEFAULTS[variant]
            table.add_row(f"{session.BUILTIN_PREFIX}{variant}", f"built-in tiny model, {DEFAULT_STEPS[variant]} "
                          "steps", "unet", f"{nag_defaults['scale']:g}", f"{nag_defaults['tau']:g}",
                          f"{nag_defaults['alpha']:g}", "1", "yes" if variant == "fewstep" else "no")
        common.out.print(table)
        common.out.print("Other pipelines whose denoiser cross-attends to the text work through the generic path "
                         "(scale 3, tau 2.5, alpha 0.5).")
