"""NAG quality on the built-in toy model: suppression, adherence and validity, measured by a probe.

    python benchmarks/quality_toy.py                    # writes docs/quality_toy.md, docs/images/toy_grid.png
    python benchmarks/quality_toy.py --seeds 4 --steps 4 --variants fewstep   # a quick look

For each checkpoint (few-step, multi-step), each number of steps and each method (no guidance,
CFG at several scales with the negative prompt as the unconditional branch, NAG at several
scales with CFG off), two paired tasks run on fixed seeds (see ``nag.toy.evaluate``):

- colour: prompts "a circle", "a square", ... (colour left free); the negative prompt is the
  colour the unguided sample shows. "colour kept" is how often that colour is still there;
  adherence is how often the prompt's shape is there.
- shape: prompts "a red shape", ... (shape left free); the negative is the unguided sample's
  shape. "shape kept" / colour adherence likewise.

"valid" is the share of samples the probe's realness head accepts as clean dataset-like images.
Everything is offline and CPU-only; the run is deterministic for a given torch build.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

from nag.toy import DEFAULT_NAG, VARIANTS, load_pipeline  # noqa: E402
from nag.toy.evaluate import Method, TrialResult, negation_trial, wilson_interval  # noqa: E402
from nag.toy.probes import AttributeProbe  # noqa: E402

#: NAG's tau and alpha on the toy model: ``nag.toy.DEFAULT_NAG`` (chosen on seeds outside the benchmark's).
NAG_TAU = DEFAULT_NAG["tau"]
NAG_ALPHA = DEFAULT_NAG["alpha"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=16, help="seeds per prompt (6 colour-task and 8 shape-task prompts)")
    p.add_argument("--first-seed", type=int, default=1000)
    p.add_argument("--steps", default="1,2,4,8,25", help="comma-separated step counts")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--cfg", default="2,4,7", help="CFG scales")
    p.add_argument("--nag", default="2,4,6,8", help="NAG scales")
    p.add_argument("--tau", type=float, default=NAG_TAU)
    p.add_argument("--alpha", type=float, default=NAG_ALPHA)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=REPO / "docs" / "quality_toy.md")
    p.add_argument("--grid", type=Path, default=REPO / "docs" / "images" / "toy_grid.png")
    p.add_argument("--json", type=Path, default=None, help="also write the raw counts here")
    return p.parse_args(argv)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _pct(x: float) -> str:
    return "n/a" if x != x else f"{100 * x:.0f}%"


def run(args: argparse.Namespace) -> tuple[dict, float]:
    probe = AttributeProbe.load()
    methods = (
        [Method("none")]
        + [Method("cfg", float(s)) for s in args.cfg.split(",")]
        + [Method("nag", float(s), tau=args.tau, alpha=args.alpha) for s in args.nag.split(",")]
    )
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    results: dict = {}
    start = time.perf_counter()
    for variant in args.variants.split(","):
        pipe = load_pipeline(variant)
        for steps in [int(s) for s in args.steps.split(",")]:
            t0 = time.perf_counter()
            by_task = {task: negation_trial(pipe, probe, task, seeds, steps, methods) for task in ("colour", "shape")}
            results[(variant, steps)] = by_task
            print(f"{variant:9s} {steps:2d} steps: {time.perf_counter() - t0:6.1f} s", flush=True)
    return results, time.perf_counter() - start


def _row(variant: str, steps: int, colour: TrialResult, shape: TrialResult) -> str:
    valid = (colour.valid + shape.valid) / (colour.samples + shape.samples)
    kept_colour = "100% (by construction)" if colour.method.kind == "none" else _pct(colour.kept_rate)
    kept_shape = "100% (by construction)" if shape.method.kind == "none" else _pct(shape.kept_rate)
    return (
        f"| {steps} | {colour.method.label} | {kept_colour} | {_pct(colour.adherence)} | {kept_shape} "
        f"| {_pct(shape.adherence)} | {_pct(valid)} |"
    )


def headline(results: dict) -> list[str]:
    """The issue's targets, on the few-step checkpoint at 4 steps."""
    key = ("fewstep", 4)
    if key not in results:
        return []
    lines = ["## Targets: the few-step checkpoint at 4 steps", ""]
    by_task = results[key]
    none = {task: trials[0] for task, trials in by_task.items()}
    for task, trials in by_task.items():
        attribute = {"colour": "colour", "shape": "shape"}[task]
        named = {"colour": "shape", "shape": "colour"}[task]
        for trial in trials[1:]:
            low, high = wilson_interval(trial.eligible - trial.kept, trial.eligible)
            removed = 1 - trial.kept_rate
            delta = 100 * (trial.adherence - none[task].adherence)
            ok = removed >= 0.9 and delta >= -5
            verdict = f": {'meets' if ok else 'misses'} the target" if trial.method.kind == "nag" else ""
            lines.append(
                f"- {trial.method.label}, negated {attribute}: removes {_pct(removed)} of the unguided model's "
                f"occurrences ({trial.eligible - trial.kept}/{trial.eligible}; 95% CI {_pct(low)}-{_pct(high)}); "
                f"{named} adherence {_pct(trial.adherence)} vs {_pct(none[task].adherence)} unguided "
                f"({delta:+.0f} points); valid {_pct(trial.valid_rate)} vs {_pct(none[task].valid_rate)} "
                f"unguided{verdict}."
            )
    lines += [
        "",
        "Target (NAG rows): >= 90% of the occurrences removed with adherence within 5 points of unguided. "
        "CFG rows are for comparison: on this few-step checkpoint CFG uses the negative prompt as its "
        "unconditional branch at the price of a second model pass per step.",
    ]
    return lines + [""]


def write_report(args: argparse.Namespace, results: dict, seconds: float, grid_seconds: float) -> None:
    import diffusers
    import transformers

    metrics = AttributeProbe.metrics()
    clean = metrics.get("accuracy_clean", {})
    corrupted = metrics.get("accuracy_corrupted", {})
    n_colour = 6 * args.seeds
    n_shape = 8 * args.seeds
    lines = [
        "# NAG on the built-in toy model",
        "",
        "Made by `python benchmarks/quality_toy.py` "
        f"({datetime.date.today().isoformat()}; {seconds / 60:.1f} min for the table, "
        f"{grid_seconds:.0f} s for the grid). "
        f"Machine: {_cpu_name()}, {torch.get_num_threads()} torch thread(s), no GPU. "
        f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}, "
        f"Python {platform.python_version()}.",
        "",
        "The model is `nag.toy` (a stock `StableDiffusionPipeline`, 32x32 pixel space; see `training/README.md`). "
        "The probe is a small CNN trained on the dataset generator's exact ground truth (`nag.toy.probes`); its own "
        "accuracy on 3000 held-out generator images: "
        + ", ".join(f"{k} {_pct(v)}" for k, v in clean.items() if k != "valid")
        + f"; on mildly corrupted copies: shape {_pct(corrupted.get('shape', float('nan')))}, colour "
        f"{_pct(corrupted.get('colour', float('nan')))}. Its realness head accepts "
        f"{_pct(clean.get('valid', float('nan')))} "
        f"of clean images, {_pct(metrics.get('valid_on_junk', float('nan')))} of junk images (blends, noise, heavy "
        f"blur, two half images) and {_pct(metrics.get('valid_on_uniform_noise', float('nan')))} of uniform noise.",
        "",
        "How to read it (`nag.toy.evaluate`): every sample is paired. The unguided sample (no CFG, no NAG) is made "
        "first; the negative prompt is then exactly the attribute the probe sees in it (its colour for the prompts "
        '"a circle", "a square", ...; its shape for "a red shape", "a blue shape", ...), and each method '
        "regenerates from the same noise. *kept*: how often the negated attribute is still there, among the samples "
        "whose unguided image the probe accepts as valid (100% without guidance by construction; 1 - kept is the "
        "share of the unguided model's occurrences the method removes). *adherence*: how often the attribute the "
        "prompt names is there. *valid*: share of all samples the probe accepts. "
        f"{n_colour} colour-task and {n_shape} shape-task samples per row (seeds {args.first_seed}-"
        f"{args.first_seed + args.seeds - 1}). CFG uses the negative prompt as its unconditional branch; NAG runs "
        f"with CFG off (`guidance_scale=0`), tau {args.tau:g}, alpha {args.alpha:g}.",
        "",
    ]
    lines += headline(results)
    for variant in args.variants.split(","):
        title = {
            "fewstep": "Few-step checkpoint (distilled, guidance baked in; made for 1-4 steps)",
            "multistep": "Multi-step checkpoint (made for about 25 steps with CFG)",
        }[variant]
        lines += [
            f"## {title}",
            "",
            "| steps | method | colour kept (lower is better) | shape adherence | shape kept (lower is better) "
            "| colour adherence | valid |",
            "|---|---|---|---|---|---|---|",
        ]
        for (v, steps), by_task in results.items():
            if v != variant:
                continue
            for colour, shape in zip(by_task["colour"], by_task["shape"]):
                lines.append(_row(variant, steps, colour, shape))
        lines.append("")
    lines += [
        "![no guidance / CFG / NAG on the few-step model](images/toy_grid.png)",
        "",
        "The grid: `python -m nag.demo --out docs/images/toy_grid.png` (the demo's defaults).",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")


def make_grid(path: Path) -> float:
    from nag import demo

    start = time.perf_counter()
    demo.main(["--out", str(path)])
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    results, seconds = run(args)
    grid_seconds = make_grid(args.grid)
    if args.json is not None:
        raw = {
            f"{variant}/{steps}/{task}/{t.method.label}": {
                "samples": t.samples, "eligible": t.eligible, "kept": t.kept, "adherent": t.adherent, "valid": t.valid
            }
            for (variant, steps), by_task in results.items()
            for task, trials in by_task.items()
            for t in trials
        }  # fmt: skip
        args.json.write_text(json.dumps(raw, indent=1) + "\n")
    write_report(args, results, seconds, grid_seconds)


if __name__ == "__main__":
    sys.exit(main())
