#!/usr/bin/env bash
# The GPU checks of the GPU update, in one command, for a machine with one CUDA GPU and no network (the lent H200):
#   1. the CUDA tests: `update()` under torch.cuda.set_sync_debug_mode("error") in every mode (tests/test_triton.py),
#      and the Triton update against the eager kernels and a float64 reference on the GPU;
#   2. benchmarks/gpu.py, which writes docs/benchmarks/gpu.md.
#
# Wheels the machine lacks (ema-pytorch, diffusers and importlib_metadata 8.x for the anchors) go in .whl/ first,
# downloaded where pip has a network:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl ema-pytorch diffusers "importlib_metadata>=8,<9"
# and travel with the working tree (the device tool's `carry: [".whl"]`).
#
#   bash benchmarks/gpu_check.sh                 # everything (about 8 minutes on an H200)
#   bash benchmarks/gpu_check.sh --section update,syncs   # arguments go to benchmarks/gpu.py
set -uo pipefail
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
status=0
python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_triton.py -k "cuda or model_ema" || status=$?
python3 benchmarks/gpu.py "$@" || status=$?
exit $status
