#!/usr/bin/env bash
# The multimodal hops task around a pretrained language model (docs/results.md, "Around a pretrained language
# model"): the tiny InternVL with `tiny-text` after the text hops task's CoT as its language model
# (tiny_language_model), args/hops.yaml (start = the colour of the object in the image, then hops_k 2 arrows), one
# epoch of CoT, then the text recipe's mixing (uniform_prob 0.3, one epoch per stage):
#   1. args/hops.yaml's 6,000 questions: the five latent rows, seeds 0 and 1 (pause + step supervision: seed 0);
#   2. 16,000 questions (the text variant's size): Coconut + step supervision (seeds 0, 1) and pause + step
#      supervision (seed 0);
#   3. (6,000 questions) around the text table's Coconut + step supervision checkpoint instead of its CoT;
# then the analysis of the Coconut + step supervision checkpoints (16,000 questions: seed 0 also at stage 2). ~5 hours
# on 2 CPU cores; finished runs are reused and unfinished ones resume. (docs/ used runs/hops_mm_pre and
# runs/hops_mm_pre16k for the two folders, each with its own copy of the same language model.)
#
#   bash scripts/hops_mm_pretrained.sh [OUT]        # default OUT: runs/hops_mm_pre
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi
T=${1:-runs/hops_mm_pre}
# The language model: tiny-text after 2 epochs of CoT on the text hops task, seed 0 (args/hops_text.yaml's recipe;
# docs/ used the text table's seed-0 warm-up, the same command and seed, copied here). One language model for every
# seed: the seed draws the vision side, the data order and the mixing.
LM=$T/text_cot
if [ ! -f "$LM/checkpoint_2/COMPLETE" ]; then
    python run.py args/hops_text.yaml coconut=false cot=true num_epochs=2 seed=0 name=text_cot save_path="$T" \
        train_path="$T/data_text/hops_text_train.json" val_path="$T/data_text/hops_text_val.json"
fi
SET="tiny_language_model=$LM/checkpoint_2 uniform_prob=0.3"
run() {  # OUT ROWS... (after --): the table's runner with this recipe
    local out=$1; shift
    python -m multimodal_coconut.experiments --config args/hops.yaml --cot-warmup 1 --jobs 2 --out "$out" "$@"
}
S=$T/q6000
run "$S" --seeds 0 --set $SET --rows coconut no_thought pause coconut_step pause_step
run "$S" --seeds 1 --set $SET --rows coconut no_thought pause coconut_step
run "$S" --seeds 0 1 --set $SET --rows coconut no_thought pause coconut_step pause_step --report-only
L=$T/q16000
run "$L" --seeds 0 --set $SET builtin_train_size=16000 --rows coconut_step pause_step
run "$L" --seeds 1 --set $SET builtin_train_size=16000 --rows coconut_step
run "$L" --seeds 0 1 --set $SET builtin_train_size=16000 --rows coconut_step pause_step --report-only
python -m multimodal_coconut.analyze "$L/runs/coconut_step_seed0/checkpoint_3" --data "$L/data/aokvqa_v1p0_val.json" \
    --out "$L/analysis/coconut_step_seed0_stage2"     # stage 2, where the answers do follow a thought
for s in 0 1; do
    python -m multimodal_coconut.analyze "$L/runs/coconut_step_seed$s" --data "$L/data/aokvqa_v1p0_val.json" \
        --out "$L/analysis/coconut_step_seed$s"
done
# 3. The language model that already reasons in thoughts: the text mixing table's Coconut + step supervision checkpoint
#    (seed 1, stage 3; docs/ used runs/hops_text_uniform/runs/coconut_step_seed1/checkpoint_4, copied here), the
#    6,000-question recipe: Coconut + step supervision (seeds 0, 1, 2), pause + step supervision, plain Coconut, w/o
#    thought and pause as thought (seeds 0, 1), No-CoT and CoT (seed 0).
TL=$T/lm_from_coconut_step
TLM=$TL/text_lm/checkpoint_4
if [ ! -f "$TLM/COMPLETE" ]; then
    echo "copy the text mixing table's coconut_step_seed1/checkpoint_4 (bash scripts/hops_results.sh) to $TLM" >&2
    exit 1
fi
SET="tiny_language_model=$TLM uniform_prob=0.3"
run "$TL" --seeds 0 --set $SET --rows coconut_step pause_step
run "$TL" --seeds 1 --set $SET --rows coconut_step pause_step
run "$TL" --seeds 2 --set $SET --rows coconut_step
# the controls without step supervision (seeds 0, 1), and No-CoT and CoT (seed 0)
run "$TL" --seeds 0 1 --set $SET --rows coconut no_thought pause
run "$TL" --seeds 0 --set $SET --rows no_cot cot
run "$TL" --seeds 0 1 2 --set $SET --rows no_cot cot coconut no_thought pause coconut_step pause_step --report-only
for s in 0 1 2; do
    python -m multimodal_coconut.analyze "$TL/runs/coconut_step_seed$s" --data "$TL/data/aokvqa_v1p0_val.json" \
        --out "$TL/analysis/coconut_step_seed$s"
done
