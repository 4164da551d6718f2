"""Composition with what diffusers users attach to a pipeline.

For each feature: NAG's output with the feature equals NAG's output without it (exactly, or
within the feature's own numerical effect, measured on the stock pipeline), and removing NAG
leaves the feature working. Combinations that cannot work raise a clear error.
"""

from __future__ import annotations

import pytest
import tiny_pipelines as tp
import torch
from test_pipelines import NEGATIVE, SETTINGS, generate, state_of
from test_reliability_state import references

import nag


def reliability(case: str, expect: str):
    return pytest.mark.reliability(area="composition", case=case, expect=expect)


def fresh(name: str):
    """A new pipeline (features below change it for good)."""
    return tp.FACTORIES[name]()


def check_composes(pipe, name, enable, *, nag_first=False, tolerance=0.0, steps=2):
    """Run the standard composition check; returns a note on the measured differences.

    ``enable(pipe)`` turns the feature on. Checks: the feature working unchanged after NAG is
    removed; NAG still acting with the feature; for an exact feature (``tolerance >= 0``) the
    feature's effect on the stock output within ``tolerance`` and NAG's output moved by no more
    than that; for an approximation (``tolerance < 0``, a cache) NAG's output moved by less than
    the guidance itself plus the feature's own effect on the stock output.
    """
    kwargs = dict(num_inference_steps=steps)
    base = fresh(name)
    stock = generate(base, name, **kwargs)
    with nag.apply(base, NEGATIVE, **SETTINGS):
        guided = generate(base, name, **kwargs)

    if nag_first:
        handle = nag.apply(pipe, NEGATIVE, **SETTINGS)
        enable(pipe)
        guided_feature = generate(pipe, name, **kwargs)
        handle.remove()
        stock_feature = generate(pipe, name, **kwargs)
    else:
        enable(pipe)
        stock_feature = generate(pipe, name, **kwargs)
        with nag.apply(pipe, NEGATIVE, **SETTINGS) as handle:
            guided_feature = generate(pipe, name, **kwargs)
            assert handle.guided_calls >= steps
    after = generate(pipe, name, **kwargs)

    feature_effect = float((stock_feature - stock).abs().max())
    nag_difference = float((guided_feature - guided).abs().max())
    nag_effect = float((guided - stock).abs().max())
    guidance_with_feature = float((guided_feature - stock_feature).abs().max())
    assert torch.isfinite(guided_feature).all()
    assert torch.equal(after, stock_feature), "the feature changed after NAG was removed"
    assert guidance_with_feature > 0.25 * nag_effect, "NAG lost its effect with the feature"
    if tolerance >= 0:  # a feature meant to be exact: NAG's output moves by its rounding at most
        assert feature_effect <= tolerance + 1e-6, feature_effect
        assert nag_difference <= 3 * feature_effect + max(tolerance, 1e-6), (nag_difference, feature_effect)
    else:  # an approximation (a cache): it may move NAG's output, but by less than the guidance itself
        assert nag_difference < nag_effect + feature_effect, (nag_difference, nag_effect, feature_effect)
    return (f"NAG+feature vs NAG {nag_difference:.1e}; the feature's own effect on the stock output "
            f"{feature_effect:.1e}; NAG's effect {nag_effect:.1e}")


# ---------------------------------------------------------------------------------------------
# offloading
# ---------------------------------------------------------------------------------------------


@reliability("enable_model_cpu_offload (accelerate hooks; onload device = cpu here)",
             "identical output; hooks keep working after removal; either order")
@pytest.mark.parametrize("name", ["sd", "flux"])
@pytest.mark.parametrize("nag_first", [False, True], ids=["feature-then-nag", "nag-then-feature"])
def test_model_cpu_offload(name, nag_first, record_property):
    pipe = fresh(name)
    record_property("observed", check_composes(pipe, name, lambda p: p.enable_model_cpu_offload(device="cpu"),
                                               nag_first=nag_first))
    assert hasattr(tp.denoiser(pipe), "_hf_hook")  # accelerate's offload hook is still installed


@reliability("enable_sequential_cpu_offload", "identical output (needs an accelerator)")
@pytest.mark.parametrize("name", ["sd"])
def test_sequential_cpu_offload(name, record_property):
    probe = fresh(name)
    try:
        probe.enable_sequential_cpu_offload(device="cpu")
        generate(probe, name)
    except Exception as error:  # noqa: BLE001 - the stock pipeline itself cannot run this here
        pytest.skip(f"stock diffusers cannot run it on this CPU-only machine ({type(error).__name__}: "
                    f"{str(error).splitlines()[0][:90]})")
    record_property(
        "observed", check_composes(fresh(name), name, lambda p: p.enable_sequential_cpu_offload(device="cpu"))
    )


@reliability(
    "group offloading (enable_group_offload, onload and offload device = cpu)",
    "identical output; offloading keeps working after removal; either order",
)
@pytest.mark.parametrize("name", ["sd", "flux", "wan"])
@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
@pytest.mark.parametrize("nag_first", [False, True], ids=["feature-then-nag", "nag-then-feature"])
def test_group_offloading(name, offload_type, nag_first, record_property):
    cpu = torch.device("cpu")

    def enable(p):
        extra = {"num_blocks_per_group": 1} if offload_type == "block_level" else {}
        tp.denoiser(p).enable_group_offload(onload_device=cpu, offload_device=cpu, offload_type=offload_type, **extra)

    pipe = fresh(name)
    record_property("observed", check_composes(pipe, name, enable, nag_first=nag_first))
    assert any(getattr(m, "_diffusers_hook", None) is not None for m in tp.denoiser(pipe).modules())


@reliability(
    "layerwise casting (enable_layerwise_casting: weights stored in float8_e4m3fn, computed in float32)",
    "runs; NAG still guides; NAG's output moves by less than the guidance itself plus the storage's own effect on "
    "the stock output; the casting works unchanged after removal; either order",
)
@pytest.mark.parametrize("name", ["sd", "flux", "wan"])
@pytest.mark.parametrize("nag_first", [False, True], ids=["feature-then-nag", "nag-then-feature"])
def test_layerwise_casting(name, nag_first, record_property):
    def enable(p):
        tp.denoiser(p).enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)

    pipe = fresh(name)
    record_property("observed", check_composes(pipe, name, enable, nag_first=nag_first, tolerance=-1))
    assert any(p.dtype == torch.float8_e4m3fn for p in tp.denoiser(pipe).parameters())


# ---------------------------------------------------------------------------------------------
# LoRA
# ---------------------------------------------------------------------------------------------

_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def _save_random_lora(name: str, directory) -> None:
    """A small LoRA with non-zero weights for the denoiser's attention projections, saved the
    way diffusers' training scripts save one."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    donor = fresh(name)
    model = tp.denoiser(donor)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=_LORA_TARGETS, init_lora_weights=False))
        for parameter_name, parameter in model.named_parameters():
            if "lora_" in parameter_name:
                parameter.data.normal_(0.0, 0.2)
    layers = get_peft_model_state_dict(model)
    if name == "flux":
        type(donor).save_lora_weights(directory, transformer_lora_layers=layers)
    else:
        type(donor).save_lora_weights(directory, unet_lora_layers=layers)


def _lora_scale_kwargs(name: str, scale: float) -> dict:
    return (
        {"joint_attention_kwargs": {"scale": scale}} if name == "flux" else {"cross_attention_kwargs": {"scale": scale}}
    )


@reliability(
    "LoRA (load_lora_weights), unfused, fused, with a LoRA scale, loaded or unloaded while NAG is applied",
    "NAG with the LoRA equals NAG on the LoRA-merged weights; the LoRA works unchanged after removal",
)
@pytest.mark.parametrize("name", ["sd", "flux"])
def test_lora(name, tmp_path):
    _save_random_lora(name, tmp_path)
    pipe = fresh(name)
    _, guided_without = references(name)

    pipe.load_lora_weights(tmp_path)
    stock_lora = generate(pipe, name)
    assert (stock_lora - references(name)[0]).abs().max() > 1e-3  # the LoRA acts
    with nag.apply(pipe, NEGATIVE, **SETTINGS):
        unfused = generate(pipe, name)
        half = generate(pipe, name, **_lora_scale_kwargs(name, 0.5))
    assert (unfused - guided_without).abs().max() > 1e-3
    assert (half - unfused).abs().max() > 1e-4  # the LoRA scale reaches the guided model
    assert torch.equal(generate(pipe, name), stock_lora)  # LoRA intact after removal

    pipe.fuse_lora()
    with nag.apply(pipe, NEGATIVE, **SETTINGS):
        fused = generate(pipe, name)
    torch.testing.assert_close(fused, unfused, rtol=0, atol=2e-5)
    pipe.unfuse_lora()

    with nag.apply(pipe, NEGATIVE, **SETTINGS):  # unloading and loading while NAG is applied
        pipe.unload_lora_weights()
        torch.testing.assert_close(generate(pipe, name), guided_without, rtol=0, atol=1e-6)
        pipe.load_lora_weights(tmp_path)
        torch.testing.assert_close(generate(pipe, name), unfused, rtol=0, atol=1e-5)
    # (fuse + unfuse leaves the base weights off by rounding: the LoRA's own effect, not NAG's)
    torch.testing.assert_close(generate(pipe, name), stock_lora, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# diffusers' caching hooks
# ---------------------------------------------------------------------------------------------


def _caches():
    from diffusers.hooks import (
        FasterCacheConfig,
        FirstBlockCacheConfig,
        MagCacheConfig,
        PyramidAttentionBroadcastConfig,
        SeaCacheConfig,
        TaylorSeerCacheConfig,
        apply_faster_cache,
        apply_first_block_cache,
        apply_mag_cache,
        apply_pyramid_attention_broadcast,
        apply_sea_cache,
        apply_taylorseer_cache,
    )

    steps = 6
    timestep = lambda p: lambda: p._current_timestep  # noqa: E731
    return steps, {
        "first-block cache, threshold 0 (never reuses)": lambda p: apply_first_block_cache(
            tp.denoiser(p), FirstBlockCacheConfig(threshold=0.0)
        ),
        "first-block cache, threshold 10 (reuses after the first step)": lambda p: apply_first_block_cache(
            tp.denoiser(p), FirstBlockCacheConfig(threshold=10.0)
        ),
        "pyramid attention broadcast (self-attention every 2nd block)": lambda p: apply_pyramid_attention_broadcast(
            tp.denoiser(p),
            PyramidAttentionBroadcastConfig(
                spatial_attention_block_skip_range=2,
                spatial_attention_timestep_skip_range=(-1, 1001),
                current_timestep_callback=timestep(p),
            ),
        ),
        "pyramid attention broadcast (cross-attention every 2nd block)": lambda p: apply_pyramid_attention_broadcast(
            tp.denoiser(p),
            PyramidAttentionBroadcastConfig(
                cross_attention_block_skip_range=2,
                cross_attention_timestep_skip_range=(-1, 1001),
                current_timestep_callback=timestep(p),
            ),
        ),
        "TaylorSeer cache (active from step 2)": lambda p: apply_taylorseer_cache(
            tp.denoiser(p), TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1, max_order=1)
        ),
        "MagCache (given ratios)": lambda p: apply_mag_cache(
            tp.denoiser(p),
            MagCacheConfig(num_inference_steps=steps, mag_ratios=[1.0] * steps, threshold=1.0, retention_ratio=0.0),
        ),
        "SeaCache": lambda p: apply_sea_cache(tp.denoiser(p), SeaCacheConfig()),
        "FasterCache": lambda p: apply_faster_cache(
            tp.denoiser(p), FasterCacheConfig(current_timestep_callback=timestep(p))
        ),
    }


CACHE_STEPS, CACHES = _caches()
# (pipeline, cache) -> expected: "exact", "effect" (within the cache's own effect) or "refused"
CACHE_CASES = {
    ("wan", "first-block cache, threshold 0 (never reuses)"): "exact",
    ("wan", "first-block cache, threshold 10 (reuses after the first step)"): "effect",
    ("wan", "pyramid attention broadcast (self-attention every 2nd block)"): "effect",
    ("wan", "pyramid attention broadcast (cross-attention every 2nd block)"): "effect",
    ("wan", "TaylorSeer cache (active from step 2)"): "effect",
    ("wan", "MagCache (given ratios)"): "effect",
    ("wan", "SeaCache"): "effect",
    ("wan", "FasterCache"): "refused",
    ("flux", "first-block cache, threshold 0 (never reuses)"): "refused",
    ("flux", "pyramid attention broadcast (self-attention every 2nd block)"): "refused",
    ("flux", "TaylorSeer cache (active from step 2)"): "refused",
    ("flux", "MagCache (given ratios)"): "refused",
    ("flux", "SeaCache"): "effect",
}
_EXPECT = {
    "exact": "identical output; the cache works unchanged after removal",
    "effect": "runs; NAG still guides; NAG's output moves by less than the guidance itself plus the cache's own "
    "effect on the stock output (skipped steps are approximated from guided ones); the cache works "
    "unchanged after removal",
    "refused": "NotImplementedError at nag.apply (and at the next generation if enabled later) naming the "
    "feature and how to turn it off",
}


@pytest.mark.parametrize(
    "name, cache, expected",
    [
        pytest.param(
            n,
            c,
            e,
            id=f"{n}-{c.split(' (')[0]}-{e}",
            marks=pytest.mark.reliability(
                area="composition", case=f"diffusers cache hook: {c} ({n})", expect=_EXPECT[e]
            ),
        )
        for (n, c), e in CACHE_CASES.items()
    ],
)
def test_cache_hooks(name, cache, expected, record_property):
    enable = CACHES[cache]
    if expected == "refused":
        pipe = fresh(name)
        enable(pipe)
        before = state_of(pipe)
        with pytest.raises(NotImplementedError, match=r"cannot run together.*disable_cache\(\)") as info:
            nag.apply(pipe, NEGATIVE, **SETTINGS)
        assert state_of(pipe) == before
        record_property("observed", f"{type(info.value).__name__}: {info.value}")
        later = fresh(name)  # enabled after nag.apply: refused when the generation starts
        with nag.apply(later, NEGATIVE, **SETTINGS):
            enable(later)
            with pytest.raises(NotImplementedError, match="cannot run together"):
                generate(later, name, num_inference_steps=CACHE_STEPS)
        return
    note = check_composes(fresh(name), name, enable, steps=CACHE_STEPS, tolerance=0.0 if expected == "exact" else -1)
    record_property("observed", note)


# ---------------------------------------------------------------------------------------------
# attention backends
# ---------------------------------------------------------------------------------------------

CPU_BACKENDS = ["native", "_native_math", "_native_flash", "flex"]
ACCELERATOR_BACKENDS = ["_native_efficient", "_native_cudnn", "flash", "sage", "xformers"]


@pytest.fixture
def global_attention_backend():
    """diffusers' ``model.set_attention_backend`` also sets the process-wide default backend
    (``_AttentionBackendRegistry``), which would leak into every later test: restore it."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    saved = _AttentionBackendRegistry._active_backend
    yield
    _AttentionBackendRegistry.set_active_backend(saved)


@reliability(
    "attention backend chosen with set_attention_backend",
    "same output as NAG on the default backend (to 1e-5); the backend stays set after removal",
)
@pytest.mark.parametrize("name", ["flux", "wan"])
@pytest.mark.parametrize("backend", CPU_BACKENDS + ACCELERATOR_BACKENDS)
@pytest.mark.filterwarnings("ignore")
@pytest.mark.usefixtures("global_attention_backend")
def test_attention_backend(name, backend, record_property):
    if backend in ACCELERATOR_BACKENDS:
        pytest.skip(f"the {backend!r} backend needs a GPU (or a package built for one)")
    pipe = fresh(name)
    model = tp.denoiser(pipe)
    model.set_attention_backend(backend)
    note = check_composes(pipe, name, lambda p: None, tolerance=1e-5)
    backends = {getattr(m.processor, "_attention_backend", None) for m in model.modules() if hasattr(m, "processor")}
    assert any(str(b).endswith(backend) or getattr(b, "value", None) == backend for b in backends if b is not None)
    record_property("observed", note)


@reliability(
    "Wan (its cross-attention dispatches) on another backend chosen with set_attention_backend",
    "the cross-attention fast path runs on that backend (no straightforward call), equal to the straightforward "
    "path's output to 1e-5",
)
@pytest.mark.parametrize("backend", ["_native_math", "flex"])
@pytest.mark.usefixtures("global_attention_backend")
@pytest.mark.filterwarnings("ignore")
def test_cross_fast_path_on_a_chosen_backend(backend, monkeypatch):
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    from nag.attention.cross import CrossAttentionNAG

    straightforward_calls, backend_calls, inside = [], [], []
    original_guided = CrossAttentionNAG.guided

    def counting_guided(self, *args, **kwargs):
        straightforward_calls.append(1)
        return original_guided(self, *args, **kwargs)

    chosen = AttentionBackendName(backend)
    original_backend = _AttentionBackendRegistry._backends[chosen]

    def counting_backend(*args, **kwargs):
        if inside:  # (attention computed inside a text cross-attention module, the ones NAG wraps)
            backend_calls.append(1)
        return original_backend(*args, **kwargs)

    pipe = fresh("wan")
    tp.denoiser(pipe).set_attention_backend(backend)
    for module_name, module in tp.denoiser(pipe).named_modules():
        if module_name.endswith("attn2"):
            module.register_forward_pre_hook(lambda *a: inside.append(1))
            module.register_forward_hook(lambda *a: inside.clear())
    outputs = {}
    for fast in (False, True):
        with monkeypatch.context() as patch:
            patch.setattr(CrossAttentionNAG, "guided", counting_guided)
            patch.setitem(_AttentionBackendRegistry._backends, chosen, counting_backend)
            straightforward_calls.clear()
            backend_calls.clear()
            with nag.apply(pipe, NEGATIVE, **SETTINGS, fast=fast):
                outputs[fast] = generate(pipe, "wan", cfg=False)
            calls = len(straightforward_calls)
        assert (calls == 0) if fast else (calls > 0)
        assert backend_calls  # (NAG's cross-attention ran on the chosen backend)
    torch.testing.assert_close(outputs[True], outputs[False], rtol=1e-5, atol=1e-5)


def _calls_on_process_wide_backend(name: str, monkeypatch, guided: bool) -> int:
    """Text-attention calls that reach the backend chosen with diffusers' ``attention_backend(...)``
    during a generation without CFG (every denoiser call guided when ``guided``)."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry, attention_backend

    chosen = AttentionBackendName._NATIVE_MATH
    original = _AttentionBackendRegistry._backends[chosen]
    calls, inside = [], []

    def counting(*args, **kwargs):
        if inside:  # only attention computed inside a text-attention module (the ones NAG wraps)
            calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setitem(_AttentionBackendRegistry._backends, chosen, counting)
    pipe = fresh(name)
    for module_name, module in tp.denoiser(pipe).named_modules():
        if module_name.endswith(("attn2", ".attn")):
            module.register_forward_pre_hook(lambda *a: inside.append(1))
            module.register_forward_hook(lambda *a: inside.clear())
    with attention_backend(chosen.value):
        if guided:
            with nag.apply(pipe, NEGATIVE, **SETTINGS) as handle:
                generate(pipe, name, cfg=False)
                assert handle.guided_calls == 2
        else:
            generate(pipe, name, cfg=False)
    return len(calls)


@pytest.mark.parametrize("name", ["flux", "wan"])
@pytest.mark.usefixtures("global_attention_backend")
@pytest.mark.filterwarnings("ignore")
def test_stock_follows_the_process_wide_attention_backend(name, monkeypatch):
    """The premise of the next test: diffusers' own processors honour the process-wide backend."""
    assert _calls_on_process_wide_backend(name, monkeypatch, guided=False) > 0


@reliability(
    "attention backend chosen process-wide (diffusers' attention_backend(...) context)",
    "NAG's attention runs on the chosen backend too",
)
@pytest.mark.parametrize("name", ["flux", "wan"])
@pytest.mark.usefixtures("global_attention_backend")
@pytest.mark.filterwarnings("ignore")
def test_process_wide_attention_backend(name, monkeypatch):
    assert _calls_on_process_wide_backend(name, monkeypatch, guided=True) > 0


# ---------------------------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------------------------


@reliability(
    "torch.compile'd denoiser: pipe.transformer = torch.compile(...), used before and after nag.apply "
    "(dynamo, eager backend)",
    "same output as eager NAG; the compiled model works after removal",
)
@pytest.mark.filterwarnings("ignore")
def test_compiled_denoiser_wrapper(record_property):
    torch._dynamo.reset()
    name = "wan"
    pipe = fresh(name)
    stock, guided = generate(pipe, name), None
    with nag.apply(pipe, NEGATIVE, **SETTINGS):
        guided = generate(pipe, name)
    pipe.transformer = torch.compile(pipe.transformer, backend="eager")
    torch.testing.assert_close(generate(pipe, name), stock, rtol=0, atol=1e-6)  # compiled without NAG first
    with nag.apply(pipe, NEGATIVE, **SETTINGS) as handle:
        compiled = generate(pipe, name)
        assert handle.guided_calls == 2
    torch.testing.assert_close(compiled, guided, rtol=0, atol=1e-6)
    torch.testing.assert_close(generate(pipe, name), stock, rtol=0, atol=1e-6)
    torch._dynamo.reset()
    record_property("observed", f"compiled NAG vs eager NAG {float((compiled - guided).abs().max()):.1e}")


@reliability(
    "torch.compile'd denoiser under inductor, the default compiler (C++ on the CPU), fast and fast=False (flux)",
    "same output as eager NAG",
)
@pytest.mark.parametrize("fast", [True, False], ids=["fast", "fast=False"])
@pytest.mark.filterwarnings("ignore")
def test_compiled_denoiser_inductor(fast, record_property):
    """(One prompt: with fast=False this batch once stopped inductor's code generation, a KeyError in its loop fusion
    from writing the combined rows through a row-index tensor; the guided rows are written through a slice.)"""
    torch._dynamo.reset()
    name = "flux"
    pipe = fresh(name)
    with nag.apply(pipe, NEGATIVE, fast=fast, **SETTINGS):
        guided = generate(pipe, name, cfg=False, prompts=["a red circle on a blue background"])
    pipe.transformer = torch.compile(pipe.transformer)
    with nag.apply(pipe, NEGATIVE, fast=fast, **SETTINGS):
        compiled = generate(pipe, name, cfg=False, prompts=["a red circle on a blue background"])
    torch.testing.assert_close(compiled, guided, rtol=0, atol=1e-5)
    torch._dynamo.reset()
    record_property("observed", f"compiled NAG vs eager NAG {float((compiled - guided).abs().max()):.1e}")


@reliability(
    "diffusers' regional compilation with fullgraph=True: compile_repeated_blocks(fullgraph=True), each repeated "
    "block one graph with no graph break allowed; fast and fast=False",
    "NAG runs inside the graphs: same output as eager NAG",
)
@pytest.mark.parametrize("fast", [True, False], ids=["fast", "fast=False"])
@pytest.mark.parametrize(
    "name", ["sdxl", "flux", "wan", "flux2", "ltx2", "qwenimage", "hunyuanvideo", "chroma", "zimage"]
)
@pytest.mark.filterwarnings("ignore")
def test_regional_compilation_with_fullgraph(name, fast, record_property):
    """Inside those graphs the wrappers read the guided call's rows as plain data, nothing reads a tensor's values to
    choose a path (the cross-attention negative keys are kept whole, a text mask is applied by the explicit math,
    Chroma's masked blocks take the straightforward path), and the straightforward path's stand-ins for the attention
    module are read through their ``__dict__``."""
    torch._dynamo.reset()
    pipe = {**tp.FACTORIES, **tp.FAMILY_FACTORIES}[name]()
    with nag.apply(pipe, NEGATIVE, fast=fast, **SETTINGS):
        guided = generate(pipe, name, cfg=False)
    (pipe.unet if name == "sdxl" else pipe.transformer).compile_repeated_blocks(fullgraph=True, backend="aot_eager")
    with nag.apply(pipe, NEGATIVE, fast=fast, **SETTINGS):
        compiled = generate(pipe, name, cfg=False)
    torch.testing.assert_close(compiled, guided, rtol=0, atol=1e-5)
    torch._dynamo.reset()
    record_property("observed", f"compiled NAG vs eager NAG {float((compiled - guided).abs().max()):.1e}")
