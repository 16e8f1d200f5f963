#!/usr/bin/env bash
# Create .venv with hf-ema and everything its tests, demo and benchmarks need. Idempotent and offline-friendly:
# torch comes from the CPU wheel pinned below (no multi-GB CUDA download), the rest from the package index.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
stamp=.venv/.hf_ema_setup
want="$(cat pyproject.toml scripts/setup.sh | sha1sum | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    .venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
    # Pin the CPU build first so nothing below pulls a CUDA torch.
    .venv/bin/python -m pip install -q "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
    .venv/bin/python -m pip install -q -e ".[dev]" "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
    .venv/bin/python -c "import hf_ema, torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
    echo "$want" > "$stamp"
fi
# Browser tests drive Debian's chromium (never a downloaded browser).
if [ "${HF_EMA_SKIP_BROWSER:-0}" != "1" ] && ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = "0" ]; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
            || echo "setup: could not install chromium; browser tests will be skipped" >&2
    else
        echo "setup: chromium not found and not root; browser tests will be skipped" >&2
    fi
fi
