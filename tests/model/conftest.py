"""Tests that run the real embedded model: it is loaded once per session, and every test
collected here is marked ``model`` (so ``-m "not model"`` selects the fast unit tests)."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.model)


@pytest.fixture(scope="session")
def embedded():
    """The embedded SmolLM2-135M-Instruct as a shared LoadedModel."""
    from esamp_agents.decoding.loading import load_model

    return load_model("embedded", device="cpu")


@pytest.fixture(scope="session")
def engine(embedded):
    from esamp_agents.decoding.engine import ESampEngine

    return ESampEngine(embedded)
