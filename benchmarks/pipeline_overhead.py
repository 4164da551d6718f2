"""Whole pipeline calls at 1 and 4 steps: no guidance, CFG, and NAG with ``with nag.apply(...)`` around each call.

    python benchmarks/pipeline_overhead.py                     # the built-in toy model, CPU, 1 thread
    python benchmarks/pipeline_overhead.py --pipelines toy,flux,sd3,sdxl --markdown docs/benchmarks.md
    python benchmarks/pipeline_overhead.py --pipelines flux,sd3,sdxl --size small --markdown docs/benchmarks.md

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


#: ``--size small``: each tiny pipeline's denoiser replaced by a wider, deeper one of the same architecture (its text
#: encoders and VAE stay tiny), called at 64x64: a forward then costs tens of milliseconds on one CPU thread, so the
#: per-call Python work weighs about as much as with a small real model on a GPU step.
SMALL_IMAGE = 64


def small_denoiser(name: str) -> torch.nn.Module:
    """The ``small`` denoiser of pipeline ``name``: width 256 (4 heads of 64), 256 image tokens at 64x64."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel

    torch.manual_seed(0)
    if name == "flux":  # 2 double-stream and 4 single-stream blocks (FLUX.1 has 19 and 38)
        return FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=2, num_single_layers=4, attention_head_dim=64,
            num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(16, 24, 24),
        ).eval()
    if name == "sd3":  # 4 joint blocks (SD3 Medium has 24)
        return SD3Transformer2DModel(
            sample_size=32, patch_size=2, in_channels=4, num_layers=4, attention_head_dim=64, num_attention_heads=4,
            joint_attention_dim=32, caption_projection_dim=256, pooled_projection_dim=32, out_channels=4,
            pos_embed_max_size=64,
        ).eval()
    if name == "sdxl":  # SDXL's block structure at a quarter of its channels, 1 and 2 transformer layers per block
        return UNet2DConditionModel(
            block_out_channels=(64, 128), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=64, attention_head_dim=(2, 4), norm_num_groups=32, use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=6 * 8 + 32,
        ).eval()
    raise ValueError(f"no small denoiser for {name!r}: --size small takes flux, sd3, sdxl")


def load(name: str, size: str = "tiny"):
    """The pipeline and its (unguided, CFG) call arguments for ``steps`` (a function of steps)."""
    if name == "toy":
        def kwargs(steps: int, cfg: bool) -> dict:
            return dict(num_inference_steps=steps, guidance_scale=4.0 if cfg else 0.0, output_type="latent")

        return load_pipeline("multistep"), kwargs
    tp = tiny_pipelines()

    def tiny_kwargs(steps: int, cfg: bool) -> dict:
        make = tp.call_kwargs if cfg else tp.no_cfg_kwargs
        kwargs = make(name, output_type="latent", num_inference_steps=steps)
        if size == "small":
            kwargs.update(height=SMALL_IMAGE, width=SMALL_IMAGE)
        return kwargs

    pipe = tp.FACTORIES[name]()
    if size == "small":
        attribute = "unet" if name == "sdxl" else "transformer"
        pipe.register_modules(**{attribute: small_denoiser(name)})
    return pipe, tiny_kwargs


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


class ForwardClock:
    """The denoiser's forwards timed (one thread's CPU time) while the block is entered: ``calls`` lists them."""

    def __init__(self, pipe):
        self.denoiser = getattr(pipe, "transformer", None) or pipe.unet
        self.calls: list[float] = []
        self._start = 0.0
        self._hooks: list = []

    def __enter__(self) -> ForwardClock:
        def begin(module, args, kwargs):
            self._start = time.thread_time()

        def end(module, args, kwargs, output):
            self.calls.append(time.thread_time() - self._start)

        self._hooks = [  # (outermost: around NAG's own hooks)
            self.denoiser.register_forward_pre_hook(begin, with_kwargs=True, prepend=True),
            self.denoiser.register_forward_hook(end, with_kwargs=True, always_call=True),
        ]
        return self

    def __exit__(self, *exc) -> None:
        for hook in self._hooks:
            hook.remove()


def forward_floor(pipe, kwargs: Callable[[int, bool], dict], repeats: int) -> float:
    """One denoiser forward with the prompt's text tokens twice (what NAG cannot compute less than: every image query
    attends to a second text as long as the prompt's), over the stock forward; the fastest of ``repeats`` each."""
    denoiser = getattr(pipe, "transformer", None) or pipe.unet
    captured: dict[str, tuple] = {}

    def capture(module, args, call_kwargs):
        captured.setdefault("call", (args, dict(call_kwargs)))

    hook = denoiser.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        pipe(PROMPT, generator=torch.Generator().manual_seed(0), **kwargs(1, False))
    finally:
        hook.remove()
    args, stock = captured["call"]
    doubled = dict(stock, encoder_hidden_states=torch.cat([stock["encoder_hidden_states"]] * 2, dim=1))
    if stock.get("txt_ids") is not None:  # (FLUX.1: one position row per text token)
        doubled["txt_ids"] = torch.cat([stock["txt_ids"]] * 2, dim=0)
    times: dict[str, list[float]] = {"stock": [], "floor": []}
    with torch.no_grad():
        for _ in range(repeats + 1):
            for mode, call_kwargs in (("stock", stock), ("floor", doubled)):
                start = time.thread_time()
                denoiser(*args, **call_kwargs)
                times[mode].append(time.thread_time() - start)
    return min(times["floor"][1:]) / min(times["stock"][1:])


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", default="1,4")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--pipelines", default="toy", help="comma-separated: toy, flux, sd3, sdxl")
    parser.add_argument("--size", default="tiny", choices=["tiny", "small"],
                        help="tiny: the tests' components (width 32, 16x16); small: flux, sd3 and sdxl with a denoiser "
                             "of width 256 at 64x64 (see SMALL_IMAGE)")
    parser.add_argument("--markdown", default=None, help="update the 'pipeline-cpu' block (pipeline-cpu-small with "
                        "--size small) of this markdown file")
    parser.add_argument("--section", default=None, help="the markdown block to update instead (e.g. a rerun's)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    os.environ.pop("NAG_EAGER", None)  # "nag" runs the compiled combine, "nag_eager" the eager one
    rows = []
    for name, steps in ((n, int(s)) for n in args.pipelines.split(",") for s in args.steps.split(",")):
        pipe, kwargs = load(name, args.size)
        modes = calls(pipe, kwargs, steps)
        for call in modes.values():  # warm-up (and the compiled combine's first compile)
            call()
        times: dict[str, list[float]] = {mode: [] for mode in modes}
        forwards: dict[str, list[float]] = {mode: [] for mode in modes}  # the denoiser's forwards after the first
        with ForwardClock(pipe) as clock:
            for _ in range(args.repeats):
                for mode, call in modes.items():
                    clock.calls.clear()
                    start = time.thread_time()
                    call()
                    times[mode].append(time.thread_time() - start)
                    forwards[mode] += clock.calls[1:]
        median = {mode: statistics.median(values) for mode, values in times.items()}
        later = {mode: statistics.median(values) if values else float("nan") for mode, values in forwards.items()}
        row = dict(pipeline=name, size=args.size, steps=steps, none_ms=median["none"] * 1e3,
                   cfg_ratio=median["cfg"] / median["none"],
                   nag_ratio=median["nag"] / median["none"], nag_eager_ratio=median["nag_eager"] / median["none"],
                   nag_forward_ratio=later["nag"] / later["none"],
                   floor_ratio=forward_floor(pipe, kwargs, args.repeats), repeats=args.repeats,
                   torch=torch.__version__)
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.markdown:
        sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
        from overhead import update_markdown

        lines = ["| pipeline | steps | no guidance | CFG | NAG (`with nag.apply(...)` per call) | NAG, eager combine "
                 "| NAG, one later forward | floor, one forward |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['pipeline']} | {r['steps']} | {r['none_ms']:.1f} ms | {r['cfg_ratio']:.2f}x | "
                  f"{r['nag_ratio']:.2f}x | {r['nag_eager_ratio']:.2f}x | "
                  + ("-" if r["steps"] < 2 else f"{r['nag_forward_ratio']:.2f}x")
                  + f" | {r['floor_ratio']:.2f}x |" for r in rows]
        models = ("toy: the built-in pipeline (`nag.toy`, multistep checkpoint, 32x32); flux, sd3, sdxl: the stock "
                  "pipelines with the tests' tiny components (width 32, 16x16 images)")
        if args.size == "small":
            models = ("flux, sd3, sdxl: the stock pipelines with the tests' tiny text encoders and VAE and a denoiser "
                      "of width 256 (FLUX.1: 2 double- and 4 single-stream blocks; SD3: 4 joint blocks; SDXL: channels "
                      "64/128, 3 transformer layers) at 64x64 (256 image tokens)")
        header = (f"{models}. NAG with each family's default settings. CPU, 1 thread, torch {torch.__version__}, "
                  f"median of {args.repeats} calls per mode, modes interleaved. One later forward: the median "
                  "denoiser forward after a call's first, NAG's over no guidance's, in the same calls. Floor: one "
                  "denoiser forward with the prompt's text tokens twice over the stock forward (fastest of each), what "
                  "NAG's forward cannot cost less than.\n\n")
        block = args.section or ("pipeline-cpu-small" if args.size == "small" else "pipeline-cpu")
        update_markdown(args.markdown, block, header + "\n".join(lines) + "\n")
    return rows


if __name__ == "__main__":
    main()
