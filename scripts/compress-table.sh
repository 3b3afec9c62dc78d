#!/usr/bin/env bash
# Compresses a model with each named recipe under the peer protocol (128 windows of 512 tokens
# from train.jsonl) and prints its valid.jsonl perplexity, bits per weight and sparsity.
#   bash scripts/compress-table.sh [-m MODEL] [-d DATA_DIR] [-j PARALLEL] [-t THREADS] RECIPE...
#   bash scripts/compress-table.sh sparsegpt-50 gptq-w4g128
set -euo pipefail
cd "$(dirname "$0")/.."
model=../shared/models/small data=../shared/data jobs=1 threads=2
while getopts "m:d:j:t:" o; do
  case $o in
    m) model=$OPTARG ;; d) data=$OPTARG ;; j) jobs=$OPTARG ;; t) threads=$OPTARG ;;
    *) exit 2 ;;
  esac
done
shift $((OPTIND - 1))
[ $# -gt 0 ] || { echo "usage: $0 [-m MODEL] [-d DATA_DIR] [-j N] [-t N] RECIPE..." >&2; exit 2; }
bin=build/release/sparsa
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
one() {
  local r=$1 out="$work/$1"
  "$bin" compress "$model" -r "recipes/$r.yaml" --calib "$data/train.jsonl" -o "$out" \
    -t "$threads" --json > "$out.compress.json" 2> /dev/null
  "$bin" eval "$out" --data "$data/valid.jsonl" -t "$threads" --json > "$out.eval.json" 2> /dev/null
  python3 - "$r" "$out.compress.json" "$out.eval.json" <<'PY'
import json, sys
c, e = json.load(open(sys.argv[2])), json.load(open(sys.argv[3]))
print(f"{sys.argv[1]:<28} ppl {e['ppl']:.4f}  bits/weight {c['bits_per_weight']:.2f}  "
      f"sparsity {c['sparsity']:.3f}  rel.error {c['mean_relative_error']:.4f}  "
      f"compress {c['seconds']:.0f} s  peak RssAnon {c['peak_rss_anon_bytes'] / 1e6:.0f} MB")
PY
  rm -rf "$out"
}
export -f one; export bin model data threads work
printf "%s\n" "$@" | xargs -P "$jobs" -I{} bash -c 'one {}'
