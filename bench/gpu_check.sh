#!/usr/bin/env bash
# The GPU machine check: one call on a lent CUDA machine whose python already has torch, grpcio,
# protobuf, transformers, safetensors, tokenizers and pytest (missing packages travel as wheels).
# On the H200 image of 2026-11-30 these were missing or too old and went as cp312 wheels installed
# with `pip install --no-deps --target /tmp/site` before the script: grpcio==1.85.1 (the generated
# stubs check it), protobuf==7.36.2 (the generated modules need >= 7.35), grpcio-health-checking
# and grpcio-reflection 1.85.1, platformdirs.
#
#   OUT=/tmp/gpu_out bash bench/gpu_check.sh
#
# Stages, each under its own time limit so one hang cannot eat the call: the C++ extensions are
# built in the background; the CUDA tests and the services end-to-end tests (which run on the GPU
# there: `--device auto`, float32 against HF transformers); a Mixtral-8x7B-shaped model under a
# device budget that streams most layers (bench/gpu_check.py); which C++ exceptions reach Python
# from an extension built there (bench/extension_errors.py); the CPU attention kernel's tests and
# a bandwidth grid on that machine's CPU (its AVX-512 path where the CPU has one). Everything goes
# to $OUT/gpu_check.log; the JSON results beside it; a summary is printed last.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-/tmp/gpu_check_out}
PY=${PYTHON:-python3}
LOG=$OUT/gpu_check.log
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
SUMMARY=()

stage() {  # stage NAME SECONDS COMMAND...
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s)
    echo "=== $name (limit ${limit}s): $*" >>"$LOG"
    timeout -k 10 "$limit" "$@" >>"$LOG" 2>&1
    rc=$?
    SUMMARY+=("$(printf '%-22s rc=%-3s %4ss' "$name" "$rc" "$(($(date +%s) - start))")")
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
    lscpu | grep -E '^(Model name|CPU\(s\)|Thread|Core|Socket)'
    grep -o -w -E 'avx2|fma|avx512f|avx512bw|avx512_bf16|avx512_fp16' /proc/cpuinfo | sort | uniq -c
    $PY -c 'import torch, transformers, grpc, google.protobuf as pb
print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers",
      transformers.__version__, "grpcio", grpc.__version__, "protobuf", pb.__version__)'
} >>"$LOG" 2>&1

# Both CPU extensions (the attention kernel; the panel kernels, used by the sampler's reductions)
# build while the CUDA tests run; later users wait on the build lock.
$PY -c 'from services.attention_cpu import kernel; from moelens import panel_gemm
print("attention kernel:", kernel.backend(), "| panel kernels:", panel_gemm.is_supported())' \
    >"$OUT/ext_build.log" 2>&1 &
BUILD=$!

stage cuda-tests "${CUDA_TESTS_S:-200}" $PY -m pytest -q -p no:cacheprovider --durations=10 \
    tests/test_cuda.py tests/test_layer_store.py tests/test_services_e2e.py
wait $BUILD
cat "$OUT/ext_build.log" >>"$LOG"
stage gpu-benchmark "${GPU_BENCH_S:-170}" $PY bench/gpu_check.py --layers "${LAYERS:-4}" \
    --device-memory-gb "${BUDGET_GB:-11.5}" --kv-cache-gb 8 --out /tmp/gpu_check \
    --json "$OUT/gpu_check.json"
stage extension-errors "${ERRORS_S:-150}" $PY bench/extension_errors.py
# the argument-check tests apart: where an extension's ValueError kills the process (above), the
# numerical tests still report
stage attention-tests "${ATTN_TESTS_S:-60}" $PY -m pytest -q -p no:cacheprovider \
    tests/test_attention_kernel.py -k "not rejects"
stage attention-checks "${ATTN_TESTS_S:-60}" $PY -m pytest -q -p no:cacheprovider \
    tests/test_attention_kernel.py -k rejects
stage attention-bench "${ATTN_BENCH_S:-100}" $PY -m moelens_cli.main bench attention \
    --contexts 2048,8192 --batches 16 --gqa 1,4,8 --kv-dtypes float32,bfloat16 \
    --threads "${ATTN_THREADS:-16}" --min-seconds 0.3 --json "$OUT/attention.json"

grep -E '^(=== |[0-9]+ (passed|failed)|FAILED|ERROR|B_IO|GEMM line|layers:|n_real)| -> ' "$LOG"
grep -E '^(measured|Stage-1|attention kernel|checkpoint)' "$LOG"
sed -n "/^=== attention-bench/,\$p" "$LOG" | tail -n 25
printf '%s\n' "${SUMMARY[@]}"
