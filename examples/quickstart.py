"""Quick start: FLUX.1-schnell in 4 steps with a negative prompt through NAG.

Needs the model weights (downloaded by diffusers, or a local path via --model) and a GPU for
reasonable speed. Writes the unguided and the NAG image side by side.
"""

from __future__ import annotations

import argparse

import torch

import nag


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="black-forest-labs/FLUX.1-schnell")
    parser.add_argument("--prompt", default="a portrait of a fox in a library, natural light")
    parser.add_argument("--negative", default="blurry, low resolution, watermark")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--scale", type=float, default=None, help="NAG scale s (paper phi = s - 1); default: family's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="quickstart.png")
    args = parser.parse_args()

    from diffusers import DiffusionPipeline

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    pipe = DiffusionPipeline.from_pretrained(args.model, torch_dtype=dtype).to(device)

    def generate():
        generator = torch.Generator(device).manual_seed(args.seed)
        return pipe(args.prompt, num_inference_steps=args.steps, guidance_scale=0.0, generator=generator).images[0]

    baseline = generate()
    with nag.apply(pipe, args.negative, scale=args.scale):
        guided = generate()

    from PIL import Image

    grid = Image.new("RGB", (baseline.width * 2, baseline.height))
    grid.paste(baseline, (0, 0))
    grid.paste(guided, (baseline.width, 0))
    grid.save(args.out)
    print(f"wrote {args.out}: left no guidance, right NAG (negative: {args.negative!r})")


if __name__ == "__main__":
    main()
