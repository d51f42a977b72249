// GEGLU's gating (Shazeer 2020, "GLU Variants Improve Transformer"), as diffusers' GEGLU:
// `hidden, gate = proj.chunk(2, -1); hidden * gelu(gate)` on contiguous [rows, 2n] -> [rows, n],
// GELU in torch's exact erf form, in f32 for f32, f16 and bf16 inputs.

#include "common.cuh"

namespace sdrs {
namespace geglu {

constexpr int THREADS = 256;

template <typename T>
__device__ __forceinline__ void forward(const T* __restrict__ x, T* __restrict__ y,
                                        long long rows, long long half) {
    const long long total = rows * half;
    const long long step = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += step) {
        const long long row = i / half;
        const long long col = i % half;
        const T* src = x + row * 2 * half;
        const float value = to_f32(src[col]);
        const float gate = to_f32(src[half + col]);
        const float gelu = 0.5f * gate * (1.0f + erff(gate * 0.70710678118654752440f));
        y[i] = from_f32<T>(value * gelu);
    }
}

}  // namespace geglu
}  // namespace sdrs

#define SDRS_GEGLU(T, NAME)                                                                  \
    extern "C" __global__ void __launch_bounds__(sdrs::geglu::THREADS)                       \
        sdrs_geglu_##NAME(const T* x, T* y, long long rows, long long half) {                 \
        sdrs::geglu::forward<T>(x, y, rows, half);                                            \
    }

SDRS_FOR_EACH_DTYPE(SDRS_GEGLU)
