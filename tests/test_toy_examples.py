"""The built-in model does what the docs say: its vocabulary, the README's examples, the demo, adherence.

The README's command-line examples on the built-in model are read from README.md and run; the
probe then checks that the image shows what the prompt names and not what the negative names.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from nag import cli
from nag.toy import DEFAULT_NAG, load_pipeline
from nag.toy.dataset import ATTRIBUTE_VALUES, caption_for, full_caption, sample_attributes
from nag.toy.vocabulary import MODEL_BACKGROUNDS, MODEL_VOCABULARY, prompt_warning, unknown_words

README = Path(__file__).resolve().parents[1] / "README.md"
runner = CliRunner()


@pytest.fixture(scope="module")
def probe():
    from nag.toy.probes import AttributeProbe

    return AttributeProbe.load()


def _as_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB"))).permute(2, 0, 1)[None].float() / 255.0


def named_attributes(text: str) -> dict[str, str]:
    """The attribute values a prompt names, by attribute ("a star on a white background" -> shape, background)."""
    words = re.findall(r"[a-z]+", text.lower())
    singular = [w[:-2] if w.endswith("ses") or w.endswith("shes") else w.rstrip("s") for w in words]
    found = {}
    for attribute in ("shape", "colour", "background"):
        for word in singular:
            if word in ATTRIBUTE_VALUES[attribute]:
                found[attribute] = word
    counts = {"two": 2, "three": 3}
    for word in words:
        if word in counts:
            found["count"] = counts[word]
    return found


# ---------------------------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------------------------


def test_unknown_words_finds_words_outside_the_training_captions():
    assert unknown_words("a large red star on the left on a black background") == []
    assert unknown_words("Three BLUE crosses, on a gray background!") == []
    assert unknown_words("a fox on a checkered background, a fox") == ["fox", "checkered"]
    assert unknown_words("2 red stars") == ["2"]
    assert prompt_warning("a red star", "") is None
    warning = prompt_warning("a red dragon", "striped")
    assert "'dragon'" in warning and "negative prompt 'striped'" in warning


def test_every_training_caption_word_is_in_the_vocabulary():
    rng = np.random.default_rng(3)
    for i in range(300):
        attributes = sample_attributes(np.random.default_rng([9, i]), 32, MODEL_BACKGROUNDS)
        assert unknown_words(caption_for(attributes, rng)) == []
        assert unknown_words(full_caption(attributes)) == []
    assert {"checkered", "striped"}.isdisjoint(MODEL_VOCABULARY)


def test_the_cli_warns_about_unknown_words(tmp_path):
    out = tmp_path / "x.png"
    result = runner.invoke(cli.app, ["generate", "-p", "a dragon", "-n", "fire", "--out", str(out), "--steps", "1"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "'dragon'" in text and "'fire'" in text and "not trained on" in text
    result = runner.invoke(cli.app, ["generate", "-p", "a red star", "--out", str(out), "--steps", "1"])
    assert result.exit_code == 0 and "not trained on" not in result.output


# ---------------------------------------------------------------------------------------------
# The README's examples and the demo
# ---------------------------------------------------------------------------------------------


def readme_builtin_commands() -> list[list[str]]:
    """`nag generate` / `nag compare` lines of the README that run on the built-in model (no -m, no --prompts)."""
    commands = []
    for line in README.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not re.match(r"nag (generate|compare)\b", line):
            continue
        args = shlex.split(line)[1:]
        if not {"-m", "--model", "--prompts"} & set(args):
            commands.append(args)
    return commands


def test_the_readme_has_builtin_examples():
    commands = readme_builtin_commands()
    assert {c[0] for c in commands} == {"generate", "compare"}


@pytest.mark.parametrize("args", readme_builtin_commands(), ids=lambda a: " ".join(a[:3]))
def test_readme_examples_draw_what_they_say(args, tmp_path, probe, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    assert "not trained on" not in result.output
    if args[0] != "generate":
        return
    prompt, negative = args[args.index("-p") + 1], args[args.index("-n") + 1]
    out = Path(args[args.index("--out") + 1])
    files = [out] if out.exists() else sorted(tmp_path.glob(f"{out.stem}-*{out.suffix}"))
    read = probe(torch.cat([_as_tensor(Image.open(f)) for f in files]))
    assert read.valid.all(), "the probe does not read a clean image"
    for attribute, value in named_attributes(prompt).items():
        assert read.labels[attribute] == [value] * len(files), (attribute, read.labels[attribute])
    for attribute, value in named_attributes(negative).items():
        assert value not in read.labels[attribute], (attribute, read.labels[attribute])


def test_the_demo_shows_nag_removing_what_the_unguided_model_draws(probe):
    from nag import demo

    pipe = load_pipeline("fewstep")
    seeds = list(range(6))
    columns = demo.generate_columns(pipe, demo.DEFAULT_PROMPT, demo.DEFAULT_NEGATIVE, seeds, 4)
    negated = named_attributes(demo.DEFAULT_NEGATIVE)
    named = named_attributes(demo.DEFAULT_PROMPT)
    reads = {label: probe(torch.cat([_as_tensor(im) for im in images])) for label, images in columns.items()}
    unguided, guided = reads["no guidance"], reads[f"NAG {DEFAULT_NAG['scale']:g}"]
    for attribute, value in negated.items():
        assert sum(v == value for v in unguided.labels[attribute]) >= 2, unguided.labels[attribute]
        assert value not in guided.labels[attribute], guided.labels[attribute]
    for attribute, value in named.items():
        assert guided.labels[attribute].count(value) >= 5, (attribute, guided.labels[attribute])
    assert int(guided.valid.sum()) >= 5


# ---------------------------------------------------------------------------------------------
# Adherence (the full measurement is docs/quality_toy.md; this is a small regression check)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant, steps, cfg", [("fewstep", 4, 0.0), ("multistep", 25, 4.0)])
def test_the_model_draws_what_it_is_asked(probe, variant, steps, cfg):
    from nag.toy.evaluate import Method, adherence_prompts, adherence_trial

    prompts, truth = adherence_prompts(48, seed=7100)  # not the benchmark's prompts
    method = Method("cfg", cfg) if cfg > 1 else Method("none")
    result = adherence_trial(load_pipeline(variant), probe, prompts, truth, range(48), steps, method)
    rates = {a: result.rate(a) for a in ("shape", "colour", "count", "background")}
    assert rates["shape"] >= 0.8 and rates["colour"] >= 0.9 and rates["count"] >= 0.7, rates
    assert rates["background"] >= 0.9, rates


def test_the_web_ui_warns_about_unknown_words(monkeypatch):
    gr = pytest.importorskip("gradio")
    from nag import ui

    shown = []
    monkeypatch.setattr(gr, "Warning", lambda message, *a, **k: shown.append(message))
    models = ui._Models("cpu", None, False)
    ui.generate(models, "builtin:fewstep", "a red dragon", "yellow", 6.0, 3.0, 0.75, 1.0, 1, 0.0, 0, [])
    assert len(shown) == 1 and "'dragon'" in shown[0]
    ui.generate(models, "builtin:fewstep", "a red star", "yellow", 6.0, 3.0, 0.75, 1.0, 1, 0.0, 0, [])
    assert len(shown) == 1


def test_the_web_ui_examples_are_in_the_vocabulary():
    pytest.importorskip("gradio")
    from nag import ui

    for prompt, negative in ui.EXAMPLES:
        assert prompt_warning(prompt, negative) is None, (prompt, negative)
