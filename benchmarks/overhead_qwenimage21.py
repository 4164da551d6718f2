"""Cost of a whole Qwen-Image 2.1 generation with no guidance, CFG and NAG, measured in one run.

Qwen-Image 2.1's pipeline caches the prompt prefix's keys/values across steps (``causal_condition``): its first step
runs the whole sequence, the later ones only the target image's tokens. A per-forward figure would hide that, so
this benchmark times whole denoising loops of ``--steps`` transformer calls the way the pipeline makes them:

    none   one call per step on the prompt (its cache filled at step 0)
    cfg    one call per step on the prompt and one on the negative prompt (a cache each), as the pipeline's true CFG
    nag    one call per step on the prompt with NAG (its negative prefix prefilled once, then read by every layer)

each with the cache (the pipeline's default) and without it (``use_kv_cache=False``: every step a full pass). Random
weights, the architecture built from its config; ``--preset cpu`` keeps the architecture with fewer layers and a
lower resolution; ``--preset full`` is the published size (meant for ``--device cuda --dtype bfloat16``). Figures are
ratios to no guidance in the same run (fastest of ``--repeats`` loops per mode, modes interleaved). On CPU one
thread's CPU time is measured.

    python benchmarks/overhead_qwenimage21.py --preset cpu --markdown docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

import nag

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import update_markdown  # noqa: E402


def build(full: bool) -> tuple[torch.nn.Module, dict[str, int]]:
    from diffusers import QwenImage21Transformer2DModel

    if full:  # 1024 px: 64x64 target tokens; a 256-token prompt
        config = dict(num_layers=32, attention_head_dim=128, num_attention_heads=32, context_in_dim=4096)
        sizes = dict(side=64, text=256, context=4096)
    else:  # 512 px: 32x32 target tokens; a 128-token prompt
        config = dict(num_layers=4, attention_head_dim=64, num_attention_heads=8, context_in_dim=1024)
        sizes = dict(side=32, text=128, context=1024)
    model = QwenImage21Transformer2DModel(patch_size=1, in_channels=64, out_channels=64, mlp_ratio=3,
                                          axes_dims_rope=(16, 24, 24) if not full else (16, 56, 56), **config)
    return model.eval(), sizes


def call_arguments(
    sizes: dict[str, int], text: torch.Tensor, device: torch.device, dtype: torch.dtype
) -> dict[str, Any]:
    side = sizes["side"]
    generator = torch.Generator().manual_seed(0)
    slots = torch.cat(
        [torch.zeros(1, text.shape[1], dtype=torch.bool), torch.ones(1, side * side // 4, dtype=torch.bool)], 1
    )
    return dict(
        hidden_states=torch.randn(1, side * side, 64, generator=generator).to(device, dtype),
        encoder_hidden_states=text,
        img_shapes=[[(1, side, side)]],
        img_mask=slots.to(device),
    )


def generation(model: torch.nn.Module, steps: int, calls: list[dict[str, Any]], cache: bool) -> None:
    """One denoising loop: every step one call per entry of ``calls`` (each with its own prefix cache)."""
    from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21KVCache

    caches = [QwenImage21KVCache(len(model.transformer_blocks)) if cache else None for _ in calls]
    for step in range(steps):
        mode = ("extract" if step == 0 else "cached") if cache else None
        timestep = torch.full((1,), 1.0 - step / steps, device=calls[0]["hidden_states"].device)
        for arguments, kv_cache in zip(calls, caches):
            model(
                **arguments,
                timestep=timestep.to(arguments["hidden_states"].dtype),
                kv_cache=kv_cache,
                kv_cache_mode=mode,
                return_dict=False,
            )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cpu", choices=["cpu", "full"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--markdown", default=None, help="write the table into this file (section qwenimage21-<preset>)"
    )
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cpu":
        torch.set_num_threads(1)
    clock = time.thread_time if device.type == "cpu" else time.perf_counter
    torch.manual_seed(0)
    model, sizes = build(args.preset == "full")
    model = model.to(device, dtype)
    text = torch.randn(1, sizes["text"], sizes["context"], generator=torch.Generator().manual_seed(1)).to(device, dtype)
    negative_text = torch.randn(1, sizes["text"] // 2, sizes["context"], generator=torch.Generator().manual_seed(2))
    negative_text = negative_text.to(device, dtype)
    positive = call_arguments(sizes, text, device, dtype)
    negative_call = call_arguments(sizes, negative_text, device, dtype)
    times: dict[tuple[str, bool], list[float]] = {}
    with torch.no_grad():
        for _ in range(args.repeats):
            for cache in (True, False):
                for mode in ("none", "cfg", "nag"):
                    handle = (
                        nag.apply_to_denoiser(
                            model, {"encoder_hidden_states": negative_text}, scale=5.0, tau=2.5, alpha=0.25
                        )
                        if mode == "nag"
                        else None
                    )
                    try:
                        if device.type == "cuda":
                            torch.cuda.synchronize()
                        start = clock()
                        generation(model, args.steps, [positive, negative_call] if mode == "cfg" else [positive], cache)
                        if device.type == "cuda":
                            torch.cuda.synchronize()
                        times.setdefault((mode, cache), []).append(clock() - start)
                    finally:
                        if handle is not None:
                            handle.remove()
    lines = [
        f"Qwen-Image 2.1 transformer, preset `{args.preset}` ({sum(p.numel() for p in model.parameters()) / 1e6:.0f} M "
        f"parameters, {sizes['side'] ** 2} target tokens, a {sizes['text']}-token prompt, a {sizes['text'] // 2}-token "
        f"negative), {args.steps} steps, {args.device} {args.dtype}, fastest of {args.repeats} loops per mode.",
        "",
        "| pipeline's prefix cache | no guidance | CFG | NAG |",
        "|---|---|---|---|",
    ]
    for cache in (True, False):
        base = min(times[("none", cache)])
        cells = [f"1.00x ({base:.2f} s)"] + [f"{min(times[(mode, cache)]) / base:.2f}x" for mode in ("cfg", "nag")]
        lines.append(f"| {'on (default)' if cache else 'off (use_kv_cache=False)'} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.markdown:
        update_markdown(args.markdown, f"qwenimage21-{args.preset}-{device.type}", table)


if __name__ == "__main__":
    main()
