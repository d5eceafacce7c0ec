#!/usr/bin/env bash
# The GPU checks in one run, for a machine with an NVIDIA GPU and a CUDA build of torch:
# `pytest -m cuda`, then the GPU benchmarks (bench.py --gpu, bench_compile.py --gpu,
# bench_layerwise.py --gpu). Each step has its own time limit, so one slow step cannot take the
# others' time; each writes its log to $OUT (default /tmp/qpass_gpu) and its tail to stdout.
#
#   bash tools/gpu_check.sh [steps...]     # steps: pytest bench compile layerwise (default), layerwise_awq,
#                                          # compile_fp8. compile: bf16, FP8 qpass and FP8 fake quant,
#                                          # each also with CUDA graphs, kernels profiled; compile_fp8:
#                                          # the backend's FP8 options (no fast accumulation, unfused);
#                                          # compile_autotune: bf16 and FP8 with mode="max-autotune"
#
# On an H200 (2026-11-28): bench about 50 s without ModelOpt, pytest -m cuda about 115 s with 8
# workers, layerwise about 50 s; bench_compile on the 30-layer model compiles each variant in
# 30-80 s (bf16 about 30-40 s, the quantized ones 50-80 s), so `compile` (six variants) has 360 s
# and `compile_fp8` 420 s; a run cut short still prints each variant measured so far. The machine
# takes about a minute to start: pytest + bench + layerwise fit one call (about 225 s) and
# compile another.
#
# Runs from a source checkout with the machine's own python3 (torch, transformers, onnx,
# onnxruntime, networkx); the model packages are not needed (random SmolLM2-shaped weights).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/qpass_gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
export PYTHONPATH="$PWD:$PWD/tools${PYTHONPATH:+:$PYTHONPATH}"
steps=${*:-bench pytest compile layerwise}

step() {  # step NAME LIMIT_S CMD...
    local name=$1 limit=$2 t0 rc
    shift 2
    echo "=== $name (limit ${limit}s): $*"
    t0=$(date +%s)
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    echo "=== $name: exit $rc after $(($(date +%s) - t0)) s"
    grep -v -e "^DEBUG" -e "Warning" "$OUT/$name.log" | tail -n "${TAIL:-30}"
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    $PY -c "import torch, transformers, onnx, onnxruntime; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, 'onnx', onnx.__version__, 'ort', onnxruntime.__version__)"
} 2>&1 | tee "$OUT/env.log"

# ModelOpt side by side: where ./.whl holds the nvidia-modelopt 0.47 wheel and the dependencies the
# GPU image lacks (pydantic, pydantic-core, annotated-types, typing-inspection, omegaconf, pulp;
# about 21 MB, fetched with `pip download --no-deps --python-version 3.12 ...`, see
# ../.library/device/README.md, and carried with the device call's carry=[".whl"]), they are
# installed to /tmp/site and bench.py --gpu runs ModelOpt's rows too (its CUDA extensions build
# first, about a minute, untimed).
modelopt_flag=(--no-modelopt)
if ls .whl/nvidia_modelopt-*.whl >/dev/null 2>&1; then
    if $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl; then
        export PYTHONPATH="/tmp/site:$PYTHONPATH"
        modelopt_flag=()
        echo "modelopt wheels installed to /tmp/site"
    fi
fi

xdist=()
$PY -c "import xdist" 2>/dev/null && xdist=(-n "${PYTEST_WORKERS:-8}")
for s in $steps; do
    case $s in
    pytest) step pytest "${PYTEST_LIMIT:-180}" $PY -m pytest -m cuda -q -p no:cacheprovider "${xdist[@]}" -rfE \
        tests/test_cuda.py tests/test_cuda_algorithms.py tests/calib/test_layerwise.py tests/calib/test_histogram.py \
        tests/export/test_compile_backend.py tests/export/test_tensorrt.py ;;
    bench) step bench "${BENCH_LIMIT:-240}" $PY tools/bench.py --gpu "${modelopt_flag[@]}" --profile --json "$OUT/bench_gpu.json" ;;
    compile) step compile "${COMPILE_LIMIT:-360}" $PY tools/bench_compile.py --gpu --layers "${COMPILE_LAYERS:-30}" --runs 20 \
        --cudagraphs --profile ;;
    compile_fp8) step compile_fp8 "${COMPILE_LIMIT:-420}" $PY tools/bench_compile.py --gpu --layers "${COMPILE_LAYERS:-30}" \
        --runs 20 --fp8-variants --profile ;;
    compile_autotune) step compile_autotune "${COMPILE_LIMIT:-420}" $PY tools/bench_compile.py --gpu \
        --layers "${COMPILE_LAYERS:-30}" --runs 20 --autotune --profile ;;
    layerwise) step layerwise "${LAYERWISE_LIMIT:-110}" $PY tools/bench_layerwise.py --gpu --random-weights \
        --config INT8_SMOOTHQUANT_CFG ;;
    layerwise_awq) step layerwise_awq "${LAYERWISE_LIMIT:-110}" $PY tools/bench_layerwise.py --gpu --random-weights \
        --layers 8 --config INT4_AWQ_CFG ;;
    *) echo "unknown step $s" ;;
    esac
done
