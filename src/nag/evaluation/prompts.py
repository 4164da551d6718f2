"""Prompt files, per-prompt seeds and the error type of :mod:`nag.evaluation`."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

__all__ = ["EvalError", "read_prompts", "seed_for", "prompts_digest", "IMAGE_SUFFIXES", "list_images"]

#: File suffixes read as images from a reference folder.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class EvalError(Exception):
    """An error the user can act on (bad input, missing model or library): a title and one paragraph."""

    def __init__(self, title: str, message: str) -> None:
        super().__init__(f"{title}: {message}")
        self.title = title
        self.message = message


def seed_for(index: int, base_seed: int = 0) -> int:
    """The seed of prompt ``index``: ``base_seed + index``.

    It depends on the prompt's position in the prompt list only, never on which process draws it,
    so the images are the same however many processes share the work; every method uses the same
    seed for a prompt, so the comparison between methods is paired.
    """
    return int(base_seed) + int(index)


def prompts_digest(prompts: Sequence[str]) -> str:
    """SHA-256 of the prompt list (identifies the prompt set in the manifest and on resume)."""
    h = hashlib.sha256()
    for p in prompts:
        h.update(p.encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def _from_record(record: Any, where: str) -> str:
    if isinstance(record, str):
        return record
    if isinstance(record, dict):
        for key in ("prompt", "caption", "text"):
            if isinstance(record.get(key), str):
                return record[key]
    raise EvalError("Bad prompts file", f"{where}: expected a string or an object with a 'prompt' or 'caption' "
                    f"field, got {str(record)[:80]!r}.")


def _coco_captions(data: dict) -> list[str]:
    """One caption per image of a COCO captions file: the one with the lowest annotation id, images in id order."""
    first: dict[int, tuple[int, str]] = {}
    for ann in data["annotations"]:
        image_id, ann_id = int(ann["image_id"]), int(ann.get("id", 0))
        if image_id not in first or ann_id < first[image_id][0]:
            first[image_id] = (ann_id, ann["caption"])
    return [first[k][1] for k in sorted(first)]


def read_prompts(path: str | Path, limit: int | None = None) -> list[str]:
    """Read prompts from ``path``.

    Formats, by suffix: ``.txt`` one prompt a line (blank lines skipped); ``.json`` a list of
    strings or of objects with a ``prompt``/``caption`` field, or a COCO captions file
    (``captions_val2014.json``: one caption per image, see :func:`_coco_captions`); ``.jsonl`` one
    string or object a line; ``.csv``/``.tsv`` the ``prompt`` or ``caption`` column (else the first).
    Prompts are stripped of surrounding whitespace; ``limit`` keeps the first ``limit``.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise EvalError("Prompts file not found", f"{str(path)!r} does not exist or is not a file. Pass --prompts "
                        "a .txt file with one prompt a line, a .json/.jsonl list of prompts, a .csv with a 'prompt' "
                        "column, or a COCO captions JSON (annotations/captions_val2014.json).")
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8")
    try:
        if suffix == ".json":
            data = json.loads(text)
            if isinstance(data, dict) and "annotations" in data:
                prompts = _coco_captions(data)
            elif isinstance(data, list):
                prompts = [_from_record(r, f"{path.name}[{i}]") for i, r in enumerate(data)]
            else:
                raise EvalError("Bad prompts file", f"{str(path)!r}: expected a JSON list of prompts or a COCO "
                                "captions file (an object with 'annotations').")
        elif suffix == ".jsonl":
            prompts = [_from_record(json.loads(line), f"{path.name}:{i + 1}")
                       for i, line in enumerate(text.splitlines()) if line.strip()]
        elif suffix in (".csv", ".tsv"):
            rows = list(csv.reader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ","))
            header = [h.strip().lower() for h in rows[0]] if rows else []
            col = next((header.index(k) for k in ("prompt", "caption") if k in header), None)
            body = rows[1:] if col is not None else rows
            prompts = [r[col or 0] for r in body if r]
        else:
            prompts = text.splitlines()
    except (ValueError, KeyError, TypeError) as exc:
        if isinstance(exc, EvalError):
            raise
        raise EvalError("Bad prompts file", f"{str(path)!r} could not be read as {suffix or 'text'} "
                        f"({str(exc).splitlines()[0][:200]}).") from exc
    prompts = [p.strip() for p in prompts if p.strip()]
    if limit is not None:
        prompts = prompts[: max(0, int(limit))]
    if not prompts:
        raise EvalError("No prompts", f"{str(path)!r} holds no prompts" + (f" (after --limit {limit})" if limit
                        is not None else "") + ".")
    return prompts


def list_images(folder: str | Path) -> list[Path]:
    """The image files directly in ``folder`` and its subfolders, sorted by path."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise EvalError("Reference folder not found", f"{str(folder)!r} is not a folder. Pass --reference-images "
                        "the folder of real images to compare with (for the paper's protocol, COCO val2014 images).")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise EvalError("No reference images", f"{str(folder)!r} holds no images ({', '.join(IMAGE_SUFFIXES)}). "
                        "FID and patch-FID need a folder of real images to compare with.")
    return files
