#!/usr/bin/env bash
# Set up and run the whole test suite, slow tests included (CPU, tiny models, 8-14 minutes on 2 idle cores; CI runs
# this). Extra arguments go to pytest. Without --runslow, `pytest` alone skips the slow ones.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
. .venv/bin/activate
python -m pytest tests --runslow "$@"
