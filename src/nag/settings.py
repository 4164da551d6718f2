"""NAG settings: the knobs, their validation and the per-family defaults."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields, replace
from typing import Any

__all__ = ["NAGSettings", "FamilyDefaults"]


@dataclass(frozen=True)
class FamilyDefaults:
    """Tuned ``scale``/``tau``/``alpha`` for a model family (scale is ``s``; the paper's phi = s - 1)."""

    scale: float
    tau: float
    alpha: float


@dataclass(frozen=True)
class NAGSettings:
    """Everything that decides what NAG computes.

    Attributes:
        scale: extrapolation factor ``s`` (1 = off). The paper's phi is ``scale - 1``.
        tau: bound on how much the guided feature's norm may grow relative to the positive one.
        alpha: blend between the normalized guided feature (1) and the positive feature (0).
        start: fraction of the full noise schedule, counted from the noisy end, at which NAG begins: step ``i`` of
            the ``N`` steps the scheduler built is guided when ``start <= i / N < end`` (``nag.schedule`` reads
            ``i`` from the scheduler, so img2img and SDXL's ``denoising_start/end`` count on the full schedule
            and every call of one step is guided alike).
        end: fraction of the schedule at which NAG stops (``end=0.5`` guides the first half of the steps).
        min_sigma: noise level below which NAG is off: a step is guided only when its sigma (read from the
            scheduler when the step begins, ``nag.schedule.schedule_sigma``) is ``>= min_sigma``. 0 (the default)
            sets no bound. Combines with ``[start, end)``: a step is guided when both allow it. Where the scheduler
            does not say its sigma, the step window alone decides.
        norm: order ``p`` of the norm used for the ratio (1 or 2).
        eps: floor on both norms.
    """

    scale: float
    tau: float
    alpha: float
    start: float = 0.0
    end: float = 1.0
    norm: int = 1
    eps: float = 1e-6
    min_sigma: float = 0.0

    def __post_init__(self) -> None:
        def finite(name: str) -> float:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                hint = " (a tensor? pass float(value))" if hasattr(value, "item") else ""
                raise ValueError(f"NAG `{name}` must be a finite number, got {value!r}{hint}")
            value = float(value)
            object.__setattr__(self, name, value)  # numpy scalars and the like become floats
            return value

        if finite("scale") < 1.0:
            raise ValueError(
                f"NAG `scale` must be >= 1 (1 turns guidance off), got {self.scale}. "
                "Note: scale is s, the paper's phi is s - 1; pass scale = phi + 1."
            )
        if finite("tau") <= 0.0:
            raise ValueError(f"NAG `tau` must be > 0 (typical: 2.5), got {self.tau}")
        if not 0.0 <= finite("alpha") <= 1.0:
            raise ValueError(f"NAG `alpha` must lie in [0, 1] (typical: 0.25-0.5), got {self.alpha}")
        start, end = finite("start"), finite("end")
        if not (0.0 <= start <= 1.0 and 0.0 <= end <= 1.0):
            raise ValueError(
                f"NAG `start` and `end` must lie in [0, 1] (fractions of the sampling trajectory; "
                f"end=0.5 guides the first half), got start={start}, end={end}"
            )
        if start >= end:
            raise ValueError(
                f"NAG `start` must be smaller than `end` (the guided steps are start <= i/N < end), "
                f"got start={start}, end={end}"
            )
        if finite("min_sigma") < 0.0:
            raise ValueError(
                f"NAG `min_sigma` must be >= 0 (NAG is off at steps whose sigma is below it; 0: no bound), "
                f"got {self.min_sigma}"
            )
        if isinstance(self.norm, bool) or self.norm not in (1, 2):
            raise ValueError(f"NAG `norm` must be 1 (L1, the default) or 2 (L2), got {self.norm!r}")
        object.__setattr__(self, "norm", int(self.norm))
        if finite("eps") <= 0.0:
            raise ValueError(f"NAG `eps` must be > 0, got {self.eps}")

    @classmethod
    def resolve(
        cls,
        defaults: FamilyDefaults,
        *,
        scale: float | None = None,
        tau: float | None = None,
        alpha: float | None = None,
        start: float = 0.0,
        end: float = 1.0,
        norm: int = 1,
        min_sigma: float = 0.0,
    ) -> NAGSettings:
        """Validated settings, omitted ``scale``/``tau``/``alpha`` taken from ``defaults``.

        What ``nag.apply`` uses; a command line can call it (with ``nag.PIPELINES[name].defaults``)
        to reject bad options before loading any weights.
        """
        return cls(
            scale=defaults.scale if scale is None else scale,
            tau=defaults.tau if tau is None else tau,
            alpha=defaults.alpha if alpha is None else alpha,
            start=start,
            end=end,
            norm=norm,
            min_sigma=min_sigma,
        )

    @property
    def enabled(self) -> bool:
        """False when the settings make NAG a no-op (scale 1 or alpha 0)."""
        return self.scale != 1.0 and self.alpha != 0.0

    def in_window(self, progress: float | None, sigma: float | None = None) -> bool:
        """Whether a step at ``progress`` (fraction of the trajectory done, 0 = noisiest) and noise level ``sigma``
        is guided (None: not known, no bound from it)."""
        in_steps = progress is None or self.start <= progress < self.end
        return in_steps and (sigma is None or sigma >= self.min_sigma)

    def apply_kwargs(self) -> dict[str, Any]:
        """The settings as ``nag.apply`` keyword arguments, every value explicit (so it can be reported and
        fingerprinted); ``min_sigma`` only where it bounds anything (runs without it keep their old fingerprint)."""
        kwargs: dict[str, Any] = dict(scale=self.scale, tau=self.tau, alpha=self.alpha, start=self.start, end=self.end,
                                      norm=self.norm)
        return {**kwargs, "min_sigma": self.min_sigma} if self.min_sigma else kwargs

    def with_updates(self, **changes: float) -> NAGSettings:
        """A validated copy with ``changes`` applied; unknown names raise a TypeError naming the known ones."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise TypeError(f"unknown NAG setting(s) {unknown}; settings are {sorted(known)}")
        return replace(self, **changes)
