"""NAG on the built-in toy model: a labelled grid of no guidance / CFG / NAG, offline, on a CPU.

    python -m nag.demo                                        # defaults: few-step model, 4 steps
    python -m nag.demo --prompt "a large star on a gray background" --negative "red" --out grid.png
    python -m nag.demo --variant multistep --steps 25

Each row is one seed (the same starting noise in every column):

- no guidance: the prompt alone (``guidance_scale=0``; on the multi-step model, its CFG 4 with
  an empty negative prompt);
- CFG: classifier-free guidance with the negative prompt as the unconditional branch;
- NAG: ``nag.apply(pipe, negative)`` with the checkpoint's NAG settings (``nag.toy.NAG_DEFAULTS``):
  CFG off on the few-step model, CFG 4 beside it on the multi-step one.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

import nag
from nag.grid import make_grid
from nag.toy import DEFAULT_GUIDANCE, DEFAULT_NAG, DEFAULT_STEPS, NAG_DEFAULTS, VARIANTS, load_pipeline
from nag.toy.vocabulary import prompt_warning

__all__ = ["main", "make_grid", "generate_columns"]

DEFAULT_PROMPT = "a large circle on a black background"
DEFAULT_NEGATIVE = "red"
CELL = 96  # pixels per image in the grid (the model draws 32x32; upscaled with nearest neighbour)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m nag.demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--negative", default=DEFAULT_NEGATIVE)
    p.add_argument("--variant", default="fewstep", choices=VARIANTS)
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: 4 few-step, 25 multi-step)")
    p.add_argument("--seed", type=int, default=0, help="first seed; rows use seed, seed+1, ...")
    p.add_argument("--rows", type=int, default=6)
    p.add_argument("--cfg", type=float, default=4.0, help="CFG scale of the CFG column")
    p.add_argument("--scale", type=float, default=None, help="NAG scale of the NAG column (default: the model's)")
    p.add_argument("--tau", type=float, default=None, help="NAG tau, the bound on the feature growth")
    p.add_argument("--alpha", type=float, default=None, help="NAG alpha, the blend with the positive")
    p.add_argument("--out", type=Path, default=Path("nag_toy_grid.png"))
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return p.parse_args(argv)


def _generate(pipe, prompt: str, seeds: Sequence[int], steps: int, **kwargs) -> list[Image.Image]:
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    return pipe([prompt] * len(seeds), num_inference_steps=steps, generator=generators, **kwargs).images


def generate_columns(
    pipe,
    prompt: str,
    negative: str,
    seeds: Sequence[int],
    steps: int,
    cfg: float = 4.0,
    scale: float = DEFAULT_NAG["scale"],
    tau: float = DEFAULT_NAG["tau"],
    alpha: float = DEFAULT_NAG["alpha"],
    base_guidance: float = 0.0,
) -> dict[str, list[Image.Image]]:
    """Images per column label: no negative prompt, CFG (negative as the unconditional), NAG.

    ``base_guidance`` is the CFG scale the model is used with when no negative prompt is given (0 for
    the few-step model); the first and the NAG column use it, with an empty unconditional prompt.
    """
    base = "no guidance" if base_guidance <= 1 else f"CFG {base_guidance:g}, no negative"
    columns = {base: _generate(pipe, prompt, seeds, steps, guidance_scale=base_guidance)}
    columns[f"CFG {cfg:g}"] = _generate(
        pipe, prompt, seeds, steps, guidance_scale=cfg, negative_prompt=[negative] * len(seeds)
    )
    label = f"NAG {scale:g}" + (f" + CFG {base_guidance:g}" if base_guidance > 1 else "")
    with nag.apply(pipe, negative, scale=scale, tau=tau, alpha=alpha):
        columns[label] = _generate(pipe, prompt, seeds, steps, guidance_scale=base_guidance)
    return columns


def main(argv: Sequence[str] | None = None) -> Path:
    args = parse_args(argv)
    if args.rows < 1:
        raise SystemExit("--rows must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = args.steps or DEFAULT_STEPS[args.variant]
    if warning := prompt_warning(args.prompt, args.negative):
        print(f"note: {warning}", file=sys.stderr)
    pipe = load_pipeline(args.variant)
    seeds = list(range(args.seed, args.seed + args.rows))
    settings = {k: v if (v := getattr(args, k)) is not None else NAG_DEFAULTS[args.variant][k]
                for k in ("scale", "tau", "alpha")}
    columns = generate_columns(
        pipe, args.prompt, args.negative, seeds, steps, args.cfg, **settings,
        base_guidance=DEFAULT_GUIDANCE[args.variant],
    )
    title = f'prompt: "{args.prompt}"   negative: "{args.negative}"\n{args.variant} model, {steps} steps'
    grid = make_grid(columns, [f"seed {s}" for s in seeds], title, cell=CELL)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(args.out)
    print(f"wrote {args.out.resolve()} ({grid.width}x{grid.height}; columns: {', '.join(columns)})")
    return args.out


if __name__ == "__main__":
    main(sys.argv[1:])
