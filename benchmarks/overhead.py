"""Per-denoiser-forward cost of no guidance, CFG and NAG, measured in one run.

Random weights, real architectures built from configs. ``--preset full`` uses the published
model sizes and resolutions (meant for ``--device cuda --dtype bfloat16``); ``--preset cpu``
keeps each architecture but with fewer layers/heads and a lower resolution, so it runs on a
laptop CPU. Every figure is reported as a ratio to no guidance measured in the same run.

    python benchmarks/overhead.py --preset cpu                 # every family with a case, CPU
    python benchmarks/overhead.py --device cuda --dtype bfloat16 --preset full --families flux,sdxl

Modes (one denoiser forward each; batch 1 image):
    none     stock forward
    cfg      stock forward on the [unconditional, conditional] batch of 2
    nag      NAG on the one image (negative of the same length as the positive), applied for this forward alone:
             the forward also does what a generation does once (the negative's keys/values projected, ...)
    nag_step NAG applied, one forward untimed, then the timed one: what each later step of a generation costs
             (cross-attention families reuse the negative's keys/values projected in the first)
    nag-end  average per step with ``end=0.5`` (half the steps guided): (none + nag) / 2
    nag_eager  NAG with the combine's eager code (``NAG_EAGER=1``): the compiled combine's saving
    floor    stock forward with the negative's text appended to the prompt's (joint and concatenating families)
             or the text twice (cross-attention ones): what NAG cannot go below; reported as NAG / floor
    nag_plain (straightforward path)  ``fast=False``: each stock attention processor run once per branch

Presets: ``cpu`` (fewer layers and heads), ``real`` (the published widths with one or two layers and about 1024
image tokens, for a CPU; FLUX.1, SD3.5-Large, SDXL, PixArt-Sigma, Sana, Wan 1.3B, Qwen-Image, HunyuanVideo) and
``full`` (published sizes, for a GPU); ``published`` (PixArt-Sigma and Wan 1.3B at their published widths and
resolutions with one block, for a CPU: the cross-attention families' per-step cost where the image is as large as
people generate it).

On CPU the benchmark runs on one thread and measures that thread's CPU time, so other work on
the machine does not distort the ratios; on CUDA it measures wall time with synchronisation.
Writes JSON lines (``--jsonl``) and a markdown table (``--markdown``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
from overhead_cases import Case, cases

import nag


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


MODES = ("none", "cfg", "nag", "nag_step", "nag_eager", "floor", "nag_plain")
LABELS = {"cfg": "CFG", "nag": "NAG", "nag_step": "NAG, later step", "nag_eager": "NAG, eager combine",
          "floor": "floor", "nag_plain": "NAG, straightforward path"}


def _call(model: torch.nn.Module, inputs: dict, nag_options: dict | None, negative: dict, settings: dict,
          device: torch.device, clock: Callable[[], float]) -> float:
    """One timed forward; ``nag_options`` (None: no NAG) may carry ``eager=True`` (the combine's eager code,
    through ``NAG_EAGER``) and ``later_step=True`` (one untimed forward under the same ``nag.apply_to_denoiser``
    first, as the first step of a generation)."""
    options = dict(nag_options or {})
    eager = options.pop("eager", False)
    later_step = options.pop("later_step", False)
    handle = nag.apply_to_denoiser(model, negative, **settings, **options) if nag_options is not None else None
    previous = os.environ.get("NAG_EAGER")
    os.environ["NAG_EAGER"] = "1" if eager else "0"
    try:
        _sync(device)
        if later_step:
            model(**inputs)
            _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = clock()
        model(**inputs)
        _sync(device)
        return clock() - start
    finally:
        if previous is None:
            os.environ.pop("NAG_EAGER", None)
        else:
            os.environ["NAG_EAGER"] = previous
        if handle is not None:
            handle.remove()


def run_case(case: Case, device: torch.device, dtype: torch.dtype, repeats: int, warmup: int, settings: dict,
             modes: tuple[str, ...] = MODES) -> dict:
    """Time every mode round-robin (one call of each per round), so load that varies over the
    run affects all modes alike; report the fastest call of each mode (and the median)."""
    # On CPU: one thread and its CPU time, which other processes on the machine do not inflate.
    clock = time.thread_time if device.type == "cpu" else time.perf_counter
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the target dtype, on the target device: no 48 GB fp32 detour
    try:
        with torch.device(device):
            model = case.build().eval()
    finally:
        torch.set_default_dtype(default_dtype)
    single = case.inputs(1, device, dtype)
    double = case.inputs(2, device, dtype)
    negative = case.negative(single)
    plan: dict[str, tuple[dict, dict | None]] = {
        "none": (single, None),
        "cfg": (double, None),
        "nag": (single, {"fast": True}),
        "nag_step": (single, {"fast": True, "later_step": True}),
        "nag_eager": (single, {"fast": True, "eager": True}),
        "nag_plain": (single, {"fast": False}),
    }
    if case.floor is not None:
        plan["floor"] = (case.floor(single, negative), None)
    plan = {mode: plan[mode] for mode in ("none", *modes) if mode in plan}
    times: dict[str, list[float]] = {mode: [] for mode in plan}
    peaks: dict[str, float | None] = {}
    with torch.no_grad():
        for round_index in range(warmup + repeats):
            for mode, (inputs, nag_options) in plan.items():
                elapsed = _call(model, inputs, nag_options, negative, settings, device, clock)
                if round_index >= warmup:
                    times[mode].append(elapsed)
                    peaks[mode] = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    base = min(times["none"])
    row = {
        "family": case.family,
        "case": case.label,
        "parameters": sum(p.numel() for p in model.parameters()),
        "none_s": base,
        "none_median_s": statistics.median(times["none"]),
    }
    for mode in plan:
        if mode == "none":
            continue
        row[f"{mode}_s"] = min(times[mode])
        row[f"{mode}_median_s"] = statistics.median(times[mode])
        row[f"{mode}_ratio"] = min(times[mode]) / base
        row[f"{mode}_memory_ratio"] = (peaks[mode] / peaks["none"]) if peaks.get("none") else None
    if "nag" in plan:
        row["nag_end_0.5_ratio"] = (1 + row["nag_ratio"]) / 2
    if "nag" in plan and "floor" in plan:
        row["nag_over_floor"] = row["nag_s"] / row["floor_s"]
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def markdown(rows: list[dict], meta: dict) -> str:
    """The table of ``rows``, with a column for each mode any row has."""
    ratio = lambda r, key: f"{r[key]:.2f}x" if r.get(key) is not None else "n/a"  # noqa: E731
    columns = [("CFG", "cfg_ratio"), ("NAG", "nag_ratio"), ("NAG, later step", "nag_step_ratio"),
               ("NAG, end=0.5", "nag_end_0.5_ratio"),
               ("NAG, eager combine", "nag_eager_ratio"), ("floor", "floor_ratio"), ("NAG / floor", "nag_over_floor"),
               ("NAG, straightforward path", "nag_plain_ratio"), ("CFG memory", "cfg_memory_ratio"),
               ("NAG memory", "nag_memory_ratio")]
    columns = [(title, key) for title, key in columns if any(r.get(key) is not None for r in rows)]
    lines = [
        f"Measured {meta['date']} on {meta['machine']}; torch {meta['torch']}, diffusers {meta['diffusers']}, "
        f"dtype {meta['dtype']}, preset `{meta['preset']}`, fastest of {meta['repeats']} forwards per mode, "
        "modes interleaved. "
        "Ratios are to no guidance in the same run (NAG / floor: to the floor).",
        "",
        "| model | params | no guidance | " + " | ".join(title for title, _ in columns) + " |",
        "|---|---|---|" + "---|" * len(columns),
    ]
    for r in rows:
        cells = [ratio(r, key) for _, key in columns]
        lines.append(
            f"| {r['case']} | {r['parameters'] / 1e6:.0f}M | {r['none_s'] * 1000:.1f} ms | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines) + "\n"


def update_markdown(path: str, section: str, table: str) -> None:
    """Replace (or append) the generated block ``section`` in ``path``, keeping the prose around it."""
    import os

    begin, end = f"<!-- overhead:{section} -->", f"<!-- /overhead:{section} -->"
    text = open(path).read() if os.path.exists(path) else ""
    block = f"{begin}\n{table}{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + block + "\n"
    with open(path, "w") as f:
        f.write(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--preset", default="cpu", choices=["cpu", "real", "published", "full"])
    parser.add_argument(
        "--modes",
        default=",".join(MODES[1:]),
        help=f"modes besides no guidance, comma-separated, of {', '.join(MODES[1:])}",
    )
    parser.add_argument(
        "--families",
        default="flux,sd3,sdxl,pixart,sana,wan,chroma,flux2,zimage,qwenimage,hunyuanvideo,hidream,lumina2,auraflow,cogview4,cogvideox",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--jsonl", default=None, help="append one JSON line per case")
    parser.add_argument(
        "--markdown",
        default=None,
        help="markdown file to update: the table replaces the block between "
        "'<!-- overhead:SECTION -->' and '<!-- /overhead:SECTION -->' (appended if absent)",
    )
    parser.add_argument("--section", default=None, help="block name in --markdown (default: the preset and device)")
    parser.add_argument(
        "--render",
        default=None,
        metavar="JSONL",
        help="measure nothing: render the table from JSON lines written earlier with --jsonl",
    )
    args = parser.parse_args(argv)

    if args.render:
        rows = [json.loads(line) for line in open(args.render) if line.strip()]
        table = markdown(rows, rows[0])
        print(table)
        if args.markdown:
            update_markdown(args.markdown, args.section or f"{rows[0]['preset']}-{args.device}", table)
        return

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if device.type == "cpu":
        torch.set_num_threads(1)
    settings = dict(scale=5.0, tau=2.5, alpha=0.25)
    machine = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{platform.machine()} CPU, 1 thread, CPU time of the thread"
    )
    import diffusers

    meta = dict(
        date=datetime.date.today().isoformat(),
        machine=machine,
        torch=torch.__version__,
        diffusers=diffusers.__version__,
        dtype=args.dtype,
        preset=args.preset,
        repeats=args.repeats,
    )
    rows = []
    for case in cases(args.preset, args.families.split(",")):
        print(f"{case.label} ...", file=sys.stderr, flush=True)
        row = run_case(case, device, dtype, args.repeats, args.warmup, settings, tuple(args.modes.split(",")))
        row.update(meta)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                f.write(json.dumps(row) + "\n")
    table = markdown(rows, meta)
    print(table)
    if args.markdown:
        update_markdown(args.markdown, args.section or f"{args.preset}-{device.type}", table)


if __name__ == "__main__":
    main()
