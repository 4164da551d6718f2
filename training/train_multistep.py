"""Train the toy model's multi-step checkpoint (a pixel-space UNet, rectified flow).

    python training/train_multistep.py                      # the shipped checkpoint (seed 0)
    python training/train_multistep.py --steps 300 --out /tmp/ms   # a quick look

Writes a ``StableDiffusionPipeline`` directory (default ``src/nag/toy/weights/multistep``).
Captions are drawn afresh for every use of an image (the dataset's caption grammar), 10% of them
empty so that classifier-free guidance works. See ``training/README.md``.
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

from nag.toy.dataset import caption_for  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0, help="seed of the data, the initialisation and the training")
    p.add_argument("--images", type=int, default=60_000, help="distinct training images")
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument(
        "--backgrounds", default=",".join(common.TRAIN_BACKGROUNDS), help="comma-separated background kinds"
    )
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--out", type=Path, default=common.WEIGHTS / "multistep")
    p.add_argument(
        "--snapshots", type=int, default=1500, help="save the EMA weights to training/work every N steps (0: off)"
    )
    return p.parse_args(argv)


def lr_at(step: int, args: argparse.Namespace) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def save_snapshot(ema_unet: common.EMA, unet: torch.nn.Module, tokenizer, text_encoder, directory: Path) -> None:
    """Save the current EMA weights as a pipeline, to look at the model while it trains."""
    snapshot = common.build_unet()
    ema_unet.copy_to(snapshot)
    common.save_pipeline(
        directory, tokenizer, text_encoder, common.build_identity_vae(), snapshot, common.build_scheduler(order=2)
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    common.set_threads(args.threads)
    common.seed_everything(args.seed)
    timer = common.Timer("train_multistep")
    device = torch.device(args.device)

    tokenizer = common.build_tokenizer()
    backgrounds = args.backgrounds.split(",")
    images, _, attributes = common.dataset_arrays(
        args.seed, args.images, desc="generating images", backgrounds=backgrounds
    )
    pixels = torch.from_numpy(images)  # uint8 (N, H, W, 3)

    torch.manual_seed(args.seed)
    text_encoder = common.build_text_encoder(tokenizer).to(device)
    unet = common.build_unet().to(device).train()
    unet = unet.to(memory_format=torch.channels_last)
    params = list(unet.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=1e-4)
    ema_unet = common.EMA(unet, args.ema)

    generator = torch.Generator().manual_seed(args.seed + 1)
    caption_rng = np.random.default_rng([args.seed, 7])
    index_stream = common.batches(len(pixels), args.batch, generator)
    bar = tqdm(range(args.steps), desc="multistep", mininterval=5)
    running = None
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args)
        idx = next(index_stream)
        x0 = common.to_tensor(pixels[idx].numpy()).to(device).contiguous(memory_format=torch.channels_last)
        captions = [
            "" if caption_rng.uniform() < args.caption_dropout else caption_for(attributes[i], caption_rng)
            for i in idx.tolist()
        ]
        ids = common.tokenize(tokenizer, captions).to(device)
        noise = torch.randn(x0.shape, generator=generator).to(device)
        sigma = common.flow_sigmas(len(idx), generator).to(device)
        s = sigma.view(-1, 1, 1, 1)
        x_t = (1 - s) * x0 + s * noise
        with torch.no_grad():
            embeds = text_encoder(ids)[0]
        velocity = unet(x_t, sigma * 1000, encoder_hidden_states=embeds).sample
        loss = F.mse_loss(velocity, noise - x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        warm = min(args.ema, (1 + step) / (10 + step))
        ema_unet.update(unet, warm)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        bar.set_postfix(loss=f"{running:.4f}", refresh=False)
        if args.snapshots and (step + 1) % args.snapshots == 0 and step + 1 < args.steps:
            save_snapshot(ema_unet, unet, tokenizer, text_encoder, common.WORK / f"multistep-{step + 1}")

    ema_unet.copy_to(unet)
    unet = unet.to(memory_format=torch.contiguous_format).eval().cpu()
    text_encoder = text_encoder.eval().cpu()
    common.save_pipeline(
        args.out, tokenizer, text_encoder, common.build_identity_vae(), unet, common.build_scheduler(order=2)
    )
    timer.done(steps=args.steps, batch=args.batch, images=args.images, final_loss=round(running or 0.0, 5))
    print(f"saved the multi-step pipeline to {args.out}")


if __name__ == "__main__":
    main()
