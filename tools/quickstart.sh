#!/usr/bin/env bash
# Set up (./.venv) and run the main job: quantize all-MiniLM-L6-v2 (shipped in a package)
# calibrated on real text, print the quant summary and the accuracy against FP32.
# Any `qpass quantize` flag may follow, e.g. --config INT8_DEFAULT_CFG.
set -euo pipefail
. "$(dirname "$0")/env.sh"
qpass quantize --model minilm "$@"
