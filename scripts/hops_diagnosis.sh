#!/usr/bin/env bash
# Why the multimodal hops task's CoT does not learn its lookups (docs/results.md, "The multimodal hops task"): one
# difference from the text variant at a time, each a CoT run of 16,000 questions (seed 1 unless said; the tiny
# preset's seed 1 learnt the text variant in one epoch), then how far each checkpoint's chain stays right. Needs the
# multimodal data of scripts/hops_mm_results.sh (OUT/../hops_table/data; made here if missing). About 80 minutes on
# 2 CPU cores; a finished run is left as it is, an unfinished one resumes.
#
#   bash scripts/hops_diagnosis.sh [OUT]        # default OUT: runs/diag
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi
T=${1:-runs/diag}
M=$(dirname "$T")/hops_table/data      # args/hops.yaml's data with 16,000 questions (hops_k=2)
mkdir -p "$T"
mm() {  # name, then overrides of args/hops.yaml (CoT, 16,000 questions)
    local name=$1; shift
    python run.py args/hops.yaml coconut=false cot=true builtin_train_size=16000 name="$name" save_path="$T" "$@"
}
chain() {  # run, epoch, val file
    python scripts/chain_accuracy.py "$T/$1/checkpoint_$2" --data "$3" | tee -a "$T/chain_accuracy.jsonl"
}
MMD=(train_path="$M/aokvqa_v1p0_train.json" val_path="$M/aokvqa_v1p0_val.json" image_root="$M")
# 1. without the "Choices:" line (answers scored as direct answers)
mm mm_direct_seed1 seed=1 num_epochs=1 answer_from=direct "${MMD[@]}"
chain mm_direct_seed1 1 "$M/aokvqa_v1p0_val.json"
# 2. the vision encoder and projector frozen (image features keep their initial norm, ~0.6 against ~35 trained)
mm mm_frozen_seed1 seed=1 num_epochs=1 freeze_vision=true freeze_projector=true "${MMD[@]}"
chain mm_frozen_seed1 1 "$M/aokvqa_v1p0_val.json"
# 3. three arrows instead of two (hops_k=3), two epochs
K3=$T/data_k3
mm mm_k3_seed1 seed=1 num_epochs=2 hops_k=3 train_path="$K3/aokvqa_v1p0_train.json" \
    val_path="$K3/aokvqa_v1p0_val.json" image_root="$K3"
chain mm_k3_seed1 1 "$K3/aokvqa_v1p0_val.json"
chain mm_k3_seed1 2 "$K3/aokvqa_v1p0_val.json"
# 3b. the same run continued to 6 epochs (a run resumes from its newest checkpoint; num_epochs may grow)
mm mm_k3_seed1 seed=1 num_epochs=6 hops_k=3 train_path="$K3/aokvqa_v1p0_train.json" \
    val_path="$K3/aokvqa_v1p0_val.json" image_root="$K3"
chain mm_k3_seed1 5 "$K3/aokvqa_v1p0_val.json"
chain mm_k3_seed1 6 "$K3/aokvqa_v1p0_val.json"
# 4-5. the start colour written in the question ("Start at green"; the image-reading step dropped), with the image
# (A-OKVQA format) and without it (the general jsonl format, the same questions, choices and steps)
S=$T/data_textstart
mkdir -p "$S" "${S}_noimage"
python - "$M" "$S" <<'EOF'
import json, sys
src, out = sys.argv[1:]
for split in ["train", "val"]:
    records = json.load(open(f"{src}/aokvqa_v1p0_{split}.json"))
    for r in records:
        start = r["step_nodes"][0]
        assert r["steps"][0] == f"object>{start}.", r["question_id"]
        r["question"] = r["question"].replace("Start at the object's colour", f"Start at {start}")
        r["steps"], r["step_nodes"] = r["steps"][1:], r["step_nodes"][1:]
        r["rationales"] = [" ".join(r["steps"])]
    json.dump(records, open(f"{out}/aokvqa_v1p0_{split}.json", "w"))
    with open(f"{out}_noimage/{split}.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps({"id": r["question_id"], "question": r["question"], "choices": r["choices"],
                                "answer": r["correct_choice_idx"], "steps": r["steps"],
                                "step_nodes": r["step_nodes"]}) + "\n")
EOF
mm mm_textstart_seed1 seed=1 num_epochs=1 dataset=aokvqa train_path="$S/aokvqa_v1p0_train.json" \
    val_path="$S/aokvqa_v1p0_val.json" image_root="$M"
chain mm_textstart_seed1 1 "$S/aokvqa_v1p0_val.json"
N=${S}_noimage
mm mm_textstart_noimage_seed1 seed=1 num_epochs=1 dataset=jsonl train_path="$N/train.jsonl" \
    val_path="$N/val.jsonl" image_root=null
chain mm_textstart_noimage_seed1 1 "$N/val.jsonl"
# 6. the same text questions (with choices) on tiny-text, the model that learnt the text variant on 3 of 3 seeds
mm tinytext_k2choices_seed1 model_id=tiny-text seed=1 num_epochs=1 dataset=jsonl train_path="$N/train.jsonl" \
    val_path="$N/val.jsonl" image_root=null
chain tinytext_k2choices_seed1 1 "$N/val.jsonl"
# 7. the text variant itself (args/hops_text.yaml, no choices) with two arrows instead of three, two epochs
K2=$T/data_text_k2
python run.py args/hops_text.yaml hops_k=2 coconut=false cot=true seed=1 num_epochs=2 name=tinytext_k2_seed1 \
    save_path="$T" train_path="$K2/hops_text_train.json" val_path="$K2/hops_text_val.json"
chain tinytext_k2_seed1 1 "$K2/hops_text_val.json"
chain tinytext_k2_seed1 2 "$K2/hops_text_val.json"
