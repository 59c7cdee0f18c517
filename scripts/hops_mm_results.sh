#!/usr/bin/env bash
# The multimodal hops task's results in docs/results.md ("The hops task with an image"): the start node is the colour
# of the object in the image, then hops_k=2 arrows in the question (args/hops.yaml), on the tiny InternVL, with the
# text variant's recipe: 16,000 questions, 2 epochs of CoT, then one epoch per stage. Seed 0 only (a row takes
# 25-50 minutes on 2 CPU cores); the runner reuses finished runs and resumes unfinished ones, so this can be stopped
# and started again, and more seeds added with --seeds.
#
#   bash scripts/hops_mm_results.sh [OUT]        # default OUT: runs/hops_table
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi
T=${1:-runs/hops_table}
run() { python -m multimodal_coconut.experiments --config args/hops.yaml --seeds 0 --cot-warmup 2 --jobs 2 \
    --set builtin_train_size=16000 --out "$T" "$@"; }
run --rows coconut coconut_step          # the warm-up alone (every core), then these two side by side
run --rows no_cot pause_step             # is the task's depth needed; step supervision without feedback
python scripts/thought_use_by_stage.py "$T" --rows coconut coconut_step
for r in coconut coconut_step; do
    python -m multimodal_coconut.analyze "$T/runs/${r}_seed0" --data "$T/data/aokvqa_v1p0_val.json" \
        --image-root "$T/data" --out "$T/analysis/${r}_seed0"
done
run --rows no_cot cot coconut no_thought pause coconut_step pause_step   # the rest of the table, and the table
