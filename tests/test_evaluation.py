"""``nag eval`` and ``nag.evaluation``: generation with per-prompt seeds, sharding over processes,
resume, the metrics through torchmetrics with tiny stand-in networks, and the reports.

Stand-ins (all built from configs, offline): a tiny CLIP (transformers ``CLIPModel`` + processor
saved to a folder, passed as ``--clip-model``) and a tiny conv net as the FID feature extractor
(exported with ``torch.export``, passed as ``--inception``). The generating model is the built-in
``builtin:fewstep`` when its weights are installed, else a tiny random-weight StableDiffusionPipeline
saved with ``save_pretrained``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tiny_pipelines as tp
import torch
from PIL import Image
from typer.testing import CliRunner

from nag import cli

pytest.importorskip("torchmetrics")

import nag.evaluation as ev  # noqa: E402

runner = CliRunner()
PROMPTS = [
    "a red circle on a white background",
    "a blue square",
    "a large green star on a checkered background",
    "a small yellow triangle",
    "a purple heart on a black background",
    "an orange circle",
]
SIZE = 16  # FID and patch-FID views of the 32x32 images


def _builtin_present() -> bool:
    from nag import toy

    try:
        toy.weights_dir("fewstep")
        return True
    except FileNotFoundError:
        return False


def flat(text: str) -> str:
    return " ".join(text.split())


class TinyFeatures(torch.nn.Module):
    """FID feature extractor stand-in: uint8 (N, 3, H, W) -> (N, 6)."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.conv = torch.nn.Conv2d(3, 6, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv(x.float() / 127.5 - 1)).mean((2, 3))


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("eval-assets")
    # model
    if _builtin_present():
        model = "builtin:fewstep"
    else:
        model = str(root / "tiny-sd")
        tp.FACTORIES["sd"]().save_pretrained(model)
    # tiny CLIP
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tok = tp.make_clip_tokenizer()
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=tok.model_max_length,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        clip = CLIPModel(config)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}), tokenizer=tok)
    clip.save_pretrained(root / "clip")
    processor.save_pretrained(root / "clip")
    # tiny FID feature net, exported
    auto = torch.export.Dim.AUTO
    program = torch.export.export(TinyFeatures(), (torch.zeros(2, 3, SIZE, SIZE, dtype=torch.uint8),),
                                  dynamic_shapes=({0: auto, 2: auto, 3: auto},))
    torch.export.save(program, root / "features.pt2")
    # reference images (sizes other than the generated ones: the views must cope)
    ref = root / "reference"
    ref.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(ref / f"{i:03d}.png")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    return {"model": model, "clip": root / "clip", "inception": root / "features.pt2", "reference": ref,
            "prompts": prompts, "root": root}


def eval_args(assets: dict, out: Path, methods: str = "none,nag") -> list[str]:
    return ["eval", "--model", assets["model"], "--prompts", str(assets["prompts"]),
            "--reference-images", str(assets["reference"]), "--methods", methods, "--out", str(out),
            "--steps", "2", "--clip-model", str(assets["clip"]), "--inception", str(assets["inception"]),
            "--fid-size", str(SIZE), "--patch-size", str(SIZE), "--device", "cpu", "--seed", "7"]


@pytest.fixture(scope="module")
def pipe(assets):
    if assets["model"].startswith("builtin:"):
        from nag.toy import load_pipeline

        return load_pipeline("fewstep")
    from diffusers import StableDiffusionPipeline

    p = StableDiffusionPipeline.from_pretrained(assets["model"])
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def cli_run(assets, tmp_path_factory) -> Path:
    """One `nag eval` run through Typer's CliRunner (one process, no launcher)."""
    out = tmp_path_factory.mktemp("cli") / "run"
    result = runner.invoke(cli.app, eval_args(assets, out))
    assert result.exit_code == 0, result.output
    return out


# --------------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------------


def test_cli_writes_results_json_and_paper_style_table(cli_run):
    results = json.loads((cli_run / "results.json").read_text())
    assert set(results["methods"]) == {"none", "nag"}
    assert results["prompts"] == len(PROMPTS) and results["reference_images"] == 6
    for entry in results["methods"].values():
        metrics = entry["metrics"]
        assert isinstance(metrics["clip"], float) and isinstance(metrics["fid"], float)
        assert isinstance(metrics["pfid"], float) and metrics["fid"] >= 0 and metrics["pfid"] >= 0
        assert metrics["image_reward"] is None  # the image-reward package is not installed for the tests
        assert entry["counts"]["images"] == len(PROMPTS)
    nag_settings = results["methods"]["nag"]["settings"]["nag"]
    assert set(nag_settings) == {"scale", "tau", "alpha", "start", "end", "norm"} and nag_settings["scale"] > 1
    assert "image_reward" in results["skipped"] and "image-reward" in results["skipped"]["image_reward"]
    assert results["versions"]["torchmetrics"] and results["versions"]["torch"]
    md = (cli_run / "results.md").read_text()
    assert "| model (steps) | CLIP | FID | PFID | ImageReward |" in md
    row = next(line for line in md.splitlines() if line.startswith("| builtin:") or line.startswith("| /"))
    assert row.count("->") == 4 and "(2)" in row
    # the images and the manifest: one per prompt and method, seeds base + index
    manifest = json.loads((cli_run / "manifest.json").read_text())
    for name in ("none", "nag"):
        entries = manifest["methods"][name]["images"]
        assert [e["index"] for e in entries] == list(range(len(PROMPTS)))
        assert [e["seed"] for e in entries] == [7 + i for i in range(len(PROMPTS))]
        assert [e["prompt"] for e in entries] == PROMPTS
        assert all((cli_run / e["file"]).is_file() for e in entries)
    # NAG changed the images
    assert any(a["sha256"] != b["sha256"] for a, b in zip(manifest["methods"]["none"]["images"],
                                                         manifest["methods"]["nag"]["images"]))


def test_two_processes_give_the_same_manifest_and_metrics(assets, cli_run, tmp_path):
    """Two processes on the CPU (gloo) through `accelerate launch` against the one-process run above.

    On a machine without GPUs accelerate's `--cpu` flag runs one process unless mpirun is set up;
    `--multi_gpu` starts the processes with torchrun, and PartialState(cpu=True) joins them with gloo.
    """
    pytest.importorskip("accelerate")
    out = tmp_path / "run2"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    launcher = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    cmd = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "-m", "nag.cli", *eval_args(assets, out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    one = json.loads((cli_run / "results.json").read_text())
    two = json.loads((out / "results.json").read_text())
    assert two["run"]["processes"] == 2 and one["run"]["processes"] == 1
    assert json.loads((out / "manifest.json").read_text()) == json.loads((cli_run / "manifest.json").read_text())
    for name in one["methods"]:
        for key, value in one["methods"][name]["metrics"].items():
            expected = None if value is None else pytest.approx(value, rel=1e-6, abs=1e-9)
            assert two["methods"][name]["metrics"][key] == expected, (name, key)
    assert len(list((out / "images" / "nag").glob("*.png"))) == len(PROMPTS)


@pytest.mark.parametrize("case", ["missing prompts", "empty reference", "unknown method", "no reference option"])
def test_cli_bad_inputs_give_clear_errors(assets, tmp_path, case):
    args = eval_args(assets, tmp_path / "out")
    if case == "missing prompts":
        args[args.index("--prompts") + 1] = str(tmp_path / "nope.txt")
        expect = "Prompts file not found"
    elif case == "empty reference":
        (tmp_path / "empty").mkdir()
        args[args.index("--reference-images") + 1] = str(tmp_path / "empty")
        expect = "No reference images"
    elif case == "unknown method":
        args[args.index("--methods") + 1] = "none,pag"
        expect = "Unknown method"
    else:
        i = args.index("--reference-images")
        del args[i:i + 2]
        expect = "--reference-images is needed"
    result = runner.invoke(cli.app, args)
    assert result.exit_code == 1
    text = flat(result.output)
    assert expect in text and "Traceback" not in text
    assert not (tmp_path / "out" / "images").exists()  # refused before drawing anything


# --------------------------------------------------------------------------------------------------
# Resume
# --------------------------------------------------------------------------------------------------


class Interrupted(Exception):
    pass


def test_interrupted_run_resumes_without_redrawing(pipe, assets, cli_run, tmp_path):
    out = tmp_path / "run"
    cli_settings = json.loads((cli_run / "results.json").read_text())["methods"]["nag"]["settings"]["nag"]
    kwargs = dict(model=assets["model"], methods=["none", "nag"], steps=2, base_seed=7, metrics=False,
                  nag_settings=cli_settings)  # the built-in model's CLI defaults differ from its family's
    drawn: list[tuple[str, int]] = []

    def stop_after_four(method: str, index: int) -> None:
        drawn.append((method, index))
        if len(drawn) == 4:
            raise Interrupted

    with pytest.raises(Interrupted):
        ev.evaluate(pipe, PROMPTS, assets["reference"], out, on_image=stop_after_four, **kwargs)
    done = sorted((out / "images" / "none").glob("*.png"))
    assert len(done) == 4
    mtimes = {p: p.stat().st_mtime_ns for p in done}
    # a half-written image from the interruption: a temporary file, never counted as done
    (out / "images" / "none" / ".000004.png.999.tmp").write_bytes(b"\x89PNG half")

    again: list[tuple[str, int]] = []
    ev.evaluate(pipe, PROMPTS, assets["reference"], out, on_image=lambda m, i: again.append((m, i)), **kwargs)
    assert sorted(again) == [("nag", i) for i in range(6)] + [("none", 4), ("none", 5)]
    assert {p: p.stat().st_mtime_ns for p in done} == mtimes
    # the resumed run has exactly the images of an uninterrupted one (the CLI run, same seeds)
    manifest = json.loads((out / "manifest.json").read_text())
    reference = json.loads((cli_run / "manifest.json").read_text())
    for name in ("none", "nag"):
        assert [e["sha256"] for e in manifest["methods"][name]["images"]] == \
            [e["sha256"] for e in reference["methods"][name]["images"]]

    # a finished run: nothing is drawn again; the metrics come from the files, with an injected
    # ImageReward scorer filling its column
    third: list[tuple[str, int]] = []
    results = ev.evaluate(pipe, PROMPTS, assets["reference"], out, on_image=lambda m, i: third.append((m, i)),
                          **dict(kwargs, metrics=True), clip_model=str(assets["clip"]),
                          inception=str(assets["inception"]), fid_size=SIZE, patch_size=SIZE,
                          image_reward=lambda prompt, image: float(len(prompt)))
    assert third == []
    assert results["methods"]["none"]["metrics"]["image_reward"] == pytest.approx(np.mean([len(p) for p in PROMPTS]))
    cli_results = json.loads((cli_run / "results.json").read_text())
    assert results["methods"]["nag"]["metrics"]["fid"] == pytest.approx(cli_results["methods"]["nag"]["metrics"]["fid"])

    # other settings in the same folder are refused, not mixed in
    with pytest.raises(ev.EvalError, match="different run"):
        ev.evaluate(pipe, PROMPTS, assets["reference"], out, **dict(kwargs, steps=3))


# --------------------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------------------


def test_fid_is_zero_against_itself_and_positive_against_other_images(assets, tmp_path):
    nets = ev.load_metric_nets(str(assets["clip"]), TinyFeatures(), "off", fid_size=SIZE, patch_size=SIZE)
    reference = sorted(assets["reference"].glob("*.png"))
    other = tmp_path / "other"
    other.mkdir()
    for i in range(6):  # smooth gradients: unlike the noise references
        ramp = np.linspace(0, 255, 32 * 32 * 3).reshape(32, 32, 3) * (i + 1) / 6
        Image.fromarray(ramp.astype(np.uint8)).save(other / f"{i}.png")
    generated = {"same": [(p, path) for p, path in zip(PROMPTS, reference)],
                 "other": [(p, path) for p, path in zip(PROMPTS, sorted(other.glob("*.png")))]}
    scores = ev.compute_metrics(nets, generated, reference, fid_size=SIZE, patch_size=SIZE)
    assert abs(scores["same"]["fid"]) < 1e-3 and abs(scores["same"]["pfid"]) < 1e-3
    assert scores["other"]["fid"] > 1e-2 and scores["other"]["pfid"] > 1e-2
    assert 0 <= scores["same"]["clip"] <= 100 and "image_reward" in nets.skipped


def test_views_crop_as_documented():
    image = Image.fromarray(np.arange(60 * 80 * 3, dtype=np.uint32).reshape(60, 80, 3).astype(np.uint8))
    assert ev.fid_view(image, 30).size == (30, 30)
    patch = ev.patch_view(image, 20)
    assert patch.size == (20, 20)
    assert np.array_equal(np.asarray(patch), np.asarray(image)[20:40, 30:50])  # centre, full resolution
    assert ev.patch_view(image, 100).size == (100, 100)  # smaller than the patch: resized up first


def test_prompt_formats_and_seeds(tmp_path):
    coco = {"annotations": [{"image_id": 9, "id": 5, "caption": "b "}, {"image_id": 9, "id": 2, "caption": "a"},
                            {"image_id": 3, "id": 7, "caption": "c"}]}
    (tmp_path / "c.json").write_text(json.dumps(coco))
    assert ev.read_prompts(tmp_path / "c.json") == ["c", "a"]
    (tmp_path / "p.csv").write_text("id,caption\n1,x y\n2,z\n")
    assert ev.read_prompts(tmp_path / "p.csv") == ["x y", "z"]
    (tmp_path / "p.jsonl").write_text('{"prompt": "one"}\n"two"\n')
    assert ev.read_prompts(tmp_path / "p.jsonl", limit=1) == ["one"]
    (tmp_path / "blank.txt").write_text("\n \n")
    with pytest.raises(ev.EvalError, match="no prompts"):
        ev.read_prompts(tmp_path / "blank.txt")
    assert [ev.seed_for(i, 100) for i in range(3)] == [100, 101, 102]
