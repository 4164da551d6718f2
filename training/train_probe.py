"""Train the attribute probe (a small CNN) on the dataset's exact ground truth.

    python training/train_probe.py            # writes src/nag/toy/weights/probe/

Training images get mild corruptions (noise, blur, contrast and brightness changes, a one-pixel
shift) so the probe also reads imperfect generated images. A realness head learns to tell those
from junk (noise, blends, heavy blur, two half images): it decides whether a sample is valid. Its accuracy per
attribute on held-out clean images (a different dataset seed) and on corrupted ones is printed and saved to
``metrics.json`` next to the weights.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from nag.toy.dataset import ATTRIBUTE_VALUES  # noqa: E402
from nag.toy.probes import PROBE_DIR, AttributeProbe, label_tensor  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images", type=int, default=15_000)
    p.add_argument("--test-images", type=int, default=3_000)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=PROBE_DIR)
    return p.parse_args(argv)


def corrupt(x: torch.Tensor, generator: torch.Generator, clean: float = 0.3) -> torch.Tensor:
    """Random mild corruptions of images in [0, 1] (per image; a share ``clean`` left as is)."""
    b = x.shape[0]
    original = x

    def u(lo: float, hi: float) -> torch.Tensor:
        return (lo + (hi - lo) * torch.rand(b, 1, 1, 1, generator=generator)).to(x)

    shift = torch.randint(-1, 2, (2,), generator=generator).tolist()
    x = torch.roll(x, shifts=shift, dims=(2, 3))
    blur = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    x = torch.lerp(x, blur, u(0.0, 0.7))
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * u(0.8, 1.2) + mean + u(-0.06, 0.06)
    x = x + torch.randn(x.shape, generator=generator).to(x) * u(0.0, 0.08)
    keep = (torch.rand(b, 1, 1, 1, generator=generator) < clean).to(x)
    return (keep * original + (1 - keep) * x).clamp(0, 1)


def junk(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Images that are not dataset images, one kind per image: uniform noise, a blend of two
    images, heavy blur plus noise, or the halves of two images side by side."""
    b = x.shape[0]
    other = x[torch.randperm(b, generator=generator)]
    kind = torch.randint(4, (b,), generator=generator).view(-1, 1, 1, 1)
    noise = torch.rand(x.shape, generator=generator)
    alpha = 0.3 + 0.4 * torch.rand(b, 1, 1, 1, generator=generator)
    blend = alpha * x + (1 - alpha) * other
    blurred = x
    for _ in range(3):
        blurred = F.avg_pool2d(F.pad(blurred, (2, 2, 2, 2), mode="replicate"), 5, stride=1)
    blurred = (blurred + 0.15 * torch.randn(x.shape, generator=generator)).clamp(0, 1)
    halves = torch.cat([x[..., : x.shape[-1] // 2], other[..., x.shape[-1] // 2 :]], dim=-1)
    out = torch.where(kind == 0, noise, blend)
    out = torch.where(kind == 2, blurred, out)
    return torch.where(kind == 3, halves, out)


def accuracy(probe: AttributeProbe, images: torch.Tensor, labels: dict[str, torch.Tensor]) -> dict[str, float]:
    correct = {k: 0 for k in labels}
    valid = 0
    for i in range(0, len(images), 500):
        result = probe(images[i : i + 500])
        valid += int(result.valid.sum())
        for k in labels:
            predicted = result.probabilities[k].argmax(dim=1)
            correct[k] += int((predicted == labels[k][i : i + 500]).sum())
    out = {k: round(v / len(images), 4) for k, v in correct.items()}
    out["valid"] = round(valid / len(images), 4)
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    common.set_threads(args.threads)
    common.seed_everything(args.seed)
    timer = common.Timer("train_probe")

    images, _, attributes = common.dataset_arrays(args.seed + 100, args.images, desc="probe training images")
    test_images, _, test_attributes = common.dataset_arrays(args.seed + 200, args.test_images, desc="probe test images")
    x = common.to_tensor(images).add(1).div(2)
    x_test = common.to_tensor(test_images).add(1).div(2)
    y = {k: label_tensor(attributes, k) for k in ATTRIBUTE_VALUES}
    y_test = {k: label_tensor(test_attributes, k) for k in ATTRIBUTE_VALUES}

    torch.manual_seed(args.seed)
    probe = AttributeProbe().train()
    optimizer = torch.optim.AdamW(probe.parameters(), lr=args.lr, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(args.seed + 3)
    index_stream = common.batches(len(x), args.batch, generator)
    bar = tqdm(range(args.steps), desc="probe", mininterval=5)
    for step in bar:
        lr = args.lr * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        idx = next(index_stream)
        # Real and junk images in one batch, so batch-norm statistics cannot tell them apart.
        n = len(idx)
        logits = probe.logits(torch.cat([corrupt(x[idx], generator), junk(x[idx], generator)]))
        loss = sum(F.cross_entropy(logits[k][:n], y[k][idx]) for k in ATTRIBUTE_VALUES)
        real_target = torch.cat([torch.ones(n), torch.zeros(n)])
        loss = loss + F.binary_cross_entropy_with_logits(logits["real"], real_target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)

    probe.eval()
    clean = accuracy(probe, x_test, y_test)
    corrupted = accuracy(probe, corrupt(x_test, torch.Generator().manual_seed(args.seed + 4), clean=0.0), y_test)
    noise = probe(torch.rand(500, 3, 32, 32, generator=torch.Generator().manual_seed(5)))
    junk_test = probe(junk(x_test[:1000], torch.Generator().manual_seed(6)))
    metrics = {
        "test_images": args.test_images,
        "test_seed": args.seed + 200,
        "accuracy_clean": clean,
        "accuracy_corrupted": corrupted,
        "valid_on_uniform_noise": round(float(noise.valid.float().mean()), 4),
        "valid_on_junk": round(float(junk_test.valid.float().mean()), 4),
        "training_steps": args.steps,
    }
    print("probe accuracy (clean held-out):", clean)
    print("probe accuracy (corrupted held-out):", corrupted)
    print("valid on uniform noise:", metrics["valid_on_uniform_noise"], "on junk:", metrics["valid_on_junk"])
    probe.save(args.out, metrics)
    timer.done(**{k: v for k, v in metrics.items() if k != "test_images"})
    print(f"saved the probe to {args.out}")


if __name__ == "__main__":
    main()
