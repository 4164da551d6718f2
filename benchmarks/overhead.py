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
    nag      NAG on the one image (negative of the same length as the positive)
    nag-end  average per step with ``end=0.5`` (half the steps guided): (none + nag) / 2
    nag (straightforward path)  ``fast=False``: each stock attention processor run once per branch

On CPU the benchmark runs on one thread and measures that thread's CPU time, so other work on
the machine does not distort the ratios; on CUDA it measures wall time with synchronisation.
Writes JSON lines (``--jsonl``) and a markdown table (``--markdown``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time

import torch

import nag
from overhead_cases import Case, cases


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_case(case: Case, device: torch.device, dtype: torch.dtype, repeats: int, warmup: int, settings: dict) -> dict:
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
    modes: dict[str, tuple[dict, dict | None]] = {
        "none": (single, None),
        "cfg": (double, None),
        "nag": (single, {"fast": True}),
        "nag_plain": (single, {"fast": False}),
    }
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    peaks: dict[str, float | None] = {}
    with torch.no_grad():
        for round_index in range(warmup + repeats):
            for mode, (inputs, nag_options) in modes.items():
                handle = nag.apply_to_denoiser(model, negative, **settings, **nag_options) if nag_options else None
                try:
                    _sync(device)
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                    start = clock()
                    model(**inputs)
                    _sync(device)
                    elapsed = clock() - start
                finally:
                    if handle is not None:
                        handle.remove()
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
    for mode in ("cfg", "nag", "nag_plain"):
        row[f"{mode}_s"] = min(times[mode])
        row[f"{mode}_median_s"] = statistics.median(times[mode])
        row[f"{mode}_ratio"] = min(times[mode]) / base
        row[f"{mode}_memory_ratio"] = (peaks[mode] / peaks["none"]) if peaks.get("none") else None
    row["nag_end_0.5_ratio"] = (1 + row["nag_ratio"]) / 2
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"Measured {meta['date']} on {meta['machine']}; torch {meta['torch']}, diffusers {meta['diffusers']}, "
        f"dtype {meta['dtype']}, preset `{meta['preset']}`, fastest of {meta['repeats']} forwards per mode, modes interleaved. "
        "Ratios are to no guidance in the same run.",
        "",
        "| model | params | no guidance | CFG | NAG | NAG, end=0.5 | NAG, straightforward path | CFG memory | NAG memory |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mem = lambda v: "n/a" if v is None else f"{v:.2f}x"  # noqa: E731
        lines.append(
            f"| {r['case']} | {r['parameters'] / 1e6:.0f}M | {r['none_s'] * 1000:.1f} ms | {r['cfg_ratio']:.2f}x | "
            f"{r['nag_ratio']:.2f}x | {r['nag_end_0.5_ratio']:.2f}x | {r['nag_plain_ratio']:.2f}x | "
            f"{mem(r['cfg_memory_ratio'])} | {mem(r['nag_memory_ratio'])} |"
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
    parser.add_argument("--preset", default="cpu", choices=["cpu", "full"])
    parser.add_argument("--families", default="flux,sd3,sdxl,pixart,sana,wan,chroma,flux2,zimage,qwenimage,hunyuanvideo,hidream,lumina2,auraflow,cogview4,cogvideox")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--jsonl", default=None, help="append one JSON line per case")
    parser.add_argument("--markdown", default=None,
                        help="markdown file to update: the table replaces the block between "
                             "'<!-- overhead:SECTION -->' and '<!-- /overhead:SECTION -->' (appended if absent)")
    parser.add_argument("--section", default=None, help="block name in --markdown (default: the preset and device)")
    parser.add_argument("--render", default=None, metavar="JSONL",
                        help="measure nothing: render the table from JSON lines written earlier with --jsonl")
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
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"{platform.machine()} CPU, 1 thread, CPU time of the thread")
    import diffusers

    meta = dict(date=datetime.date.today().isoformat(), machine=machine, torch=torch.__version__,
                diffusers=diffusers.__version__, dtype=args.dtype, preset=args.preset, repeats=args.repeats)
    rows = []
    for case in cases(args.preset, args.families.split(",")):
        print(f"{case.label} ...", file=sys.stderr, flush=True)
        row = run_case(case, device, dtype, args.repeats, args.warmup, settings)
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
