#!/usr/bin/env bash
# Create or update .venv, the one Python environment of a clone, with torch from the CPU wheel pinned below (no
# multi-GB CUDA download) and hf-ema installed editable:
#   bash scripts/setup.sh        # development (scripts/test.sh, .ci/run): ".[dev]", i.e. tests, docs, lint, DeepSpeed,
#                                # diffusers, benchmarks, plus Debian chromium for the browser tests
#   bash scripts/setup.sh demo   # only what `hf-ema demo` needs (scripts/demo.sh): ".[serve,demo]"
# Idempotent and offline-friendly: .venv/.hf_ema_setup records what was installed (the profile, and a hash of
# pyproject.toml and this script), and nothing is installed while it holds. A development .venv already has all the
# demo needs, so `demo` never shrinks one; `dev` on a demo .venv adds the rest.
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${1:-dev}
case "$profile" in
    dev) extras="dev" ;;
    demo) extras="serve,demo" ;;
    *)
        echo "setup.sh: unknown profile '$profile': use dev (the default) or demo" >&2
        exit 2
        ;;
esac
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
stamp=.venv/.hf_ema_setup
hash="$(cat pyproject.toml scripts/setup.sh | sha1sum | cut -c1-16)"
have="$(cat "$stamp" 2>/dev/null || true)"
if [ "$profile" = demo ] && [ "${have%% *}" = dev ]; then
    profile=dev
    extras=dev
fi
if [ "$have" != "$profile $hash" ]; then
    echo "setup: installing hf-ema with the \"$extras\" extras into .venv (CPU torch 2.13.0)"
    .venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
    # torch named in the same command as everything else, so that no dependency can pull a CUDA build. setuptools'
    # note on every editable install (folders named like the package may shadow it) is about the clone's own
    # layout, which `serve/` -> `hf_ema.app` is by design: not shown.
    PYTHONWARNINGS="ignore:Editable installation" .venv/bin/python -m pip install -q "torch==2.13.0" -e ".[$extras]" \
        2>&1 | grep -v "^WARNING: Location" || true
    .venv/bin/python -c "import hf_ema, torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
    echo "$profile $hash" > "$stamp"
fi
# Browser tests drive Debian's chromium (never a downloaded browser); the demo needs none.
if [ "$profile" = dev ] && [ "${HF_EMA_SKIP_BROWSER:-0}" != "1" ] && ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = "0" ]; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
            || echo "setup: could not install chromium; browser tests will be skipped" >&2
    else
        echo "setup: chromium not found and not root; browser tests will be skipped" >&2
    fi
fi
