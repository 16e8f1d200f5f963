#!/usr/bin/env bash
# The README's first command, from a fresh clone to the app, offline:
#   1. set up .venv with only what the demo needs (`scripts/setup.sh demo`: the library and the `serve` and `demo`
#      extras; idempotent, and a development .venv set up by scripts/test.sh is used as it is),
#   2. train the tiny offline model with EMACallback into runs/tiny (skipped when a trained run is there),
#   3. start the raw-vs-EMA Gradio app on 127.0.0.1 and print its URL.
# Arguments go to `hf-ema demo` (e.g. --port 7861, --force, --lora --output-dir runs/tiny-lora, --open-browser).
# Headless (tests, CI): HF_EMA_DEMO_EXIT_AFTER_START=1 (or --exit-after-start) starts the app, sends it one
# request through the Gradio client, prints both answers and exits.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh demo
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false GRADIO_ANALYTICS_ENABLED=False
exec .venv/bin/hf-ema demo "$@"
