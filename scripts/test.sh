#!/usr/bin/env bash
# Builds (release preset) and runs every test. Tests that need ../shared skip without it, and
# fail without it when CI=true.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
ctest --preset release -j 1 --timeout 1500 "$@"
