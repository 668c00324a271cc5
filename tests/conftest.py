"""Settings for the whole suite: offline, and idle OpenMP workers that sleep.

``tests/unit/`` never loads the embedded model (``tests/unit/conftest.py`` guards it);
``tests/model/`` runs the real embedded model, loaded once per session there.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Idle OpenMP workers sleep instead of spinning: with any other process on the 2 cores, spinning
# threads made one model test 50x slower (366 s vs 7 s). Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Under pytest-xdist (`-n N`) the cores are shared out between the N worker processes, so that
# N workers with 2 threads each do not fight over 2 cores.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // _workers)))
    if "torch" in sys.modules:  # imported by a plugin before this file: tell it directly
        sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
