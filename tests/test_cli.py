"""The ``nag`` command line, through its real entry points: Typer's CliRunner on ``nag.cli:app``
and the installed ``nag`` console script in a subprocess.

Models: tiny random-weight stock pipelines saved with ``save_pretrained`` (so the real loading
code runs), and the built-in tiny model when its weights are present.
"""

from __future__ import annotations

import functools
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
from nag import grid as grid_mod
from nag.cli import common

runner = CliRunner()
FAST = ["--steps", "2", "--device", "cpu"]
SD_SIZE = (32, 32)  # the saved tiny SD pipeline's default image size


def _builtin_present() -> bool:
    from nag import toy

    try:
        toy.weights_dir("fewstep")
        return True
    except FileNotFoundError:
        return False


needs_builtin = pytest.mark.skipif(not _builtin_present(), reason="the built-in model's weights are not installed")


def flat(text: str) -> str:
    """Output with Rich's line wrapping undone."""
    return " ".join(text.split())


def invoke(*args: str):
    result = runner.invoke(cli.app, list(args))
    return result, flat(result.output)


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / "tiny-sd"
    tp.FACTORIES["sd"]().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def unsupported_dir(tmp_path_factory) -> Path:
    """An unconditional DDPM pipeline: no text, so nothing for NAG to guide."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8,),
                       down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",), layers_per_block=1,
                       norm_num_groups=4)
    path = tmp_path_factory.mktemp("models") / "ddpm"
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(path)
    return path


# --------------------------------------------------------------------------------------------------
# generate
# --------------------------------------------------------------------------------------------------


def test_generate_writes_pngs_and_nag_changes_them(sd_dir, tmp_path):
    out = tmp_path / "img" / "cat.png"
    result, text = invoke("generate", "-m", str(sd_dir), "-p", "a red circle", "-n", "blue", "--num-images", "2",
                          "--seed", "3", "--out", str(out), *FAST)
    assert result.exit_code == 0, result.output
    files = [tmp_path / "img" / "cat-0.png", tmp_path / "img" / "cat-1.png"]
    for f in files:
        assert Image.open(f).size == SD_SIZE
        assert str(f) in text
    a, b = (np.asarray(Image.open(f)) for f in files)
    assert not np.array_equal(a, b)  # seeds 3 and 4

    plain = tmp_path / "plain.png"
    result, _ = invoke("generate", "-m", str(sd_dir), "-p", "a red circle", "--seed", "3", "--out", str(plain), *FAST)
    assert result.exit_code == 0, result.output
    assert not np.array_equal(np.asarray(Image.open(plain)), a)  # the negative prompt acts

    seeded = tmp_path / "again.png"
    result, _ = invoke("generate", "-m", str(sd_dir), "-p", "a red circle", "-n", "blue", "--seed", "3",
                       "--out", str(seeded), *FAST)
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(np.asarray(Image.open(seeded)), a)  # reproducible


def test_generate_size_options(sd_dir, tmp_path):
    out = tmp_path / "wide.png"
    result, _ = invoke("generate", "-m", str(sd_dir), "-p", "a star", "-n", "red", "--width", "32", "--height", "24",
                       "--scale", "3", "--tau", "2", "--alpha", "0.4", "--end", "0.5", "--out", str(out), *FAST)
    assert result.exit_code == 0, result.output
    assert Image.open(out).size == (32, 24)


def test_min_sigma_option_bounds_the_guided_steps(sd_dir, tmp_path):
    """--min-sigma reaches nag.apply: above every step's sigma NAG guides nothing (the unguided image), at 0 the
    negative acts; the run's summary names the bound."""
    images = {}
    for name, extra in [("off", []), ("bounded", ["-n", "blue", "--min-sigma", "1e6"]), ("guided", ["-n", "blue"])]:
        out = tmp_path / f"{name}.png"
        result, text = invoke("generate", "-m", str(sd_dir), "-p", "a red circle", "--seed", "3", "--out", str(out),
                              *extra, *FAST)
        assert result.exit_code == 0, result.output
        images[name] = np.asarray(Image.open(out))
        if name == "bounded":
            assert "min_sigma 1e+06" in text
    np.testing.assert_array_equal(images["bounded"], images["off"])
    assert not np.array_equal(images["guided"], images["off"])


def test_generate_video_mp4(tmp_path):
    import imageio.v3 as iio

    model = tmp_path / "tiny-wan"
    tp.FACTORIES["wan"]().save_pretrained(model)
    out = tmp_path / "clip.mp4"
    result, _ = invoke("generate", "-m", str(model), "-p", "a red circle", "-n", "blue", "--frames", "5",
                       "--width", "32", "--height", "32", "--out", str(out), *FAST)
    assert result.exit_code == 0, result.output
    frames = iio.imread(out)
    assert frames.shape == (5, 32, 32, 3)


def test_lora_option(sd_dir, tmp_path):
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    pipe = StableDiffusionPipeline.from_pretrained(sd_dir)
    torch.manual_seed(0)
    pipe.unet.add_adapter(LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                     init_lora_weights=False))
    StableDiffusionPipeline.save_lora_weights(tmp_path / "lora", unet_lora_layers=get_peft_model_state_dict(pipe.unet))
    lora_file = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    assert lora_file.is_file()

    outs = {}
    for name, extra in (("base", []), ("lora", ["--lora", str(lora_file)])):
        outs[name] = tmp_path / f"{name}.png"
        result, _ = invoke("generate", "-m", str(sd_dir), "-p", "a star", "-n", "red", "--out", str(outs[name]),
                           *extra, *FAST)
        assert result.exit_code == 0, result.output
    assert not np.array_equal(np.asarray(Image.open(outs["base"])), np.asarray(Image.open(outs["lora"])))

    result, text = invoke("generate", "-m", str(sd_dir), "-p", "a star", "--lora", str(tmp_path / "nope.safetensors"),
                          *FAST)
    assert result.exit_code == 1
    assert "LoRA file not found" in text and "Traceback" not in result.output


# --------------------------------------------------------------------------------------------------
# compare
# --------------------------------------------------------------------------------------------------


LABELS = ("no guidance", "CFG 4", "NAG 2")  # the tiny SD pipeline's family default scale is 2


def _strip(grid: Image.Image, layout: grid_mod.GridLayout) -> np.ndarray:
    """The column-label strip under the title."""
    return np.asarray(grid.convert("L"))[layout.title_h:layout.title_h + grid_mod.HEADER]


def check_grid(grid: Image.Image, image_size: tuple[int, int], rows: int, labels=LABELS) -> grid_mod.GridLayout:
    """The three labels drawn in the strip, one above each column, in order; a title and seed labels."""
    blank = Image.new("RGB", image_size, "white")
    title_lines = 2
    reference = grid_mod.make_grid({label: [blank] * rows for label in labels}, [f"seed {r}" for r in range(rows)],
                                   "\n".join(["x"] * title_lines))
    layout = grid_mod.layout(image_size, 3, rows, "\n".join(["x"] * title_lines))
    assert grid.height == layout.size[1] and grid.width >= layout.size[0]
    cw, _ = layout.cell
    strip = _strip(grid, layout)
    for c in range(3):
        x, _ = layout.cell_origin(c, 0)
        assert (strip[:, x:x + cw] < 128).sum() > 20, f"no label above column {c}"
    np.testing.assert_array_equal(strip[:, :reference.width], _strip(reference, layout))
    other = grid_mod.make_grid({label: [blank] * rows for label in reversed(labels)}, [], "x\nx")
    assert not np.array_equal(strip[:, :reference.width], _strip(other, layout))
    gray = np.asarray(grid.convert("L"))
    assert (gray[:layout.title_h] < 128).sum() > 50, "no title"
    assert (gray[layout.title_h + grid_mod.HEADER:, :grid_mod.ROW_LABEL] < 128).sum() > 20, "no seed labels"
    return layout


def test_compare_grid(sd_dir, tmp_path):
    out = tmp_path / "grid.png"
    result, text = invoke("compare", "-m", str(sd_dir), "-p", "a red circle", "-n", "blue", "--num-images", "2",
                          "--out", str(out), *FAST)
    assert result.exit_code == 0, result.output
    assert "no guidance, CFG 4, NAG 2" in text and "seeds 0..1" in text
    grid = Image.open(out)
    layout = check_grid(grid, SD_SIZE, rows=2)
    cw, ch = layout.cell
    cells = [np.asarray(grid)[y:y + ch, x:x + cw] for x, y in (layout.cell_origin(c, 0) for c in range(3))]
    assert not np.array_equal(cells[0], cells[1]) and not np.array_equal(cells[0], cells[2])


def test_installed_command_compare(sd_dir, tmp_path):
    """The console script itself, in a fresh process."""
    exe = Path(sys.executable).parent / "nag"
    exe = str(exe) if exe.exists() else shutil.which("nag")
    assert exe, "the `nag` console script is not installed (pip install -e .)"
    out = tmp_path / "grid.png"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([exe, "compare", "-m", str(sd_dir), "-p", "a red circle", "-n", "blue", "--out", str(out),
                           *FAST], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    check_grid(Image.open(out), SD_SIZE, rows=1)

    proc = subprocess.run([exe, "generate", "-m", "someone/not-downloaded", "-p", "x"], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 1
    assert "No weights available offline" in flat(proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout


@needs_builtin
def test_builtin_model_default(tmp_path):
    from nag import toy

    out = tmp_path / "star.png"
    result, _ = invoke("generate", "-p", "a large star on a gray background", "-n", "red", "--out", str(out),
                       "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert Image.open(out).size == (32, 32)
    grid = tmp_path / "grid.png"
    result, _ = invoke("compare", "-m", "builtin:fewstep", "-p", "a large star on a gray background", "-n", "red",
                       "--out", str(grid), "--device", "cpu")
    assert result.exit_code == 0, result.output
    scale = f"NAG {toy.DEFAULT_NAG['scale']:g}"
    check_grid(Image.open(grid), (32, 32), rows=1, labels=("no guidance", "CFG 4", scale))


# --------------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------------


def test_models_lists_families_and_defaults(monkeypatch):
    monkeypatch.setattr(common.out, "_width", 320)  # one table row per line
    result = runner.invoke(cli.app, ["models"])
    assert result.exit_code == 0, result.output
    import nag
    from nag.cli.models import few_step_text

    lines = result.output.splitlines()
    rows = {}
    for name, info in nag.supported_pipelines().items():
        row = next(line for line in lines if f" {name} " in line)
        cells = [c.strip() for c in row.strip("│┃ ").split("│")]
        assert cells[2:] == [info["family"], f"{info['scale']:g}", f"{info['tau']:g}", f"{info['alpha']:g}", "1",
                             few_step_text(name, info)]
        rows[name] = cells[-1]
    # the few-step checkpoints the README names, and Wan's few-step setting
    assert "FLUX.1-schnell" in rows["FluxPipeline"] and "Turbo" in rows["StableDiffusion3Pipeline"]
    assert "DMD2" in rows["StableDiffusionXLPipeline"]
    assert "scale 11, tau 3.5, alpha 0.5" in rows["WanPipeline"]
    assert rows["SanaSprintPipeline"] == "yes" and rows["StableDiffusionPipeline"] == "no"
    assert "builtin:fewstep" in result.output and "builtin:multistep" in result.output


# --------------------------------------------------------------------------------------------------
# errors: one paragraph, exit code 1, no traceback unless --debug
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, expected",
    [
        (["-m", "builtin:nope"], "Unknown model - 'builtin:nope': there is no built-in model"),
        (["-m", "no/such/model/id"], "Unknown model - 'no/such/model/id': it is neither an existing directory"),
        (["-m", "someone/not-downloaded"], "No weights available offline - the model 'someone/not-downloaded'"),
        (["--scale", "0.5"], "Option out of range - --scale must be >= 1"),
        (["--alpha", "1.5"], "Option out of range - --alpha must lie in [0, 1]"),
        (["--start", "0.6", "--end", "0.5"], "Option out of range - --start must be smaller than --end"),
        (["--min-sigma", "-1"], "Option out of range - --min-sigma must be >= 0"),
        (["--width", "30"], "Option out of range - --width must be a positive multiple of 8"),
        (["--dtype", "int8"], "Unknown dtype"),
    ],
)
def test_error_messages(args, expected, tmp_path):
    result, text = invoke("generate", "-p", "a star", "-n", "red", "--out", str(tmp_path / "x.png"), *args)
    assert result.exit_code == 1, result.output
    assert expected in text
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert not (tmp_path / "x.png").exists()


def test_error_unsupported_family(unsupported_dir):
    result, text = invoke("generate", "-m", str(unsupported_dir), "-p", "x", "-n", "y", *FAST)
    assert result.exit_code == 1
    assert "Model family not supported - the model loads as DDPMPipeline" in text
    assert "nag models" in text
    assert "Traceback" not in result.output


def test_error_not_a_pipeline_directory(tmp_path):
    result, text = invoke("generate", "-m", str(tmp_path), "-p", "x", *FAST)
    assert result.exit_code == 1
    assert "Not a diffusers pipeline" in text and "model_index.json" in text


def test_error_builtin_weights_missing(monkeypatch):
    from nag import toy

    def missing(variant: str = "fewstep") -> Path:
        raise FileNotFoundError(f"the {variant} checkpoint is missing")

    monkeypatch.setattr(toy, "weights_dir", missing)
    result, text = invoke("generate", "-p", "x", "-n", "y")
    assert result.exit_code == 1
    assert "No weights available offline - the built-in tiny model 'builtin:fewstep'" in text


def test_error_out_of_memory_suggests_offload(sd_dir, monkeypatch, tmp_path):
    from diffusers import StableDiffusionPipeline

    original = StableDiffusionPipeline.__call__

    @functools.wraps(original)
    def out_of_memory(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", out_of_memory)
    args = ["-m", str(sd_dir), "-p", "x", "-n", "y", "--out", str(tmp_path / "x.png"), *FAST]
    result, text = invoke("generate", *args)
    assert result.exit_code == 1
    assert "Out of memory" in text and "--offload" in text
    assert "Traceback" not in result.output

    result = runner.invoke(cli.app, ["generate", *args, "--debug"])
    # --debug: the error propagates (with its traceback), chained to the original one
    assert isinstance(result.exception, cli.NagCLIError)
    assert isinstance(result.exception.__cause__, torch.OutOfMemoryError)


def test_debug_reraises(unsupported_dir):
    result = runner.invoke(cli.app, ["generate", "-m", str(unsupported_dir), "-p", "x", "-n", "y", "--debug", *FAST])
    assert result.exit_code != 0
    assert isinstance(result.exception, cli.NagCLIError)


def test_device_and_dtype_resolution():
    assert cli.resolve_device("cpu") == "cpu"
    expected = "cuda" if torch.cuda.is_available() else (
        "mps" if torch.backends.mps.is_available() else "cpu")
    assert cli.resolve_device(None) == expected
    assert cli.resolve_dtype(None, "cpu") == torch.float32
    assert cli.resolve_dtype("bf16", "cpu") == torch.bfloat16
    if not torch.cuda.is_available():
        with pytest.raises(cli.NagCLIError, match="Device not available"):
            cli.resolve_device("cuda")


def test_automatic_choice_on_cuda(monkeypatch):
    """cuda > mps > cpu, and bf16 on CUDA where supported (fp16 otherwise); no GPU needed."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert cli.resolve_device(None) == "cuda"
    assert cli.resolve_dtype(None, "cuda") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert cli.resolve_dtype(None, "cuda") == torch.float16
    assert cli.resolve_dtype(None, "mps") == torch.float16


def test_offload_uses_model_cpu_offload_on_accelerators(sd_dir, monkeypatch):
    from diffusers import StableDiffusionPipeline

    calls = []
    monkeypatch.setattr(StableDiffusionPipeline, "enable_model_cpu_offload",
                        lambda self, gpu_id=None, device=None: calls.append(device))
    monkeypatch.setattr(StableDiffusionPipeline, "to", lambda self, *a, **k: pytest.fail("moved despite --offload"))
    loaded = cli.load_model(str(sd_dir), "cuda", torch.float32, offload=True)
    assert calls == ["cuda"] and type(loaded.pipe).__name__ == "StableDiffusionPipeline"


def test_offload_on_cpu_is_a_note(sd_dir, tmp_path):
    result, text = invoke("generate", "-m", str(sd_dir), "-p", "a star", "--offload", "--out",
                          str(tmp_path / "x.png"), *FAST)
    assert result.exit_code == 0, result.output
    assert "--offload has no effect on the CPU" in text and (tmp_path / "x.png").is_file()
