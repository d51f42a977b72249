#!/usr/bin/env bash
# The GPU check: run on a machine with an NVIDIA GPU, its driver and no Rust, with a release
# `sdrs` built elsewhere with `--features cuda` (see stage.sh) and the fixtures. It writes one
# report (Markdown, with the raw outputs beside it) and exits 0 once every step has run; the
# report says which steps passed. Budget: under 8 minutes in all (each step has its own limit).
#
#   scripts/gpu-check/run.sh [SDRS_BINARY] [FIXTURES_DIR] [OUT_DIR]
#
# Defaults: .gpu/sdrs, .gpu/fixtures, $OUT (the device tool's output folder) or ./gpu-check-out.
# What it checks:
#   1. the machine: nvidia-smi, the driver, the CUDA libraries the binary needs (ldd);
#   2. device choice: `--device auto` takes the GPU (prints `device: cuda:0 (...)`);
#   3. our CUDA kernels against the CPU ones (`sdrs selfcheck --device cuda`: flash attention
#      for head dims 40/64/80/160, implicit-GEMM convolutions, fused GroupNorm+SiLU, GEGLU, in
#      f32/f16/bf16);
#   4. `sdrs parity --device cuda` in f32, f16 and bf16 on the fixtures, with candle's kernels
#      (the default) and with ours (SDRS_GPU_KERNELS=ours);
#   5. `sdrs bench --device cuda --dtype f16`: SD1.5 at 512 and SDXL at 1024 with random
#      full-size weights (UNet step it/s, VAE decode, whole generation, GFLOP/s, peak VRAM), with
#      candle's kernels and with ours.
set -uo pipefail

here="$(cd "$(dirname "$0")/../.." && pwd)"
sdrs="${1:-$here/.gpu/sdrs}"
fixtures="${2:-$here/.gpu/fixtures}"
out="${3:-${OUT:-$here/gpu-check-out}}"
mkdir -p "$out"
report="$out/gpu-report.md"
started=$(date +%s)

: >"$report"
say() { printf '%s\n' "$*" >>"$report"; }
# step NAME LIMIT_S COMMAND...: runs the command with a time limit, keeps its output in
# $out/NAME.log, and records its status and duration in the report.
budget="${SDRS_GPU_CHECK_BUDGET:-420}"
step() {
  local name="$1" limit="$2"
  shift 2
  local t0 t1 rc
  if [ $(($(date +%s) - started)) -ge "$budget" ]; then
    say "### $name: skipped (the ${budget} s budget is spent)"
    return 0
  fi
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >"$out/$name.log" 2>&1
  rc=$?
  t1=$(date +%s)
  local status="ok"
  [ "$rc" -eq 0 ] || status="FAILED (exit $rc)"
  [ "$rc" -eq 124 ] && status="TIMED OUT after ${limit} s"
  say "### $name: $status, $((t1 - t0)) s"
  say '```'
  tail -n 60 "$out/$name.log" >>"$report"
  say '```'
  return 0
}

say "# sdrs GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
say ""
say "binary: $sdrs"
say "fixtures: $fixtures"
# stage.sh ships the binary compressed.
if [ ! -e "$sdrs" ] && [ -f "$sdrs.xz" ]; then
  xz -d -k "$sdrs.xz" && chmod +x "$sdrs"
fi
if [ ! -x "$sdrs" ]; then
  say "FAILED: no executable sdrs at $sdrs"
  cat "$report"
  exit 1
fi

step machine 30 bash -c "nvidia-smi; nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv; nvcc --version; uname -a; nproc; echo '--- libraries the binary needs:'; ldd '$sdrs'"
# (grep reads all of ldd's output: with -q it would stop early and pipefail would see ldd's SIGPIPE.)
if ldd "$sdrs" 2>&1 | grep "not found" >/dev/null; then
  say "FAILED: the binary needs libraries this machine lacks (see ldd above): install the CUDA 13 runtime libraries (cuBLAS, cuRAND, NVRTC, cudart)"
  cat "$report"
  exit 1
fi
step version 30 "$sdrs" --version
step device-auto 120 "$sdrs" generate -m "$fixtures/tiny-sd15" -p "a red fox" --steps 2 -W 64 -H 64 -s 1 -o "$out/auto.png"
step selfcheck 90 "$sdrs" selfcheck --device cuda
parity() { step "parity-$1-$2" 90 env SDRS_GPU_KERNELS="$1" "$sdrs" parity --fixtures "$fixtures" --device cuda --dtype "$2"; }
bench() {
  local model="$1" size="$2" kernels="$3" runs="$4" limit="$5"
  step "bench-$model-$size-$kernels" "$limit" env SDRS_GPU_KERNELS="$kernels" "$sdrs" bench -m "$model" --size "$size" --device cuda --dtype f16 --runs "$runs" --steps 20 --parts unet,vae,generate --json "$out/bench-$model-$size-$kernels.json"
}
parity candle f16
parity ours f16
bench sd15 512 candle 10 90
bench sd15 512 ours 10 90
parity candle f32
parity candle bf16
parity ours f32
parity ours bf16
bench sdxl 1024 candle 5 120
bench sdxl 1024 ours 5 120

say ""
say "## Summary"
grep -h "^### " "$report" | sed 's/^### /- /' >"$out/summary.txt"
cat "$out/summary.txt" >>"$report"
for log in "$out"/parity-*.log; do
  [ -f "$log" ] && say "- $(basename "$log" .log): $(grep -E '^[0-9]+ passed' "$log" | tail -n 1)"
done
say "total: $(($(date +%s) - started)) s"
cat "$report"
