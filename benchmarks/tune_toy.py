"""Choose the built-in model's default NAG settings on tuning seeds (never the benchmark's).

    python benchmarks/tune_toy.py                         # prints a table and the chosen settings
    python benchmarks/tune_toy.py --seeds 4 --scales 3,5  # a quick look

Every (scale, tau, alpha) of the grid runs the paired negation tasks of ``nag.toy.evaluate``
(negate the colour of "a star", the shape of "a red shape") on each checkpoint the way it is
meant to be used: the few-step one at 4 steps with CFG off, the multi-step one at 25 steps with
CFG 4 (``--cfg``; 0 tunes it with CFG off).
A setting is acceptable when, in every one of those cases, it removes at least 90% of the
unguided model's occurrences of the negated attribute and keeps the named attribute's adherence
and the probe's validity within 5 points of unguided. Of the acceptable settings the one with
the most removal (then the least change in adherence, then the smallest scale) is chosen. When no
setting is acceptable, the closest is named: the most removal (rounded to 5 points), then the
least loss of adherence or validity, then the smallest scale.
The tuning seeds (default 2000-2007) are disjoint from the benchmark's (1000-1015) and the tests'.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time

import torch

from nag.toy import load_pipeline
from nag.toy.evaluate import Method, negation_trial
from nag.toy.probes import AttributeProbe


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--first-seed", type=int, default=2000)
    p.add_argument("--scales", default="3,5,8")
    p.add_argument("--taus", default="2.5,4")
    p.add_argument("--alphas", default="0.5,1")
    p.add_argument("--cfg", type=float, default=4.0, help="CFG beside NAG on the multi-step model (0: CFG off)")
    p.add_argument("--variants", default="fewstep,multistep", help="the checkpoints to tune on")
    p.add_argument("--fewstep", default=None, help="a few-step checkpoint directory other than the shipped one")
    p.add_argument("--multistep", default=None, help="a multi-step checkpoint directory other than the shipped one")
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def cases(cfg: float, variants: str = "fewstep,multistep") -> list[tuple[str, str, int, float]]:
    """(label, variant, steps, CFG scale under NAG)."""
    out = [("fewstep 4", "fewstep", 4, 0.0)]
    label = f"multistep 25 + CFG {cfg:g}" if cfg > 1 else "multistep 25"
    out.append((label, "multistep", 25, cfg if cfg > 1 else 0.0))
    return [case for case in out if case[1] in variants.split(",")]


def load(variant: str, directory: str | None):
    if directory is None:
        return load_pipeline(variant)
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(directory, dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def measure(args: argparse.Namespace) -> tuple[list[tuple[float, float, float]], dict]:
    probe = AttributeProbe.load()
    grid = [
        (float(s), float(t), float(a))
        for s, t, a in itertools.product(args.scales.split(","), args.taus.split(","), args.alphas.split(","))
    ]
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    scores: dict = {}
    pipes = {}
    for label, variant, steps, cfg in cases(args.cfg, args.variants):
        if variant not in pipes:
            pipes[variant] = load(variant, getattr(args, variant))
        pipe = pipes[variant]
        t0 = time.perf_counter()
        for task in ("colour", "shape"):
            methods = [Method("nag", s, tau=t, alpha=a, cfg=cfg) for s, t, a in grid]
            # CFG + NAG is measured against CFG alone (with an empty negative prompt), NAG against no guidance.
            reference = Method("cfg", cfg) if cfg > 1 else Method("none")
            base, *trials = negation_trial(pipe, probe, task, seeds, steps, methods, reference=reference)
            for setting, trial in zip(grid, trials):
                scores[(label, task, setting)] = (
                    1 - trial.kept_rate,
                    trial.adherence - base.adherence,
                    trial.valid_rate - base.valid_rate,
                )
        print(f"{label}: {time.perf_counter() - t0:.0f} s", flush=True)
    return grid, scores


def choose(grid, scores, labels) -> tuple[tuple[float, float, float] | None, list[str]]:
    lines = ["| scale | tau | alpha | " + " | ".join(f"{c} {t}" for c in labels for t in ("colour", "shape")) + " |"]
    lines.append("|---" * (3 + 2 * len(labels)) + "|")
    ranked, closest = [], []
    for setting in grid:
        cells, ok, removal, change = [], True, 1.0, 0.0
        for label in labels:
            for task in ("colour", "shape"):
                removed, d_adherence, d_valid = scores[(label, task, setting)]
                cells.append(f"{100 * removed:.0f}% / {100 * d_adherence:+.0f} / {100 * d_valid:+.0f}")
                ok &= removed >= 0.9 and d_adherence >= -0.05 and d_valid >= -0.05
                removal = min(removal, removed)
                change = max(change, -d_adherence, -d_valid)
        lines.append(f"| {setting[0]:g} | {setting[1]:g} | {setting[2]:g} | " + " | ".join(cells) + " |")
        if ok:
            ranked.append((-removal, change, setting[0], setting))
        closest.append((-round(removal * 20), change, setting[0], setting))
    if ranked:
        return min(ranked)[-1], lines
    return None, lines + [f"no setting qualifies; closest: scale {min(closest)[-1][0]:g}, tau {min(closest)[-1][1]:g}, "
                          f"alpha {min(closest)[-1][2]:g}"]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    grid, scores = measure(args)
    labels = [c[0] for c in cases(args.cfg, args.variants)]
    chosen, lines = choose(grid, scores, labels)
    print("cells: removed / adherence change (points) / validity change (points)")
    print("\n".join(lines))
    if chosen:
        print(f"chosen: scale {chosen[0]:g}, tau {chosen[1]:g}, alpha {chosen[2]:g}")


if __name__ == "__main__":
    sys.exit(main())
