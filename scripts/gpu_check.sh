#!/usr/bin/env bash
# GPU check: what the CPU suite cannot run, in under 10 minutes on one GPU. Prints a summary, exits non-zero if
# anything failed.
#
#   bash scripts/gpu_check.sh [OUT_DIR]          # default OUT_DIR: runs/gpu_check
#   NPROC=2 bash scripts/gpu_check.sh            # processes per run (default: 2 when 2+ GPUs are visible, else 1)
#
# 1-4. torchrun with NCCL, bf16: two epochs (stage 0, then stage 1 with latents) each with an evaluation (batched
#      generation), of the tiny InternVL and of the original-format stand-in (tests/internvl_chat_standin, remote
#      code, as OpenGVLab/InternVL3-1B-Pretrained), under DDP and under FSDP2 (generation under FSDP included; the FSDP runs write their checkpoints with async_checkpoint).
#      Every collective runs on NCCL, so a tensor on the wrong device fails here. With one process the model is not
#      wrapped (distributed.wrap_model wraps for 2+ processes): DDP/FSDP themselves need NPROC=2 on 2 GPUs.
# 5.   The same FSDP run of the tiny model with thought_norm=projection and thought_supervision=1.0.
# 6.   The speed and memory benchmark at InternVL3-1B's shapes (random weights), numbers to OUT_DIR/benchmark.json.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi

OUT=${1:-runs/gpu_check}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export MMC_CACHE="$OUT/model_cache" TOKENIZERS_PARALLELISM=false
export HF_MODULES_CACHE="$OUT/hf_modules"  # the stand-in's remote code is copied here, not into ~/.cache
declare -a SUMMARY=()
FAILED=0

record() {  # record NAME SECONDS STATUS [DETAIL]
    SUMMARY+=("$(printf '%-28s %-4s %5ss  %s' "$1" "$3" "$2" "${4:-}")")
    if [ "$3" != "ok" ]; then FAILED=1; fi
}

step() {  # step NAME LOG TIMEOUT_S COMMAND...: run with a time limit, output to LOG (its tail shown on failure)
    local name=$1 log=$2 limit=$3
    shift 3
    local start=$SECONDS
    echo "== $name"
    if timeout "$limit" "$@" >"$log" 2>&1; then
        return 0
    else
        local rc=$?
        echo "   FAILED (exit $rc, $((SECONDS - start)) s); the end of $log:"
        tail -n 25 "$log" | sed 's/^/   | /'
        return $rc
    fi
}

if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA device visible to torch: nothing to check"
    exit 1
fi
GPUS=$(python -c "import torch; print(torch.cuda.device_count())")
NPROC=${NPROC:-$([ "$GPUS" -ge 2 ] && echo 2 || echo 1)}
python -c "import torch; print('torch', torch.__version__, 'on', torch.cuda.get_device_name(0), '| processes per run:', $NPROC)"

# Data and the original-format stand-in checkpoint (written as tests/test_backbone.py writes it).
start=$SECONDS
if step "prepare data and stand-in" "$OUT/prepare.log" 300 bash -c "
    python -m multimodal_coconut.builtin_data --out '$OUT/data' --train 64 --val 16 --seed 0 --regenerate &&
    rm -rf '$OUT/standin' && python -c \"import sys; sys.path.insert(0, 'tests');
from test_backbone import write_standin; write_standin('$OUT/standin')\""; then
    record "prepare" $((SECONDS - start)) ok
else
    record "prepare" $((SECONDS - start)) FAIL "see $OUT/prepare.log"
    printf '%s\n' "${SUMMARY[@]}"
    exit 1
fi

DATA=(train_path="$OUT/data/aokvqa_v1p0_train.json" val_path="$OUT/data/aokvqa_v1p0_val.json"
      image_root="$OUT/data" builtin_train_size=64 builtin_val_size=16)
COMMON=(save_path="$OUT/runs" num_epochs=2 epochs_per_stage=1 max_latent_stage=1 batch_size_training=8
        max_new_tokens=16 num_workers=0 bf16=true)
port=29600
train_check() {  # train_check NAME STRATEGY OVERRIDES...: torchrun on NCCL, then check both epochs in metrics.jsonl
    local name=$1 strategy=$2
    shift 2
    port=$((port + 1))
    rm -rf "$OUT/runs/$name"
    start=$SECONDS
    if step "$name: torchrun, $NPROC process(es), NCCL, bf16" "$OUT/$name.log" 240 \
        python -m torch.distributed.run --nnodes 1 --nproc_per_node "$NPROC" --master_port "$port" run.py \
        args/demo.yaml name="$name" distributed="$strategy" async_checkpoint=$([ "$strategy" = fsdp ] && echo true || echo false) \
        "$@" "${DATA[@]}" "${COMMON[@]}"; then
        # Both epochs trained (finite loss) and were evaluated (generation -> accuracy).
        detail=$(python - "$OUT/runs/$name/metrics.jsonl" 2>&1 <<'EOF'
import json, math, sys
metrics = [json.loads(line) for line in open(sys.argv[1])]
assert [m["epoch"] for m in metrics] == [1, 2], metrics
for m in metrics:
    assert m["train_loss"] is not None and math.isfinite(m["train_loss"]), m
    assert m.get("mc_accuracy") is not None, m
print("loss " + " ".join(f"{m['train_loss']:.3f}" for m in metrics)
      + " | MC " + " ".join(f"{m['mc_accuracy']:.1f}" for m in metrics)
      + " | tok/s " + " ".join(str(m["tokens_per_s"]) for m in metrics))
EOF
        ) && record "$name" $((SECONDS - start)) ok "$detail" \
          || record "$name" $((SECONDS - start)) FAIL "metrics.jsonl: ${detail##*$'\n'}"
    else
        record "$name" $((SECONDS - start)) FAIL "see $OUT/$name.log"
    fi
}
for model in tiny standin; do
    if [ "$model" = standin ]; then
        MODEL=(model_id="$OUT/standin" trust_remote_code=true image_size=64 max_num_patches=1)
    else
        MODEL=(model_id=tiny)
    fi
    for strategy in ddp fsdp; do
        train_check "$model-$strategy" "$strategy" "${MODEL[@]}"
    done
done
# 5. The options on the thought (learned projection + step supervision) under FSDP: the projection's parameters
#    are sharded and checkpointed with the model, the step loss's extra decoder call runs on every rank.
train_check "tiny-fsdp-options" fsdp model_id=tiny thought_norm=projection thought_supervision=1.0

start=$SECONDS
if step "benchmark: InternVL3-1B shapes" "$OUT/benchmark.log" 330 \
    python -m multimodal_coconut.benchmark --device cuda --preset internvl3-1b-shape --out "$OUT/benchmark.json"; then
    record "benchmark internvl3-1b-shape" $((SECONDS - start)) ok "$OUT/benchmark.json, tables in $OUT/benchmark.log"
else
    record "benchmark internvl3-1b-shape" $((SECONDS - start)) FAIL "see $OUT/benchmark.log"
fi

echo
echo "== summary (outputs in $OUT)"
printf '%s\n' "${SUMMARY[@]}"
if [ "$FAILED" -ne 0 ]; then
    echo "GPU CHECK FAILED"
    exit 1
fi
echo "GPU CHECK OK"
