#!/usr/bin/env bash
# What sdrs writes, coremltools loads: chunks and compressed packages made by `sdrs coreml` from
# the Core ML fixtures, loaded by coremltools 9.0 (from PyPI, in a virtual environment of its own)
# and compared with the packages coremltools itself wrote for the same operation. Run by .ci/run;
# needs python3 with venv. Prints one line per package and "N passed, N failed".
set -euo pipefail
cd "$(dirname "$0")/../.."

fixtures=${SDRS_FIXTURES:-../shared/fixtures}/coreml
if [ ! -d "$fixtures" ]; then
  if [ "${CI:-}" = true ]; then
    echo "$fixtures not found (CI=true requires the fixtures)" >&2
    exit 1
  fi
  echo "skipped: $fixtures not found"
  exit 0
fi

# The environment is kept between runs (target/ is the build cache); a broken one is rebuilt.
venv=${SDRS_COREMLTOOLS_VENV:-target/coremltools-venv}
if ! "$venv/bin/python" -c 'import coremltools, numpy' 2>/dev/null; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r tests/coreml/requirements.txt
fi

cargo build --quiet --locked --bin sdrs
sdrs=target/debug/sdrs
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

# One case per line: name, our package, coremltools' package (or empty), what to compare.
add() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$out/cases.tsv"; }

# Chunks: every *-chunked/ folder names its source in chunks.json.
for dir in "$fixtures"/*-chunked; do
  kind=$(basename "$dir")
  src=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["source"])' "$dir/chunks.json")
  "$sdrs" coreml chunk "$fixtures/$src" -o "$out/$kind" >/dev/null
  for chunk in "$dir"/*.mlpackage; do
    name=$(basename "$chunk")
    add "chunk:$kind:$name" "$out/$kind/$name" "$chunk" values
  done
done

# Compression, with the settings each fixture package was made with (see the fixtures' README).
unet=$fixtures/sd15/Unet.mlpackage
unet18=$fixtures/compressed/Unet_ios18_fp16.mlpackage
c=$fixtures/compressed
"$sdrs" coreml palettize "$unet" --nbits 6 -o "$out/pal6.mlpackage" >/dev/null
add palettize:pal6_pertensor "$out/pal6.mlpackage" "$c/Unet_pal6_pertensor_ios16.mlpackage" values
"$sdrs" coreml palettize "$unet" --nbits 2 -o "$out/pal2.mlpackage" >/dev/null
add palettize:pal2_pertensor "$out/pal2.mlpackage" "$c/Unet_pal2_pertensor_ios16.mlpackage" values
"$sdrs" coreml palettize "$unet18" --nbits 4 --granularity grouped:16 -o "$out/pal4g16.mlpackage" >/dev/null
add palettize:pal4_group16 "$out/pal4g16.mlpackage" "$c/Unet_pal4_group16_ios18.mlpackage" values
"$sdrs" coreml palettize "$unet" --int8 -o "$out/int8.mlpackage" >/dev/null
add palettize:int8_perchannel "$out/int8.mlpackage" "$c/Unet_int8_perchannel_ios16.mlpackage" values
"$sdrs" coreml palettize "$unet18" --int4 --block-size 32 -o "$out/int4.mlpackage" >/dev/null
add palettize:int4_block32 "$out/int4.mlpackage" "$c/Unet_int4_block32_ios18.mlpackage" values
"$venv/bin/python" -c '
import json, sys
recipe = json.load(open(sys.argv[1]))["models"]["Unet_mixedbit_ios16"]["recipe_nbits_by_const_name"]
json.dump(recipe, open(sys.argv[2], "w"))' "$c/compressed.json" "$out/recipe.json"
"$sdrs" coreml palettize "$unet" --recipe "$out/recipe.json" -o "$out/mixed.mlpackage" >/dev/null
add palettize:mixedbit "$out/mixed.mlpackage" "$c/Unet_mixedbit_ios16.mlpackage" values
# Other settings coremltools has no package for here: they must load and materialise.
for bits in 1 8; do
  "$sdrs" coreml palettize "$unet" --nbits "$bits" -o "$out/pal$bits.mlpackage" >/dev/null
  add "palettize:pal${bits}_pertensor" "$out/pal$bits.mlpackage" "" load
done
"$sdrs" coreml palettize "$unet18" --nbits 3 -o "$out/pal3.mlpackage" >/dev/null
add palettize:pal3_pertensor_ios18 "$out/pal3.mlpackage" "" load
"$sdrs" coreml palettize "$unet18" --int8 --block-size 16 -o "$out/int8b16.mlpackage" >/dev/null
add palettize:int8_block16_ios18 "$out/int8b16.mlpackage" "" load
"$sdrs" coreml chunk "$unet" --chunks 3 -o "$out/three" >/dev/null
for i in 1 2 3; do add "chunk:three:$i" "$out/three/UnetChunk$i.mlpackage" "" load; done

# coremltools says on import that its Core ML bindings are macOS-only; nothing here needs them.
"$venv/bin/python" tests/coreml/check_with_coremltools.py "$out/cases.tsv" \
  2> >(grep -v "Failed to load _ML" >&2)
