#!/usr/bin/env bash
# The README's first command: set up .venv, train the tiny offline model with EMA (skipped when already trained).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/hf-ema demo "$@"
