#!/usr/bin/env bash
# The multimodal hops task's CoT warm-up (docs/results.md, "The multimodal variant: CoT does not learn the lookups"):
# args/hops.yaml (the start is the colour of the object in the image, then hops_k=2 arrows) with the text variant's
# data size, 16,000 questions, CoT on the tiny InternVL for seeds 0 (6 epochs), 1 (2) and 2 (1), how far each
# checkpoint's chain stays right, and for comparison the same tiny preset's language model trained on the text variant
# (1 epoch, seeds 0 and 1). About 100 minutes on 2 CPU cores; a finished run is left as it is, an unfinished one
# resumes. The table's rows (Coconut and the others from these warm-ups) were not run: nothing to start them from.
#
#   bash scripts/hops_mm_results.sh [OUT]        # default OUT: runs/hops_table
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi
T=${1:-runs/hops_table}
D=$T/data
cot() {  # seed epochs
    python run.py args/hops.yaml coconut=false cot=true builtin_train_size=16000 seed="$1" num_epochs="$2" \
        name="cot_warmup_seed$1" save_path="$T/runs" train_path="$D/aokvqa_v1p0_train.json" \
        val_path="$D/aokvqa_v1p0_val.json" image_root="$D"
    for c in "$T/runs/cot_warmup_seed$1"/checkpoint_*; do
        python scripts/chain_accuracy.py "$c" --data "$D/aokvqa_v1p0_val.json" | tee -a "$T/chain_accuracy.jsonl"
    done
}
cot 0 6
cot 1 2
cot 2 1
# the tiny InternVL's language model on the text variant (args/hops_text.yaml's data: k=3, 16,000 questions)
D=$T/data_text
for s in 0 1; do
    python run.py args/hops_text.yaml model_id=tiny coconut=false cot=true num_epochs=1 seed="$s" \
        name="tiny_on_hops_text_seed$s" save_path="$T/runs" train_path="$D/hops_text_train.json" \
        val_path="$D/hops_text_val.json"
    python scripts/chain_accuracy.py "$T/runs/tiny_on_hops_text_seed$s/checkpoint_1" --data "$D/hops_text_val.json" \
        | tee -a "$T/chain_accuracy.jsonl"
done
