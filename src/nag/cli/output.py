"""Output files of ``nag generate`` and ``nag compare``: checked before any work, written whole.

A file named by ``--out`` either does not exist or holds a complete image or video: every file is
first written to a temporary name in the same folder, and renamed only once all are written.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nag.session import NagCLIError

__all__ = ["IMAGE_FORMATS", "VIDEO_SUFFIXES", "FPS", "check_out", "check_kind", "numbered", "write_all",
           "write_video"]

#: Image file suffixes and the PIL format each is written in.
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
#: Video containers the bundled ffmpeg writes H.264 into.
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv")
#: Frames per second of written videos.
FPS = 16


def _kinds() -> str:
    return f"{', '.join(IMAGE_FORMATS)} for images, {', '.join(VIDEO_SUFFIXES)} for video"


def check_out(out: Path) -> None:
    """Refuse an ``--out`` that cannot be written as a file, before the model is loaded."""
    if out.is_dir():
        raise NagCLIError("Output is a folder", f"--out {str(out)!r} is an existing folder; pass a file name such as "
                          f"{str(out / 'nag.png')!r} ({_kinds()}).")
    suffix = out.suffix.lower()
    if suffix not in IMAGE_FORMATS and suffix not in VIDEO_SUFFIXES:
        has = f"the extension {suffix!r}" if suffix else "no extension"
        raise NagCLIError("Unknown output type", f"--out {str(out)!r} has {has}; use {_kinds()}.")


def check_kind(out: Path, is_video: bool, model: str) -> None:
    """Refuse an image file name for a video model and the reverse, before sampling."""
    suffix = out.suffix.lower()
    if is_video and suffix not in VIDEO_SUFFIXES:
        raise NagCLIError("Output type does not fit the model", f"{model!r} makes videos, but --out {str(out)!r} "
                          f"names an image; use {', '.join(VIDEO_SUFFIXES)} (e.g. {str(out.with_suffix('.mp4'))!r}).")
    if not is_video and suffix not in IMAGE_FORMATS:
        raise NagCLIError("Output type does not fit the model", f"{model!r} makes images, but --out {str(out)!r} "
                          f"names a video; use {', '.join(IMAGE_FORMATS)} (e.g. {str(out.with_suffix('.png'))!r}).")


def numbered(out: Path, index: int, count: int) -> Path:
    """``out`` itself for one file, else ``NAME-index.SUFFIX``."""
    return out if count == 1 else out.with_name(f"{out.stem}-{index}{out.suffix}")


def write_video(path: Path, frames: Any, fps: int = FPS) -> None:
    """Write ``(frames, H, W, 3)`` uint8 frames as H.264 (imageio with its bundled ffmpeg)."""
    import imageio.v2 as imageio
    import numpy as np

    frames = np.asarray(frames)
    # H.264 wants even sizes: pad by one pixel where needed.
    h, w = frames.shape[1:3]
    frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    imageio.mimwrite(path, list(frames), fps=fps, codec="libx264", macro_block_size=1)


def _write(path: Path, result: Any) -> None:
    if path.suffix.lower() in VIDEO_SUFFIXES:
        write_video(path, result)
    else:
        result.convert("RGB").save(path, format=IMAGE_FORMATS[path.suffix.lower()])


def write_all(paths: Sequence[Path], results: Sequence[Any]) -> None:
    """Write every result to its path: all to temporary files first, then renamed into place, so an
    interrupted or failed write leaves no partial output."""
    temps: list[Path] = []
    try:
        for path, result in zip(paths, results, strict=True):
            path.parent.mkdir(parents=True, exist_ok=True)
            temps.append(path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}"))
            _write(temps[-1], result)
        for temp, path in zip(temps, paths, strict=True):
            os.replace(temp, path)
    finally:
        for temp in temps:
            temp.unlink(missing_ok=True)
