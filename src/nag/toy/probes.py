"""Attribute probes for the toy model: a small CNN trained on the dataset's exact ground truth.

    from nag.toy.probes import AttributeProbe
    probe = AttributeProbe.load()            # the shipped weights (src/nag/toy/weights/probe)
    result = probe(images)                   # images: (B, 3, 32, 32) floats in [0, 1]
    result.labels["colour"]                  # ['red', 'blue', ...]
    result.confidence["colour"]              # tensor of max-softmax probabilities
    result.valid                             # bool tensor: the probe recognises a clean object

The probe reads every attribute of :data:`nag.toy.dataset.ATTRIBUTE_VALUES` from an image.
A sample counts as *valid* when the probe's realness head, trained to tell dataset images from
junk (noise, blends of two images, heavy blur and noise, two half images), gives it a
probability of at least ``VALID_THRESHOLD``. ``training/train_probe.py`` makes the weights and reports the probe's
own accuracy on held-out images (also in ``weights/probe/metrics.json``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .dataset import ATTRIBUTE_VALUES

__all__ = ["AttributeProbe", "ProbeResult", "VALID_THRESHOLD", "PROBE_DIR"]

PROBE_DIR = Path(__file__).resolve().parent / "weights" / "probe"
#: Minimum realness probability of a valid sample.
VALID_THRESHOLD = 0.5


@dataclass
class ProbeResult:
    """Per attribute: predicted value names, class probabilities and confidence (max probability)."""

    labels: dict[str, list]
    probabilities: dict[str, torch.Tensor]
    realness: torch.Tensor

    @property
    def confidence(self) -> dict[str, torch.Tensor]:
        return {k: p.max(dim=1).values for k, p in self.probabilities.items()}

    @property
    def valid(self) -> torch.Tensor:
        return self.realness >= VALID_THRESHOLD

    def has(self, attribute: str, value) -> torch.Tensor:
        """Bool tensor: the predicted ``attribute`` equals ``value`` (one value, or one per image)."""
        values = value if isinstance(value, (list, tuple)) else [value] * len(self.labels[attribute])
        return torch.tensor([p == v for p, v in zip(self.labels[attribute], values)])


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class AttributeProbe(nn.Module):
    """A CNN with one classification head per attribute (32x32 RGB input in [0, 1])."""

    def __init__(self, width: int = 32, image_size: int = 32):
        super().__init__()
        self.image_size = image_size
        w = width
        self.features = nn.Sequential(
            _block(3, w, 1),
            _block(w, 2 * w, 2),
            _block(2 * w, 2 * w, 1),
            _block(2 * w, 2 * w, 2),
            _block(2 * w, 2 * w, 1),
            _block(2 * w, 2 * w, 2),
        )
        cells = (image_size // 8) ** 2
        self.trunk = nn.Sequential(nn.Flatten(), nn.Linear(2 * w * cells, 128), nn.ReLU(inplace=True))
        self.heads = nn.ModuleDict({k: nn.Linear(128, len(v)) for k, v in ATTRIBUTE_VALUES.items()})
        self.real = nn.Linear(128, 1)
        self.config = {"width": width, "image_size": image_size}

    def logits(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Raw logits per attribute, and under ``"real"`` the realness logit; ``images`` (B, 3, H, W) in [0, 1]."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        if images.shape[-2:] != (self.image_size, self.image_size):
            images = nn.functional.interpolate(images, size=(self.image_size,) * 2, mode="area")
        x = self.trunk(self.features(images * 2.0 - 1.0))
        out = {k: head(x) for k, head in self.heads.items()}
        out["real"] = self.real(x).squeeze(1)
        return out

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> ProbeResult:  # type: ignore[override]
        was_training = self.training
        self.eval()
        try:
            parameter = next(self.parameters())
            logits = self.logits(images.to(parameter.device, parameter.dtype).clamp(0, 1))
        finally:
            self.train(was_training)
        realness = logits.pop("real").float().sigmoid().cpu()
        probabilities = {k: v.float().softmax(dim=1).cpu() for k, v in logits.items()}
        labels = {k: [ATTRIBUTE_VALUES[k][i] for i in p.argmax(dim=1).tolist()] for k, p in probabilities.items()}
        return ProbeResult(labels, probabilities, realness)

    def save(self, directory: Path, metrics: dict | None = None) -> None:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, directory / "probe.safetensors"
        )
        (directory / "config.json").write_text(json.dumps(self.config, indent=2) + "\n")
        if metrics is not None:
            (directory / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path | str = PROBE_DIR, device: str | torch.device = "cpu") -> AttributeProbe:
        """Load probe weights (default: the shipped ones)."""
        from safetensors.torch import load_file

        directory = Path(directory)
        weights = directory / "probe.safetensors"
        if not weights.exists():
            raise FileNotFoundError(f"no probe weights at {weights}; run `python training/train_probe.py` to make them")
        config = json.loads((directory / "config.json").read_text())
        probe = cls(**config)
        probe.load_state_dict(load_file(weights))
        return probe.to(device).eval()

    @staticmethod
    def metrics(directory: Path | str = PROBE_DIR) -> dict:
        """The probe's own accuracy, as measured when it was trained."""
        path = Path(directory) / "metrics.json"
        return json.loads(path.read_text()) if path.exists() else {}


def label_tensor(attributes: Sequence, attribute: str) -> torch.Tensor:
    """Class indices of ``attribute`` for a sequence of :class:`~nag.toy.dataset.Attributes`."""
    return torch.tensor([a.label(attribute) for a in attributes])
