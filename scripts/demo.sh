#!/usr/bin/env bash
# Set up and run the demo: the tiny InternVL on the built-in visual reasoning set, stage 0 (CoT) through the last
# latent stage, on CPU in minutes. Extra arguments are config overrides, e.g. `bash scripts/demo.sh num_epochs=4`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python run.py args/demo.yaml "$@"
# Are the thoughts used? The final checkpoint's accuracy with its thoughts intact and with another question's.
read -r run_dir val_path < <(python -c 'import sys; from multimodal_coconut.config import load_config
c = load_config("args/demo.yaml", sys.argv[1:]); print(f"{c.save_path}/{c.name} {c.val_path}")' "$@")
python -m multimodal_coconut.analyze "$run_dir" --data "$val_path" --thought-use
