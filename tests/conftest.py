"""Shared fixtures: the embedded model is loaded once per test session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Idle OpenMP workers sleep instead of spinning: with any other process on the 2 cores, spinning
# threads made one model test 50x slower (366 s vs 7 s). Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(scope="session")
def embedded():
    """The embedded SmolLM2-135M-Instruct as a shared LoadedModel."""
    from esamp_agents.decoding.loading import load_model

    return load_model("embedded", device="cpu")


@pytest.fixture(scope="session")
def engine(embedded):
    from esamp_agents.decoding.engine import ESampEngine

    return ESampEngine(embedded)
