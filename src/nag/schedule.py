"""Where a denoiser call stands in the full noise schedule, read from the pipeline's scheduler.

NAG's window ``[start, end)`` is a fraction of the *full* schedule: the ``N`` steps ``scheduler.set_timesteps`` built
(``scheduler.num_inference_steps``), step ``k`` sitting at ``k / N``. Every diffusers pipeline builds that full
schedule and then starts or stops inside it (img2img ``strength``, SDXL's ``denoising_start``/``denoising_end``), so
the positions below count the skipped start and ignore a shortened end: a base and a refiner split one window.

A call's position in ``scheduler.timesteps`` comes from the scheduler's own progress: ``step_index`` (advanced only
by ``scheduler.step``), else ``begin_index`` before the first step, else, for schedulers that keep no index (DDIM,
DDPM, PNDM), the call's timestep looked up in the schedule. Extra calls of one step (skip-layer guidance, true CFG's
second call) find the scheduler where the first left it and share its step. Multi-call steps (Heun and KDPM2: two
calls a step, ``2N - 1`` entries; PNDM: a warm-up pair, or Runge-Kutta steps of four calls) map every call of one
step to that step.

A step's noise level (for ``min_sigma``) is read at the step's first call: ``scheduler.sigmas`` at that position for
the schedulers that keep sigmas (Euler, DPM++, Heun, flow matching: there sigma is the flow's noise fraction); for
discrete-time schedulers (DDIM, DDPM, PNDM) from the step's timestep through ``alphas_cumprod``,
``sigma = sqrt((1 - a) / a)``, the sigma those timesteps have in the Karras/EDM convention.
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["schedule_step", "schedule_fraction", "schedule_sigma"]


def _scalar(value: Any) -> float | None:
    """A call's timestep as a number (the first row of a per-row tensor), or None."""
    if isinstance(value, torch.Tensor):
        return float(value.detach().reshape(-1)[0]) if value.numel() else None
    if isinstance(value, (int, float)):
        return float(value)
    return None


def _looked_up(scheduler: Any, timesteps: torch.Tensor, timestep: Any) -> int | None:
    """The position of ``timestep`` in ``timesteps`` (schedulers that keep no step index). A value the schedule holds
    twice (PNDM) is told apart by the scheduler's own call counter."""
    value = _scalar(timestep)
    if value is None:
        return None
    matches = torch.nonzero(torch.isclose(timesteps.detach().double().cpu(), torch.tensor(value, dtype=torch.double),
                                          rtol=0.0, atol=1e-4)).flatten().tolist()
    if not matches:
        return None
    counter = getattr(scheduler, "counter", None)
    if len(matches) > 1 and isinstance(counter, int):
        return min(matches, key=lambda position: abs(position - counter))
    return matches[0]


def _position(scheduler: Any, timesteps: torch.Tensor, timestep: Any) -> int | None:
    """The current call's position in ``scheduler.timesteps`` (the full schedule)."""
    step_index = getattr(scheduler, "step_index", None)
    if isinstance(step_index, int):
        return step_index
    begin_index = getattr(scheduler, "begin_index", None)
    if isinstance(begin_index, int):
        return begin_index
    if hasattr(scheduler, "step_index"):  # not stepped since set_timesteps, no begin index: the schedule's start
        return 0
    return _looked_up(scheduler, timesteps, timestep)


def _step_of_position(scheduler: Any, position: int, steps: int) -> int:
    """The step (of ``steps``) whose calls include the schedule entry ``position``."""
    if getattr(scheduler, "plms_timesteps", None) is not None:  # PNDM
        prk = getattr(scheduler, "prk_timesteps", None)
        runge_kutta = 0 if prk is None else len(prk)
        if runge_kutta:  # Runge-Kutta steps of `pndm_order` calls, then one call a step
            order = getattr(scheduler, "pndm_order", 4)
            step = position // order if position < runge_kutta else runge_kutta // order + position - runge_kutta
        else:  # skip_prk_steps: the first step is a pair of calls, then one call a step
            step = max(position - 1, 0)
    else:
        # `order` entries a step (Heun, KDPM2: 2N - 1 entries, the last step a single call): diffusers' own
        # convention (img2img starts at `t_start * scheduler.order`)
        step = position // max(int(getattr(scheduler, "order", 1) or 1), 1)
    return min(step, steps - 1)


def schedule_step(scheduler: Any, timestep: Any) -> tuple[int, int] | None:
    """``(k, N)``: the current call belongs to step ``k`` of the full schedule of ``N`` steps; None when the
    scheduler does not say (no schedule set, or a timestep it does not hold)."""
    timesteps = getattr(scheduler, "timesteps", None)
    if not isinstance(timesteps, torch.Tensor) or timesteps.numel() == 0:
        return None
    calls = len(timesteps)
    steps = getattr(scheduler, "num_inference_steps", None)
    if not isinstance(steps, int) or not 0 < steps <= calls:
        order = getattr(scheduler, "order", 1) or 1
        steps = -(-calls // order)
    position = _position(scheduler, timesteps, timestep)
    if position is None or not 0 <= position < calls:
        return None
    return _step_of_position(scheduler, position, steps), steps


def schedule_fraction(scheduler: Any, timestep: Any) -> float | None:
    """The fraction ``k / N`` of the full schedule done when the current call's step began (0: the noisiest)."""
    step = schedule_step(scheduler, timestep)
    return None if step is None else step[0] / step[1]


def _first_position(scheduler: Any, step: int) -> int:
    """The position in ``scheduler.timesteps`` of the first call of ``step`` (the inverse of ``_step_of_position``)."""
    if getattr(scheduler, "plms_timesteps", None) is not None:  # PNDM
        prk = getattr(scheduler, "prk_timesteps", None)
        runge_kutta = 0 if prk is None else len(prk)
        if runge_kutta:
            order = getattr(scheduler, "pndm_order", 4)
            prk_steps = runge_kutta // order
            return step * order if step < prk_steps else runge_kutta + step - prk_steps
        return 0 if step == 0 else step + 1
    return step * max(int(getattr(scheduler, "order", 1) or 1), 1)


def schedule_sigma(scheduler: Any, timestep: Any) -> float | None:
    """The noise level sigma of the step the current call belongs to, at that step's first call (so every call of
    one step sees the same value); None when the scheduler does not say."""
    step = schedule_step(scheduler, timestep)
    if step is None:
        return None
    position = _first_position(scheduler, step[0])
    sigmas = getattr(scheduler, "sigmas", None)
    if isinstance(sigmas, torch.Tensor) and position < sigmas.numel():
        return float(sigmas.reshape(-1)[position])
    alphas = getattr(scheduler, "alphas_cumprod", None)
    timesteps = scheduler.timesteps
    if not isinstance(alphas, torch.Tensor) or position >= len(timesteps):
        return None
    index = int(round(float(timesteps[position])))
    if not 0 <= index < alphas.numel():
        return None
    alpha = float(alphas[index])
    return math.sqrt((1.0 - alpha) / alpha) if alpha > 0.0 else math.inf
