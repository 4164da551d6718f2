"""State: several pipelines, threads, faults at every step of a generation, saving, determinism.

After any fault the pipeline must be exactly as before ``nag.apply`` once NAG is removed, and a
handle that saw a fault must guide the next generation exactly like a fresh one.
"""

from __future__ import annotations

import filecmp
import os
import threading
from functools import cache

import pytest
import tiny_pipelines as tp
import torch
from test_pipelines import NAMES, NEGATIVE, SETTINGS, generate, pipeline, state_of

import nag


def reliability(area: str, case: str, expect: str):
    return pytest.mark.reliability(area=area, case=case, expect=expect)


@cache
def references(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(stock output, NAG output) of the shared tiny pipeline, CFG on."""
    pipe = pipeline(name)
    stock = generate(pipe, name)
    with nag.apply(pipe, NEGATIVE, **SETTINGS):
        guided = generate(pipe, name)
    return stock, guided


class SimulatedFault(Exception):
    """What a hook raises to stand for an out-of-memory error or a user abort."""


# ---------------------------------------------------------------------------------------------
# faults at every step
# ---------------------------------------------------------------------------------------------

FAULT_PIPELINES = ["sd", "flux", "wan"]  # cross attention + batched CFG; joint attention + sequential CFG; video
# (text-encoder calls, denoiser calls) of one guided generation with CFG: positive, CFG negative and
# NAG's negative prompt; one batched call per step (sd) or a conditional and an unconditional one.
CALL_COUNTS = {"sd": (3, 2), "flux": (3, 4), "wan": (3, 4)}


def _count_calls(module: torch.nn.Module, run) -> int:
    calls = []
    handle = module.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        run()
    finally:
        handle.remove()
    return len(calls)


def _fault_points(name: str) -> list[str]:
    text, denoiser = CALL_COUNTS[name]
    return (
        ["text encoder (positive prompt)", f"text encoder (NAG's negative prompt, call {text})"]
        + [f"denoiser call {k + 1} of {denoiser}" for k in range(denoiser)]
        + ["text attention inside a guided call", "callback_on_step_end, step 1", "callback_on_step_end, step 2",
           "VAE decode"]
    )


FAULTS = [(name, point) for name in FAULT_PIPELINES for point in _fault_points(name)]


@pytest.mark.parametrize("name", FAULT_PIPELINES)
def test_fault_points_cover_every_call(name):
    """The fault list above reaches every text-encoder and denoiser call of a guided generation."""
    pipe = pipeline(name)
    with nag.apply(pipe, NEGATIVE, **SETTINGS):
        text = _count_calls(pipe.text_encoder, lambda: generate(pipe, name))
        denoiser = _count_calls(tp.denoiser(pipe), lambda: generate(pipe, name))
    assert (text, denoiser) == CALL_COUNTS[name]


class _Undo:
    def __init__(self, undo):
        self.remove = undo


def _inject(pipe, name: str, point: str, exception: BaseException):
    """Arrange for ``exception`` at ``point``; returns (extra call kwargs, cleanup)."""
    handles = []
    counter = [0]

    def raise_on(call_number):
        def hook(*args):
            counter[0] += 1
            if counter[0] == call_number:
                raise exception

        return hook

    extra = {}
    if point.startswith("text encoder"):
        number = 1 if "positive" in point else int(point.rsplit(" ", 1)[1].rstrip(")"))
        handles.append(pipe.text_encoder.register_forward_pre_hook(raise_on(number)))
    elif point.startswith("denoiser call"):
        handles.append(tp.denoiser(pipe).register_forward_pre_hook(raise_on(int(point.split()[2]))))
    elif point.startswith("text attention"):
        model = tp.denoiser(pipe)
        module = next(m for n, m in model.named_modules() if n.endswith("attn2") or n.endswith(".attn"))
        handles.append(module.register_forward_pre_hook(raise_on(1)))
    elif point.startswith("callback"):
        step = int(point.rsplit(" ", 1)[1]) - 1

        def callback(pipe_, i, t, kwargs):
            if i == step:
                raise exception
            return kwargs

        extra["callback_on_step_end"] = callback
    elif point == "VAE decode":

        def decode(*args, **kwargs):
            raise exception

        pipe.vae.decode = decode  # an instance attribute over the method; deleted by the cleanup
        handles.append(_Undo(lambda: delattr(pipe.vae, "decode")))
    return extra, lambda: [h.remove() for h in handles]


@pytest.mark.parametrize(
    "name, point",
    [pytest.param(n, p, id=f"{n}-{p}", marks=reliability("fault during a generation", p,
     "the error propagates; the same handle then guides exactly like a fresh one; removal (also by leaving "
     "`with`) restores the stock pipeline bit for bit")) for n, p in FAULTS],
)
def test_fault_at_any_step(name, point):
    pipe = pipeline(name)
    stock, guided = references(name)
    before = state_of(pipe)

    # 1. inside `with`: leaving the block removes NAG even though the generation raised
    extra, cleanup = _inject(pipe, name, point, torch.OutOfMemoryError("simulated out of memory"))
    try:
        with pytest.raises(torch.OutOfMemoryError, match="simulated"):
            with nag.apply(pipe, NEGATIVE, **SETTINGS):
                generate(pipe, name, **extra)
    finally:
        cleanup()
    assert state_of(pipe) == before

    # 2. a handle kept across the fault: the next generation is exactly the clean guided one
    handle = nag.apply(pipe, NEGATIVE, **SETTINGS)
    try:
        extra, cleanup = _inject(pipe, name, point, SimulatedFault("user abort"))
        try:
            with pytest.raises(SimulatedFault):
                generate(pipe, name, **extra)
        finally:
            cleanup()
        assert torch.equal(generate(pipe, name), guided)
    finally:
        handle.remove()
    assert state_of(pipe) == before
    assert torch.equal(generate(pipe, name), stock)


@reliability("fault during a generation", "KeyboardInterrupt (Ctrl-C) in callback_on_step_end",
             "propagates; leaving `with` restores the stock pipeline")
def test_keyboard_interrupt_in_a_callback():
    pipe = pipeline("sd")
    stock, _ = references("sd")
    before = state_of(pipe)

    def callback(pipe_, i, t, kwargs):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        with nag.apply(pipe, NEGATIVE, **SETTINGS):
            generate(pipe, "sd", callback_on_step_end=callback)
    assert state_of(pipe) == before
    assert torch.equal(generate(pipe, "sd"), stock)


@reliability("fault during a generation", "pipe._interrupt = True from callback_on_step_end (diffusers' stop)",
             "the loop stops early without error; the next generation is the clean guided one")
@pytest.mark.parametrize("name", ["sd", "flux", "wan", "sana"])
@pytest.mark.parametrize("step", [0, 1])
def test_pipeline_interrupt(name, step):
    pipe = pipeline(name)
    _, guided = references(name)

    def callback(pipe_, i, t, kwargs):
        if i == step:
            pipe_._interrupt = True
        return kwargs

    with nag.apply(pipe, NEGATIVE, **SETTINGS) as handle:
        out = generate(pipe, name, callback_on_step_end=callback)
        assert torch.isfinite(out).all()
        assert handle.guided_calls == step + 1  # one guided denoiser call per step until the stop
        assert torch.equal(generate(pipe, name), guided)


# ---------------------------------------------------------------------------------------------
# several pipelines, threads
# ---------------------------------------------------------------------------------------------

OTHER = dict(negative="watermark text, deformed", scale=5.0, tau=2.0, alpha=0.25, end=0.5)


def _other_settings():
    return {k: v for k, v in OTHER.items() if k != "negative"}


@reliability("state", "two pipelines in one process with different NAG settings, used alternately",
             "each gives exactly what it gives alone")
@pytest.mark.parametrize("name", ["sd", "flux"])
def test_two_pipelines_with_different_settings(name):
    first, second = pipeline(name), tp.FACTORIES[name]()
    _, alone_first = references(name)
    with nag.apply(second, OTHER["negative"], **_other_settings()):
        alone_second = generate(second, name)
    assert not torch.equal(alone_first, alone_second)
    with nag.apply(first, NEGATIVE, **SETTINGS), nag.apply(second, OTHER["negative"], **_other_settings()):
        outputs = [generate(first, name), generate(second, name), generate(first, name), generate(second, name)]
    assert torch.equal(outputs[0], alone_first) and torch.equal(outputs[2], alone_first)
    assert torch.equal(outputs[1], alone_second) and torch.equal(outputs[3], alone_second)


def _run_in_threads(jobs):
    """Run ``jobs`` (callables) in threads; returns their results, re-raising the first error."""
    results, errors = [None] * len(jobs), []

    def run(index):
        try:
            results[index] = jobs[index]()
        except BaseException as error:  # noqa: BLE001 - re-raised in the caller
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,), name=f"generator-{i}") for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    if errors:
        raise errors[0]
    return results


@reliability("state", "two threads generating at the same time on two pipelines with different settings",
             "each gives exactly what it gives alone")
@pytest.mark.parametrize("name", ["sd", "flux"])
def test_two_threads_on_two_pipelines(name):
    first, second = tp.FACTORIES[name](), tp.FACTORIES[name]()
    _, alone_first = references(name)
    with nag.apply(second, OTHER["negative"], **_other_settings()):
        alone_second = generate(second, name)
    meet = threading.Barrier(2, timeout=60)

    def at_first_step(pipe_, i, t, kwargs):  # both generations are inside their loops at once
        if i == 0:
            meet.wait()
        return kwargs

    with nag.apply(first, NEGATIVE, **SETTINGS), nag.apply(second, OTHER["negative"], **_other_settings()):
        out_first, out_second = _run_in_threads([
            lambda: generate(first, name, callback_on_step_end=at_first_step),
            lambda: generate(second, name, callback_on_step_end=at_first_step),
        ])
    assert torch.equal(out_first, alone_first)
    assert torch.equal(out_second, alone_second)


@reliability("state", "one pipeline used by two threads at the same time",
             "the second thread gets a RuntimeError saying to use one pipeline per thread; the first "
             "generation is unaffected; afterwards the second thread can generate")
def test_one_pipeline_two_threads(record_property):
    pipe = pipeline("sd")
    _, guided = references("sd")
    inside, release = threading.Event(), threading.Event()

    def hold_at_first_step(pipe_, i, t, kwargs):
        if i == 0:
            inside.set()
            assert release.wait(timeout=60)
        return kwargs

    def second_thread():
        assert inside.wait(timeout=60)
        try:
            generate(pipe, "sd")
        except RuntimeError as error:
            return error
        finally:
            release.set()
        return None

    with nag.apply(pipe, NEGATIVE, **SETTINGS):
        first_out, error = _run_in_threads([lambda: generate(pipe, "sd", callback_on_step_end=hold_at_first_step),
                                            second_thread])
        assert isinstance(error, RuntimeError) and "one generation at a time" in str(error)
        record_property("observed", f"RuntimeError: {error}")
        assert torch.equal(first_out, guided)
        (later,) = _run_in_threads([lambda: generate(pipe, "sd")])  # the pipeline is free again
        assert torch.equal(later, guided)


@reliability("state", "one pipeline handed from thread to thread (one generation at a time), including after a "
             "generation that failed", "works; no false alarm")
def test_one_pipeline_sequential_threads():
    pipe = pipeline("sd")
    _, guided = references("sd")

    def failing():
        with pytest.raises(SimulatedFault):
            generate(pipe, "sd", callback_on_step_end=lambda *a: (_ for _ in ()).throw(SimulatedFault()))

    with nag.apply(pipe, NEGATIVE, **SETTINGS):
        _run_in_threads([failing])
        (first,) = _run_in_threads([lambda: generate(pipe, "sd")])
        (second,) = _run_in_threads([lambda: generate(pipe, "sd")])
    assert torch.equal(first, guided) and torch.equal(second, guided)


# ---------------------------------------------------------------------------------------------
# saving, determinism
# ---------------------------------------------------------------------------------------------


def _same_files(left: str, right: str) -> list[str]:
    """Relative paths that differ between two directory trees (missing on one side included)."""
    differences = []
    for root, _, files in os.walk(left):
        for file in files:
            relative = os.path.relpath(os.path.join(root, file), left)
            other = os.path.join(right, relative)
            if not os.path.exists(other) or not filecmp.cmp(os.path.join(root, file), other, shallow=False):
                differences.append(relative)
    for root, _, files in os.walk(right):
        for file in files:
            relative = os.path.relpath(os.path.join(root, file), right)
            if not os.path.exists(os.path.join(left, relative)):
                differences.append(relative)
    return differences


@reliability("state", "save_pretrained after NAG was used and removed, and while it is applied",
             "byte-identical files to a never-guided pipeline")
@pytest.mark.parametrize("name", ["sd", "flux"])
def test_save_pretrained(name, tmp_path):
    never = tp.FACTORIES[name]()
    generate(never, name)  # used, never guided (a fast tokenizer saves the padding/truncation of its last call)
    never.save_pretrained(tmp_path / "never")
    used = tp.FACTORIES[name]()
    with nag.apply(used, NEGATIVE, **SETTINGS):
        generate(used, name)
        used.save_pretrained(tmp_path / "while")
    used.save_pretrained(tmp_path / "after")
    assert (tmp_path / "never" / "model_index.json").exists()
    assert _same_files(str(tmp_path / "never"), str(tmp_path / "after")) == []
    assert _same_files(str(tmp_path / "never"), str(tmp_path / "while")) == []


@reliability("state", "same seed twice, and after remove + apply again", "bit-identical outputs")
@pytest.mark.parametrize("name", NAMES)
def test_determinism(name):
    pipe = pipeline(name)
    _, guided = references(name)
    with nag.apply(pipe, NEGATIVE, **SETTINGS):
        first, second = generate(pipe, name), generate(pipe, name)
    assert torch.equal(first, guided) and torch.equal(second, guided)
