"""Reliability: the noise-level bound ``min_sigma`` (NAG off at the steps whose sigma is below it).

A step's sigma is the scheduler's at the step's first call: ``scheduler.sigmas`` where it keeps them (Euler, DPM++,
Heun, flow matching), else ``sqrt((1 - a) / a)`` of the step's timestep in ``alphas_cumprod`` (DDIM, PNDM). The
expected sigmas below come from the scheduler's schedule and the number of calls each step makes, counted
independently of ``nag.schedule``. Batch 2 throughout.
"""

from __future__ import annotations

import math

import pytest
import tiny_pipelines as tp
import torch
from test_pipelines import NEGATIVE, PROMPTS, SETTINGS
from test_reliability_window import STEPS, _generate, calls_per_step, guided_pattern

import nag
from nag.settings import NAGSettings


def reliability(area: str, case: str, expect: str):
    return pytest.mark.reliability(area=area, case=case, expect=expect)


def step_sigmas(scheduler) -> list[float]:
    """Each step's sigma at its first call: the schedule entry after all earlier steps' calls."""
    sigmas = []
    entry = 0
    for calls in calls_per_step(scheduler):
        if hasattr(scheduler, "sigmas"):
            sigmas.append(float(scheduler.sigmas[entry]))
        else:
            a = float(scheduler.alphas_cumprod[int(scheduler.timesteps[entry])])
            sigmas.append(math.sqrt((1 - a) / a))
        entry += calls
    return sigmas


def expected(scheduler, min_sigma: float, start: float = 0.0, end: float = 1.0) -> str:
    """``G`` for each call of a step ``k`` with sigma >= ``min_sigma`` and ``start <= k / N < end``, else ``.``."""
    sigmas = step_sigmas(scheduler)
    return "".join(
        ("G" if sigmas[k] >= min_sigma and start <= k / STEPS < end else ".") * calls
        for k, calls in enumerate(calls_per_step(scheduler))
    )


def sd_with(cls: str):
    import diffusers

    pipe = tp.FACTORIES["sd"]()
    pipe.scheduler = getattr(diffusers, cls).from_config(pipe.scheduler.config)
    return pipe, lambda: tp.output_tensor(_generate(pipe))


def flux():
    pipe = tp.FACTORIES["flux"]()  # FlowMatchEulerDiscreteScheduler; no true CFG: one call a step

    def run():
        return tp.output_tensor(pipe(prompt=PROMPTS, generator=torch.Generator().manual_seed(0),
                                     **tp.no_cfg_kwargs("flux", num_inference_steps=STEPS)))

    return pipe, run


CASES = {
    "DDIMScheduler": lambda: sd_with("DDIMScheduler"),
    "EulerDiscreteScheduler": lambda: sd_with("EulerDiscreteScheduler"),
    "DPMSolverMultistepScheduler": lambda: sd_with("DPMSolverMultistepScheduler"),
    "HeunDiscreteScheduler": lambda: sd_with("HeunDiscreteScheduler"),
    "PNDMScheduler": lambda: sd_with("PNDMScheduler"),
    "FlowMatchEulerDiscreteScheduler-flux": flux,
}


@reliability("state", "min_sigma with DDIM, Euler, DPM++, Heun, PNDM (SD) and flow matching (Flux)",
             "the guided calls are exactly those of the steps whose sigma >= min_sigma; combined with [start, end)")
@pytest.mark.parametrize("case", list(CASES))
def test_guided_steps_are_those_at_or_above_min_sigma(case):
    pipe, run = CASES[case]()
    run()  # the scheduler's schedule for this generation
    sigmas = step_sigmas(pipe.scheduler)
    assert sigmas == sorted(sigmas, reverse=True) and len(set(sigmas)) == STEPS, sigmas
    between = (sigmas[1] + sigmas[2]) / 2
    for bound, window in [(between, {}), (sigmas[2], {}), (sigmas[3], dict(end=0.5)), (between, dict(start=0.25)),
                          (sigmas[0] * 2, {})]:
        want = expected(pipe.scheduler, bound, **window)
        assert guided_pattern(pipe, run, min_sigma=bound, **window) == want, (bound, window)
    assert expected(pipe.scheduler, between).strip(".") and "." in expected(pipe.scheduler, between)


@reliability("state", "min_sigma above every step's sigma", "bit-identical to the stock pipeline")
@pytest.mark.parametrize("case", ["DDIMScheduler", "FlowMatchEulerDiscreteScheduler-flux"])
def test_bound_above_every_sigma_is_stock(case):
    pipe, run = CASES[case]()
    reference = run()
    with nag.apply(pipe, NEGATIVE, **SETTINGS, min_sigma=1e6) as handle:
        assert torch.equal(run(), reference)
        assert handle.guided_calls == 0
        handle.update(min_sigma=0.0)  # no bound: every step guided again
        assert not torch.allclose(run(), reference, atol=1e-3)
        assert handle.guided_calls == STEPS


@reliability("bad input at handle.update", "min_sigma: negative, not finite, not a number",
             "ValueError naming min_sigma, at nag.apply and handle.update; update leaves "
             "the settings as they were")
@pytest.mark.parametrize("value", [-0.1, float("nan"), float("inf"), True, "1"])
def test_min_sigma_is_validated(value):
    with pytest.raises(ValueError, match="min_sigma"):
        NAGSettings(scale=2.0, tau=2.5, alpha=0.5, min_sigma=value)
    pipe, _ = sd_with("DDIMScheduler")
    with nag.apply(pipe, NEGATIVE, **SETTINGS, min_sigma=0.5) as handle:
        with pytest.raises(ValueError, match="min_sigma"):
            handle.update(min_sigma=value)
        assert handle.settings.min_sigma == 0.5
    with pytest.raises(ValueError, match="min_sigma"):
        nag.apply(pipe, NEGATIVE, min_sigma=value)
    assert not hasattr(pipe, "_nag_handle") and nag.apply(pipe, NEGATIVE).remove() is None
