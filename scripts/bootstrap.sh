#!/usr/bin/env bash
# Installs the Debian packages antkv needs and builds it: build/ (Release; CUDA kernels too when nvcc is
# at /usr/local/cuda or CUDAToolkit_ROOT) and build-asan/ (CPU code under AddressSanitizer + UBSan).
# Run from the repository root on Debian 12 as root (or with sudo).
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo
PACKAGES=(
  build-essential cmake ninja-build pkg-config git file xz-utils
  libeigen3-dev libopenblas-dev libfaiss-dev libhdf5-dev hdf5-tools
  libcli11-dev libfmt-dev catch2 libyaml-cpp-dev nlohmann-json3-dev libpcre2-dev libxxhash-dev libutf8proc-dev
  python3-matplotlib
)
$SUDO apt-get update -qq
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
JOBS=$(nproc)
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release
cmake --build build -j "$JOBS"
cmake -S . -B build-asan -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DANTKV_SANITIZE=ON
cmake --build build-asan -j "$JOBS"
