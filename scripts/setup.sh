#!/usr/bin/env bash
# Installs the build dependencies (Debian/Ubuntu packages) and builds sparsa (release preset).
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(cmake ninja-build g++ pkg-config libfmt-dev nlohmann-json3-dev libcli11-dev
          libpcre2-dev libyaml-cpp-dev libopenblas-dev liblapacke-dev libgtest-dev libgmock-dev
          libbenchmark-dev libcpp-httplib-dev)
missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

cmake --preset release ${SPARSA_CMAKE_ARGS:-} >/dev/null
cmake --build --preset release -j "$(nproc)"
