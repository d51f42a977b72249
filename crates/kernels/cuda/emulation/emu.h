// A host emulation of the little of CUDA our kernels use, so that their index arithmetic,
// synchronisation and reductions can be checked on a machine without a GPU (run.sh): every
// thread of a block is a std::thread, blocks run one after another, __syncthreads and
// __syncwarp are barriers, shuffles go through a per-warp buffer, and wmma fragments hold their
// whole 16 x 16 tile in every lane (the API's semantics, not the hardware's register layout; the
// pointer alignment and leading-dimension rules are checked). f16 is GCC's _Float16, bf16 a
// 16-bit pattern with round-to-nearest-even conversions. Not a performance model.
#pragma once

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// Blocks run one at a time, so one static copy is the block's shared memory.
#define __shared__ static

using std::max;
using std::min;

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
struct alignas(16) float4 {
    float x, y, z, w;
};

inline dim3 gridDim, blockDim, blockIdx;
inline thread_local dim3 threadIdx;

namespace emu {
inline std::unique_ptr<std::barrier<>> block_barrier;
inline std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
inline float shuffle[32][32];  // [warp][lane]
alignas(128) inline unsigned char dynamic_smem[256 * 1024];
inline unsigned dynamic_smem_bytes = 0;

[[noreturn]] inline void fail(const char* what) {
    std::fprintf(stderr, "emulation: %s\n", what);
    std::abort();
}

// Runs `kernel` on a grid of 1-D blocks, every thread of a block a std::thread.
inline void launch(dim3 grid, unsigned threads, unsigned smem, const std::function<void()>& kernel) {
    if (threads % 32 != 0 || threads > 1024 || smem > sizeof(dynamic_smem)) {
        fail("bad launch");
    }
    gridDim = grid;
    blockDim = {threads, 1, 1};
    dynamic_smem_bytes = smem;
    std::memset(dynamic_smem, 0xff, sizeof(dynamic_smem));  // NaN garbage, as uninitialised
    for (unsigned z = 0; z < grid.z; ++z) {
        for (unsigned y = 0; y < grid.y; ++y) {
            for (unsigned x = 0; x < grid.x; ++x) {
                blockIdx = {x, y, z};
                block_barrier = std::make_unique<std::barrier<>>(threads);
                warp_barriers.clear();
                for (unsigned w = 0; w < threads / 32; ++w) {
                    warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
                }
                std::vector<std::thread> pool;
                for (unsigned t = 0; t < threads; ++t) {
                    pool.emplace_back([t, &kernel] {
                        threadIdx = {t, 0, 0};
                        kernel();
                    });
                }
                for (auto& thread : pool) {
                    thread.join();
                }
            }
        }
    }
}
}  // namespace emu

inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) {
    emu::warp_barriers[threadIdx.x / 32]->arrive_and_wait();
}
inline float __shfl_xor_sync(unsigned, float x, int offset) {
    const unsigned warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    emu::shuffle[warp][lane] = x;
    __syncwarp();
    const float other = emu::shuffle[warp][lane ^ offset];
    __syncwarp();
    return other;
}
[[noreturn]] inline void __trap() { emu::fail("__trap"); }
inline float4* emu_dynamic_smem() { return reinterpret_cast<float4*>(emu::dynamic_smem); }
inline unsigned emu_dynamic_smem_size() { return emu::dynamic_smem_bytes; }

struct __half {
    _Float16 v;
};
inline float __half2float(__half h) { return (float)h.v; }
inline __half __float2half_rn(float x) { return {(_Float16)x}; }

struct __nv_bfloat16 {
    uint16_t bits;
};
inline float __bfloat162float(__nv_bfloat16 h) {
    uint32_t bits = (uint32_t)h.bits << 16;
    float x;
    std::memcpy(&x, &bits, 4);
    return x;
}
inline __nv_bfloat16 __float2bfloat16_rn(float x) {
    uint32_t bits;
    std::memcpy(&bits, &x, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u) {
        return {(uint16_t)((bits >> 16) | 0x40)};
    }
    return {(uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1)) >> 16)};
}

namespace nvcuda::wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
    float x[16 * 16];
};

inline float value(float x) { return x; }
inline float value(__half x) { return __half2float(x); }
inline float value(__nv_bfloat16 x) { return __bfloat162float(x); }

inline void check(const void* p, unsigned ldm, unsigned multiple) {
    if (reinterpret_cast<uintptr_t>(p) % 32 != 0) {
        emu::fail("wmma pointer not 32-byte aligned");
    }
    if (ldm % multiple != 0) {
        emu::fail("wmma leading dimension not a multiple of 16 bytes");
    }
}

template <typename Use, typename T>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, row_major>& f, const T* p, unsigned ldm) {
    check(p, ldm, 16 / sizeof(T));
    for (int r = 0; r < 16; ++r) {
        for (int c = 0; c < 16; ++c) {
            f.x[r * 16 + c] = value(p[r * ldm + c]);
        }
    }
}

template <typename F>
void fill_fragment(F& f, float v) {
    for (float& x : f.x) {
        x = v;
    }
}

template <typename A, typename B, typename C>
void mma_sync(C& d, const A& a, const B& b, const C& c) {
    float out[256];
    for (int r = 0; r < 16; ++r) {
        for (int col = 0; col < 16; ++col) {
            float sum = c.x[r * 16 + col];
            for (int k = 0; k < 16; ++k) {
                sum += a.x[r * 16 + k] * b.x[k * 16 + col];
            }
            out[r * 16 + col] = sum;
        }
    }
    std::memcpy(d.x, out, sizeof(out));
}

template <typename C>
void store_matrix_sync(float* p, const C& f, unsigned ldm, layout_t layout) {
    check(p, ldm, 4);
    if (layout != mem_row_major) {
        emu::fail("only row-major stores are emulated");
    }
    if (threadIdx.x % 32 == 0) {  // every lane holds the same tile
        for (int r = 0; r < 16; ++r) {
            for (int c = 0; c < 16; ++c) {
                p[r * ldm + c] = f.x[r * 16 + c];
            }
        }
    }
    __syncwarp();
}
}  // namespace nvcuda::wmma
