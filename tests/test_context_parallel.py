"""NAG under diffusers' context parallelism: two CPU processes (gloo) against the same NAG call in one process.

Each case runs the tiny denoiser on a classifier-free-guidance batch of 4 (2 unconditional, 2 conditional rows) in
float32; ``tests/context_parallel_worker.py`` holds the two processes and the CPU workarounds stock diffusers needs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
TOLERANCE = 1e-5

# family:mode:negative tokens (the prompt has 8):order (NAG applied before or after enable_parallelism)
CASES = [
    "wan:ulysses:5:after",
    "wan:ring:12:before",
    "flux:ulysses:4:after",
    "flux:ring:4:before",
    "flux:ulysses:12:before",
    "flux:ring:12:after",
    "flux:ring:8:after",
    "flux:ring:pipeline:after",  # nag.apply on the whole FluxPipeline, true CFG, 2 steps
    "flux:ulysses:5:after",  # refused: an odd negative length cannot be split in two
    "wan:ring:pipeline:after",  # nag.apply on the whole WanPipeline, CFG, 2 steps
    "ltx_unmasked:ulysses:4:after",  # LTX-Video called without text masks
    "ltx_unmasked:ring:12:before",
    "ltx_unmasked:ulysses:12:after",
    "ltx_unmasked:ring:4:after",
    "flux2:ulysses:8:after",  # FLUX.2: the negative at the prompt's length (its pipelines pad both to 512)
    "flux2:ring:8:before",
    "flux2_klein:ulysses:pipeline:after",  # nag.apply on the whole Flux2KleinPipeline, CFG (one call per branch)
    "flux:ring:12:straightforward",  # NAG's straightforward wrappers (fast=False)
    "flux2:ulysses:8:straightforward",
    "ltx_unmasked:ulysses:4:straightforward",
]
# Refused: FLUX.2 with a negative of another length; LTX-Video with its text mask (stock diffusers alone, no NAG,
# fails under Ulysses and differs from one process under ring)
REFUSED = [
    "flux2:ulysses:4:after",
    "flux2:ring:12:after",
    "ltx:ulysses:4:after",
    "ltx:ring:12:after",
    "ltx:ulysses:stock:after",
    "ltx:ring:stock:after",
]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("context_parallel") / "results.jsonl"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), *sys.path])}
    done = subprocess.run(
        [sys.executable, str(HERE / "context_parallel_worker.py"), str(out), *CASES, *REFUSED],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    return {line["case"]: line for line in lines}


@pytest.mark.parametrize("case", [c for c in CASES if not c.endswith(":5:after") or c.startswith("wan")])
def test_matches_one_process(results: dict[str, dict], case: str) -> None:
    result = results[case]
    assert "error" not in result, result["error"]
    assert result["max_abs_diff"] <= TOLERANCE, result
    assert result["nag_effect"] > 100 * TOLERANCE  # NAG changed the output: the comparison means something


# The wrappers whose straightforward path each family's guided calls would take without the fast paths.
FAST_UNDER_PARALLELISM = {
    "wan": ("cross",), "ltx_unmasked": ("cross",), "flux": ("joint", "single"), "flux2": ("joint", "single_fused"),
    "flux2_klein": ("joint", "single_fused"),
}  # fmt: skip


@pytest.mark.parametrize("case", [c for c in CASES if not c.endswith((":straightforward", ":5:after"))])
def test_fast_paths_run_under_parallelism(results: dict[str, dict], case: str) -> None:
    """Under context parallelism the fast paths serve every guided attention call (the cases above: exactly):
    Wan's cross-attention on each rank's own queries against the whole text; LTX-Video's cross-attention and the
    joint and single-stream attention of Flux and FLUX.2 inside diffusers' parallel attention, NAG's kernels
    returning the log-sum-exp the merge needs."""
    calls = results[case]["straightforward_calls"]
    wrappers = FAST_UNDER_PARALLELISM[case.split(":")[0]]
    assert all(calls[name] == 0 for name in wrappers), results[case]


@pytest.mark.parametrize("case", [c for c in CASES if c.endswith(":straightforward")])
def test_straightforward_wrappers_are_counted(results: dict[str, dict], case: str) -> None:
    """With ``fast=False`` the straightforward wrappers run (and are exact too): the count above can fail."""
    calls = results[case]["straightforward_calls"]
    assert all(calls[name] > 0 for name in FAST_UNDER_PARALLELISM[case.split(":")[0]]), results[case]


def test_odd_negative_length_is_refused_with_the_reason(results: dict[str, dict]) -> None:
    error = results["flux:ulysses:5:after"]["error"]
    assert "divisible by 2" in error and "max_sequence_length" in error


def test_text_mask_is_refused_and_stock_diffusers_cannot_run_it(results: dict[str, dict]) -> None:
    """LTX-Video's text mask, split by its plan: NAG refuses it with the reason, because stock diffusers alone
    fails on it under Ulysses and gives another output than one process under ring."""
    for case in ("ltx:ulysses:4:after", "ltx:ring:12:after"):
        error = results[case]["error"]
        assert "NotImplementedError" in error and "encoder_attention_mask" in error
    assert "RuntimeError" in results["ltx:ulysses:stock:after"]["error"]
    assert results["ltx:ring:stock:after"]["max_abs_diff"] > 1e-3


def test_flux2_negative_of_another_length_is_refused(results: dict[str, dict]) -> None:
    """FLUX.2's text positions count along the text and one table serves every row: shards of branches of other
    lengths would need other positions, so NAG refuses them and says what to change."""
    for case in ("flux2:ulysses:4:after", "flux2:ring:12:after"):
        error = results[case]["error"]
        assert "NotImplementedError" in error and "same text length" in error and "max_sequence_length" in error


def test_unverified_family_is_refused_at_attach_and_at_call() -> None:
    """Families not marked exact under context parallelism are refused, whether parallelism is on before NAG is
    applied or enabled after (then at the first guided call). A stand-in config: no process group needed."""
    import tiny_pipelines as tp

    import nag

    transformer = tp.FACTORIES["sd3"]().transformer
    negative = {"encoder_hidden_states": torch.randn(1, 4, 32), "pooled_projections": torch.randn(1, 32)}

    class Config:
        context_parallel_config = type("CP", (), {"ring_degree": 1, "ulysses_degree": 2})()

    transformer._parallel_config = Config()
    with pytest.raises(NotImplementedError, match="not exact for sd3 under context parallelism"):
        nag.apply_to_denoiser(transformer, negative, scale=3.0)
    assert all(
        not type(p).__name__.startswith(("JointAttentionNAG", "Fast")) for p in transformer.attn_processors.values()
    )
    transformer._parallel_config = None
    handle = nag.apply_to_denoiser(transformer, negative, scale=3.0)
    transformer._parallel_config = Config()
    inputs = dict(
        hidden_states=torch.randn(2, 4, 8, 8),
        encoder_hidden_states=torch.randn(2, 4, 32),
        pooled_projections=torch.randn(2, 32),
        timestep=torch.full((2,), 500.0),
    )
    with pytest.raises(NotImplementedError, match="not exact for sd3"):
        transformer(**inputs)
    handle.remove()
    transformer._parallel_config = None


@pytest.mark.parametrize(
    ("family", "reason"), [("qwenimage", "rotary table"), ("ltx2", "text mask"), ("sd3", "parallelism yet")]
)
def test_refusal_says_why_the_family_cannot_be_exact(family: str, reason: str) -> None:
    """Families that cannot be exact say what in the model's plan or in stock diffusers makes it so."""
    from nag.families import FAMILIES
    from nag.hooks.parallel import refusal

    model = torch.nn.Module()
    assert refusal(model, FAMILIES[family]) is None  # no parallelism: nothing to refuse
    model._parallel_config = type("Config", (), {"context_parallel_config": type("CP", (), {"ring_degree": 2})()})()
    message = refusal(model, FAMILIES[family])
    assert message is not None and reason in message and "without enable_parallelism" in message


def test_cli_parallel_needs_a_launcher_and_a_model_with_a_plan(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """``nag generate --parallel``: a clear error without torchrun, for an unknown mode, beside --prompts, and for
    a model whose denoiser has no context-parallel plan; nothing is written."""
    from typer.testing import CliRunner

    from nag.cli import app

    runner = CliRunner()
    out = tmp_path / "x.png"
    base = ["generate", "-p", "a cat", "--device", "cpu", "--steps", "1", "--out", str(out)]
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    alone = runner.invoke(app, [*base, "--parallel", "ulysses"])
    assert alone.exit_code == 1 and "torchrun --nproc_per_node" in alone.output
    unknown = runner.invoke(app, [*base, "--parallel", "sideways"])
    assert unknown.exit_code == 1 and "ulysses or ring" in unknown.output
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    both = runner.invoke(app, ["generate", "--prompts", str(prompts), "--parallel", "ring"])
    assert both.exit_code == 1 and "--prompts" in both.output
    monkeypatch.setenv("WORLD_SIZE", "2")
    no_plan = runner.invoke(app, [*base, "--parallel", "ring"])  # the built-in model: a UNet, no plan
    assert no_plan.exit_code == 1 and "no context-parallel plan" in no_plan.output
    assert not out.exists()


def test_fast_placement_stands_in_only_for_exact_backends() -> None:
    """Where the fast paths compute attention with NAG's kernels: on this process on the default backend only; under
    context parallelism, inside diffusers' parallel attention for the fast paths that can run there, on backends
    that compute exact softmax attention (never for SageAttention's quantized kernels), with gradients off. Masks are
    refused there."""
    from nag.attention.placement import ON_THIS_PROCESS, AttentionPlacement, fast_placement

    class Stock:
        _attention_backend = None
        _parallel_config = None

    stock = Stock()
    assert fast_placement(stock, under_parallelism=True) is ON_THIS_PROCESS
    stock._attention_backend = "flash"
    assert fast_placement(stock, under_parallelism=True) is None  # one process: the chosen backend's own kernels
    stock._parallel_config = config = object()
    for backend, under, placed in [("flash", True, True), ("_native_cudnn", True, True), (None, True, True),
                                   ("sage", True, False), ("native", False, False)]:  # fmt: skip
        stock._attention_backend = backend
        with torch.no_grad():
            placement = fast_placement(stock, under_parallelism=under)
        assert (placement is not None) == placed, backend
        if placed:
            assert placement.parallel_config is config
            with torch.enable_grad():  # (NAG's op inside the parallel attention has no backward)
                assert fast_placement(stock, under_parallelism=under) is None
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(RuntimeError, match="takes no mask"):
        AttentionPlacement(config).attend(q, q, q, torch.ones(1, 1, 4, 4, dtype=torch.bool))
