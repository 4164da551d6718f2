"""Where an evaluation run keeps its files, atomic image writes, and the merged manifest.

Layout of an output folder::

    OUT/images/METHOD/000000.png ...   one image per prompt index (the image *is* the record that
                                       the prompt is done: written to a temporary file, then renamed)
    OUT/images/METHOD/settings.json    what generated them (checked on resume)
    OUT/manifest.json                  every image, per method, sorted by prompt index
    OUT/results.json, OUT/results.md   the metrics (see nag.evaluation.report)
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .prompts import EvalError, prompts_digest, seed_for

__all__ = [
    "image_path",
    "method_dir",
    "save_image_atomic",
    "write_json_atomic",
    "check_settings_file",
    "check_settings_json",
    "build_manifest",
    "MANIFEST",
    "file_sha256",
]

MANIFEST = "manifest.json"


def method_dir(out_dir: str | Path, method: str) -> Path:
    return Path(out_dir) / "images" / method


def image_path(out_dir: str | Path, method: str, index: int) -> Path:
    """The image of prompt ``index`` for ``method``; it exists only once completely written."""
    return method_dir(out_dir, method) / f"{index:06d}.png"


def save_image_atomic(image: Any, path: Path) -> None:
    """Save a PIL image as PNG so that ``path`` either does not exist or holds the whole image:
    written to a temporary file in the same folder, flushed to disk, then renamed over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            image.save(f, format="PNG")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_settings_file(out_dir: str | Path, method: str, settings: dict[str, Any]) -> bool:
    """Compare ``settings`` with the ones that made the images already in the method's folder.

    Returns True when the folder has no settings file yet (a new run). Raises :class:`EvalError`
    when they differ: resuming would mix images made differently.
    """
    return check_settings_json(method_dir(out_dir, method) / "settings.json", settings)


def check_settings_json(path: Path, settings: dict[str, Any]) -> bool:
    """True when ``path`` does not exist yet; :class:`EvalError` when it holds other settings than
    ``settings`` (the images beside it were made differently)."""
    if not path.is_file():
        return True
    old = json.loads(path.read_text(encoding="utf-8"))
    if old != settings:
        changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        raise EvalError(
            "Output folder holds a different run",
            f"{str(path.parent)!r} has images made with other settings (differing: "
            f"{', '.join(changed)}). Resuming would mix them: pass a new --out folder, or delete that folder "
            "to start again.",
        )
    return False


def build_manifest(
    out_dir: str | Path, prompts: Sequence[str], methods: dict[str, dict[str, Any]], base_seed: int
) -> dict[str, Any]:
    """The merged manifest: per method, one entry per prompt index in order (prompt, seed, file,
    SHA-256 of the PNG, or ``"file": null`` where the image is missing). Depends only on the files,
    the prompts and the settings, never on how many processes made the images."""
    out_dir = Path(out_dir)
    manifest: dict[str, Any] = {
        "prompts": len(prompts),
        "prompts_sha256": prompts_digest(prompts),
        "base_seed": base_seed,
        "seed_rule": "seed = base_seed + prompt index",
        "methods": {},
    }
    for name, settings in methods.items():
        entries = []
        for i, prompt in enumerate(prompts):
            path = image_path(out_dir, name, i)
            done = path.is_file()
            entries.append(
                {
                    "index": i,
                    "prompt": prompt,
                    "seed": seed_for(i, base_seed),
                    "file": path.relative_to(out_dir).as_posix() if done else None,
                    "sha256": file_sha256(path) if done else None,
                }
            )
        manifest["methods"][name] = {"settings": settings, "images": entries}
    return manifest
