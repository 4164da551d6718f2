"""``benchmarks/gpu_check.sh``, the one command a machine with a GPU runs, rehearsed on the CPU
(``GPU_CHECK_DEVICE=cpu``): every step runs (the CUDA tests skip), none fails or runs out of time, and the results
come back in the files the script names. A GPU run then only changes the device and the sizes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils' timeout")
def test_gpu_check_rehearsal_on_cpu(tmp_path):
    env = {**os.environ, "GPU_CHECK_DEVICE": "cpu", "GPU_CHECK_FAMILIES": "sdxl", "PYTHON": sys.executable}
    result = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=300,
    )
    log = (tmp_path / "gpu_check.log").read_text()
    assert result.returncode == 0, result.stdout + result.stderr + log
    for step in ("CUDA tests", "combine benchmark", "overhead sdxl"):
        assert f"{step}: exit 0" in log, log
    assert "time limit" not in log and "skipped" not in log, log
    assert "done in" in log

    rows = [json.loads(line) for line in (tmp_path / "overhead.jsonl").read_text().splitlines()]
    assert [row["family"] for row in rows] == ["sdxl"]
    for key in ("cfg_ratio", "nag_ratio", "nag_step_ratio", "nag_eager_ratio", "floor_ratio", "nag_over_floor"):
        assert rows[0][key] > 0, key
    table = (tmp_path / "overhead.md").read_text()
    assert "<!-- overhead:full-cpu -->" in table and "| SDXL" in table

    combine = json.loads((tmp_path / "combine.jsonl").read_text().splitlines()[-1])
    assert combine["device"] == "cpu" and combine["shape"][1] == 256
    assert "skipped" in (tmp_path / "cuda_tests.log").read_text()  # (no CUDA device here)
