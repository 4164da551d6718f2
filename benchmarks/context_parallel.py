"""NAG on Wan under diffusers' context parallelism: the cross-attention fast path against the straightforward one.

    python benchmarks/context_parallel.py                       # 2 CPU processes (gloo), Ulysses
    python benchmarks/context_parallel.py --mode ring --markdown docs/benchmarks.md

Each of two processes holds half of the video tokens (``WanTransformer3DModel.enable_parallelism``) and one CPU
thread; a Wan 2.1 1.3B-width block stack (width 1536, 12 heads of 128, ``--layers`` blocks, 4096-wide text) runs one
forward on ``--tokens`` video tokens and 512 text tokens per mode: no guidance, NAG (fast paths) and NAG with
``fast=False`` (every stock attention processor once per branch), interleaved; the fastest of ``--repeats`` each, one
thread's CPU time on rank 0. Wan's cross-attention attends to the whole text on every process (diffusers gives it no
parallel configuration), so NAG's cross-attention fast path serves it under parallelism: one query and one output
projection per process, the negative keys/values projected once. The CPU workarounds stock diffusers needs for
context parallelism on CPU processes are the tests' (``tests/context_parallel_worker.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HERE = Path(__file__).resolve().parent
WORLD = 2
TEXT_TOKENS = 512
SETTINGS = dict(scale=5.0, tau=2.5, alpha=0.25)


def build(layers: int) -> torch.nn.Module:
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
        text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
    ).eval()


def inputs_for(tokens: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """One video of ``tokens`` patches (frames x 16 x 16 latents, 2x2 patches: 64 tokens a frame) and its text."""
    g = torch.Generator().manual_seed(0)
    frames = max(tokens // 64, 1)
    inputs = dict(
        hidden_states=torch.randn(1, 16, frames, 16, 16, generator=g),
        encoder_hidden_states=torch.randn(1, TEXT_TOKENS, 4096, generator=g),
        timestep=torch.full((1,), 500.0),
        return_dict=False,
    )
    negative = dict(encoder_hidden_states=torch.randn(1, TEXT_TOKENS, 4096, generator=g))
    return inputs, negative


def worker(rank: int, store: str, out: str, args: argparse.Namespace) -> None:
    sys.path.insert(0, str(HERE.parent / "tests"))
    from context_parallel_worker import cpu_workarounds
    from diffusers import ContextParallelConfig

    import nag

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    cpu_workarounds()
    try:
        model = build(args.layers)
        model.enable_parallelism(config=ContextParallelConfig(**{f"{args.mode}_degree": WORLD}))
        inputs, negative = inputs_for(args.tokens)
        handles = {"none": None, "nag": True, "nag_straightforward": False}
        times: dict[str, list[float]] = {mode: [] for mode in handles}
        with torch.no_grad():
            for repeat in range(args.repeats + 1):  # (the first round warms up)
                for mode, fast in handles.items():
                    handle = None if fast is None else nag.apply_to_denoiser(model, negative, **SETTINGS, fast=fast)
                    dist.barrier()
                    start = time.thread_time()
                    model(**inputs)
                    elapsed = time.thread_time() - start
                    if handle is not None:
                        handle.remove()
                    if repeat:
                        times[mode].append(elapsed)
        if rank == 0:
            best = {mode: min(values) for mode, values in times.items()}
            row = dict(mode=args.mode, processes=WORLD, layers=args.layers, video_tokens=args.tokens,
                       text_tokens=TEXT_TOKENS, none_ms=best["none"] * 1e3,
                       nag_ratio=best["nag"] / best["none"],
                       nag_straightforward_ratio=best["nag_straightforward"] / best["none"],
                       repeats=args.repeats, torch=torch.__version__)
            Path(out).write_text(json.dumps(row))
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", default="ulysses", choices=["ulysses", "ring"])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=2048, help="video tokens (a multiple of 128)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--markdown", default=None, help="update the 'context-parallel-cpu' block of this file")
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
            f"Wan 2.1 1.3B width, {row['layers']} blocks, {row['video_tokens']} video and {row['text_tokens']} text "
            f"tokens, {row['mode']} over {row['processes']} CPU processes (gloo), one thread each; "
            f"torch {row['torch']}, fastest of {row['repeats']} forwards per mode, rank 0's CPU time.\n\n"
            "| no guidance | NAG | NAG, straightforward path (`fast=False`) |\n|---|---|---|\n"
            f"| {row['none_ms']:.0f} ms | {row['nag_ratio']:.2f}x | {row['nag_straightforward_ratio']:.2f}x |\n"
        )
        update_markdown(args.markdown, f"context-parallel-cpu-{row['mode']}", table)
    return row


if __name__ == "__main__":
    main()
