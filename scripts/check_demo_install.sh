#!/usr/bin/env bash
# The demo's install as a new user meets it: a fresh clone of HEAD, then `bash scripts/demo.sh` (headless, on a tiny
# training budget). Fails if the demo does not answer, if its .venv holds more than MAX_PACKAGES packages (`pip list`,
# pip and setuptools included), or if it printed a line from an engine the demo does not use (deepspeed).
#
#   bash scripts/check_demo_install.sh     # what .ci/run calls; about a minute with the wheels cached
set -euo pipefail
cd "$(dirname "$0")/.."
# Half the 133 packages the demo once installed (the whole development environment).
MAX_PACKAGES=${MAX_PACKAGES:-66}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
git clone -q . "$work/clone"
if ! output=$(cd "$work/clone" && HF_EMA_DEMO_EXIT_AFTER_START=1 bash scripts/demo.sh --max-steps 4 --save-steps 2 \
    --output-dir "$work/run" 2>&1); then
    echo "$output"
    echo "check_demo_install.sh: scripts/demo.sh failed" >&2
    exit 1
fi
if ! grep -q "smoke test: raw and EMA both generated" <<<"$output"; then
    echo "$output"
    echo "check_demo_install.sh: the app did not answer its smoke request" >&2
    exit 1
fi
if grep -qi "deepspeed\|real_accelerator" <<<"$output"; then
    grep -i "deepspeed\|real_accelerator" <<<"$output"
    echo "check_demo_install.sh: the demo printed a deepspeed line" >&2
    exit 1
fi
count=$("$work/clone/.venv/bin/python" -m pip list --format=json 2>/dev/null \
    | "$work/clone/.venv/bin/python" -c "import json, sys; print(len(json.load(sys.stdin)))")
echo "demo install: $count packages (at most $MAX_PACKAGES), no deepspeed line, the app answered"
if [ "$count" -gt "$MAX_PACKAGES" ]; then
    "$work/clone/.venv/bin/python" -m pip list 2>/dev/null
    echo "check_demo_install.sh: the demo installs $count packages, more than $MAX_PACKAGES" >&2
    exit 1
fi
