"""Fixtures of the LangChain model tests."""

from __future__ import annotations

from typing import Any

import pytest

from esamp_agents.decoding.engine import ESampEngine


@pytest.fixture
def no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any decode step fails the test: validation must happen before decoding."""

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("decoding started before validation")

    monkeypatch.setattr(ESampEngine, "_decode", boom)
