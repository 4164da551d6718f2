"""What a new user hits, through the installed ``nag`` command in a fresh process: every error is
one paragraph with exit code 1 and no traceback, and nothing is half-written. Also ``--version``,
the summary after ``generate``, the one rule for an empty negative prompt, ``compare``'s checks,
and the import graph of the front ends.
"""

from __future__ import annotations

import ast
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import nag

SRC = Path(nag.__file__).parent
FAST = ["--steps", "2", "--device", "cpu"]


def nag_exe() -> str:
    """The installed ``nag`` console script of this environment."""
    exe = Path(sys.executable).parent / "nag"
    found = str(exe) if exe.exists() else shutil.which("nag")
    assert found, "the `nag` console script is not installed (pip install -e .)"
    return found


def run_nag(*args: str, env: dict | None = None, limit_memory: int | None = None,
            timeout: int = 300) -> subprocess.CompletedProcess:
    """``nag ARGS`` in a fresh process, offline, one thread (so images are bit-stable)."""
    full_env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", COLUMNS="200", **(env or {}))

    def cap_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit_memory, limit_memory))

    return subprocess.run([nag_exe(), *args], capture_output=True, text=True, env=full_env, timeout=timeout,
                          preexec_fn=cap_memory if limit_memory else None)


def one_paragraph_error(proc: subprocess.CompletedProcess, *expected: str) -> str:
    """Exit 1, an ``Error:`` paragraph holding every ``expected`` text, no traceback."""
    text = " ".join(proc.stderr.split())
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert text.startswith("Error:") and text.count("Error:") == 1, text
    for part in expected:
        assert part in text, (part, text)
    return text


def fake_missing(tmp_path: Path, module: str) -> dict:
    """An environment in which ``import module`` fails as if the package were not installed."""
    stub = tmp_path / "missing" / module
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text(f"raise ModuleNotFoundError(\"No module named '{module}'\", name='{module}')\n")
    return {"PYTHONPATH": os.pathsep.join([str(tmp_path / "missing"), os.environ.get("PYTHONPATH", "")])}


# --------------------------------------------------------------------------------------------------
# Output names
# --------------------------------------------------------------------------------------------------


def test_video_name_for_an_image_model(tmp_path):
    proc = run_nag("generate", "-p", "a star", "-n", "red", "--out", str(tmp_path / "x.mp4"), *FAST)
    one_paragraph_error(proc, "makes images", "x.mp4", ".png")
    assert list(tmp_path.iterdir()) == []


def test_existing_folder_as_out(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    proc = run_nag("generate", "-p", "a star", "--out", str(tmp_path), *FAST)
    one_paragraph_error(proc, "Output is a folder", str(tmp_path / "nag.png"))
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_unknown_extension(tmp_path):
    proc = run_nag("compare", "-p", "a star", "-n", "red", "--out", str(tmp_path / "grid.gif"), *FAST)
    one_paragraph_error(proc, "Unknown output type", "'.gif'", ".png")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------------
# Memory: batches, and a real allocation failure on the CPU
# --------------------------------------------------------------------------------------------------


def test_cpu_out_of_memory_is_one_paragraph(tmp_path):
    """A 3 GiB address-space cap makes torch's CPU allocator fail on a batch of 8 large images."""
    proc = run_nag("generate", "-p", "a star", "-n", "red", "--width", "4096", "--height", "4096", "--num-images",
                   "8", "--batch-size", "8", "--steps", "1", "--device", "cpu", "--out", str(tmp_path / "x.png"),
                   limit_memory=3 * 2**30)
    one_paragraph_error(proc, "Out of memory", "--batch-size")
    assert list(tmp_path.iterdir()) == []


def test_num_images_are_drawn_in_batches(monkeypatch, tmp_path):
    """--num-images 5 at --batch-size 2: calls of 2, 2, 1; the images do not depend on the batch size."""
    from diffusers import StableDiffusionPipeline
    from typer.testing import CliRunner

    from nag import cli

    sizes: list[int] = []
    original = StableDiffusionPipeline.__call__

    def spy(self, prompt, *args, **kwargs):
        sizes.append(len(prompt))
        return original(self, prompt, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", spy)
    outs = {}
    for batch in ("2", "1"):
        outs[batch] = tmp_path / batch / "x.png"
        result = CliRunner().invoke(cli.app, ["generate", "-p", "a star", "-n", "red", "--num-images", "5",
                                              "--batch-size", batch, "--out", str(outs[batch]), *FAST])
        assert result.exit_code == 0, result.output
    assert sizes == [2, 2, 1, 1, 1, 1, 1, 1]
    for i in range(5):
        a, b = (np.asarray(Image.open(outs[k].with_name(f"x-{i}.png")), dtype=int) for k in ("2", "1"))
        assert np.abs(a - b).max() <= 2  # batching changes floats, not images


# --------------------------------------------------------------------------------------------------
# Missing extras: the hint keeps its [extra]
# --------------------------------------------------------------------------------------------------


def test_ui_without_the_ui_extra(tmp_path):
    proc = run_nag("ui", "--port", "1", env=fake_missing(tmp_path, "gradio"))
    one_paragraph_error(proc, "The web UI not installed", 'pip install "nag-diffusion[ui]"')
    assert "http://" not in proc.stdout  # no address printed for a server that never starts


def test_eval_without_accelerate_keeps_the_extra(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a star\n")
    proc = run_nag("eval", "--prompts", str(prompts), "--no-metrics", "--out", str(tmp_path / "run"),
                   env=fake_missing(tmp_path, "accelerate"))
    one_paragraph_error(proc, 'pip install "nag-diffusion[eval]"')
    assert not (tmp_path / "run").exists()


def test_offline_hint_names_hf_download():
    proc = run_nag("generate", "-m", "someone/not-downloaded", "-p", "x")
    text = one_paragraph_error(proc, "No weights available offline", "`hf download someone/not-downloaded`")
    assert "huggingface-cli" not in text


# --------------------------------------------------------------------------------------------------
# --version, the summary
# --------------------------------------------------------------------------------------------------


def test_version():
    proc = run_nag("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"nag {nag.__version__}"


def test_generate_prints_what_ran(tmp_path):
    proc = run_nag("generate", "-p", "a star", "-n", "red", "--scale", "4", "--num-images", "2",
                   "--out", str(tmp_path / "x.png"), *FAST)
    assert proc.returncode == 0, proc.stderr
    summary = " ".join(proc.stdout.split()).split("ran ", 1)[1]
    from nag.toy import DEFAULT_NAG

    # --scale 4, the model's own tau and alpha
    settings = f"NAG scale 4, tau {DEFAULT_NAG['tau']:g}, alpha {DEFAULT_NAG['alpha']:g}"
    for part in ("builtin:fewstep", "on cpu, float32", "2 steps", "guidance 0", settings,
                 "negative 'red'", "seeds 0..1", "2 images in"):
        assert part in summary, (part, summary)
    assert summary.rstrip().endswith(" s")


# --------------------------------------------------------------------------------------------------
# One rule: an empty negative prompt is off
# --------------------------------------------------------------------------------------------------


def test_blank_negative_is_off_in_generate(tmp_path):
    outs, said = {}, {}
    for name, extra in (("none", []), ("blank", ["-n", "   "]), ("red", ["-n", "red"])):
        outs[name] = tmp_path / f"{name}.png"
        proc = run_nag("generate", "-p", "a red star", "--out", str(outs[name]), *extra, *FAST)
        assert proc.returncode == 0, proc.stderr
        said[name] = " ".join(proc.stdout.split())
    image = {k: np.asarray(Image.open(v)) for k, v in outs.items()}
    np.testing.assert_array_equal(image["blank"], image["none"])
    assert not np.array_equal(image["red"], image["none"])
    assert "NAG off" in said["blank"] and "NAG off" not in said["red"]


def test_blank_negative_is_off_in_the_ui():
    pytest.importorskip("gradio")
    from nag import ui

    models = ui._Models("cpu", None, False)
    unguided, guided = ui._pair(models, "builtin:fewstep", "a red star", " ", 6, 3, 0.75, 1.0, 2, 0, 0)
    assert guided is unguided
    unguided, guided = ui._pair(models, "builtin:fewstep", "a red star", "red", 6, 3, 0.75, 1.0, 2, 0, 0)
    assert not np.array_equal(np.asarray(guided), np.asarray(unguided))


@pytest.mark.parametrize("args, expected", [
    (["-n", ""], "No negative prompt"),
    (["-n", "red", "--cfg", "1"], "--cfg must be > 1"),
])
def test_compare_refuses_what_would_not_compare(args, expected, tmp_path):
    proc = run_nag("compare", "-p", "a star", *args, "--out", str(tmp_path / "g.png"), *FAST)
    one_paragraph_error(proc, expected)
    assert not (tmp_path / "g.png").exists()


# --------------------------------------------------------------------------------------------------
# The import graph: session <- cli, session <- ui, and no other way round
# --------------------------------------------------------------------------------------------------


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth in the file (functions included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            found |= {base} | {f"{base}.{a.name}".strip(".") for a in node.names}
    return found


def test_front_ends_share_session_without_a_cycle():
    ui_imports = _imports(SRC / "ui.py")
    session_imports = _imports(SRC / "session.py")
    assert "nag.session" in ui_imports
    assert not any(m.startswith("nag.cli") for m in ui_imports | session_imports)
    assert not any(m.startswith("nag.ui") for m in session_imports)
    loaded = subprocess.run([sys.executable, "-c", "import sys, nag.ui; print(sorted(sys.modules))"],
                            capture_output=True, text=True, check=True).stdout
    assert "'nag.session'" in loaded and "nag.cli" not in loaded
