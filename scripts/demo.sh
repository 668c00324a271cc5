#!/usr/bin/env bash
# Set up the environment if needed, then run the demo on the embedded model, offline.
# Extra arguments go to the demo, e.g. `bash scripts/demo.sh --questions 3 -n 4`.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/bootstrap.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m esamp_agents demo "$@"
