#!/usr/bin/env bash
# Set up (./.venv) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
. "$(dirname "$0")/env.sh"
python -m pytest -q -p no:cacheprovider --durations=25 "$@"
