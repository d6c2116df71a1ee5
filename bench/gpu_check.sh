#!/usr/bin/env bash
# GPU check on a CUDA machine whose python already has torch, grpcio, protobuf, transformers:
# install the project without touching torch, run the CUDA tests and the end-to-end tests, then
# profile and measure a Mixtral-8x7B-shaped model under a 16 GiB device budget.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
$PY -m pip install -q --no-deps -e .
$PY -m pip install -q safetensors tokenizers platformdirs tqdm ninja grpcio-health-checking \
    grpcio-reflection prometheus-client pytest pytest-timeout 2>/dev/null || true
$PY -m pytest -q tests/test_cuda.py tests/test_model_vs_hf.py tests/test_attention_kernel.py
$PY bench/gpu_check.py --layers "${LAYERS:-8}" --device-memory-gb "${BUDGET_GB:-16}" "$@"
