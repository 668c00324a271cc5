"""Unit tests: no embedded model. Loading its weights here fails at once, so a test that needs
the model cannot hide among the fast ones (move it to ``tests/model/``)."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture(autouse=True)
def _no_embedded_model(monkeypatch: pytest.MonkeyPatch) -> None:
    from esamp_agents.decoding import loading

    load_fresh = loading._load_fresh

    def guarded(name: str, device: str, dtype: str) -> Any:
        if name == loading.EMBEDDED:
            # the checks before the weights load still run, so their errors can be unit-tested
            loading._resolve_dtype(dtype, device)
            loading.embedded_model_file()
            raise RuntimeError("a unit test tried to load the embedded model; move it to tests/model/")
        return load_fresh(name, device, dtype)

    monkeypatch.setattr(loading, "_load_fresh", guarded)
