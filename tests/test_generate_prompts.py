"""``nag generate --prompts FILE`` through the installed command: one image set per prompt, a
manifest with settings and hashes, resume, refusal to mix runs, and a 2-process run (gloo on the
CPU, through ``accelerate launch``) that gives the same images as one process."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli_errors import one_paragraph_error, run_nag

from nag.evaluation.prompts import read_records
from nag.toy import DEFAULT_NAG

FAST = ["--steps", "2", "--num-images", "2", "-n", "red"]
LINES = [{"prompt": "a star", "negative": "yellow", "seed": 40}, {"prompt": "a circle"},
         {"prompt": "two squares", "negative": ""}]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "p.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in LINES))
    return path


@pytest.fixture(scope="module")
def one_process(prompts, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "one"
    proc = run_nag("generate", "--prompts", str(prompts), "--out", str(out), "--device", "cpu", *FAST)
    assert proc.returncode == 0, proc.stderr
    assert "drew 6, 0 already there" in " ".join(proc.stdout.split())
    return out


def test_manifest_lists_every_image_with_its_seed_negative_and_hash(one_process):
    manifest = json.loads((one_process / "manifest.json").read_text())
    entries = manifest["prompts"]
    assert [e["prompt"] for e in entries] == ["a star", "a circle", "two squares"]
    assert [e["negative"] for e in entries] == ["yellow", "red", ""]  # the line's, else --negative
    assert [e["seed"] for e in entries] == [40, 1, 2]  # the line's, else --seed + index
    for e in entries:
        assert [f["seed"] for f in e["files"]] == [e["seed"], e["seed"] + 1]
        for f in e["files"]:
            assert hashlib.sha256((one_process / f["file"]).read_bytes()).hexdigest() == f["sha256"]
    assert manifest["settings"]["nag"]["scale"] == DEFAULT_NAG["scale"] and manifest["settings"]["num_images"] == 2
    hashes = [f["sha256"] for e in entries for f in e["files"]]
    assert len(set(hashes)) == len(hashes)
    assert sorted(p.name for p in one_process.iterdir()) == sorted(
        ["manifest.json", "settings.json"] + [f"{i:06d}-{k}.png" for i in range(3) for k in range(2)])


def test_rerun_draws_only_what_is_missing(prompts, one_process, tmp_path):
    out = tmp_path / "resume"
    shutil.copytree(one_process, out)
    (out / "000001-1.png").unlink()
    (out / ".000001-1.99.tmp.png").write_bytes(b"half")  # a write that was cut off is not an image
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("0*.png")}
    proc = run_nag("generate", "--prompts", str(prompts), "--out", str(out), "--device", "cpu", *FAST)
    assert proc.returncode == 0, proc.stderr
    assert "drew 1, 5 already there" in " ".join(proc.stdout.split())
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("0*.png") if p.name in kept} == kept
    assert (out / "manifest.json").read_text() == (one_process / "manifest.json").read_text()


def test_a_different_run_into_the_same_folder_is_refused(prompts, one_process, tmp_path):
    out = tmp_path / "other"
    shutil.copytree(one_process, out)
    before = sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir())
    proc = run_nag("generate", "--prompts", str(prompts), "--out", str(out), "--device", "cpu", "--scale", "7",
                   *FAST)
    one_paragraph_error(proc, "Output folder holds a different run", "nag", "new --out folder")
    assert sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir()) == before


@pytest.mark.parametrize("case", ["both prompt options", "out is a file", "bad seed"])
def test_prompts_option_errors(prompts, tmp_path, case):
    args = ["generate", "--prompts", str(prompts), "--out", str(tmp_path / "run"), "--device", "cpu", *FAST]
    if case == "both prompt options":
        args += ["-p", "a star"]
        expected = "either --prompt or --prompts"
    elif case == "out is a file":
        (tmp_path / "run").write_text("mine")
        expected = "is an existing file"
    else:
        bad = tmp_path / "bad.csv"
        bad.write_text("prompt,seed\na star,soon\n")
        args[2] = str(bad)
        expected = "'seed' must be a whole number"
    one_paragraph_error(run_nag(*args), expected)
    assert not (tmp_path / "run").is_dir()


def test_prompt_files_txt_csv_jsonl(tmp_path):
    (tmp_path / "p.txt").write_text("a star\n\n  a circle  \n")
    (tmp_path / "p.csv").write_text("prompt,negative,seed\na star,red,5\na circle,,\n")
    (tmp_path / "p.jsonl").write_text('{"prompt": "a star", "negative": "", "seed": 2}\n"a circle"\n')
    assert read_records(tmp_path / "p.txt") == [{"prompt": "a star"}, {"prompt": "a circle"}]
    # an empty CSV cell is "not given" (the command line's value applies)
    assert read_records(tmp_path / "p.csv") == [{"prompt": "a star", "negative": "red", "seed": 5},
                                                {"prompt": "a circle"}]
    # an explicit empty negative is "NAG off" for that line
    assert read_records(tmp_path / "p.jsonl") == [{"prompt": "a star", "negative": "", "seed": 2},
                                                  {"prompt": "a circle"}]


def test_two_processes_give_the_same_images(prompts, one_process, tmp_path):
    """`accelerate launch --multi_gpu` starts 2 processes with torchrun; they join over gloo on the CPU."""
    pytest.importorskip("accelerate")
    out = tmp_path / "two"
    launcher = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
           "no", "--dynamo_backend", "no", "-m", "nag.cli", "generate", "--prompts", str(prompts), "--out", str(out),
           *FAST]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es)" in " ".join(proc.stdout.split())
    assert (out / "manifest.json").read_text() == (one_process / "manifest.json").read_text()
