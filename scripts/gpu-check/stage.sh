#!/usr/bin/env bash
# Builds, on this machine (no GPU needed), the release `sdrs` with CUDA for the GPU check and
# stages what run.sh needs into .gpu/ (ignore it with `echo /.gpu/ >> .git/info/exclude`): the
# stripped binary and the fixture folders the check reads (the tiny SD1.5 and SDXL models, the
# reference outputs, the generator draws, the tokenizer cases; about 45 MB with the binary
# compressed). scripts/gpu-check/README.md says how to take it to a GPU machine.
#
#   scripts/gpu-check/stage.sh [FIXTURES_DIR]      (default: tests/fixtures)
set -euo pipefail
cd "$(dirname "$0")/../.."
fixtures=${1:-tests/fixtures}

# shellcheck source=../../.ci/cuda-toolchain
source .ci/cuda-toolchain
.ci/cuda-stubs
target=${CARGO_TARGET_DIR:-target/cuda}
# PTX for compute_80 runs on every GPU from Ampere on (crates/kernels/cuda/README.md).
CUDA_COMPUTE_CAP=80 CARGO_TARGET_DIR="$target" cargo build --release --locked --features cuda

rm -rf .gpu && mkdir -p .gpu/fixtures
strip -o .gpu/sdrs "$target/release/sdrs"
# Compressed for the trip; run.sh unpacks it.
xz -T0 -6 -k .gpu/sdrs && rm .gpu/sdrs
for item in tiny-sd15 tiny-sdxl reference rng.safetensors tokenizer_cases.json README.md; do
  cp -r "$fixtures/$item" .gpu/fixtures/
done
cp scripts/gpu-check/run.sh .gpu/
du -sh .gpu .gpu/*
