// GroupNorm (+ SiLU) over contiguous [N, C, *spatial] in f32, f16 or bf16, as torch's
// nn.GroupNorm: per (image, group) mean and biased variance in f32 (combined in f64), then
// `y = (x - mean) * (rstd * weight[c]) + bias[c]`, optionally `silu(y)`, with f32 weight and bias.
//
// Three launches, so that one (image, group) of a VAE layer (16 channels x 512 x 512 values) is
// spread over many blocks instead of one:
// 1. `partial`: block (chunk, group) computes the count, mean and sum of squared deviations (M2)
//    of `chunk` consecutive values of the group (two passes over its chunk, the second from
//    cache); `chunk` and the number of chunks come from the caller;
// 2. `finalize`: one block per group merges the chunks' statistics (Chan, Golub and LeVeque's
//    pairwise update, in f64) into the group's mean and 1 / sqrt(var + eps);
// 3. `apply`: every value, normalised with its group's statistics and its channel's affine.

#include "common.cuh"

namespace sdrs {
namespace group_norm {

constexpr int THREADS = 256;

// The sum of `x` over the block, in every thread. `shared` holds one float per warp.
__device__ __forceinline__ float block_sum(float x, float* shared) {
    x = warp_sum(x);
    const int lane = threadIdx.x % 32;
    const int warp = threadIdx.x / 32;
    __syncthreads();  // `shared` may still be read by a previous call
    if (lane == 0) {
        shared[warp] = x;
    }
    __syncthreads();
    const int warps = blockDim.x / 32;
    return warp_sum(lane < warps ? shared[lane] : 0.0f);
}

// partials[(group * chunks + block) * 3 + {0, 1, 2}] = count, mean, M2 of the group's values
// block * chunk .. (block + 1) * chunk.
template <typename T>
__device__ __forceinline__ void partial(const T* __restrict__ x, float* __restrict__ partials,
                                        long long group_elems, int chunk, int chunks) {
    __shared__ float shared[32];
    const long long group = blockIdx.y;
    const long long start = (long long)blockIdx.x * chunk;
    const long long end = min(start + (long long)chunk, group_elems);
    float* p = partials + (group * chunks + blockIdx.x) * 3;
    if (start >= end) {
        // Beyond the group (a caller with too many chunks): an empty partial, merged as nothing.
        if (threadIdx.x == 0) {
            p[0] = 0.0f;
            p[1] = 0.0f;
            p[2] = 0.0f;
        }
        return;
    }
    const T* xg = x + group * group_elems;
    float sum = 0.0f;
    for (long long i = start + threadIdx.x; i < end; i += blockDim.x) {
        sum += to_f32(xg[i]);
    }
    const float count = (float)(end - start);
    const float mean = block_sum(sum, shared) / count;
    float m2 = 0.0f;
    for (long long i = start + threadIdx.x; i < end; i += blockDim.x) {
        const float delta = to_f32(xg[i]) - mean;
        m2 = fmaf(delta, delta, m2);
    }
    m2 = block_sum(m2, shared);
    if (threadIdx.x == 0) {
        p[0] = count;
        p[1] = mean;
        p[2] = m2;
    }
}

struct Moments {
    double count;
    double mean;
    double m2;
};

__device__ __forceinline__ Moments merge(Moments a, Moments b) {
    if (a.count == 0.0) {
        return b;
    }
    if (b.count == 0.0) {
        return a;
    }
    const double count = a.count + b.count;
    const double delta = b.mean - a.mean;
    return {count, a.mean + delta * (b.count / count),
            a.m2 + b.m2 + delta * delta * (a.count * b.count / count)};
}

// stats[group * 2 + {0, 1}] = mean, 1 / sqrt(var + eps). Launched with THREADS threads.
__device__ __forceinline__ void finalize(const float* __restrict__ partials,
                                         float* __restrict__ stats, int chunks, float eps) {
    __shared__ Moments shared[THREADS];
    const long long group = blockIdx.x;
    Moments own = {0.0, 0.0, 0.0};
    for (int i = threadIdx.x; i < chunks; i += blockDim.x) {
        const float* p = partials + (group * chunks + i) * 3;
        own = merge(own, {(double)p[0], (double)p[1], (double)p[2]});
    }
    shared[threadIdx.x] = own;
    __syncthreads();
    if (threadIdx.x == 0) {
        Moments total = shared[0];
        for (int i = 1; i < (int)blockDim.x; ++i) {
            total = merge(total, shared[i]);
        }
        const double var = total.count > 0.0 ? fmax(total.m2 / total.count, 0.0) : 0.0;
        stats[group * 2] = (float)total.mean;
        stats[group * 2 + 1] = (float)(1.0 / sqrt(var + (double)eps));
    }
}

template <typename T>
__device__ __forceinline__ void apply(const T* __restrict__ x, const float* __restrict__ stats,
                                      const float* __restrict__ weight,
                                      const float* __restrict__ bias, T* __restrict__ y,
                                      long long total, long long spatial, int channels,
                                      int channels_per_group, int silu_after) {
    const int groups = channels / channels_per_group;
    const long long step = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += step) {
        const long long image_channel = i / spatial;
        const int c = (int)(image_channel % channels);
        const long long image = image_channel / channels;
        const long long group = image * groups + c / channels_per_group;
        const float mean = stats[group * 2];
        const float rstd = stats[group * 2 + 1];
        // Centred first, as the CPU kernel: folding the mean into the shift loses digits.
        float out = (to_f32(x[i]) - mean) * (rstd * weight[c]) + bias[c];
        if (silu_after) {
            out = silu(out);
        }
        y[i] = from_f32<T>(out);
    }
}

}  // namespace group_norm
}  // namespace sdrs

extern "C" __global__ void __launch_bounds__(sdrs::group_norm::THREADS)
    sdrs_group_norm_finalize(const float* partials, float* stats, int chunks, float eps) {
    sdrs::group_norm::finalize(partials, stats, chunks, eps);
}

#define SDRS_GROUP_NORM(T, NAME)                                                              \
    extern "C" __global__ void __launch_bounds__(sdrs::group_norm::THREADS)                   \
        sdrs_group_norm_partial_##NAME(const T* x, float* partials, long long group_elems,     \
                                       int chunk, int chunks) {                                \
        sdrs::group_norm::partial<T>(x, partials, group_elems, chunk, chunks);                 \
    }                                                                                          \
    extern "C" __global__ void __launch_bounds__(sdrs::group_norm::THREADS)                   \
        sdrs_group_norm_apply_##NAME(const T* x, const float* stats, const float* weight,      \
                                     const float* bias, T* y, long long total,                 \
                                     long long spatial, int channels, int channels_per_group,  \
                                     int silu_after) {                                         \
        sdrs::group_norm::apply<T>(x, stats, weight, bias, y, total, spatial, channels,        \
                                   channels_per_group, silu_after);                            \
    }

SDRS_FOR_EACH_DTYPE(SDRS_GROUP_NORM)
