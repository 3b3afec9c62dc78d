#!/usr/bin/env bash
# CTest entry of the end-to-end tests: run.sh client|load PATH_TO_SPARSA.
# Skips (exit 77) when node, the npm packages (npm ci in tests/e2e) or, for `load`, ../shared are
# missing, except in CI (CI=true), where that is a failure.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
mode="$1"
cli="$2"
skip() {
  if [ "${CI:-}" = "true" ]; then
    echo "FAIL: $1 (required in CI)" >&2
    exit 1
  fi
  echo "SKIPPED: $1"
  exit 77
}
command -v node >/dev/null 2>&1 || skip "node is not installed"
[ -d "$here/node_modules/openai" ] || skip "the openai npm package is missing (cd tests/e2e && npm ci)"
case "$mode" in
  client)
    exec node "$here/client.mjs" --cli "$cli" --model "$root/models/tiny" ;;
  load)
    shared="${SPARSA_SHARED:-$root/../shared}"
    [ -f "$shared/models/small/config.json" ] || skip "../shared/models/small is absent"
    exec node "$here/load.mjs" --cli "$cli" --model "$shared/models/small" --check ;;
  *)
    echo "usage: run.sh client|load PATH_TO_SPARSA" >&2
    exit 2 ;;
esac
