#!/usr/bin/env bash
# Sets up, builds, and runs the main job on the vendored tiny model: inspect it, generate text,
# measure perplexity, and benchmark decode against the memory-bandwidth bound.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
sparsa=build/release/sparsa
model=${1:-models/tiny}

echo "== inspect"
$sparsa inspect "$model" | head -n 8
echo "== generate (greedy)"
$sparsa generate "$model" -p "The kernel scheduler" -n 48
echo "== perplexity"
if [ -f ../shared/data/valid.jsonl ]; then
  $sparsa eval "$model" --data ../shared/data/valid.jsonl --max-windows 64
else
  $sparsa eval "$model" --data README.md --ctx 128
fi
echo "== bench"
$sparsa bench "$model" --threads "$(nproc)"
