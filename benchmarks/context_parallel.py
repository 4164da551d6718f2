"""NAG under diffusers' context parallelism: its fast paths against the straightforward wrappers and the floor.

    python benchmarks/context_parallel.py                        # FLUX.1, 2 CPU processes (gloo), Ulysses
    python benchmarks/context_parallel.py --family wan --mode ring --markdown docs/benchmarks.md

Each of two processes holds half of the sequence (``model.enable_parallelism``) and one CPU thread. The model is
``benchmarks/overhead.py``'s ``real`` preset of the family (the published width, fewer blocks, about 1,000-2,000
image tokens; random weights), one forward per mode, interleaved: no guidance; the floor (the stock model with the
negative's text appended to the prompt's: attending to as many text tokens as NAG does); NAG (its fast paths); NAG
with ``fast=False`` (every stock attention processor once per branch). The fastest of ``--repeats`` each, one
thread's CPU time on rank 0.

Under parallelism NAG's fast paths run as on one process: Wan's cross-attention attends to the whole text on every
process; the joint and single-stream attention of FLUX.1 and FLUX.2 run inside diffusers' parallel attention with
NAG's kernels, which return the log-sum-exp the merge needs. The CPU workarounds stock diffusers needs for context
parallelism on CPU processes are the tests' (``tests/context_parallel_worker.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HERE = Path(__file__).resolve().parent
WORLD = 2
SETTINGS = dict(scale=5.0, tau=2.5, alpha=0.25)
FAMILIES = ("flux", "flux2", "wan")  # families with a context-parallel plan in overhead.py's real preset


def worker(rank: int, store: str, out: str, args: argparse.Namespace) -> None:
    sys.path.insert(0, str(HERE.parent / "tests"))
    sys.path.insert(0, str(HERE))
    from context_parallel_worker import cpu_workarounds
    from diffusers import ContextParallelConfig
    from overhead_cases import REAL

    import nag

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    cpu_workarounds()
    try:
        case = REAL[args.family]()[0]
        torch.manual_seed(0)
        model = case.build().eval()
        model.enable_parallelism(config=ContextParallelConfig(**{f"{args.mode}_degree": WORLD}))
        inputs = case.inputs(1, torch.device("cpu"), torch.float32)
        negative = case.negative(inputs)
        floor = case.floor(inputs, negative)
        modes = {"none": (None, inputs), "floor": (None, floor), "nag": (True, inputs),
                 "nag_straightforward": (False, inputs)}  # fmt: skip
        times: dict[str, list[float]] = {mode: [] for mode in modes}
        with torch.no_grad():
            for repeat in range(args.repeats + 1):  # (the first round warms up)
                for mode, (fast, call) in modes.items():
                    handle = None if fast is None else nag.apply_to_denoiser(model, negative, **SETTINGS, fast=fast)
                    dist.barrier()
                    start = time.thread_time()
                    model(**call, return_dict=False)[0].sum().item()  # (waits for the gathered output)
                    elapsed = time.thread_time() - start
                    if handle is not None:
                        handle.remove()
                    if repeat:
                        times[mode].append(elapsed)
        if rank == 0:
            best = {mode: min(values) for mode, values in times.items()}
            row = dict(family=args.family, label=case.label, mode=args.mode, processes=WORLD,
                       none_ms=best["none"] * 1e3, floor_ratio=best["floor"] / best["none"],
                       nag_ratio=best["nag"] / best["none"], nag_floor_ratio=best["nag"] / best["floor"],
                       nag_straightforward_ratio=best["nag_straightforward"] / best["none"],
                       repeats=args.repeats, torch=torch.__version__)  # fmt: skip
            Path(out).write_text(json.dumps(row))
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="flux", choices=FAMILIES)
    parser.add_argument("--mode", default="ulysses", choices=["ulysses", "ring"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--markdown", default=None, help="update the 'context-parallel-cpu-FAMILY-MODE' block here")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "row.json")
        mp.start_processes(worker, args=(os.path.join(folder, "store"), out, args), nprocs=WORLD,
                           start_method="spawn")  # fmt: skip
        row = json.loads(Path(out).read_text())
    print(json.dumps(row))
    if args.markdown:
        sys.path.insert(0, str(HERE))
        from overhead import update_markdown

        table = (
            f"{row['label']}, {row['mode']} over {row['processes']} CPU processes (gloo), one thread each; "
            f"torch {row['torch']}, fastest of {row['repeats']} forwards per mode, rank 0's CPU time.\n\n"
            "| no guidance | floor | NAG | NAG / floor | NAG, straightforward (`fast=False`) |\n|---|---|---|---|---|\n"
            f"| {row['none_ms']:.0f} ms | {row['floor_ratio']:.2f}x | {row['nag_ratio']:.2f}x | "
            f"{row['nag_floor_ratio']:.2f} | {row['nag_straightforward_ratio']:.2f}x |\n"
        )
        update_markdown(args.markdown, f"context-parallel-cpu-{row['family']}-{row['mode']}", table)
    return row


if __name__ == "__main__":
    main()
