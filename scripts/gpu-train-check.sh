#!/usr/bin/env bash
# Checks the CUDA training backend on a machine with an NVIDIA GPU, PyTorch and transformers:
#
#   scripts/gpu-train-check.sh build                    # build/gpu: sparsa, tests, train_grads
#   scripts/gpu-train-check.sh tests                    # the CUDA and training unit tests
#   scripts/gpu-train-check.sh grads MODEL DATA OUT     # gradients against PyTorch
#   scripts/gpu-train-check.sh throughput STUDENT TEACHER DATA OUT [STEPS]
#   scripts/gpu-train-check.sh students SHARED OUT      # SparseGPT 50%, 70%, 2:4 of SHARED/models/small
#   scripts/gpu-train-check.sh finetune SHARED OUT      # fine-tune them (48 M tokens each)
#   scripts/gpu-train-check.sh qat SHARED OUT           # SparseGPT 50% + GPTQ w4g128, then QAT
#   scripts/gpu-train-check.sh dkm SHARED OUT           # 3-bit palettization, then DKM
#   scripts/gpu-train-check.sh eval SHARED OUT          # valid perplexity of all of them
#
# `grads` prunes MODEL to 50% by magnitude in PyTorch (a dense copy, so that both sides read the
# same student), takes one micro-batch of CE + KL + SquareHead against the dense MODEL through
# sparsa's engine (CUDA fp32 and bf16 GEMMs, and the CPU), and compares loss and every parameter's
# gradient with PyTorch in fp32 (scripts/compare_grads_torch.py); JSON reports land in OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
B=build/gpu

case "${1:-}" in
build)
  cmake -S . -B "$B" -G Ninja -DCMAKE_BUILD_TYPE=Release -DSPARSA_BUILD_BENCH=OFF \
    -DSPARSA_BUILD_SERVER=OFF >"$B.configure.log" 2>&1 || { tail -40 "$B.configure.log"; exit 1; }
  grep -E "sparsa:" "$B.configure.log" || true
  ninja -C "$B" sparsa_cli sparsa_tests train_grads
  ;;
tests)
  "$B/sparsa_tests" --gtest_filter='Cuda*:TrainModel*:TrainOps*:Trainer.*:FinetuneCli*'
  ;;
grads)
  model=$2 data=$3 out=$4
  mkdir -p "$out"
  student="$out/student-m50"
  python3 - "$model" "$student" <<'EOF'
import shutil, sys, torch, transformers
src, dst = sys.argv[1], sys.argv[2]
m = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
with torch.no_grad():
    for name, p in m.named_parameters():
        if name.endswith("proj.weight"):
            k = p.numel() // 2
            thr = p.abs().flatten().kthvalue(k).values
            p[p.abs() <= thr] = 0.0
m.save_pretrained(dst, safe_serialization=True)
for f in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(f"{src}/{f}", f"{dst}/{f}")
print("pruned student:", dst)
EOF
  for run in "cuda fp32" "cuda bf16" "cpu fp32"; do
    set -- $run
    tag="$1-$2"
    "$B/train_grads" --student "$student" --teacher "$model" --data "$data" --device "$1" \
      --precision "$2" --batch 4 --seq 256 --ce 1 --kl 1 --squarehead 1 --temperature 2 \
      -o "$out/grads-$tag.safetensors"
    python3 scripts/compare_grads_torch.py "$out/grads-$tag.safetensors" --student "$student" \
      --teacher "$model" --json "$out/compare-$tag.json" |
      grep -E "^(loss|total|ce|kl|squarehead) |^tensors compared|^worst|^median|MISSING|MISMATCH"
  done
  ;;
throughput)
  student=$2 teacher=$3 data=$4 out=$5 steps=${6:-30}
  "$B/sparsa" finetune "$student" --teacher "$teacher" --data "$data" \
    -r recipes/finetune-squarehead-50m.yaml --max-tokens $((steps * 32 * 512)) --device cuda \
    -o "$out" --overwrite --json
  ;;
students)
  # The one-shot SparseGPT students of the fine-tuning runs: OUT/sparsegpt-{50,70,2of4}.
  shared=$2 out=$3
  mkdir -p "$out"
  for r in sparsegpt-50 sparsegpt-70 sparsegpt-2of4; do
    "$B/sparsa" compress "$shared/models/small" -r "recipes/$r.yaml" \
      --calib "$shared/data/train.jsonl" -o "$out/$r" --overwrite --json
  done
  ;;
finetune)
  # Fine-tunes every student of `students` with recipes/finetune-squarehead-50m.yaml, all at
  # once on the one GPU (each in its own session, logs in OUT/ft-*.log), then waits for them.
  shared=$2 out=$3
  for r in sparsegpt-50 sparsegpt-70 sparsegpt-2of4; do
    setsid "$B/sparsa" finetune "$out/$r" --teacher "$shared/models/small" \
      --data "$shared/data/train.jsonl" --valid "$shared/data/valid.jsonl" \
      -r recipes/finetune-squarehead-50m.yaml --device cuda -o "$out/$r-ft" --overwrite --json \
      >"$out/ft-$r.log" 2>&1 </dev/null &
  done
  wait
  ;;
qat)
  # SparseGPT 50% + GPTQ 4-bit g128, then quantization-aware fine-tuning on GPTQ's grid.
  shared=$2 out=$3
  mkdir -p "$out"
  "$B/sparsa" compress "$shared/models/small" -r recipes/sparsegpt-50-gptq-w4g128.yaml \
    --calib "$shared/data/train.jsonl" -o "$out/sparsegpt-50-gptq-w4g128" --overwrite --json
  "$B/sparsa" finetune "$out/sparsegpt-50-gptq-w4g128" --teacher "$shared/models/small" \
    --data "$shared/data/train.jsonl" --valid "$shared/data/valid.jsonl" \
    -r recipes/finetune-qat-w4g128.yaml --device cuda -o "$out/sparsegpt-50-gptq-w4g128-qat" \
    --overwrite --json
  ;;
dkm)
  # 3-bit palettization (one-shot), then clustering-aware fine-tuning (DKM).
  shared=$2 out=$3
  mkdir -p "$out"
  "$B/sparsa" compress "$shared/models/small" -r recipes/palettize-3bit.yaml \
    --calib "$shared/data/train.jsonl" -o "$out/palettize-3bit" --overwrite --json
  "$B/sparsa" finetune "$out/palettize-3bit" --teacher "$shared/models/small" \
    --data "$shared/data/train.jsonl" --valid "$shared/data/valid.jsonl" \
    -r recipes/finetune-dkm-3bit.yaml --device cuda -o "$out/palettize-3bit-dkm" \
    --overwrite --json
  ;;
eval)
  # Valid perplexity (the shared protocol) of the students and their fine-tuned versions.
  shared=$2 out=$3
  for d in "$out"/sparsegpt-* "$out"/palettize-*; do
    [ -d "$d" ] || continue
    echo "$(basename "$d") $("$B/sparsa" eval "$d" --data "$shared/data/valid.jsonl" --json)"
  done
  ;;
*)
  sed -n 2,18p "$0"
  exit 2
  ;;
esac
