"""Prompt files, per-prompt seeds and the error type of :mod:`nag.evaluation`."""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["EvalError", "read_prompts", "read_records", "seed_for", "prompts_digest", "IMAGE_SUFFIXES", "list_images"]

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


def _from_record(record: Any, where: str) -> dict[str, Any]:
    """``{"prompt": ...}`` plus the record's ``negative`` and ``seed`` where it has them."""
    if isinstance(record, str):
        return {"prompt": record}
    if isinstance(record, dict):
        prompt = next((record[k] for k in ("prompt", "caption", "text") if isinstance(record.get(k), str)), None)
        if prompt is not None:
            return {"prompt": prompt, **_extras(record, where)}
    raise EvalError("Bad prompts file", f"{where}: expected a string or an object with a 'prompt' or 'caption' "
                    f"field, got {str(record)[:80]!r}.")


def _extras(record: dict[str, Any], where: str) -> dict[str, Any]:
    """The optional per-prompt ``negative`` (a string; empty: NAG off) and ``seed`` (an integer)."""
    extras: dict[str, Any] = {}
    negative = record.get("negative", record.get("negative_prompt"))
    if negative is not None:
        if not isinstance(negative, str):
            raise EvalError("Bad prompts file", f"{where}: 'negative' must be a string, got {negative!r}.")
        extras["negative"] = negative
    seed = record.get("seed")
    if seed is not None:
        try:
            extras["seed"] = int(seed)
        except (TypeError, ValueError):
            raise EvalError("Bad prompts file", f"{where}: 'seed' must be a whole number, got {seed!r}.") from None
    return extras


def _coco_captions(data: dict) -> list[str]:
    """One caption per image of a COCO captions file: the one with the lowest annotation id, images in id order."""
    first: dict[int, tuple[int, str]] = {}
    for ann in data["annotations"]:
        image_id, ann_id = int(ann["image_id"]), int(ann.get("id", 0))
        if image_id not in first or ann_id < first[image_id][0]:
            first[image_id] = (ann_id, ann["caption"])
    return [first[k][1] for k in sorted(first)]


def read_prompts(path: str | Path, limit: int | None = None) -> list[str]:
    """Read prompts from ``path`` (the formats of :func:`read_records`)."""
    return [r["prompt"] for r in read_records(path, limit)]


def _csv_records(text: str, delimiter: str, name: str) -> list[dict[str, Any]]:
    """Rows of a CSV/TSV: the ``prompt`` or ``caption`` column (else the first), and the optional
    ``negative`` and ``seed`` columns."""
    rows = list(csv.reader(text.splitlines(), delimiter=delimiter))
    header = [h.strip().lower() for h in rows[0]] if rows else []
    col = next((header.index(k) for k in ("prompt", "caption") if k in header), None)
    if col is None:
        return [{"prompt": r[0]} for r in rows if r]
    # an empty cell is a value not given (the command line's applies), not an empty string
    return [_from_record({k: v for k, v in zip(header, r) if v.strip() or k == header[col]}, f"{name}:{n + 2}")
            for n, r in enumerate(rows[1:]) if r]


def _parse(path: Path, text: str) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".json":
        data = json.loads(text)
        if isinstance(data, dict) and "annotations" in data:
            return [{"prompt": p} for p in _coco_captions(data)]
        if isinstance(data, list):
            return [_from_record(r, f"{path.name}[{i}]") for i, r in enumerate(data)]
        raise EvalError("Bad prompts file", f"{str(path)!r}: expected a JSON list of prompts or a COCO "
                        "captions file (an object with 'annotations').")
    if suffix == ".jsonl":
        return [_from_record(json.loads(line), f"{path.name}:{i + 1}")
                for i, line in enumerate(text.splitlines()) if line.strip()]
    if suffix in (".csv", ".tsv"):
        return _csv_records(text, "\t" if suffix == ".tsv" else ",", path.name)
    return [{"prompt": line} for line in text.splitlines()]


def read_records(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """Read prompt records (``{"prompt", optional "negative", optional "seed"}``) from ``path``.

    Formats, by suffix: ``.txt`` one prompt a line (blank lines skipped); ``.json`` a list of
    strings or of objects with a ``prompt``/``caption`` field, or a COCO captions file
    (``captions_val2014.json``: one caption per image, see :func:`_coco_captions`); ``.jsonl`` one
    string or object a line; ``.csv``/``.tsv`` the ``prompt`` or ``caption`` column (else the first).
    Objects and CSV rows may carry ``negative`` and ``seed``. Prompts are stripped of surrounding
    whitespace; ``limit`` keeps the first ``limit``.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise EvalError("Prompts file not found", f"{str(path)!r} does not exist or is not a file. Pass --prompts "
                        "a .txt file with one prompt a line, a .json/.jsonl list of prompts, a .csv with a 'prompt' "
                        "column, or a COCO captions JSON (annotations/captions_val2014.json).")
    try:
        records = _parse(path, path.read_text(encoding="utf-8"))
    except EvalError:
        raise
    except (ValueError, KeyError, TypeError) as exc:
        raise EvalError("Bad prompts file", f"{str(path)!r} could not be read as {path.suffix.lower() or 'text'} "
                        f"({str(exc).splitlines()[0][:200]}).") from exc
    records = [dict(r, prompt=r["prompt"].strip()) for r in records if r["prompt"].strip()]
    if limit is not None:
        records = records[: max(0, int(limit))]
    if not records:
        raise EvalError("No prompts", f"{str(path)!r} holds no prompts" + (f" (after --limit {limit})" if limit
                        is not None else "") + ".")
    return records


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
