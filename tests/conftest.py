import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

# Tiny models run fastest on one thread; it also keeps timings stable on shared cores.
torch.set_num_threads(1)
