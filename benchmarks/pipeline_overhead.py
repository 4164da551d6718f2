"""Whole pipeline calls at 1 and 4 steps: no guidance, CFG, and NAG with ``with nag.apply(...)`` around each call.

    python benchmarks/pipeline_overhead.py                     # the built-in toy model, CPU, 1 thread
    python benchmarks/pipeline_overhead.py --pipelines toy,flux,sd3,sdxl --markdown docs/benchmarks.md

The per-forward benchmark (benchmarks/overhead.py) leaves out what NAG costs once per call: installing and removing
its processors, encoding the negative prompt, the per-call setup. Here each NAG call is a fresh
``with nag.apply(pipe, negative): pipe(...)``, so all of that is included; at 1 step it weighs the most. The model is
the shipped toy pipeline (``nag.toy``: a stock ``StableDiffusionPipeline``, text encoder, UNet and VAE), or with
``--pipelines`` also the stock FLUX.1, SD3 and SDXL pipelines with the test suite's tiny random components
(``tests/tiny_pipelines.py``: every text encoder and denoiser a few layers of width 32), so fixed costs are a
larger share here than in a real model. Modes run interleaved; the figure is the median of
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
from pathlib import Path

import torch

import nag
from nag.toy import load_pipeline

PROMPT = "a large red star on a checkered background"
NEGATIVE = "blue"


def tiny_pipelines():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import tiny_pipelines as tp

    return tp


def load(name: str):
    """The pipeline and its (unguided, CFG) call arguments for ``steps`` (a function of steps)."""
    if name == "toy":
        def kwargs(steps: int, cfg: bool) -> dict:
            return dict(num_inference_steps=steps, guidance_scale=4.0 if cfg else 0.0, output_type="latent")

        return load_pipeline("multistep"), kwargs
    tp = tiny_pipelines()

    def tiny_kwargs(steps: int, cfg: bool) -> dict:
        make = tp.call_kwargs if cfg else tp.no_cfg_kwargs
        return make(name, output_type="latent", num_inference_steps=steps)

    return tp.FACTORIES[name](), tiny_kwargs


def calls(pipe, kwargs: Callable[[int, bool], dict], steps: int) -> dict[str, Callable[[], None]]:
    """One pipeline call per mode."""
    def run(cfg: bool) -> None:
        negative = {"negative_prompt": NEGATIVE} if cfg else {}
        pipe(PROMPT, generator=torch.Generator().manual_seed(0), **negative, **kwargs(steps, cfg))

    def guided() -> None:
        with nag.apply(pipe, NEGATIVE):
            run(False)

    def guided_eager() -> None:  # the combine's eager code (NAG_EAGER=1)
        os.environ["NAG_EAGER"] = "1"
        try:
            guided()
        finally:
            os.environ.pop("NAG_EAGER")

    return {"none": lambda: run(False), "cfg": lambda: run(True), "nag": guided, "nag_eager": guided_eager}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", default="1,4")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--pipelines", default="toy", help="comma-separated: toy, flux, sd3, sdxl")
    parser.add_argument("--markdown", default=None, help="update the 'pipeline-cpu' block of this markdown file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    os.environ.pop("NAG_EAGER", None)  # "nag" runs the compiled combine, "nag_eager" the eager one
    rows = []
    for name, steps in ((n, int(s)) for n in args.pipelines.split(",") for s in args.steps.split(",")):
        pipe, kwargs = load(name)
        modes = calls(pipe, kwargs, steps)
        for call in modes.values():  # warm-up (and the compiled combine's first compile)
            call()
        times: dict[str, list[float]] = {mode: [] for mode in modes}
        for _ in range(args.repeats):
            for mode, call in modes.items():
                start = time.thread_time()
                call()
                times[mode].append(time.thread_time() - start)
        median = {mode: statistics.median(values) for mode, values in times.items()}
        row = dict(pipeline=name, steps=steps, none_ms=median["none"] * 1e3, cfg_ratio=median["cfg"] / median["none"],
                   nag_ratio=median["nag"] / median["none"], nag_eager_ratio=median["nag_eager"] / median["none"],
                   repeats=args.repeats, torch=torch.__version__)
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.markdown:
        sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
        from overhead import update_markdown

        lines = ["| pipeline | steps | no guidance | CFG | NAG (`with nag.apply(...)` per call) | NAG, eager combine |",
                 "|---|---|---|---|---|---|"]
        lines += [f"| {r['pipeline']} | {r['steps']} | {r['none_ms']:.1f} ms | {r['cfg_ratio']:.2f}x | "
                  f"{r['nag_ratio']:.2f}x | {r['nag_eager_ratio']:.2f}x |" for r in rows]
        header = ("toy: the built-in pipeline (`nag.toy`, multistep checkpoint, 32x32); flux, sd3, sdxl: the stock "
                  "pipelines with the tests' tiny components (width 32, 16x16 images). NAG with each family's default "
                  f"settings. CPU, 1 thread, torch {torch.__version__}, "
                  f"median of {args.repeats} calls per mode, modes interleaved.\n\n")
        update_markdown(args.markdown, "pipeline-cpu", header + "\n".join(lines) + "\n")
    return rows


if __name__ == "__main__":
    main()
