"""Reliability: the step window ``[start, end)`` on the full noise schedule, read from the scheduler (``nag.schedule``).

Every call of one step gets that step's decision, whatever the scheduler (Heun and KDPM2 make two calls a step, PNDM a
warm-up pair or four-call Runge-Kutta steps); img2img ``strength`` and SDXL's ``denoising_start``/``denoising_end``
count on the full schedule; extra calls of a step (SD3's skip-layer guidance) are not steps. Batch 2 throughout.
"""

from __future__ import annotations

import pytest
import tiny_pipelines as tp
import torch
from test_pipelines import NEGATIVE, PROMPTS, SETTINGS, pipeline, record_calls

import nag

STEPS = 4


def reliability(area: str, case: str, expect: str):
    return pytest.mark.reliability(area=area, case=case, expect=expect)


def calls_per_step(scheduler) -> list[int]:
    """How many denoiser calls each of the ``STEPS`` steps makes (CFG batched: one call per scheduler entry), from
    the schedulers' documented structure, independently of ``nag.schedule``."""
    name = type(scheduler).__name__
    if name == "PNDMScheduler":
        # skip_prk_steps: a warm-up pair (the first step taken twice), then one call a step; else three Runge-Kutta
        # steps of four calls, then one call
        return [2, 1, 1, 1] if scheduler.config.skip_prk_steps else [4, 4, 4, 1]
    if scheduler.order == 2:  # Heun, KDPM2: a predictor and a corrector call, the last step a single call
        return [2, 2, 2, 1]
    return [1] * STEPS


def expected(scheduler, start: float = 0.0, end: float = 1.0) -> str:
    """``G`` for each call of a step ``k`` with ``start <= k / N < end``, ``.`` for the others."""
    return "".join(
        ("G" if start <= k / STEPS < end else ".") * calls for k, calls in enumerate(calls_per_step(scheduler))
    )


def guided_pattern(pipe, run, **window) -> str:
    """Runs ``run()`` with NAG on ``pipe``: which denoiser calls were guided (``G``) or stock (``.``)."""
    flags: list[bool] = []
    with nag.apply(pipe, NEGATIVE, **SETTINGS, **window) as handle:
        # registered after NAG's own pre-hook (which comes first): sees whether the call was guided
        hook = tp.denoiser(pipe).register_forward_pre_hook(lambda *_: flags.append(handle.runtime.call is not None))
        try:
            run()
        finally:
            hook.remove()
        assert handle.guided_calls == sum(flags)
    return "".join("G" if flag else "." for flag in flags)


def _sd_schedulers():
    stock = pipeline("sd").scheduler
    params = []
    for cls in sorted(stock.compatibles, key=lambda c: c.__name__):
        variants = [{}, {"skip_prk_steps": True}] if cls.__name__ == "PNDMScheduler" else [{}]
        for extra in variants:
            case = cls.__name__ + ("-skip_prk_steps" if extra else "")
            params.append(pytest.param(cls, extra, id=case))
    return params


def _scheduler(cls, extra):
    base = pipeline("sd").scheduler
    try:
        return cls.from_config({**base.config, **extra})
    except ImportError as error:  # (LMS needs scipy, DPMSolverSDE torchsde)
        pytest.skip(f"{cls.__name__} needs a package that is not installed: {error}")


def _generate(pipe, **kwargs):
    return pipe(prompt=PROMPTS, num_inference_steps=STEPS, height=16, width=16, output_type="pt",
                generator=torch.Generator().manual_seed(0), **kwargs)


@reliability("state", "step window with every scheduler SD accepts (Heun, KDPM2: two calls a step; PNDM)",
             "every call of a step guided alike; [start, end) on the steps of the full schedule")
@pytest.mark.parametrize("cls, extra", _sd_schedulers())
def test_window_per_scheduler(cls, extra):
    pipe = tp.FACTORIES["sd"]()
    pipe.scheduler = scheduler = _scheduler(cls, extra)
    for window in (dict(end=0.5), dict(start=0.5), dict(start=0.25, end=0.75), dict()):
        assert guided_pattern(pipe, lambda: _generate(pipe), **window) == expected(scheduler, **window), window


@pytest.mark.parametrize("cls", ["HeunDiscreteScheduler", "PNDMScheduler"])
def test_calls_outside_the_window_are_stock(cls):
    """Heun's and PNDM's later steps, outside ``end=0.5``, are bit-identical to the stock model's calls."""
    import diffusers

    pipe = tp.FACTORIES["sd"]()
    pipe.scheduler = getattr(diffusers, cls).from_config(pipe.scheduler.config)
    model = pipe.unet
    with nag.apply(pipe, NEGATIVE, end=0.5, **SETTINGS) as handle:
        _, calls = record_calls(model, _generate, pipe)
        guided = handle.guided_calls
    stock_calls = len(calls) - guided
    assert 0 < guided and 0 < stock_calls
    with torch.no_grad():
        for call in calls[guided:]:
            out = model(**{**call["inputs"], "return_dict": False})[0]
            assert torch.equal(out, call["output"])


@reliability("state", "img2img strength 0.5 (DDIM, Heun): the skipped start counts",
             "end=0.5 guides no call, start=0.5 every call")
@pytest.mark.parametrize("cls", ["DDIMScheduler", "HeunDiscreteScheduler", "EulerDiscreteScheduler"])
def test_img2img_strength_counts_the_skipped_start(cls):
    import diffusers

    pipe = diffusers.StableDiffusionImg2ImgPipeline.from_pipe(tp.FACTORIES["sd"]())
    pipe.scheduler = getattr(diffusers, cls).from_config(pipe.scheduler.config)
    image = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))

    def run():
        _generate(pipe, image=image, strength=0.5)

    late = guided_pattern(pipe, run, start=0.5)
    assert late and set(late) == {"G"}  # the second half of the schedule: every call
    assert set(guided_pattern(pipe, run, end=0.5)) == {"."}
    assert guided_pattern(pipe, run, start=0.75) == "." * (len(late) - len(late) // 2) + "G" * (len(late) // 2)


@reliability("state", "SDXL base (denoising_end=0.5) + refiner (denoising_start=0.5) with one window",
             "the two split the window on the full schedule: end=0.5 guides the base only")
def test_base_and_refiner_split_one_window():
    import diffusers

    base = tp.FACTORIES["sdxl"]()
    refiner = diffusers.StableDiffusionXLImg2ImgPipeline.from_pipe(base)
    kwargs = dict(prompt=PROMPTS, num_inference_steps=STEPS, height=16, width=16)
    latents = []

    def run_base():
        latents.append(base(**kwargs, denoising_end=0.5, output_type="latent",
                            generator=torch.Generator().manual_seed(0)).images)

    def run_refiner():
        refiner(**kwargs, image=latents[-1], denoising_start=0.5, output_type="latent",
                generator=torch.Generator().manual_seed(0))

    assert guided_pattern(base, run_base, end=0.5) == "GG"
    assert guided_pattern(refiner, run_refiner, end=0.5) == ".."
    assert guided_pattern(base, run_base, start=0.5) == ".."
    assert guided_pattern(refiner, run_refiner, start=0.5) == "GG"
    assert guided_pattern(base, run_base, start=0.25, end=0.75) == ".G"
    assert guided_pattern(refiner, run_refiner, start=0.25, end=0.75) == "G."


@reliability("state", "SD3 skip-layer guidance (an extra denoiser call in a step)",
             "the extra call is not a step: every step inside the window is guided, the last one included")
def test_skip_layer_guidance_calls_are_not_steps():
    pipe = pipeline("sd3")
    slg = dict(skip_guidance_layers=[0], skip_layer_guidance_start=0.0, skip_layer_guidance_stop=1.0)
    kwargs = {**tp.call_kwargs("sd3", num_inference_steps=STEPS), **slg}
    steps: list[int] = []

    def run():
        def count(pipe_, i, t, callback_kwargs):
            steps.append(i)
            return {}

        pipe(prompt=PROMPTS, negative_prompt=["deformed"] * 2, generator=torch.Generator().manual_seed(0),
             callback_on_step_end=count, **kwargs)

    # steps 1..3 take a second (skip-layer) call after the CFG call
    full = guided_pattern(pipe, run)
    assert full == "G" + "GG" * 3
    assert guided_pattern(pipe, run, end=0.5) == "G" + "GG" + ".." * 2
    assert guided_pattern(pipe, run, start=0.75) == "." + ".." * 2 + "GG"
    assert len(steps) == 3 * STEPS


# ---------------------------------------------------------------------------------------------
# other people's hooks, shared denoisers, copies
# ---------------------------------------------------------------------------------------------


@reliability("composition", "a user's forward pre-hook (with_kwargs) on the denoiser reading keyword arguments",
             "it sees the keyword arguments as the pipeline passed them (the guided call's values)")
@pytest.mark.parametrize("name", ["sd", "flux", "wan"])
def test_user_pre_hook_sees_the_keyword_arguments(name):
    pipe = pipeline(name)
    model = tp.denoiser(pipe)
    seen: list[tuple[int, list[str]]] = []

    def user_hook(module, args, kwargs):
        seen.append((len(args), sorted(kwargs)))
        kwargs["encoder_hidden_states"]  # noqa: B018 (what a user's hook does: read an argument by name)

    stock: list[tuple[int, list[str]]] = []
    hook = model.register_forward_pre_hook(user_hook, with_kwargs=True)
    try:
        tp_generate(pipe, name)
        stock, seen[:] = list(seen), []
        with nag.apply(pipe, NEGATIVE, **SETTINGS) as handle:
            tp_generate(pipe, name)
            assert handle.guided_calls > 0
    finally:
        hook.remove()
    assert seen == stock  # same positional count and the same keyword names as the stock calls


def tp_generate(pipe, name):
    from test_pipelines import generate

    return generate(pipe, name)


@reliability("pipeline", "a second pipeline sharing the guided one's denoiser (from_pipe)",
             "the second generates stock (bit-identical); the guided one stays guided")
@pytest.mark.parametrize("embeds", [False, True], ids=["negative_prompt", "negative_embeds_after_a_generation"])
def test_sibling_sharing_the_denoiser_generates_stock(embeds):
    import diffusers

    pipe = tp.FACTORIES["sd"]()
    sibling = diffusers.StableDiffusionImg2ImgPipeline.from_pipe(pipe)
    image = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    stock_sibling = _generate(sibling, image=image, strength=0.75).images
    stock_pipe = _generate(pipe).images
    negative = (dict(negative_prompt_embeds=pipe.encode_prompt(NEGATIVE, "cpu", 1, False)[0]) if embeds
                else dict(negative_prompt=NEGATIVE))
    with nag.apply(pipe, **negative, **SETTINGS) as handle:
        guided = _generate(pipe).images
        assert handle.guided_calls == STEPS
        assert torch.equal(_generate(sibling, image=image, strength=0.75).images, stock_sibling)
        assert handle.guided_calls == STEPS  # (the sibling's calls are not counted as this pipeline's)
        assert torch.equal(_generate(pipe).images, guided)
    assert (guided - stock_pipe).abs().max() > 1e-4


@reliability("state", "copy.deepcopy(pipe) and torch.save(pipe.unet / transformer) while NAG is applied",
             "both work; the copy is stock (bit-identical to the stock pipeline); the original stays guided")
@pytest.mark.parametrize("name", ["sd", "flux", "sd3", "pixart_sigma"])
def test_deepcopy_and_save_while_applied(name, tmp_path):
    import copy

    from test_pipelines import generate

    pipe = tp.FACTORIES[name]()
    stock = generate(pipe, name)
    with nag.apply(pipe, NEGATIVE, **SETTINGS) as handle:
        guided = generate(pipe, name)
        twin = copy.deepcopy(pipe)
        model = tp.denoiser(pipe)
        torch.save(model, tmp_path / "model.pt")
        loaded = torch.load(tmp_path / "model.pt", weights_only=False)
        assert torch.equal(generate(twin, name), stock)  # the copy is stock
        assert handle.guided_calls > 0 and torch.equal(generate(pipe, name), guided)  # the original still guided
        assert not any(isinstance(getattr(m, "processor", None), nag.attention.NAGProcessor)
                       for m in list(tp.denoiser(twin).modules()) + list(loaded.modules()))
        with nag.apply(twin, NEGATIVE, **SETTINGS):  # the copy takes NAG of its own
            assert torch.equal(generate(twin, name), guided)
        assert torch.equal(generate(pipe, name), guided)
    assert torch.equal(generate(twin, name), stock)
    for method in ("check_inputs", "encode_prompt", "progress_bar"):  # the copy's own methods, not the original's
        assert getattr(twin, method).__self__ is twin
    tp.denoiser(pipe).load_state_dict(loaded.state_dict())  # the saved weights are the model's
