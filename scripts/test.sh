#!/usr/bin/env bash
# Set up and run the test suite (CPU, tiny models, about 10 minutes on 2 cores). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
. .venv/bin/activate
python -m pytest tests "$@"
