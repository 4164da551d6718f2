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

from nag.toy import NAG_DEFAULTS, VARIANTS, load_pipeline  # noqa: E402
from nag.toy.evaluate import (  # noqa: E402
    Method,
    TrialResult,
    adherence_prompts,
    adherence_trial,
    negation_trial,
    wilson_interval,
)
from nag.toy.probes import AttributeProbe  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=16, help="seeds per prompt (6 colour-task and 8 shape-task prompts)")
    p.add_argument("--first-seed", type=int, default=1000)
    p.add_argument("--steps", default="1,2,4,8,25", help="comma-separated step counts")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--cfg", default="4", help="CFG scales")
    p.add_argument("--nag", default=None, help="NAG scales (the first one also runs with CFG); default: the model's")
    p.add_argument("--cfg-nag", type=float, default=4.0, help="CFG scale of the CFG + NAG rows (0: none)")
    p.add_argument("--adherence", type=int, default=192, help="prompts of the adherence table (0: skip it)")
    p.add_argument("--tau", type=float, default=None, help="NAG tau (default: the model's, nag.toy.NAG_DEFAULTS)")
    p.add_argument("--alpha", type=float, default=None, help="NAG alpha (default: the model's)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=REPO / "docs" / "quality_toy.md")
    p.add_argument("--images", type=Path, default=REPO / "docs" / "images", help="where the picture grids go")
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


def nag_settings(args: argparse.Namespace, variant: str) -> tuple[list[float], float, float]:
    """NAG scales, tau and alpha for a checkpoint: the command line's, else the checkpoint's defaults."""
    defaults = NAG_DEFAULTS[variant]
    scales = [float(s) for s in args.nag.split(",")] if args.nag else [defaults["scale"]]
    tau = args.tau if args.tau is not None else defaults["tau"]
    return scales, tau, args.alpha if args.alpha is not None else defaults["alpha"]


def methods(args: argparse.Namespace, variant: str) -> list[Method]:
    """no guidance, CFG at each scale, NAG at each scale (CFG off), then NAG's first scale with CFG."""
    nag_scales, tau, alpha = nag_settings(args, variant)
    out = [Method("none")] + [Method("cfg", float(s)) for s in args.cfg.split(",")]
    out += [Method("nag", s, tau=tau, alpha=alpha) for s in nag_scales]
    if args.cfg_nag > 1:
        out.append(Method("nag", nag_scales[0], tau=tau, alpha=alpha, cfg=args.cfg_nag))
    return out


#: Where the headline is measured: each checkpoint at the step count it is made for.
HEADLINE = (("fewstep", 4), ("multistep", 25))
#: The sampling each checkpoint's adherence is measured with: (variant, steps, CFG scale).
ADHERENCE = (("fewstep", 1, 0.0), ("fewstep", 2, 0.0), ("fewstep", 4, 0.0), ("multistep", 25, 0.0),
             ("multistep", 25, 4.0))


def run(args: argparse.Namespace) -> tuple[dict, dict, list, float]:
    """The negation trials (per checkpoint and step count), CFG + NAG against CFG, and adherence."""
    probe = AttributeProbe.load()
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    results: dict = {}
    against_cfg: dict = {}
    adherence: list = []
    prompts, truth = adherence_prompts(args.adherence)
    start = time.perf_counter()
    for variant in args.variants.split(","):
        pipe = load_pipeline(variant)
        for steps in [int(s) for s in args.steps.split(",")]:
            t0 = time.perf_counter()
            keep = (variant, steps) == ("fewstep", 4)
            results[(variant, steps)] = {
                task: negation_trial(pipe, probe, task, seeds, steps, methods(args, variant), keep_images=keep)
                for task in ("colour", "shape")
            }
            if (variant, steps) in HEADLINE and args.cfg_nag > 1:
                cfg_nag = [m for m in methods(args, variant) if m.kind == "nag" and m.cfg > 1]
                reference = Method("cfg", args.cfg_nag)
                against_cfg[(variant, steps)] = {
                    task: negation_trial(pipe, probe, task, seeds, steps, cfg_nag, reference=reference)
                    for task in ("colour", "shape")
                }
            print(f"{variant:9s} {steps:2d} steps: {time.perf_counter() - t0:6.1f} s", flush=True)
        for v, steps, cfg in ADHERENCE:
            if v == variant and args.adherence:
                method = Method("cfg", cfg) if cfg > 1 else Method("none")
                guidance = f"CFG {cfg:g}" if cfg > 1 else "no guidance"
                label = f"{variant}, {steps} step{'s' if steps > 1 else ''}, {guidance}"
                sample_seeds = [args.first_seed + i for i in range(len(prompts))]
                adherence.append(adherence_trial(pipe, probe, prompts, truth, sample_seeds, steps, method, label=label))
    return results, against_cfg, adherence, time.perf_counter() - start


def _row(variant: str, steps: int, colour: TrialResult, shape: TrialResult) -> str:
    valid = (colour.valid + shape.valid) / (colour.samples + shape.samples)
    kept_colour = "100% (by construction)" if colour.method.kind == "none" else _pct(colour.kept_rate)
    kept_shape = "100% (by construction)" if shape.method.kind == "none" else _pct(shape.kept_rate)
    return (
        f"| {steps} | {colour.method.label} | {kept_colour} | {_pct(colour.adherence)} | {kept_shape} "
        f"| {_pct(shape.adherence)} | {_pct(valid)} |"
    )


def _verdict_lines(trials: dict, reference_name: str, only=None) -> list[str]:
    lines = []
    for task, (reference, *rest) in trials.items():
        named = {"colour": "shape", "shape": "colour"}[task]
        for trial in rest:
            if trial.method.kind != "nag" or (only is not None and not only(trial.method)):
                continue
            low, high = wilson_interval(trial.eligible - trial.kept, trial.eligible)
            removed = 1 - trial.kept_rate
            delta = 100 * (trial.adherence - reference.adherence)
            d_valid = 100 * (trial.valid_rate - reference.valid_rate)
            ok = removed >= 0.9 and delta >= -5 and d_valid >= -5
            lines.append(
                f"- {trial.method.label}, negated {task}: removes {_pct(removed)} of the {reference_name} "
                f"occurrences ({trial.eligible - trial.kept}/{trial.eligible}; 95% CI {_pct(low)}-{_pct(high)}); "
                f"{named} adherence {_pct(trial.adherence)} vs {_pct(reference.adherence)} ({delta:+.0f} points); "
                f"valid {_pct(trial.valid_rate)} vs {_pct(reference.valid_rate)} ({d_valid:+.0f} points): "
                f"{'meets' if ok else 'misses'} the target."
            )
    return lines


def headline(results: dict, against_cfg: dict) -> list[str]:
    """The targets: each checkpoint at the step count it is made for, NAG with its default settings."""
    lines = ["## Targets", ""]
    for key in HEADLINE:
        if key not in results:
            continue
        lines += [f"**{key[0]}, {key[1]} steps**", ""]
        lines += _verdict_lines(results[key], "unguided model's", only=lambda m: m.cfg <= 1)
        if key in against_cfg:
            lines += _verdict_lines(against_cfg[key], "CFG-alone (empty negative prompt)")
        lines.append("")
    lines += [
        "Target: >= 90% of the occurrences removed, with adherence and validity within 5 points of the same "
        "sampling without a negative prompt (no guidance for NAG; CFG alone for CFG + NAG). CFG rows in the "
        "tables below are for comparison (the negative prompt as CFG's unconditional branch, a second model "
        "pass per step).",
        "",
    ]
    return lines


def adherence_table(adherence: list) -> list[str]:
    if not adherence:
        return []
    attributes = ("shape", "colour", "count", "size", "position", "background")
    backgrounds = list(adherence[0].by_background)
    lines = [
        "## Does the model draw what it is asked?",
        "",
        f"{adherence[0].samples} held-out prompts that name every attribute (\"a large red star on the left on a black "
        "background\", \"three blue crosses on a gray background\"), one seed each, read by the probe. Size and "
        "position are scored on the single-object prompts. The last columns: shape, colour and count all right, "
        "per background. Targets: shape >= 90%, colour >= 95%, count >= 80%.",
        "",
        "| sampling | " + " | ".join(attributes) + " | valid | " + " | ".join(f"all three, {b}" for b in backgrounds)
        + " |",
        "|---" * (2 + len(attributes) + len(backgrounds)) + "|",
    ]
    for result in adherence:
        cells = [_pct(result.rate(a)) for a in attributes] + [_pct(result.valid / result.samples)]
        cells += [_pct(done / total) for done, total in (result.by_background[b] for b in backgrounds)]
        lines.append(f"| {result.label} | " + " | ".join(cells) + " |")
    return lines + [""]


def write_report(args: argparse.Namespace, results: dict, against_cfg: dict, adherence: list, seconds: float,
                 grids: list[Path]) -> None:
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
        f"({datetime.date.today().isoformat()}; {seconds / 60:.1f} min). "
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
    ]
    lines += adherence_table(adherence)
    lines += [
        "## Negative prompts",
        "",
        "How to read it (`nag.toy.evaluate`): every sample is paired. The unguided sample (no CFG, no NAG) is made "
        "first; the negative prompt is then exactly the attribute the probe sees in it (its colour for the prompts "
        '"a circle", "a square", ...; its shape for "a red shape", "a blue shape", ...), and each method '
        "regenerates from the same noise. *kept*: how often the negated attribute is still there, among the samples "
        "whose unguided image the probe accepts as valid (100% without guidance by construction; 1 - kept is the "
        "share of the unguided model's occurrences the method removes). *adherence*: how often the attribute the "
        "prompt names is there. *valid*: share of all samples the probe accepts. "
        f"{n_colour} colour-task and {n_shape} shape-task samples per row (seeds {args.first_seed}-"
        f"{args.first_seed + args.seeds - 1}; the default NAG settings were chosen on other seeds by "
        "`benchmarks/tune_toy.py`). CFG uses the negative prompt as its unconditional branch; NAG runs "
        "with CFG off (`guidance_scale=0`) unless the row says + CFG (then CFG's unconditional prompt is empty), "
        "with each checkpoint's own tau and alpha: "
        + "; ".join(f"{v} tau {nag_settings(args, v)[1]:g}, alpha {nag_settings(args, v)[2]:g}"
                    for v in args.variants.split(","))
        + ".",
        "",
    ]
    lines += headline(results, against_cfg)
    for variant in args.variants.split(","):
        title = {
            "fewstep": "Few-step checkpoint (distilled, guidance baked in; made for 1-4 steps)",
            "multistep": "Multi-step checkpoint (made for about 25 steps with CFG)",
        }[variant]
        lines += [
            f"### {title}",
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
    for path in grids:
        task = path.stem.split("_")[-1]
        lines += [f"![{task} task, few-step model, 4 steps](images/{path.name})", ""]
    if grids:
        lines += [
            "The grids: the few-step checkpoint at 4 steps, the first seed of each prompt of the task; every row "
            "negates what its unguided image shows (its colour, or its shape). The demo grid: "
            "`python -m nag.demo --out docs/images/toy_grid.png`.",
            "",
        ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")


def task_grids(results: dict, directory: Path, seeds: int) -> list[Path]:
    """One picture grid per task from the few-step 4-step trials: a row per prompt (its first seed)."""
    from nag.grid import make_grid
    from nag.toy.evaluate import task_prompts

    if ("fewstep", 4) not in results:
        return []
    probe = AttributeProbe.load()
    paths = []
    for task, trials in results[("fewstep", 4)].items():
        prompts, negated, _ = task_prompts(task)
        rows = [k * seeds for k in range(len(prompts))]  # the first seed of each prompt
        negatives = probe(trials[0].images[rows]).labels[negated]
        columns = {t.method.label: [_pil(t.images[i]) for i in rows] for t in trials}
        labels = [f"-{n}" for n in negatives]
        title = (f"{task} task: negate the {negated} the unguided image shows (few-step model, 4 steps)\n"
                 f"rows: {', '.join(prompts)}")
        path = directory / f"toy_task_{task}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        make_grid(columns, labels, title, cell=72).save(path)
        paths.append(path)
    return paths


def _pil(image: torch.Tensor):
    from PIL import Image

    return Image.fromarray(image.mul(255).round().clamp(0, 255).byte().permute(1, 2, 0).numpy())


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    results, against_cfg, adherence, seconds = run(args)
    grids = task_grids(results, args.images, args.seeds)
    from nag import demo

    demo.main(["--out", str(args.images / "toy_grid.png")])
    if args.json is not None:
        raw = {
            f"{variant}/{steps}/{task}/{t.method.label}": {
                "samples": t.samples, "eligible": t.eligible, "kept": t.kept, "adherent": t.adherent, "valid": t.valid
            }
            for (variant, steps), by_task in results.items()
            for task, trials in by_task.items()
            for t in trials
        }  # fmt: skip
        raw["adherence"] = {r.label: {"samples": r.samples, "correct": r.correct, "named": r.named, "valid": r.valid}
                            for r in adherence}
        args.json.write_text(json.dumps(raw, indent=1) + "\n")
    write_report(args, results, against_cfg, adherence, seconds, grids)


if __name__ == "__main__":
    sys.exit(main())
