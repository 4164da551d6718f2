"""Distil the few-step checkpoint (1 to 4 steps, guidance baked in) from the multi-step one.

    python training/distill_fewstep.py        # reads weights/multistep, writes weights/fewstep

1. The teacher (the multi-step pipeline, DPM-Solver++ with classifier-free guidance) turns
   ``--pairs`` fixed noise images into samples for captions drawn from the dataset's grammar:
   real prompts only, no empty caption and no negative prompt, as FLUX.1-schnell and DMD2 are
   distilled. The student therefore never learns an unconditional prediction, and CFG on it is
   whatever it turns out to be (``docs/quality_toy.md`` measures it). Each pair ``(noise, teacher
   sample)`` is one straight path of a rectified flow ("reflow").
2. The student, initialised from the teacher's UNet (the text encoder stays frozen and shared),
   learns the straight velocity ``noise - sample`` at points of those paths, half of them at the
   noise levels the 1-, 2-, 3- and 4-step Euler samplers visit. One Euler step from pure noise
   then lands on the teacher's guided sample: guidance is baked in, as in FLUX.1-schnell, and the
   few-step model is used with ``guidance_scale=0``.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from nag.toy.dataset import caption_for, sample_attributes  # noqa: E402

#: Noise levels visited by the Euler sampler of the few-step scheduler for 1..4 steps.
FEW_STEP_SIGMAS = (0.999, 0.749, 0.666, 0.4995, 0.333, 0.2498)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--teacher", type=Path, default=common.WEIGHTS / "multistep")
    p.add_argument("--pairs", type=int, default=6144, help="teacher samples (noise, image)")
    p.add_argument("--teacher-steps", type=int, default=8)
    p.add_argument("--guidance", type=float, default=4.0, help="the teacher's CFG scale, baked into the student")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--ema", type=float, default=0.995)
    p.add_argument(
        "--caption-dropout", type=float, default=0.0, help="share of empty captions (0: real prompts only, as schnell)"
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=common.WEIGHTS / "fewstep")
    p.add_argument("--cache", type=Path, default=None, help="reuse/save the teacher pairs here (.pt)")
    return p.parse_args(argv)


def teacher_pairs(pipe, args: argparse.Namespace) -> dict[str, torch.Tensor | list[str]]:
    """Captions, noises and the teacher's guided samples for them."""
    rng = np.random.default_rng([args.seed, 11])
    captions = []
    for i in range(args.pairs):
        attributes = sample_attributes(
            np.random.default_rng([args.seed + 1000, i, 0]), common.IMAGE_SIZE, common.TRAIN_BACKGROUNDS
        )
        captions.append("" if rng.uniform() < args.caption_dropout else caption_for(attributes, rng))
    generator = torch.Generator().manual_seed(args.seed + 12)
    noise = torch.randn(args.pairs, 3, common.IMAGE_SIZE, common.IMAGE_SIZE, generator=generator)
    samples = torch.empty_like(noise)
    chunk = 128
    for i in tqdm(range(0, args.pairs, chunk), desc="teacher samples", mininterval=5):
        out = pipe(
            captions[i : i + chunk],
            latents=noise[i : i + chunk].to(pipe.device),
            num_inference_steps=args.teacher_steps,
            guidance_scale=args.guidance,
            output_type="latent",
        ).images
        samples[i : i + chunk] = out.float().cpu().clamp(-1, 1)
    return {"captions": captions, "noise": noise, "samples": samples}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    common.set_threads(args.threads)
    common.seed_everything(args.seed)
    timer = common.Timer("distill_pairs")
    device = torch.device(args.device)

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(args.teacher, dtype=torch.float32, local_files_only=True).to(device)
    pipe.set_progress_bar_config(disable=True)
    if args.cache is not None and args.cache.exists():
        pairs = torch.load(args.cache)
    else:
        with torch.no_grad():
            pairs = teacher_pairs(pipe, args)
        if args.cache is not None:
            args.cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save(pairs, args.cache)
    pair_time = timer.done(pairs=args.pairs, teacher_steps=args.teacher_steps, guidance=args.guidance)
    timer = common.Timer("distill_student")

    text_encoder = pipe.text_encoder.eval().requires_grad_(False)
    with torch.no_grad():
        ids = common.tokenize(pipe.tokenizer, pairs["captions"]).to(device)
        embeds = torch.cat([text_encoder(ids[i : i + 512])[0] for i in range(0, len(ids), 512)]).cpu()
    noise, samples = pairs["noise"], pairs["samples"]

    student = pipe.unet.train().to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    ema = common.EMA(student, args.ema)
    generator = torch.Generator().manual_seed(args.seed + 13)
    index_stream = common.batches(len(noise), args.batch, generator)
    few = torch.tensor(FEW_STEP_SIGMAS)
    bar = tqdm(range(args.steps), desc="fewstep", mininterval=5)
    running = None
    for step in bar:
        lr = args.lr * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        idx = next(index_stream)
        z, x0, e = noise[idx].to(device), samples[idx].to(device), embeds[idx].to(device)
        n = len(idx)
        pick = torch.randint(len(few), (n,), generator=generator)
        sigma = torch.where(torch.rand(n, generator=generator) < 0.5, few[pick], common.flow_sigmas(n, generator))
        sigma = sigma.to(device)
        s = sigma.view(-1, 1, 1, 1)
        x_t = ((1 - s) * x0 + s * z).contiguous(memory_format=torch.channels_last)
        velocity = student(x_t, sigma * 1000, encoder_hidden_states=e).sample
        loss = F.mse_loss(velocity, z - x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        ema.update(student, min(args.ema, (1 + step) / (10 + step)))
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        bar.set_postfix(loss=f"{running:.4f}", refresh=False)

    ema.copy_to(student)
    student = student.to(memory_format=torch.contiguous_format).eval().cpu()
    common.save_pipeline(
        args.out, pipe.tokenizer, text_encoder.cpu(), pipe.vae.cpu(), student, common.build_scheduler(order=1)
    )
    seconds = timer.done(steps=args.steps, batch=args.batch, final_loss=round(running or 0.0, 5))
    print(f"teacher pairs {pair_time / 60:.1f} min, student {seconds / 60:.1f} min")
    print(f"saved the few-step pipeline to {args.out}")


if __name__ == "__main__":
    main()
