"""results.json and results.md (a table laid out like the paper's Table 1)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .manifest import write_json_atomic

__all__ = ["write_reports", "render_markdown", "versions", "COLUMNS"]

#: (key in results, column title, decimals): the paper's Table 1 columns and precision.
COLUMNS = (("clip", "CLIP", 1), ("fid", "FID", 2), ("pfid", "PFID", 2), ("image_reward", "ImageReward", 3))
LABELS = {"none": "no guidance", "cfg": "CFG", "nag": "NAG"}


def versions() -> dict[str, str | None]:
    """Versions of the packages that decide the numbers."""
    from importlib import metadata

    out: dict[str, str | None] = {}
    for dist in ("nag-diffusion", "torch", "diffusers", "transformers", "accelerate", "torchmetrics",
                 "torch-fidelity", "image-reward"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _fmt(value: float | None, decimals: int) -> str:
    return "n/a" if value is None else f"{value:.{decimals}f}"


def _baseline(methods: dict[str, Any]) -> str | None:
    return next((m for m in ("none", "cfg") if m in methods), None)


def render_markdown(results: dict[str, Any]) -> str:
    methods = results["methods"]
    steps = results.get("steps")
    label = f"{results['model']} ({steps})" if steps is not None else results["model"]
    lines = [f"# NAG evaluation: {results['model']}", ""]
    base = _baseline(methods)
    if base is not None and "nag" in methods:
        lines += [
            f"Baseline ({LABELS[base]}) -> +NAG, laid out like Table 1 of the NAG paper.",
            "",
            "| model (steps) | " + " | ".join(title for _, title, _ in COLUMNS) + " |",
            "|---" * (len(COLUMNS) + 1) + "|",
            f"| {label} | " + " | ".join(
                f"{_fmt(methods[base]['metrics'][key], d)} -> {_fmt(methods['nag']['metrics'][key], d)}"
                for key, _, d in COLUMNS) + " |",
            "",
        ]
    else:
        lines += ["(The baseline -> +NAG table needs the nag method and none or cfg.)", ""]
    lines += [
        "## Per method",
        "",
        "| method | images | " + " | ".join(title for _, title, _ in COLUMNS) + " | settings |",
        "|---" * (len(COLUMNS) + 3) + "|",
    ]
    for name, entry in methods.items():
        settings = entry["settings"]
        desc = ", ".join(f"{k}={v}" for k, v in settings.get("pipeline_kwargs", {}).items())
        if "nag" in settings:
            desc = ", ".join(filter(None, [desc, ", ".join(f"nag {k}={v}" for k, v in settings["nag"].items())]))
        lines.append(f"| {LABELS.get(name, name)} | {entry['counts']['images']} | " + " | ".join(
            _fmt(entry["metrics"][key], d) for key, _, d in COLUMNS) + f" | {desc} |")
    protocol = results["protocol"]
    lines += [
        "",
        f"Prompts: {results['prompts']} (seed of prompt i: {protocol['base_seed']} + i). Reference images: "
        f"{results['reference_images']}. Negative prompt: \"{protocol['negative_prompt']}\".",
        f"CLIP score: {protocol['clip_model']}. FID: {protocol['fid_view']}; patch-FID: {protocol['pfid_view']}; "
        f"features: {protocol['inception']}.",
    ]
    for key, why in results.get("skipped", {}).items():
        lines.append(f"Not computed ({key}): {why}.")
    return "\n".join(lines) + "\n"


def write_reports(out_dir: str | Path, results: dict[str, Any]) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    json_path, md_path = out_dir / "results.json", out_dir / "results.md"
    write_json_atomic(json_path, results)
    tmp = md_path.with_name(".results.md.tmp")
    tmp.write_text(render_markdown(results), encoding="utf-8")
    tmp.replace(md_path)
    return json_path, md_path
