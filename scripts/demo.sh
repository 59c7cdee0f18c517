#!/usr/bin/env bash
# Set up and run the demo: the tiny InternVL on the built-in visual reasoning set, stage 0 (CoT) through the last
# latent stage, on CPU in minutes. Extra arguments are config overrides, e.g. `bash scripts/demo.sh num_epochs=4`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python run.py args/demo.yaml "$@"
