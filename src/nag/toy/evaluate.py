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

import torch

import nag

from .dataset import COLOURS, SHAPES
from .probes import AttributeProbe, ProbeResult

__all__ = ["Method", "TrialResult", "negation_trial", "generate", "task_prompts", "wilson_interval"]


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
) -> list[TrialResult]:
    """Run the paired negation measurement for ``task`` ("colour" or "shape").

    Every prompt of the task is sampled with every seed. Returns one result per method, the
    unguided one first.
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

    none = Method("none")
    images = generate(pipe, prompts, sample_seeds, steps, none, batch_size=batch_size)
    read = probe(images)
    negatives = read.labels[negated]
    eligible = read.valid
    results = [score(none, images, read, eligible, negatives)]
    for method in methods:
        if method.kind == "none":
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
