#!/bin/sh
# Builds our CUDA kernels for the host emulation (emu.h) and runs check.cpp: a check of the
# kernels' logic on a machine without a GPU (and without CUDA: only a C++20 compiler). The two
# device-only lines of flash_attention.cu (its dynamic shared memory and the PTX register that
# holds its size) are swapped for emu.h's stand-ins in a copy of the sources.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp "$here"/../*.cu "$here"/../*.cuh "$work"/
sed -i -e 's|extern __shared__ float4 smem4\[\];|float4* smem4 = emu_dynamic_smem();|' \
    -e 's|asm volatile("mov.u32 %0, %%dynamic_smem_size;" : "=r"(bytes));|bytes = emu_dynamic_smem_size();|' \
    "$work"/flash_attention.cu
grep -q emu_dynamic_smem_size "$work"/flash_attention.cu
${CXX:-g++} -std=c++20 -O2 -pthread -Wno-unknown-pragmas -include "$here"/emu.h -I "$here"/shim \
    -I "$work" -o "$work"/check "$here"/check.cpp
"$work"/check
