// Flash attention forward, `softmax(q kᵀ · scale) v`, for q [B, H, Lq, D], k [B, H, Lk, D],
// v [B, H, Lk, Dv] in f32, f16 or bf16: FlashAttention's tiling with an online softmax (Dao et
// al. 2022, "FlashAttention: Fast and Memory-Efficient Exact Attention with IO-Awareness"), so the
// Lq x Lk score matrix never exists; every product and the softmax in f32.
//
// One block of WARPS warps takes WARPS * R consecutive queries of one (batch, head); each warp
// owns R of them. Keys stream through shared memory in tiles of 32, one key per lane:
// - scores: lane j computes the R dot products of its key with the warp's queries (queries read
//   as broadcasts, keys as conflict-free float4 loads: the row stride is 4 mod 8 floats);
// - online softmax: each row's running max and sum are reduced across the warp, so every lane
//   holds the same values; the accumulator is rescaled by exp(old max - new max);
// - values: lane l accumulates the output dims l, l + 32, ... of the warp's R rows, the tile's
//   probabilities read from shared memory as broadcasts.
// DP (a multiple of 32) is the compiled head dim; the real D and Dv (<= DP) come from the call,
// the tiles are zero-padded beyond them. Any Lq and Lk >= 1.
//
// Inputs may be strided in their batch, head and token dims (the last dim must be contiguous);
// the output is contiguous [B, H, Lq, Dv].

#include "common.cuh"

namespace sdrs {
namespace flash {

constexpr int WARPS = 4;
constexpr int THREADS = WARPS * 32;
constexpr int BLOCK_K = 32;

// The dynamic shared memory of one block, in floats. src/cuda/mod.rs (`flash_smem_bytes`)
// computes the same size for the launch; the kernel checks it got at least that much.
template <int DP, int R> struct Smem {
    static constexpr int QK_STRIDE = DP + 4;
    static constexpr int BQ = WARPS * R;
    static constexpr int Q = 0;                            // [BQ][QK_STRIDE], pre-scaled
    static constexpr int K = Q + BQ * QK_STRIDE;           // [BLOCK_K][QK_STRIDE]
    static constexpr int V = K + BLOCK_K * QK_STRIDE;      // [BLOCK_K][DP]
    static constexpr int P = V + BLOCK_K * DP;             // [WARPS][R][BLOCK_K]
    static constexpr int FLOATS = P + WARPS * R * BLOCK_K;
    static constexpr unsigned BYTES = FLOATS * 4u;
};

__device__ __forceinline__ unsigned dynamic_smem_bytes() {
    unsigned bytes;
    asm volatile("mov.u32 %0, %%dynamic_smem_size;" : "=r"(bytes));
    return bytes;
}

template <typename T, int DP, int R>
__device__ __forceinline__ void forward(const T* __restrict__ q, const T* __restrict__ k,
                                        const T* __restrict__ v, T* __restrict__ out, int heads,
                                        int lq, int lk, int d, int dv, long long q_sb,
                                        long long q_sh, long long q_sl, long long k_sb,
                                        long long k_sh, long long k_sl, long long v_sb,
                                        long long v_sh, long long v_sl, float scale) {
    static_assert(DP % 32 == 0, "the head dim tile is a whole number of warps' lanes");
    using L = Smem<DP, R>;
    constexpr int COLS = DP / 32;
    if (dynamic_smem_bytes() < L::BYTES) {
        __trap();  // a launch bug on the Rust side: never read past the shared memory
    }
    extern __shared__ float4 smem4[];
    float* smem = reinterpret_cast<float*>(smem4);
    float* qs = smem + L::Q;
    float* ks = smem + L::K;
    float* vs = smem + L::V;

    const int tid = threadIdx.x;
    const int warp = tid / 32;
    const int lane = tid % 32;
    const int bh = blockIdx.y;
    const int b = bh / heads;
    const int h = bh % heads;
    const int i0 = blockIdx.x * L::BQ;
    const T* qh = q + b * q_sb + h * q_sh;
    const T* kh = k + b * k_sb + h * k_sh;
    const T* vh = v + b * v_sb + h * v_sh;

    // The block's queries, pre-scaled (as the CPU kernel does), zero beyond D and Lq.
    for (int idx = tid; idx < L::BQ * DP; idx += THREADS) {
        const int r = idx / DP;
        const int c = idx % DP;
        const int row = i0 + r;
        float x = 0.0f;
        if (row < lq && c < d) {
            x = to_f32(qh[row * q_sl + c]) * scale;
        }
        qs[r * L::QK_STRIDE + c] = x;
    }

    float m[R];
    float l[R];
    float acc[R][COLS];
#pragma unroll
    for (int r = 0; r < R; ++r) {
        m[r] = -INFINITY;
        l[r] = 0.0f;
#pragma unroll
        for (int t = 0; t < COLS; ++t) {
            acc[r][t] = 0.0f;
        }
    }
    // D rounded up to whole float4s: still <= DP, the padding is zero in both q and k.
    const int d4 = (d + 3) & ~3;
    const float* qw = qs + warp * R * L::QK_STRIDE;
    float* ps = smem + L::P + warp * R * BLOCK_K;

    for (int j0 = 0; j0 < lk; j0 += BLOCK_K) {
        // The previous tile is read by every warp (and, the first time, the queries are
        // stored) before the tile is overwritten.
        __syncthreads();
        for (int idx = tid; idx < BLOCK_K * DP; idx += THREADS) {
            const int j = idx / DP;
            const int c = idx % DP;
            const int key = j0 + j;
            float kx = 0.0f;
            float vx = 0.0f;
            if (key < lk) {
                if (c < d) {
                    kx = to_f32(kh[key * k_sl + c]);
                }
                if (c < dv) {
                    vx = to_f32(vh[key * v_sl + c]);
                }
            }
            ks[j * L::QK_STRIDE + c] = kx;
            vs[j * DP + c] = vx;
        }
        __syncthreads();

        float s[R];
#pragma unroll
        for (int r = 0; r < R; ++r) {
            s[r] = 0.0f;
        }
        const float* kr = ks + lane * L::QK_STRIDE;
        for (int c = 0; c < d4; c += 4) {
            const float4 kv = *reinterpret_cast<const float4*>(kr + c);
#pragma unroll
            for (int r = 0; r < R; ++r) {
                const float4 qv = *reinterpret_cast<const float4*>(qw + r * L::QK_STRIDE + c);
                s[r] = fmaf(qv.x, kv.x, s[r]);
                s[r] = fmaf(qv.y, kv.y, s[r]);
                s[r] = fmaf(qv.z, kv.z, s[r]);
                s[r] = fmaf(qv.w, kv.w, s[r]);
            }
        }

        const bool valid = j0 + lane < lk;
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const float score = valid ? s[r] : -INFINITY;
            // Lane 0's key always exists, so the new max is finite for finite inputs.
            const float m_new = fmaxf(m[r], warp_max(score));
            const float p = expf(score - m_new);         // 0 for the missing keys
            const float correction = expf(m[r] - m_new);  // 0 on the first tile
            l[r] = l[r] * correction + warp_sum(p);
            m[r] = m_new;
#pragma unroll
            for (int t = 0; t < COLS; ++t) {
                acc[r][t] *= correction;
            }
            ps[r * BLOCK_K + lane] = p;
        }
        __syncwarp();

        const int keys = min(BLOCK_K, lk - j0);
        for (int j = 0; j < keys; ++j) {
            const float* vr = vs + j * DP;
            float vv[COLS];
#pragma unroll
            for (int t = 0; t < COLS; ++t) {
                vv[t] = vr[lane + 32 * t];
            }
#pragma unroll
            for (int r = 0; r < R; ++r) {
                const float p = ps[r * BLOCK_K + j];
#pragma unroll
                for (int t = 0; t < COLS; ++t) {
                    acc[r][t] = fmaf(p, vv[t], acc[r][t]);
                }
            }
        }
        // The next tile's probabilities are written only after the __syncthreads at the top.
    }

    T* oh = out + (long long)bh * lq * dv;
#pragma unroll
    for (int r = 0; r < R; ++r) {
        const int row = i0 + warp * R + r;
        if (row < lq) {
            const float inv = 1.0f / l[r];
#pragma unroll
            for (int t = 0; t < COLS; ++t) {
                const int c = lane + 32 * t;
                if (c < dv) {
                    oh[(long long)row * dv + c] = from_f32<T>(acc[r][t] * inv);
                }
            }
        }
    }
}

}  // namespace flash
}  // namespace sdrs

// sdrs_flash_attention_<dtype>_d<DP>: DP >= max(D, Dv). R (queries per warp) is 8 up to DP 96
// and 4 above, which keeps the shared memory under 48 KiB up to DP 128 (160 and 256 need the
// opt-in the Rust side sets) and the accumulator at 32 registers or fewer per lane.
#define SDRS_FLASH(T, NAME, DP, R)                                                               \
    extern "C" __global__ void __launch_bounds__(sdrs::flash::THREADS)                           \
        sdrs_flash_attention_##NAME##_d##DP(                                                     \
            const T* q, const T* k, const T* v, T* out, int heads, int lq, int lk, int d, int dv, \
            long long q_sb, long long q_sh, long long q_sl, long long k_sb, long long k_sh,      \
            long long k_sl, long long v_sb, long long v_sh, long long v_sl, float scale) {       \
        sdrs::flash::forward<T, DP, R>(q, k, v, out, heads, lq, lk, d, dv, q_sb, q_sh, q_sl,    \
                                       k_sb, k_sh, k_sl, v_sb, v_sh, v_sl, scale);              \
    }

#define SDRS_FLASH_DIMS(T, NAME) \
    SDRS_FLASH(T, NAME, 64, 8)   \
    SDRS_FLASH(T, NAME, 96, 8)   \
    SDRS_FLASH(T, NAME, 128, 4)  \
    SDRS_FLASH(T, NAME, 160, 4)  \
    SDRS_FLASH(T, NAME, 256, 4)

SDRS_FOR_EACH_DTYPE(SDRS_FLASH_DIMS)
