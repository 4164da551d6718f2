"""The built-in toy model: dataset ground truth, offline checkpoints, NAG's measurable effect, demo."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nag.toy import DEFAULT_NAG, VARIANTS, load_pipeline, weights_dir
from nag.toy.dataset import (
    ATTRIBUTE_VALUES,
    BACKGROUNDS,
    PALETTE,
    Attributes,
    ToyDataset,
    render,
)

# ---------------------------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------------------------


def test_dataset_is_deterministic_per_seed_and_index():
    a, b = ToyDataset(seed=3), ToyDataset(seed=3)
    forward = [a[i] for i in range(6)]
    backward = [b[i] for i in reversed(range(6))][::-1]
    for x, y in zip(forward, backward):
        assert np.array_equal(np.asarray(x.image), np.asarray(y.image))
        assert x.caption == y.caption and x.attributes == y.attributes
    other = ToyDataset(seed=4)
    assert any(not np.array_equal(np.asarray(other[i].image), np.asarray(forward[i].image)) for i in range(6))


def test_ground_truth_matches_the_pixels_and_the_caption():
    data = ToyDataset(seed=0, image_size=32)
    for i in range(60):
        sample = data[i]
        a = sample.attributes
        pixels = np.asarray(sample.image).astype(int)
        assert pixels.shape == (32, 32, 3)
        assert len(a.objects) == a.count
        assert (a.count > 1) == (a.position == "scattered")
        for cx, cy, r in a.objects:
            centre = pixels[int(cy), int(cx)]
            assert np.abs(centre - np.array(PALETTE[a.colour])).max() <= 12, (i, a)
            assert r / 32 == pytest.approx({"small": 0.19, "large": 0.32}[a.size], rel=0.07)
        if a.position in ("left", "right", "top", "bottom"):
            cx, cy, _ = a.objects[0]
            offset = {"left": 16 - cx, "right": cx - 16, "top": 16 - cy, "bottom": cy - 16}[a.position]
            assert offset > 2
        # Every attribute word in the caption is the ground truth's.
        words = sample.caption.split()
        for attribute in ("colour", "size", "background"):
            named = [w for w in words if w in ATTRIBUTE_VALUES[attribute]]
            assert named in ([], [getattr(a, attribute)]), (sample.caption, a)
        shapes = [w.rstrip("s").replace("crosse", "cross") for w in words]
        assert all(s == a.shape for s in shapes if s in ATTRIBUTE_VALUES["shape"]), (sample.caption, a)


def test_render_draws_what_it_is_told():
    for background in BACKGROUNDS:
        attributes = Attributes("square", "blue", 1, "large", "center", background, ((16.0, 16.0, 9.6),))
        pixels = np.asarray(render(attributes, 32)).astype(int)
        assert np.abs(pixels[16, 16] - np.array(PALETTE["blue"])).max() <= 10
        corner = pixels[1, 1]
        assert corner[0] == corner[1] == corner[2]  # backgrounds are achromatic


# ---------------------------------------------------------------------------------------------
# Checkpoints and probe
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipes():
    return {variant: load_pipeline(variant) for variant in VARIANTS}


@pytest.fixture(scope="module")
def probe():
    from nag.toy.probes import AttributeProbe

    return AttributeProbe.load()


def test_weights_ship_within_budget():
    root = weights_dir("fewstep").parent
    total = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert total <= 20 * 2**20, f"shipped toy weights are {total / 2**20:.1f} MiB"


@pytest.mark.parametrize("variant", VARIANTS)
def test_checkpoint_loads_offline_and_generates(pipes, variant):
    from diffusers import StableDiffusionPipeline

    pipe = pipes[variant]
    assert type(pipe) is StableDiffusionPipeline
    steps, guidance = (2, 0.0) if variant == "fewstep" else (8, 3.0)
    out = pipe(
        ["a large red circle", "two blue squares on a white background"],
        num_inference_steps=steps,
        guidance_scale=guidance,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert out.shape == (2, 3, 32, 32)
    assert torch.isfinite(out).all() and out.std() > 0.05


def test_probe_reads_clean_dataset_images(probe):
    data = ToyDataset(seed=12345)
    samples = [data[i] for i in range(64)]
    images = torch.from_numpy(np.stack([np.asarray(s.image) for s in samples])).permute(0, 3, 1, 2) / 255.0
    result = probe(images)
    for attribute in ("shape", "colour"):
        truth = [getattr(s.attributes, attribute) for s in samples]
        accuracy = float(result.has(attribute, truth).float().mean())
        assert accuracy >= 0.9, (attribute, accuracy)
    assert float(result.valid.float().mean()) >= 0.9


# ---------------------------------------------------------------------------------------------
# NAG on the few-step model, measured by the probe
# ---------------------------------------------------------------------------------------------


def _one_sided_fisher(kept_a: int, n_a: int, kept_b: int, n_b: int) -> float:
    """P(a keeps at most ``kept_a`` | both tables' margins): small when a keeps fewer than b."""
    total_kept, total = kept_a + kept_b, n_a + n_b

    def pmf(k: int) -> float:
        return math.comb(n_a, k) * math.comb(n_b, total_kept - k) / math.comb(total, total_kept)

    return sum(pmf(k) for k in range(max(0, total_kept - n_b), kept_a + 1))


def test_nag_suppresses_a_negated_colour_on_the_fewstep_model(pipes, probe):
    """Fixed seeds, every shape prompt: negate the colour each unguided sample shows.

    NAG must remove it far more often than an unrelated negative prompt changes it (a control
    that guides just as hard with a colour the sample does not have).
    """
    from nag.toy.dataset import COLOURS
    from nag.toy.evaluate import Method, generate, task_prompts

    pipe = pipes["fewstep"]
    base, _, _ = task_prompts("colour")
    seeds = list(range(6))
    prompts = [p for p in base for _ in seeds]
    sample_seeds = [s for _ in base for s in seeds]
    none = generate(pipe, prompts, sample_seeds, 4, Method("none"))
    read = probe(none)
    shown = read.labels["colour"]
    eligible = read.valid
    n = int(eligible.sum())
    assert n >= 0.5 * len(prompts), f"only {n}/{len(prompts)} unguided samples are clean"

    nag_method = Method("nag", **DEFAULT_NAG)
    own = probe(generate(pipe, prompts, sample_seeds, 4, nag_method, negatives=shown))
    other_colour = [COLOURS[(COLOURS.index(c) + 4) % len(COLOURS)] for c in shown]
    control = probe(generate(pipe, prompts, sample_seeds, 4, nag_method, negatives=other_colour))

    kept_own = int((own.has("colour", shown) & eligible).sum())
    kept_control = int((control.has("colour", shown) & eligible).sum())
    assert kept_own <= 0.2 * n, f"NAG kept the negated colour in {kept_own}/{n} samples"
    assert kept_control >= 0.6 * n, f"an unrelated negative changed the colour in {n - kept_control}/{n}"
    assert _one_sided_fisher(kept_own, n, n, n) < 1e-6  # against no guidance, which keeps all n
    assert _one_sided_fisher(kept_own, n, kept_control, n) < 1e-4


# ---------------------------------------------------------------------------------------------
# Demo
# ---------------------------------------------------------------------------------------------


def test_demo_writes_a_labelled_grid(tmp_path, capsys):
    from PIL import Image

    from nag import demo

    out = tmp_path / "grid.png"
    demo.main(["--rows", "2", "--out", str(out), "--steps", "2"])
    image = Image.open(out)
    columns, rows, cell, pad = 3, 2, demo.CELL, 6
    assert image.width >= 64 + columns * (cell + pad) + pad
    # the title (prompt and negative) fits: the right margin of the title band is blank
    title_band = np.asarray(image.convert("L"))[:40]
    assert (title_band[:, -4:] > 250).all()
    assert image.height >= rows * (cell + pad)
    assert str(out) in capsys.readouterr().out
