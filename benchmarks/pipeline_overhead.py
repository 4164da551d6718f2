"""Whole pipeline calls at 1 and 4 steps: no guidance, CFG, and NAG with ``with nag.apply(...)`` around each call.

    python benchmarks/pipeline_overhead.py                     # the built-in toy model, CPU, 1 thread
    python benchmarks/pipeline_overhead.py --markdown docs/benchmarks.md

The per-forward benchmark (benchmarks/overhead.py) leaves out what NAG costs once per call: installing and removing
its processors, encoding the negative prompt, the per-call setup. Here each NAG call is a fresh
``with nag.apply(pipe, negative): pipe(...)``, so all of that is included; at 1 step it weighs the most. The model is
the shipped toy pipeline (``nag.toy``: a stock ``StableDiffusionPipeline``, text encoder, UNet and VAE), so fixed
costs are a larger share here than in a real model. Modes run interleaved; the figure is the median of
``--repeats`` calls of one thread's CPU time (one thread).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch

import nag
from nag.toy import load_pipeline

PROMPT = "a large red star on a checkered background"
NEGATIVE = "blue"


def calls(pipe, steps: int) -> dict[str, Callable[[], None]]:
    """One pipeline call per mode."""
    def run(guidance: float) -> None:
        pipe(PROMPT, num_inference_steps=steps, guidance_scale=guidance, generator=torch.Generator().manual_seed(0),
             output_type="latent")

    def guided() -> None:
        with nag.apply(pipe, NEGATIVE, scale=6.0, tau=3.0, alpha=0.75):
            run(0.0)

    def guided_eager() -> None:  # the combine's eager code (NAG_EAGER=1)
        os.environ["NAG_EAGER"] = "1"
        try:
            guided()
        finally:
            os.environ.pop("NAG_EAGER")

    return {"none": lambda: run(0.0), "cfg": lambda: run(4.0), "nag": guided, "nag_eager": guided_eager}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", default="1,4")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--markdown", default=None, help="update the 'pipeline-cpu' block of this markdown file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    os.environ.pop("NAG_EAGER", None)  # "nag" runs the compiled combine, "nag_eager" the eager one
    pipe = load_pipeline("multistep")
    rows = []
    for steps in (int(s) for s in args.steps.split(",")):
        modes = calls(pipe, steps)
        for call in modes.values():  # warm-up (and the compiled combine's first compile)
            call()
        times: dict[str, list[float]] = {mode: [] for mode in modes}
        for _ in range(args.repeats):
            for mode, call in modes.items():
                start = time.thread_time()
                call()
                times[mode].append(time.thread_time() - start)
        median = {mode: statistics.median(values) for mode, values in times.items()}
        row = dict(steps=steps, none_ms=median["none"] * 1e3, cfg_ratio=median["cfg"] / median["none"],
                   nag_ratio=median["nag"] / median["none"], nag_eager_ratio=median["nag_eager"] / median["none"],
                   repeats=args.repeats, torch=torch.__version__)
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.markdown:
        sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
        from overhead import update_markdown

        lines = ["| steps | no guidance | CFG | NAG (`with nag.apply(...)` per call) | NAG, eager combine |",
                 "|---|---|---|---|---|"]
        lines += [f"| {r['steps']} | {r['none_ms']:.1f} ms | {r['cfg_ratio']:.2f}x | {r['nag_ratio']:.2f}x | "
                  f"{r['nag_eager_ratio']:.2f}x |" for r in rows]
        header = (f"Toy pipeline (`nag.toy`, multistep checkpoint, 32x32), CPU, 1 thread, torch {torch.__version__}, "
                  f"median of {args.repeats} calls per mode, modes interleaved.\n\n")
        update_markdown(args.markdown, "pipeline-cpu", header + "\n".join(lines) + "\n")
    return rows


if __name__ == "__main__":
    main()
