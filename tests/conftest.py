import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The combine's compiled code costs seconds to compile per dtype and process, more than most tests take:
# tests run the eager code unless they ask for the compiled one (tests/test_fused.py does).
os.environ.setdefault("NAG_EAGER", "1")
sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

# Tiny models run fastest on one thread; it also keeps timings stable on shared cores.
torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device (benchmarks/gpu_check.sh runs these)")
