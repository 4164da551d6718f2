"""``nag generate --prompts FILE``: one image set per prompt into a folder, resumable and sharded.

Layout of ``--out``::

    OUT/000000.png ...          prompt 0's images (000000-0.png, 000000-1.png ... with --num-images)
    OUT/settings.json           what made them (checked on a rerun: a different run is refused)
    OUT/manifest.json           per prompt: prompt, negative, seed, files, SHA-256 of each file

Prompt i uses its line's seed, else ``--seed + i``; image k of its set uses that seed + k. The
seed belongs to the prompt, never to the process that draws it, so the images are the same
however many processes (``accelerate launch``) share the work. Every file is written under a
temporary name and renamed when complete, so a rerun into the same folder draws only what is
missing. The sharding and the manifest reuse :mod:`nag.evaluation`.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nag import session
from nag.evaluation import generate as eval_generate
from nag.evaluation import manifest as eval_manifest
from nag.evaluation.prompts import EvalError, read_records

from . import common, output

__all__ = ["Options", "run", "total_steps", "plan"]


@dataclass(frozen=True)
class Options:
    """The sampling and NAG options of ``nag generate`` (None: the model's defaults)."""

    negative: str = ""
    scale: float | None = None
    tau: float | None = None
    alpha: float | None = None
    start: float = 0.0
    end: float = 1.0
    norm: int = 1
    min_sigma: float = 0.0
    steps: int | None = None
    guidance: float | None = None
    seed: int = 0
    width: int | None = None
    height: int | None = None
    frames: int | None = None
    num_images: int = 1
    batch_size: int = 1

    def call(self, loaded: session.Loaded) -> dict[str, Any]:
        """Pipeline arguments (None values dropped: the pipeline's defaults apply)."""
        kwargs = session.sampling_kwargs(loaded, self.steps, self.guidance, self.width, self.height, self.frames)
        return {k: v for k, v in kwargs.items() if v is not None}

    def settings(self) -> dict[str, Any]:
        """The NAG settings as given (``nag.apply``'s keyword arguments; None: the family's default)."""
        return dict(scale=self.scale, tau=self.tau, alpha=self.alpha, start=self.start, end=self.end, norm=self.norm,
                    min_sigma=self.min_sigma)

    def nag(self, loaded: session.Loaded) -> dict[str, Any]:
        return session.nag_settings(loaded, **self.settings())


def total_steps(loaded: session.Loaded, call: dict[str, Any], seeds: Sequence[int], options: Options) -> int | None:
    """Denoising steps of drawing ``seeds`` in batches (for a progress bar's total)."""
    steps = call.get("num_inference_steps") or loaded.default_steps()
    calls = -(-len(seeds) // options.batch_size)
    return steps * calls if steps else None


@dataclass(frozen=True)
class Item:
    """One prompt's image set."""

    index: int
    prompt: str
    negative: str
    seed: int
    files: tuple[str, ...]


def plan(records: Sequence[dict[str, Any]], options: Options, suffix: str) -> list[Item]:
    """The image set of every prompt: its negative (the line's, else ``--negative``), seed and files."""
    items = []
    for i, record in enumerate(records):
        n = options.num_images
        files = tuple(f"{i:06d}{suffix}" if n == 1 else f"{i:06d}-{k}{suffix}" for k in range(n))
        items.append(Item(i, record["prompt"], record.get("negative", options.negative),
                          record.get("seed", options.seed + i), files))
    return items


class _OneProcess:
    """The sharding interface of accelerate's ``PartialState`` for a plain run without accelerate."""

    num_processes, process_index, is_main_process = 1, 0, True
    device = None

    def wait_for_everyone(self) -> None:
        pass

    @contextmanager
    def split_between_processes(self, items: list) -> Iterator[list]:
        yield items


def _state() -> Any:
    try:
        return eval_generate.get_state()
    except EvalError:
        return _OneProcess()  # accelerate is optional for one process


def _fingerprint(model: str, items: Sequence[Item], call: dict[str, Any], nag: dict[str, Any],
                 options: Options) -> dict[str, Any]:
    """What decides the images: a rerun with anything else into the same folder is refused."""
    prompts = json.dumps([[it.prompt, it.negative, it.seed] for it in items])
    return {"model": model, "prompts_sha256": hashlib.sha256(prompts.encode()).hexdigest(),
            "num_images": options.num_images, "seed_rule": "image k of prompt i: (line seed, else --seed + i) + k",
            "pipeline_kwargs": call, "nag": nag, "negative_off": "an empty negative prompt turns NAG off"}


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise session.NagCLIError("Output is a file", f"with --prompts, --out is a folder, but {str(out_dir)!r} is "
                                  "an existing file. Pass a folder name (it is created).")


def _draw(loaded: session.Loaded, item: Item, missing: list[int], out_dir: Path, call: dict[str, Any],
          nag: dict[str, Any], options: Options, advance: Any) -> None:
    """Draw the ``missing`` images of ``item``, each written (atomically) as soon as its batch is done."""
    with session.guide(loaded.pipe, item.negative, nag):
        for b in range(0, len(missing), options.batch_size):
            ks = missing[b:b + options.batch_size]
            results = session.run_pipeline(loaded, item.prompt, [item.seed + k for k in ks], options.batch_size,
                                            **call)
            output.write_all([out_dir / item.files[k] for k in ks], results)
            advance(len(ks))


def _manifest(out_dir: Path, items: Sequence[Item], settings: dict[str, Any]) -> dict[str, Any]:
    entries = []
    for it in items:
        paths = [out_dir / f for f in it.files]
        entries.append({"index": it.index, "prompt": it.prompt, "negative": it.negative, "seed": it.seed,
                        "files": [{"file": p.name, "seed": it.seed + k,
                                   "sha256": eval_manifest.file_sha256(p) if p.is_file() else None}
                                  for k, p in enumerate(paths)]})
    return {"settings": settings, "prompts": entries}


def run(prompts_file: Path, out_dir: Path, model: str, options: Options, device: str | None,
        dtype: str | None, offload: bool, lora: Path | None) -> None:
    """Draw every missing image of every prompt in ``prompts_file``: this process's share of them."""
    began = time.perf_counter()
    try:
        records = read_records(prompts_file)
    except EvalError as exc:
        raise session.NagCLIError(exc.title, exc.message) from exc
    _check_out_dir(out_dir)
    state = _state()
    if state.num_processes > 1:
        device = str(state.device)  # under accelerate launch each process has its own device
    loaded = common.load_with_progress(model, device, dtype, offload, lora)
    call, nag = options.call(loaded), options.nag(loaded)
    items = plan(records, options, ".mp4" if loaded.is_video else ".png")
    if state.is_main_process and (warning := session.vocabulary_warning(
            loaded, " ".join(it.prompt for it in items), " ".join(it.negative for it in items))):
        common.note(warning)
    settings = _fingerprint(model, items, call, nag, options)
    try:
        new = eval_manifest.check_settings_json(out_dir / "settings.json", settings)
    except EvalError as exc:
        raise session.NagCLIError(exc.title, exc.message) from exc
    state.wait_for_everyone()  # every process has checked the folder before anything is written
    if new and state.is_main_process:
        eval_manifest.write_json_atomic(out_dir / "settings.json", settings)
    pending = [(it, [k for k, f in enumerate(it.files) if not (out_dir / f).is_file()]) for it in items]
    pending = [(it, ks) for it, ks in pending if ks]
    state.wait_for_everyone()  # nobody writes before every process has listed what is missing
    with state.split_between_processes(pending) as mine:
        mine = list(mine)
    who = f"process {state.process_index + 1}/{state.num_processes}" if state.num_processes > 1 else "generating"
    with common.progress_bar() as progress:
        task = progress.add_task(who, total=sum(len(ks) for _, ks in mine))
        for it, ks in mine:
            _draw(loaded, it, ks, out_dir, call, nag, options, lambda n: progress.advance(task, n))
    state.wait_for_everyone()
    if state.is_main_process:
        manifest = _manifest(out_dir, items, settings)
        eval_manifest.write_json_atomic(out_dir / eval_manifest.MANIFEST, manifest)
        drawn = sum(len(ks) for _, ks in pending)
        common.out.print(f"wrote {out_dir / eval_manifest.MANIFEST}: {len(items)} prompts x {options.num_images}; "
                         f"drew {drawn}, {len(items) * options.num_images - drawn} already there", markup=False)
        common.out.print(f"ran {common.settings_text(loaded, call, nag, options.negative)}; "
                         f"{state.num_processes} process(es); {time.perf_counter() - began:.1f} s", markup=False)
