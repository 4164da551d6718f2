"""nag: Normalized Attention Guidance (arXiv 2505.21179) for stock diffusers pipelines.

    import nag
    with nag.apply(pipe, "blurry, low quality"):
        image = pipe("a photo of a cat", num_inference_steps=4).images[0]
"""

from .combine import nag_combine
from .denoiser import DenoiserHandle, apply_to_denoiser
from .families import FAMILIES, PIPELINES
from .pipeline import NAGHandle, apply, remove
from .settings import FamilyDefaults, NAGSettings

__version__ = "0.1.0"

__all__ = [
    "apply",
    "remove",
    "apply_to_denoiser",
    "DenoiserHandle",
    "NAGHandle",
    "NAGSettings",
    "FamilyDefaults",
    "nag_combine",
    "supported_pipelines",
    "FAMILIES",
    "PIPELINES",
    "__version__",
]


def supported_pipelines() -> dict[str, dict]:
    """Supported pipeline classes with their family, defaults and whether they are few-step."""
    return {
        name: {
            "label": spec.label,
            "family": spec.family,
            "scale": spec.defaults.scale,
            "tau": spec.defaults.tau,
            "alpha": spec.defaults.alpha,
            "few_step": spec.few_step,
        }
        for name, spec in PIPELINES.items()
    }
