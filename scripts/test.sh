#!/usr/bin/env bash
# Set up the environment if needed, lint, then run the test suite offline.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh tests/unit -x -q` (fast: no model) or `-m "not model"`.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/bootstrap.sh
# shellcheck disable=SC1091
. .venv/bin/activate

echo "[test] ruff check"
ruff check .
echo "[test] ruff format --check"
ruff format --check .

# Offline: no model hub; sockets are disabled by pytest's addopts (pyproject.toml).
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Two worker processes (pytest-xdist, whole files per worker so module fixtures load once) halve
# the suite's time on 2 cores: a small model's decode step is bound by per-op overhead, not by the
# cores, so one single-threaded process per core does more than one process with two threads.
# ESAMP_TEST_WORKERS=0 runs everything in this process (as does passing your own -n / -p no:xdist).
workers="${ESAMP_TEST_WORKERS:-$(($(nproc) < 4 ? $(nproc) : 4))}"
parallel=()
if [[ "$workers" -gt 1 && " $* " != *" -n "* && " $* " != *"no:xdist"* ]]; then
    parallel=(-n "$workers" --dist loadfile)
fi
echo "[test] pytest ${parallel[*]} $*"
status=0
python -m pytest --durations=25 "${parallel[@]}" "$@" || status=$?
if [[ $status -eq 5 ]]; then
    echo "[test] ERROR: pytest collected no tests (exit 5); treating that as a failure" >&2
    exit 5
fi
exit "$status"
