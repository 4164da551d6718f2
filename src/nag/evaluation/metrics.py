"""CLIP score, FID, patch-FID and ImageReward, through torchmetrics (and image-reward when present).

The metric networks are injectable: ``clip`` is a Hugging Face id / local folder of a CLIP model
(or a ``(model, processor)`` pair), ``inception`` the FID feature extractor (None: torchmetrics'
FID Inception-v3; a ``.pt2`` file from ``torch.export.save``; the path of the Inception weights
file torchmetrics/torch-fidelity use; or any ``nn.Module`` mapping uint8 (N, 3, H, W) images to
(N, D) features).

Image views (the same for generated and reference images):

- FID: the whole image, shorter side resized to ``fid_size`` (bicubic), centre square crop.
- patch-FID: one ``patch_size`` x ``patch_size`` crop from the centre of the image at its full
  resolution (an image smaller than that is first resized up so its shorter side fits), so
  the details at the model's native resolution count, as in the paper's PFID.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .prompts import EvalError

__all__ = ["DEFAULT_CLIP", "MetricNets", "load_metric_nets", "compute_metrics", "fid_view", "patch_view",
           "EXTRA_HINT"]

#: torchmetrics' default CLIP model for CLIPScore.
DEFAULT_CLIP = "openai/clip-vit-large-patch14"
EXTRA_HINT = 'pip install "nag-diffusion[eval]"'

ImageRewardFn = Callable[[str, Any], float]


def _torchmetrics() -> Any:
    try:
        import torchmetrics
    except ImportError as exc:
        raise EvalError("Metrics library not installed", f"the metrics need torchmetrics ({exc}). Install the "
                        f"evaluation extra: `{EXTRA_HINT}` (torchmetrics, torch-fidelity).") from exc
    return torchmetrics


# --------------------------------------------------------------------------------------------------
# Image views
# --------------------------------------------------------------------------------------------------


def _resize_short(image: Any, size: int) -> Any:
    from PIL import Image

    w, h = image.size
    if min(w, h) == size:
        return image
    scale = size / min(w, h)
    return image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)


def _center_crop(image: Any, size: int) -> Any:
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    return image.crop((left, top, left + size, top + size))


def fid_view(image: Any, size: int) -> Any:
    """The whole image: shorter side to ``size``, centre square."""
    return _center_crop(_resize_short(image.convert("RGB"), size), size)


def patch_view(image: Any, size: int) -> Any:
    """The centre ``size`` x ``size`` patch at full resolution."""
    image = image.convert("RGB")
    if min(image.size) < size:
        image = _resize_short(image, size)
    return _center_crop(image, size)


def _to_uint8(images: Sequence[Any]) -> Any:
    import numpy as np
    import torch

    return torch.from_numpy(np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images])).permute(
        0, 3, 1, 2).contiguous()


def _open(path: Path) -> Any:
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


# --------------------------------------------------------------------------------------------------
# Loading the networks
# --------------------------------------------------------------------------------------------------


@dataclass
class MetricNets:
    """Loaded metric networks and what they are (for results.json)."""

    clip: Any                      # torchmetrics CLIPScore
    fid: Any                       # torchmetrics FrechetInceptionDistance (whole images)
    pfid: Any                      # the same on patches
    image_reward: ImageRewardFn | None
    describe: dict[str, Any] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def _offline() -> bool:
    import os

    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _clip_features_as_tensors(model: Any) -> Any:
    """``model`` with ``get_image_features``/``get_text_features`` returning the projected feature
    tensors: transformers 5 returns a ``BaseModelOutputWithPooling`` (features in ``pooler_output``)
    where torchmetrics' CLIPScore expects a tensor."""
    import torch

    class _CLIPFeatures(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner
            self.config = inner.config

        @staticmethod
        def _tensor(out: Any) -> Any:
            return out if isinstance(out, torch.Tensor) else out.pooler_output

        def get_image_features(self, *args: Any, **kwargs: Any) -> Any:
            return self._tensor(self.inner.get_image_features(*args, **kwargs))

        def get_text_features(self, *args: Any, **kwargs: Any) -> Any:
            return self._tensor(self.inner.get_text_features(*args, **kwargs))

    return _CLIPFeatures(model).eval()


def load_clip(spec: Any) -> tuple[Any, Any]:
    """A ``(CLIPModel, CLIPProcessor)`` pair from a Hub id or local folder (or ``spec`` itself if a pair)."""
    if isinstance(spec, (tuple, list)):
        return spec[0], spec[1]
    from transformers import CLIPModel, CLIPProcessor

    path = Path(str(spec)).expanduser()
    source = str(path) if path.exists() else str(spec)
    try:
        model = CLIPModel.from_pretrained(source, local_files_only=path.exists() or _offline())
        processor = CLIPProcessor.from_pretrained(source, local_files_only=path.exists() or _offline())
    except (OSError, ValueError) as exc:
        raise EvalError(
            "CLIP model not available",
            f"the CLIP score needs the CLIP model {str(spec)!r}, which could not be loaded "
            f"({str(exc).splitlines()[0][:200]}). Download it once while online "
            f"(`hf download {spec} --local-dir models/clip`, then --clip-model models/clip), or pass "
            "--clip-model a local folder holding a CLIPModel and "
            "its CLIPProcessor (what `save_pretrained` writes); the paper's numbers use a ViT-L/14-class CLIP.",
        ) from exc
    return model.eval(), processor


def _load_pt2(path: Path) -> Any:
    import torch

    try:
        return torch.export.load(str(path)).module()
    except Exception as exc:  # noqa: BLE001 - any failure to read the archive is the user's file
        raise EvalError("Bad --inception file", f"{str(path)!r} could not be loaded with torch.export.load "
                        f"({str(exc).splitlines()[0][:200]}).") from exc


def _make_fid(inception: Any, size: int) -> tuple[Any, str]:
    tm = _torchmetrics()
    del tm
    import torch
    from torchmetrics.image.fid import FrechetInceptionDistance

    common = dict(reset_real_features=False, normalize=False, sync_on_compute=False)
    if isinstance(inception, torch.nn.Module):
        return FrechetInceptionDistance(feature=inception, input_img_size=(3, size, size), **common), \
            f"custom module {type(inception).__name__}"
    weights = None
    if inception is not None:
        path = Path(str(inception)).expanduser()
        if not path.is_file():
            raise EvalError("Inception file not found", f"--inception {str(path)!r} does not exist. Pass the FID "
                            "Inception-v3 weights file (weights-inception-2015-12-05-6726825d.pth) or a torch.export "
                            "archive (.pt2) of a feature extractor; omit it for torchmetrics' FID Inception.")
        if path.suffix == ".pt2":
            module = _load_pt2(path)
            return FrechetInceptionDistance(feature=module, input_img_size=(3, size, size), **common), \
                f"torch.export archive {path.name}"
        weights = str(path)
    try:
        fid = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=weights, **common)
    except ModuleNotFoundError as exc:
        raise EvalError("Metrics library not installed", f"FID with the standard Inception-v3 needs torch-fidelity "
                        f"({exc}). Install the evaluation extra: `{EXTRA_HINT}`.") from exc
    except Exception as exc:  # noqa: BLE001 - download failures come in many types
        raise EvalError(
            "FID Inception weights not available",
            f"torchmetrics could not load the FID Inception-v3 ({str(exc).splitlines()[0][:200]}). It downloads "
            "weights-inception-2015-12-05-6726825d.pth on first use into the torch hub cache "
            "($TORCH_HOME/hub/checkpoints, by default ~/.cache/torch/hub/checkpoints); on a machine without "
            "internet, copy that file over and pass --inception PATH_TO_IT (docs/evaluation.md, Offline).",
        ) from exc
    return fid, "torchmetrics FID Inception-v3 (2048 features)" + (f", weights {Path(weights).name}" if weights else "")


def load_image_reward(spec: Any, device: Any) -> tuple[ImageRewardFn | None, str | None]:
    """An ImageReward scorer ``(prompt, PIL image) -> float``, or None and why not.

    ``spec``: a callable (used as it is), False/None/"off" (skipped), or "auto": the
    ``image-reward`` package's ``ImageReward-v1.0`` when the package and its checkpoint load.
    """
    if callable(spec):
        return spec, None
    if spec in (None, False, "off"):
        return None, "ImageReward disabled (--no-image-reward)"
    try:
        import ImageReward as RM  # noqa: N814 - the package's own name
    except Exception as exc:  # noqa: BLE001 - the package breaks at import on newer dependencies
        return None, (f"ImageReward skipped: the image-reward package is not importable ({type(exc).__name__}: "
                      f"{str(exc).splitlines()[0][:160] if str(exc) else ''}). It is not part of the eval extra "
                      "because it pins old dependencies; see docs/evaluation.md")
    try:
        model = RM.load("ImageReward-v1.0", device=str(device))
    except Exception as exc:  # noqa: BLE001
        return None, (f"ImageReward skipped: its checkpoint could not be loaded "
                      f"({str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__})")

    def score(prompt: str, image: Any) -> float:
        return float(model.score(prompt, image))

    return score, None


def load_metric_nets(clip: Any = DEFAULT_CLIP, inception: Any = None, image_reward: Any = "auto", *,
                     fid_size: int = 299, patch_size: int = 299, device: Any = "cpu") -> MetricNets:
    """Load every metric network (raises :class:`EvalError` when one cannot be had)."""
    _torchmetrics()
    for name, value in (("--fid-size", fid_size), ("--patch-size", patch_size)):
        if value < 2:
            raise EvalError("Option out of range", f"{name} must be at least 2 pixels, got {value}.")
    from torchmetrics.multimodal.clip_score import CLIPScore

    model, processor = load_clip(clip)
    wrapped = _clip_features_as_tensors(model)
    clip_metric = CLIPScore(model_name_or_path=lambda: (wrapped, processor), sync_on_compute=False)
    if isinstance(inception, (tuple, list)):  # (fid module, patch-fid module)
        fid, fid_desc = _make_fid(inception[0], fid_size)
        pfid, _ = _make_fid(inception[1], patch_size)
    else:
        fid, fid_desc = _make_fid(inception, fid_size)
        pfid, _ = _make_fid(inception, patch_size)
    scorer, why = load_image_reward(image_reward, device)
    nets = MetricNets(clip_metric.to(device), fid.to(device), pfid.to(device), scorer)
    nets.describe = {
        "clip_model": clip if isinstance(clip, str) else f"custom {type(model).__name__}",
        "inception": fid_desc,
        "fid_view": f"whole image, shorter side resized to {fid_size} (bicubic), centre crop {fid_size}x{fid_size}",
        "pfid_view": f"centre {patch_size}x{patch_size} crop at full resolution",
        "image_reward": "ImageReward-v1.0" if scorer is not None and not callable(image_reward) else
        ("custom scorer" if scorer is not None else None),
    }
    if why:
        nets.skipped["image_reward"] = why
    return nets


# --------------------------------------------------------------------------------------------------
# Computing
# --------------------------------------------------------------------------------------------------


def _batches(items: Sequence[Any], size: int) -> Any:
    for k in range(0, len(items), size):
        yield items[k:k + size]


def _finite(value: Any) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def compute_metrics(
    nets: MetricNets,
    generated: dict[str, list[tuple[str, Path]]],
    reference: Sequence[Path],
    *,
    fid_size: int = 299,
    patch_size: int = 299,
    batch_size: int = 32,
    device: Any = "cpu",
    on_batch: Callable[[str, int], None] | None = None,
) -> dict[str, dict[str, float | None]]:
    """Metrics per method. ``generated``: method -> [(prompt, image path)] in prompt order.

    The reference statistics are computed once and shared by all methods. FID/patch-FID need at
    least two images on each side; with fewer they are None. ``on_batch(stage, n)`` reports progress.
    """
    import torch

    with torch.no_grad():
        for paths in _batches(list(reference), batch_size):
            images = [_open(p) for p in paths]
            nets.fid.update(_to_uint8([fid_view(im, fid_size) for im in images]).to(device), real=True)
            nets.pfid.update(_to_uint8([patch_view(im, patch_size) for im in images]).to(device), real=True)
            if on_batch:
                on_batch("reference", len(paths))
        results: dict[str, dict[str, float | None]] = {}
        for method, items in generated.items():
            nets.clip.reset()
            nets.fid.reset()  # keeps the reference statistics (reset_real_features=False)
            nets.pfid.reset()
            rewards: list[float] = []
            for chunk in _batches(items, batch_size):
                prompts = [p for p, _ in chunk]
                images = [_open(path) for _, path in chunk]
                nets.clip.update(list(_to_uint8(images).to(device)), prompts)
                nets.fid.update(_to_uint8([fid_view(im, fid_size) for im in images]).to(device), real=False)
                nets.pfid.update(_to_uint8([patch_view(im, patch_size) for im in images]).to(device), real=False)
                if nets.image_reward is not None:
                    rewards += [float(nets.image_reward(p, im)) for p, im in zip(prompts, images)]
                if on_batch:
                    on_batch(method, len(chunk))
            enough = len(items) >= 2 and len(reference) >= 2
            results[method] = {
                "clip": _finite(nets.clip.compute()) if items else None,
                "fid": _finite(nets.fid.compute()) if enough else None,
                "pfid": _finite(nets.pfid.compute()) if enough else None,
                "image_reward": (sum(rewards) / len(rewards)) if rewards else None,
            }
    return results
