"""Fixtures of the server tests: one server on loopback per module, and an ``openai`` client of it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from esamp_agents.serving import Server


@pytest.fixture(scope="module")
def server(embedded) -> Iterator[Server]:
    with Server(embedded, port=0, max_body_bytes=64 * 1024) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server) -> Any:
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server.url, api_key="x", max_retries=0, timeout=120)
