"""Evaluation of guidance methods with the paper's metrics: CLIP score, FID, patch-FID, ImageReward.

    import nag.evaluation as ev

    results = ev.evaluate(pipe, "coco5k.txt", "coco/val2014", "runs/flux", model="FLUX.1-schnell",
                          methods=["none", "nag"])

or ``nag eval`` on the command line. Generation is sharded across the processes of an
``accelerate launch`` and resumable; the metrics come from torchmetrics (install the extra:
``pip install "nag-diffusion[eval]"``); the metric libraries are imported only when the metrics
are computed, so this package imports without them.
"""

from .generate import DEFAULT_NEGATIVE, METHODS, Method, build_methods, generate_images
from .manifest import build_manifest, image_path, save_image_atomic
from .metrics import DEFAULT_CLIP, compute_metrics, fid_view, load_metric_nets, patch_view
from .prompts import EvalError, list_images, read_prompts, seed_for
from .report import render_markdown, write_reports
from .run import evaluate

__all__ = [
    "evaluate",
    "EvalError",
    "METHODS",
    "DEFAULT_NEGATIVE",
    "DEFAULT_CLIP",
    "Method",
    "build_methods",
    "generate_images",
    "read_prompts",
    "list_images",
    "seed_for",
    "image_path",
    "save_image_atomic",
    "build_manifest",
    "load_metric_nets",
    "compute_metrics",
    "fid_view",
    "patch_view",
    "render_markdown",
    "write_reports",
]
