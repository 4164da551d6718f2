"""Measure negative-prompt guidance on the toy model with the attribute probe.

The measurement is paired, per sample (a prompt and a seed):

1. Generate without guidance; the probe reads the attribute under test (the colour for prompts
   that name only a shape, "a star"; the shape for prompts that name only a colour, "a red shape").
2. Negate exactly what the unguided sample shows: the negative prompt is that colour ("yellow")
   or shape ("star"). Generate again from the same noise with each guidance method.
3. *kept*: how often the negated attribute is still there (of the samples whose unguided image
   the probe reads confidently; 100% without guidance by construction). 1 - kept is the share of
   the unguided model's occurrences that the method removes.
   *adherence*: how often the attribute the prompt names is there (the shape of "a star").
   *valid*: how often the probe is confident of both shape and colour (a clean image).

    from nag.toy import load_pipeline
    from nag.toy.evaluate import Method, negation_trial
    from nag.toy.probes import AttributeProbe

    pipe, probe = load_pipeline("fewstep"), AttributeProbe.load()
    result = negation_trial(pipe, probe, "colour", seeds=range(16), steps=4,
                            methods=[Method("nag", 4.0)])
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

import nag

from .dataset import COLOURS, SHAPES, Attributes, full_caption, sample_attributes
from .probes import AttributeProbe, ProbeResult
from .vocabulary import MODEL_BACKGROUNDS

__all__ = [
    "Method", "TrialResult", "AdherenceResult", "negation_trial", "adherence_trial", "adherence_prompts", "generate",
    "task_prompts", "wilson_interval",
]

#: The attributes an adherence trial scores (a prompt of several objects names no size or position).
ADHERENCE_ATTRIBUTES: tuple[str, ...] = ("shape", "colour", "count", "size", "position", "background")


@dataclass(frozen=True)
class Method:
    """A guidance method: ``"none"``, ``"cfg"`` (scale = guidance_scale) or ``"nag"`` (scale = NAG s).

    ``cfg`` on a ``"nag"`` method adds classifier-free guidance with an empty unconditional prompt
    (NAG then guides the conditional branch).
    """

    kind: str
    scale: float = 1.0
    tau: float = 2.5
    alpha: float = 0.5
    cfg: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("none", "cfg", "nag"):
            raise ValueError(f"unknown method kind {self.kind!r}; expected 'none', 'cfg' or 'nag'")

    @property
    def label(self) -> str:
        if self.kind == "none":
            return "none"
        if self.kind == "cfg":
            return f"CFG {self.scale:g}"
        extra = f" + CFG {self.cfg:g}" if self.cfg > 1 else ""
        return f"NAG {self.scale:g}{extra}"


@dataclass
class TrialResult:
    """Counts of one method on one task (see the module docstring for the definitions)."""

    method: Method
    task: str
    samples: int
    eligible: int  # samples whose unguided image the probe reads confidently
    kept: int  # of the eligible, how many still show the negated attribute
    adherent: int
    valid: int
    images: torch.Tensor | None = field(default=None, repr=False)

    @property
    def kept_rate(self) -> float:
        return self.kept / self.eligible if self.eligible else float("nan")

    @property
    def adherence(self) -> float:
        return self.adherent / self.samples

    @property
    def valid_rate(self) -> float:
        return self.valid / self.samples


def task_prompts(task: str) -> tuple[list[str], str, str]:
    """Prompts of a task, the attribute they leave free (negated) and the one they name (adhered)."""
    if task == "colour":
        return [f"a {shape}" for shape in SHAPES], "colour", "shape"
    if task == "shape":
        return [f"a {colour} shape" for colour in COLOURS], "shape", "colour"
    raise ValueError(f"unknown task {task!r}; expected 'colour' or 'shape'")


def generate(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int,
    method: Method,
    negatives: Sequence[str] | None = None,
    batch_size: int = 128,
) -> torch.Tensor:
    """Images (N, 3, H, W) in [0, 1]; sample ``i`` starts from the noise of ``seeds[i]``."""
    if len(prompts) != len(seeds):
        raise ValueError("one seed per prompt")
    if method.kind != "none" and (negatives is None or len(negatives) != len(prompts)):
        raise ValueError("guided methods need one negative prompt per prompt")
    out = []
    for i in range(0, len(prompts), batch_size):
        p = list(prompts[i : i + batch_size])
        n = list(negatives[i : i + batch_size]) if negatives is not None else None
        g = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[i : i + batch_size]]
        kwargs = dict(num_inference_steps=steps, generator=g, output_type="pt")
        if method.kind == "none":
            images = pipe(p, guidance_scale=0.0, **kwargs).images
        elif method.kind == "cfg":
            images = pipe(p, guidance_scale=method.scale, negative_prompt=n, **kwargs).images
        else:
            with nag.apply(pipe, n, scale=method.scale, tau=method.tau, alpha=method.alpha):
                images = pipe(p, guidance_scale=method.cfg, **kwargs).images
        out.append(images.float().cpu())
    return torch.cat(out)


def negation_trial(
    pipe,
    probe: AttributeProbe,
    task: str,
    seeds: Iterable[int],
    steps: int,
    methods: Sequence[Method],
    keep_images: bool = False,
    batch_size: int = 128,
    reference: Method = Method("none"),
) -> list[TrialResult]:
    """Run the paired negation measurement for ``task`` ("colour" or "shape").

    Every prompt of the task is sampled with every seed. Returns one result per method, the
    reference first: the sampling without a negative prompt whose attributes are negated, no
    guidance by default, or ``Method("cfg", s)`` (CFG with an empty negative prompt) to measure
    CFG + NAG against CFG alone.
    """
    base_prompts, negated, named = task_prompts(task)
    seeds = list(seeds)
    prompts = [p for p in base_prompts for _ in seeds]
    sample_seeds = [s for _ in base_prompts for s in seeds]
    wanted = [p.split()[1] for p in prompts]  # "a star" -> star, "a red shape" -> red

    def score(method: Method, images: torch.Tensor, read: ProbeResult, eligible, negatives) -> TrialResult:
        kept = read.has(negated, negatives) & eligible
        return TrialResult(
            method=method,
            task=task,
            samples=len(prompts),
            eligible=int(eligible.sum()),
            kept=int(kept.sum()),
            adherent=int(read.has(named, wanted).sum()),
            valid=int(read.valid.sum()),
            images=images if keep_images else None,
        )

    if reference.kind == "nag":
        raise ValueError("the reference of a negation trial samples without a negative prompt: 'none' or 'cfg'")
    images = generate(pipe, prompts, sample_seeds, steps, reference, [""] * len(prompts), batch_size=batch_size)
    read = probe(images)
    negatives = read.labels[negated]
    eligible = read.valid
    results = [score(reference, images, read, eligible, negatives)]
    for method in methods:
        if method == reference:
            continue
        images = generate(pipe, prompts, sample_seeds, steps, method, negatives, batch_size=batch_size)
        results.append(score(method, images, probe(images), eligible, negatives))
    return results


def wilson_interval(successes: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95% for z = 1.96)."""
    if total == 0:
        return (float("nan"), float("nan"))
    p = successes / total
    denominator = 1 + z * z / total
    center = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    return (max(0.0, center - half), min(1.0, center + half))


@dataclass
class AdherenceResult:
    """How often the probe reads what the prompt names, per attribute, for one way of sampling."""

    label: str
    samples: int
    correct: dict[str, int]  # attribute -> samples showing the named value
    named: dict[str, int]  # attribute -> samples whose prompt names it
    valid: int
    by_background: dict[str, tuple[int, int]]  # background -> (shape, colour and count all right, samples)
    images: torch.Tensor | None = field(default=None, repr=False)

    def rate(self, attribute: str) -> float:
        return self.correct[attribute] / self.named[attribute] if self.named[attribute] else float("nan")


def adherence_prompts(count: int, seed: int = 7000) -> tuple[list[str], list[Attributes]]:
    """``count`` prompts that name every attribute, drawn from the model's vocabulary (held out by seed)."""
    attributes = [sample_attributes(np.random.default_rng([seed, i]), 32, MODEL_BACKGROUNDS) for i in range(count)]
    return [full_caption(a) for a in attributes], attributes


def adherence_trial(
    pipe, probe: AttributeProbe, prompts: Sequence[str], truth: Sequence[Attributes], seeds: Sequence[int],
    steps: int, method: Method, label: str | None = None, keep_images: bool = False, batch_size: int = 128,
) -> AdherenceResult:
    """Generate each prompt once (sample ``i`` from ``seeds[i]``) and score every attribute it names."""
    images = generate(pipe, prompts, seeds, steps, method, negatives=[""] * len(prompts), batch_size=batch_size)
    read = probe(images)
    correct, named = {}, {}
    for attribute in ADHERENCE_ATTRIBUTES:
        rows = [i for i, a in enumerate(truth) if attribute not in ("size", "position") or a.count == 1]
        named[attribute] = len(rows)
        correct[attribute] = sum(read.labels[attribute][i] == getattr(truth[i], attribute) for i in rows)
    by_background: dict[str, tuple[int, int]] = {}
    for i, a in enumerate(truth):
        right = all(read.labels[k][i] == getattr(a, k) for k in ("shape", "colour", "count"))
        done, total = by_background.get(a.background, (0, 0))
        by_background[a.background] = (done + int(right), total + 1)
    return AdherenceResult(
        label or method.label, len(prompts), correct, named, int(read.valid.sum()), by_background,
        images if keep_images else None,
    )
