"""Settings for the whole suite: offline, and idle OpenMP workers that sleep.

``tests/unit/`` never loads the embedded model (``tests/unit/conftest.py`` guards it);
``tests/model/`` runs the real embedded model, loaded once per session there.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Idle OpenMP workers sleep instead of spinning: with any other process on the 2 cores, spinning
# threads made one model test 50x slower (366 s vs 7 s). Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
