"""Fixtures of the LangChain model tests."""

from __future__ import annotations

import re
from typing import Any

import pytest

from esamp_agents.decoding.engine import ESampEngine


@pytest.fixture
def no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any decode step fails the test: validation must happen before decoding."""

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("decoding started before validation")

    monkeypatch.setattr(ESampEngine, "_prefill", boom)


# The standard integration suite runs twice on one loaded model: text tests with a 10-token
# budget (fast), tool-calling and structured-output tests with enough tokens for a whole call
# (a call of the suite's tools is ~25 tokens). Each class runs only its half.
_TOOL_TESTS = re.compile(r"tool|structured|json_mode|agent_loop")
_SPLIT = {"TestChatESampIntegration": False, "TestChatESampToolsIntegration": True}
# The async twins of the tool/structured tests run the very same decode (ChatESamp's async path
# is its sync path in a worker thread, tested by the text half): skipped to keep the suite short.
_ASYNC_TWINS = re.compile(r"^test_(structured_output|tool_calling)_async\b")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    keep, drop = [], []
    for item in items:
        cls = getattr(item, "cls", None)
        wants_tools = _SPLIT.get(cls.__name__) if cls is not None else None
        is_tool_test = bool(_TOOL_TESTS.search(item.name))
        twin = wants_tools is True and bool(_ASYNC_TWINS.search(item.name))
        (drop if twin or (wants_tools is not None and wants_tools != is_tool_test) else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
