#!/usr/bin/env bash
# Side-by-side CPU benchmark: `sdrs bench` and PyTorch/diffusers (torch_side.py) on the same
# real-size UNet step and VAE decode, in one run on this machine, alternating the two so that a
# change in the machine's load hits both; prints a Markdown table with the ratios.
#
# usage: scripts/bench-torch/run.sh [--model sd15|sdxl|sdxl-refiner] [--size N] [--dtypes f32,bf16]
#                                  [--parts unet,vae] [--runs N] [--threads N] [--out FILE.md]
# env:   SDRS_BIN (default target/release/sdrs), SDRS_BENCH_VENV (default .venv-bench; created and
#        filled with the pinned torch and diffusers on first use; it is ignored by git).
set -euo pipefail

root="$(cd "$(dirname "$0")/../.." && pwd)"
here="$root/scripts/bench-torch"
TORCH_VERSION="2.15.*"
DIFFUSERS_VERSION="0.42.1"

model=sd15 size="" dtypes=f32,bf16 parts=unet,vae runs=3 threads="" out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --model) model="$2"; shift 2 ;;
    --size) size="$2"; shift 2 ;;
    --dtypes) dtypes="$2"; shift 2 ;;
    --parts) parts="$2"; shift 2 ;;
    --runs) runs="$2"; shift 2 ;;
    --threads) threads="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "run.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
configs="$root/crates/pipeline/configs/$model"
[ -d "$configs" ] || { echo "run.sh: unknown model '$model': expected sd15, sdxl or sdxl-refiner" >&2; exit 2; }
case "$runs" in ''|*[!0-9]*|0) echo "run.sh: --runs must be a positive integer, got '$runs'" >&2; exit 2 ;; esac

sdrs="${SDRS_BIN:-$root/target/release/sdrs}"
if [ ! -x "$sdrs" ]; then
  echo "building $sdrs (cargo build --release)" >&2
  (cd "$root" && cargo build --release --quiet)
fi
venv="${SDRS_BENCH_VENV:-$root/.venv-bench}"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import torch, diffusers" 2>/dev/null; then
  echo "setting up $venv with torch $TORCH_VERSION and diffusers $DIFFUSERS_VERSION (a few GB, once)" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --upgrade pip
  "$venv/bin/pip" install --quiet "torch==$TORCH_VERSION" "diffusers==$DIFFUSERS_VERSION"
fi

# Both sides run with the same thread count: sdrs' default (its physical cores) unless given.
if [ -z "$threads" ]; then
  threads="$(lscpu -p=socket,core 2>/dev/null | grep -v '^#' | sort -u | wc -l)"
  [ "$threads" -gt 0 ] 2>/dev/null || threads="$(nproc)"
fi
size_args=(); [ -n "$size" ] && size_args=(--size "$size")
sdrs_size=(); [ -n "$size" ] && sdrs_size=(--width "$size" --height "$size")

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cpu="$(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ *//' || true)"
flags="$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || true)"
isa="AVX2-only"
case "$flags" in *avx512f*) isa="AVX-512" ;; esac
case "$flags" in *avx512_bf16*) isa="AVX-512 + AVX512-BF16" ;; esac
case "$flags" in *amx_bf16*) isa="AVX-512 + AMX-BF16" ;; esac
[ "$(uname -m)" = aarch64 ] && isa="aarch64"

IFS=, read -r -a dtype_list <<< "$dtypes"
for dtype in "${dtype_list[@]}"; do
  case "$dtype" in f32|bf16) ;; *) echo "run.sh: unknown dtype '$dtype': expected f32 or bf16" >&2; exit 2 ;; esac
  echo "== $model $dtype: sdrs" >&2
  "$sdrs" bench -m "$model" "${sdrs_size[@]}" --dtype "$dtype" --parts "$parts" --runs "$runs" \
    --threads "$threads" --json "$work/sdrs-$dtype.json" >&2
  echo "== $model $dtype: torch" >&2
  "$venv/bin/python" "$here/torch_side.py" --configs "$configs" "${size_args[@]}" --dtype "$dtype" \
    --parts "$parts" --runs "$runs" --threads "$threads" > "$work/torch-$dtype.json"
done

"$venv/bin/python" "$here/table.py" --cpu "$cpu" --isa "$isa" --cores "$(nproc)" "$work" "${dtype_list[@]}" |
  if [ -n "$out" ]; then tee "$out"; else cat; fi
