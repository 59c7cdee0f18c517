#!/usr/bin/env bash
# The hops task's results in docs/results.md ("The hops task"), from scratch: the table (3 seeds; every row but No-CoT
# starts from 2 epochs of CoT, then one epoch per stage), whether each checkpoint's answers need its thoughts, and the
# analysis of the Coconut checkpoints. About 75 minutes on 2 CPU cores; finished runs are reused, unfinished ones
# resume, so it can be stopped and started again.
#
#   bash scripts/hops_results.sh [OUT]        # default OUT: runs/hops_text_table
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi
T=${1:-runs/hops_text_table}
python -m multimodal_coconut.experiments --config args/hops_text.yaml --seeds 0 1 2 --cot-warmup 2 --jobs 2 \
    --rows no_cot cot coconut no_thought pause coconut_step pause_step --out "$T"
python scripts/thought_use_by_stage.py "$T" --rows coconut coconut_step
for run in coconut_seed0 coconut_step_seed0 coconut_step_seed1 coconut_step_seed2; do
    python -m multimodal_coconut.analyze "$T/runs/$run" --data "$T/data/hops_text_val.json" --out "$T/analysis/$run"
done
