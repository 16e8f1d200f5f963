#!/usr/bin/env bash
# The minimum-versions job: the tests that reach every module of hf_ema/compat/ (and the Trainer, LoRA, Hub and
# multi-process paths behind them), run against the oldest transformers, accelerate, peft, huggingface_hub,
# safetensors, datasets and tokenizers that pyproject.toml allows. The floors are read from pyproject.toml and
# installed exactly (`name==floor`), so a floor that no longer holds fails here. torch stays at the CPU 2.13.0
# wheel. The environment is .venv-min (gitignored), rebuilt only when pyproject.toml or this script changes.
#
#   bash scripts/test_min_versions.sh            # what .ci/run calls after the main suite
#   bash scripts/test_min_versions.sh -x -q      # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv-min
start=$(date +%s)

# `name==floor` for every upstream whose floor the job proves (torch, numpy, tqdm and packaging keep their newest).
pins=$("$PY" - <<'EOF'
import re
import tomllib

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
extras = project["optional-dependencies"]
deps = project["dependencies"] + extras["peft"] + extras["demo"] + extras["examples"]
proved = {"transformers", "accelerate", "peft", "huggingface_hub", "safetensors", "datasets", "tokenizers"}
pins = []
for dep in deps:
    match = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*>=\s*([0-9][0-9.]*)", dep.strip())
    if match and match.group(1).lower().replace("-", "_") in proved:
        pins.append(f"{match.group(1)}=={match.group(2)}")
missing = proved - {p.split("==")[0].lower().replace("-", "_") for p in pins}
if missing:
    raise SystemExit(f"test_min_versions.sh: no `>=` floor in pyproject.toml for {sorted(missing)}")
print(" ".join(sorted(pins)))
EOF
)

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
stamp=$VENV/.hf_ema_min_setup
want="$(cat pyproject.toml scripts/test_min_versions.sh | sha1sum | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    # shellcheck disable=SC2086
    "$VENV/bin/python" -m pip install -q "torch==2.13.0" $pins pytest pytest-timeout 2>&1 \
        | grep -v "^WARNING: Location" || true
    "$VENV/bin/python" -m pip install -q --no-deps -e . 2>&1 | grep -v "^WARNING: Location" || true
    echo "$want" > "$stamp"
fi
# Fail if the resolver moved anything off its floor (or torch off the CPU wheel).
# shellcheck disable=SC2086
"$VENV/bin/python" - $pins <<'EOF'
import importlib.metadata as md
import sys

import torch

from packaging.version import Version

wrong = [p for p in sys.argv[1:] if Version(md.version(p.split("==")[0])) != Version(p.split("==")[1])]
assert torch.__version__.startswith("2.13.0"), torch.__version__
if wrong:
    raise SystemExit(f"test_min_versions.sh: not installed at the floor: {wrong}")
EOF
echo "minimum versions: $pins (torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)'))"

export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# compat/torch.py: test_model_ema, test_serialization; compat/transformers.py: test_callback (bind and the frame
# walk, resume, LoRA), test_evaluation (the evaluation wrap, swap_at_end); compat/huggingface_hub.py and the
# Trainer's push hooks: test_hub (2 processes for the Trainer + DDP push, through accelerate); compat/torch_fsdp.py
# and compat/deepspeed.py: the FSDP1/FSDP2/DDP/ZeRO-3-layout launch of test_sharding. Not test_sharding's Trainer +
# DDP resume: transformers < 5.18 loads the optimizer state onto `args.device` under DDP, which torch 2.13 cannot
# restore on a CPU-only machine (a Trainer limitation of CPU DDP, not hf-ema's; the main suite runs it).
# The app's serve/batching/ reads peft's LoRA layers (lora_A, lora_B, scaling, lora_variant, use_dora) to stack
# adapters, and transformers' cache and forward arguments: test_serve_batching and test_serve_compare.
status=0
"$VENV/bin/python" -m pytest -q -p no:cacheprovider \
    tests/test_layers.py tests/test_config.py tests/test_model_ema.py tests/test_serialization.py \
    tests/test_callback.py tests/test_evaluation.py tests/test_hub.py tests/test_serve_batching.py \
    tests/test_serve_compare.py "$@" || status=$?
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_sharding.py \
    -k "zero3_layout or fsdp1_without_orig_params" "$@" || status=$?
echo "minimum-versions job: exit $status in $(( $(date +%s) - start )) s"
exit $status
