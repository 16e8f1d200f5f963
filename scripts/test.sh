#!/usr/bin/env bash
# The README's test command: set up the development .venv (scripts/setup.sh; it extends a demo .venv), then run the
# whole test suite. Arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest "$@"
