"""Per-call cost of the NAG combine and of the joint paths' merge + combine, compiled against eager.

    python benchmarks/combine.py                                   # FLUX.1 widths, CPU float32, 1 thread
    python benchmarks/combine.py --device cuda --dtype bfloat16 --tokens 4096

Shapes: ``tokens`` image queries, ``heads`` x ``head_dim`` (FLUX.1: 24 x 128 = 3072), batch 1. ``combine`` is
``nag_combine(Z+, Z-)``; ``merge+combine`` is the two log-sum-exp merges (image->image with image->positive text
and image->negative text) followed by the combine, eager as ``nag.kernels.merge_attention`` twice then
``nag_combine``, compiled as one ``nag.fused.merge_and_combine``; ``combine rescaled`` is the eager code with every
token rescaled by a power of two (``nag.combine.combine_rescaled``, what the eager code does only for tokens near the
dtype's limits). The variants run interleaved; each figure is
the median of ``--repeats`` calls (one thread's CPU time on CPU, synchronised wall time on CUDA). The first
compiled call's time (compile included) is reported separately; ``--cold`` points inductor at an empty cache
directory so that it is the time of a first run on a fresh machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import torch


def _clock(device: torch.device) -> Callable[[], float]:
    if device.type == "cuda":
        def wall() -> float:
            torch.cuda.synchronize()
            return time.perf_counter()
        return wall
    return time.thread_time


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=24)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--cold", action="store_true", help="compile with an empty inductor cache")
    parser.add_argument("--markdown", default=None,
                        help="update the block 'combine-DEVICE-DTYPE' of this markdown file (see overhead.py)")
    args = parser.parse_args(argv)
    if args.cold:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="nag-inductor-")
    from nag.combine import combine_rescaled, combine_scalars, nag_combine
    from nag.fused import merge_and_combine
    from nag.kernels import merge_attention

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cpu":
        torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    shape = (1, args.tokens, args.heads, args.head_dim)
    outs = [torch.randn(*shape, generator=g).to(device, dtype) for _ in range(3)]
    lses = [torch.randn(*shape[:3], generator=g).to(device) for _ in range(3)]
    image, positive, negative = zip(outs, lses)
    settings = dict(scale=5.0, tau=2.5, alpha=0.25)
    z_pos, z_neg = outs[0].flatten(2), outs[1].flatten(2)

    def merged_eager() -> torch.Tensor:
        zp = merge_attention(*image, *positive).flatten(2)
        return nag_combine(zp, merge_attention(*image, *negative).flatten(2), **settings, compiled=False)

    scalars = combine_scalars(dtype, dtype, settings["scale"], settings["tau"], settings["alpha"], 1e-6)
    variants: dict[str, Callable[[], torch.Tensor]] = {
        "combine rescaled": lambda: combine_rescaled(z_pos, z_neg, *scalars),
        "combine eager": lambda: nag_combine(z_pos, z_neg, **settings, compiled=False),
        "combine compiled": lambda: nag_combine(z_pos, z_neg, **settings),
        "merge+combine eager": merged_eager,
        "merge+combine compiled": lambda: merge_and_combine([image, positive], [image, negative], **settings),
    }
    clock = _clock(device)
    first: dict[str, float] = {}
    for name, call in variants.items():  # first calls: compile time of the compiled ones
        start = time.perf_counter()
        call()
        clock()
        first[name] = time.perf_counter() - start
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, call in variants.items():
            start = clock()
            call()
            times[name].append(clock() - start)
    median = {name: statistics.median(values) for name, values in times.items()}
    row = dict(device=str(device), dtype=args.dtype, shape=list(shape), cold=args.cold, torch=torch.__version__,
               median_ms={k: round(v * 1e3, 3) for k, v in median.items()},
               first_call_s={k: round(v, 2) for k, v in first.items() if "compiled" in k},
               compiled_over_eager={"combine": median["combine compiled"] / median["combine eager"],
                                    "merge+combine": median["merge+combine compiled"] / median["merge+combine eager"]})
    print(json.dumps(row))
    for name, value in median.items():
        print(f"{name:24s} {value * 1e3:8.2f} ms", file=sys.stderr)
    if args.markdown:
        from overhead import update_markdown

        update_markdown(args.markdown, f"combine-{device.type}-{args.dtype}", table(row, median, first))
    return row


def table(row: dict, median: dict[str, float], first: dict[str, float]) -> str:
    """The markdown block of one run."""
    cache = "an empty inductor cache" if row["cold"] else "inductor's cache left from earlier runs"
    lines = [f"{row['device']}, {row['dtype']}, outputs {tuple(row['shape'])}, torch {row['torch']}; first compiled "
             f"call with {cache}.", "",
             "| | eager, every token rescaled | eager | compiled | compiled / eager | first compiled call |",
             "|---|---|---|---|---|---|"]
    for what in ("combine", "merge+combine"):
        eager, compiled = median[f"{what} eager"], median[f"{what} compiled"]
        rescaled = f"{median['combine rescaled'] * 1e3:.1f} ms" if what == "combine" else ""
        lines.append(f"| {what} | {rescaled} | {eager * 1e3:.1f} ms | {compiled * 1e3:.1f} ms | "
                     f"{compiled / eager:.2f}x | {first[f'{what} compiled']:.1f} s |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
