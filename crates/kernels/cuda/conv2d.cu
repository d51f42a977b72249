// 2-D convolution (NCHW, groups == 1) as an implicit GEMM: `out[o][p] = sum_k w[o][k] * x̂[k][p]`
// with M = output channels, N = every output pixel of every image, K = C * kh * kw, where the
// im2col matrix x̂ is never built: each K x N tile is gathered from the input as it is loaded
// into shared memory (zero outside the padded input and beyond K and N). The epilogue adds the
// f32 bias and, when given, a residual of the output's shape and dtype, and writes NCHW.
//
// Two kernels: a SIMT tile for every dtype (64 x 64 outputs, K in steps of 16, a 4 x 4 register
// tile per thread, f32 FMAs), and for f16/bf16 a tensor-core tile through nvcuda::wmma
// (m16n16k16 fragments, f32 accumulators; sm_80 and newer, the oldest architecture built).
// Every index is bounds-checked against the real sizes: no size needs to be a tile multiple.

#include <mma.h>

#include "common.cuh"

namespace sdrs {
namespace conv {

struct Geometry {
    int images, channels, height, width;
    int out_channels, kernel_h, kernel_w;
    int stride, padding, dilation;
    int out_h, out_w;
};

// One output pixel's place in the input: the image's base and the top-left corner of its
// receptive field (possibly in the padding).
struct Pixel {
    bool valid;
    long long image_offset;
    int iy0;
    int ix0;
};

__device__ __forceinline__ Pixel locate(const Geometry& g, long long pixel, long long pixels) {
    Pixel p = {false, 0, 0, 0};
    if (pixel < pixels) {
        const long long plane = (long long)g.out_h * g.out_w;
        const long long image = pixel / plane;
        const int rest = (int)(pixel % plane);
        p.valid = true;
        p.image_offset = image * g.channels * g.height * g.width;
        p.iy0 = (rest / g.out_w) * g.stride - g.padding;
        p.ix0 = (rest % g.out_w) * g.stride - g.padding;
    }
    return p;
}

// Element (k, pixel) of the implicit im2col matrix.
template <typename T>
__device__ __forceinline__ float patch(const T* __restrict__ x, const Geometry& g, const Pixel& p,
                                       int k, int K) {
    if (!p.valid || k >= K) {
        return 0.0f;
    }
    const int taps = g.kernel_h * g.kernel_w;
    const int c = k / taps;
    const int tap = k % taps;
    const int iy = p.iy0 + (tap / g.kernel_w) * g.dilation;
    const int ix = p.ix0 + (tap % g.kernel_w) * g.dilation;
    if (iy < 0 || iy >= g.height || ix < 0 || ix >= g.width) {
        return 0.0f;
    }
    return to_f32(x[p.image_offset + ((long long)c * g.height + iy) * g.width + ix]);
}

// out[pixel's image][o][pixel's place] = acc + bias[o] (+ residual there).
template <typename T>
__device__ __forceinline__ void store(const Geometry& g, T* __restrict__ y,
                                      const float* __restrict__ bias,
                                      const T* __restrict__ residual, int o, long long pixel,
                                      long long pixels, float acc) {
    if (o >= g.out_channels || pixel >= pixels) {
        return;
    }
    const long long plane = (long long)g.out_h * g.out_w;
    const long long image = pixel / plane;
    const long long index = (image * g.out_channels + o) * plane + pixel % plane;
    float value = acc;
    if (bias != nullptr) {
        value += bias[o];
    }
    if (residual != nullptr) {
        value += to_f32(residual[index]);
    }
    y[index] = from_f32<T>(value);
}

namespace simt {
constexpr int BM = 64;
constexpr int BN = 64;
constexpr int BK = 16;
constexpr int THREADS = 256;
}  // namespace simt

template <typename T>
__device__ __forceinline__ void conv2d_simt(const T* __restrict__ x, const T* __restrict__ w,
                                            const float* __restrict__ bias,
                                            const T* __restrict__ residual, T* __restrict__ y,
                                            const Geometry g) {
    using namespace simt;
    // Rows padded to 68 floats: the transposed weight stores hit 8 banks instead of 1, and
    // rows stay float4-aligned.
    __shared__ __align__(16) float ws[BK][BM + 4];
    __shared__ __align__(16) float xs[BK][BN];

    const int K = g.channels * g.kernel_h * g.kernel_w;
    const long long pixels = (long long)g.images * g.out_h * g.out_w;
    const int m0 = blockIdx.y * BM;
    const long long p0 = (long long)blockIdx.x * BN;
    const int tid = threadIdx.x;
    const int tx = tid % 16;  // output pixels tx * 4 ..
    const int ty = tid / 16;  // output channels ty * 4 ..

    // This thread gathers pixel `col` of the tile for K rows tid / BN + 4 i.
    const int col = tid % BN;
    const Pixel pixel = locate(g, p0 + col, pixels);

    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            acc[i][j] = 0.0f;
        }
    }

    for (int k0 = 0; k0 < K; k0 += BK) {
#pragma unroll
        for (int i = 0; i < BM * BK / THREADS; ++i) {
            const int idx = tid + i * THREADS;
            const int m = idx / BK;
            const int kk = idx % BK;
            const int o = m0 + m;
            const int k = k0 + kk;
            ws[kk][m] = (o < g.out_channels && k < K) ? to_f32(w[(long long)o * K + k]) : 0.0f;
        }
#pragma unroll
        for (int i = 0; i < BK * BN / THREADS; ++i) {
            const int kk = tid / BN + i * (THREADS / BN);
            xs[kk][col] = patch(x, g, pixel, k0 + kk, K);
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < BK; ++kk) {
            const float4 a = *reinterpret_cast<const float4*>(&ws[kk][ty * 4]);
            const float4 b = *reinterpret_cast<const float4*>(&xs[kk][tx * 4]);
            const float av[4] = {a.x, a.y, a.z, a.w};
            const float bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
            for (int i = 0; i < 4; ++i) {
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
                }
            }
        }
        __syncthreads();
    }

#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            store(g, y, bias, residual, m0 + ty * 4 + i, p0 + tx * 4 + j, pixels, acc[i][j]);
        }
    }
}

namespace tc {
constexpr int BM = 64;
constexpr int BN = 64;
constexpr int BK = 32;
constexpr int THREADS = 128;  // 4 warps, 2 x 2, each 32 x 32 outputs (2 x 2 fragments)
// Leading dims (elements): multiples of 8 for 16-bit and of 4 for f32 operands, as wmma needs;
// with them every fragment pointer below is 32-byte aligned (checked in the comments).
constexpr int LDA = BK + 8;  // A tile [BM][LDA]: row 16 r starts at 16 r * 80 bytes
constexpr int LDB = BN + 8;  // B tile [BK][LDB]: row 16 r starts at 16 r * 144 bytes
constexpr int LDC = BN + 4;  // C tile [BM][LDC] f32: row 16 r starts at 16 r * 272 bytes
constexpr int A_BYTES = BM * LDA * 2;  // 5120, a multiple of 32: B starts aligned
constexpr int AB_BYTES = A_BYTES + BK * LDB * 2;
constexpr int C_BYTES = BM * LDC * 4;
constexpr int SMEM_BYTES = AB_BYTES > C_BYTES ? AB_BYTES : C_BYTES;
}  // namespace tc

template <typename T>
__device__ __forceinline__ void conv2d_wmma(const T* __restrict__ x, const T* __restrict__ w,
                                            const float* __restrict__ bias,
                                            const T* __restrict__ residual, T* __restrict__ y,
                                            const Geometry g) {
    using namespace nvcuda;
    using namespace tc;
    // A and B tiles during the main loop; the f32 C tile (the same bytes) for the epilogue.
    __shared__ __align__(128) unsigned char smem[SMEM_BYTES];
    T* as = reinterpret_cast<T*>(smem);
    T* bs = reinterpret_cast<T*>(smem + A_BYTES);
    float* cs = reinterpret_cast<float*>(smem);

    const int K = g.channels * g.kernel_h * g.kernel_w;
    const long long pixels = (long long)g.images * g.out_h * g.out_w;
    const int m0 = blockIdx.y * BM;
    const long long p0 = (long long)blockIdx.x * BN;
    const int tid = threadIdx.x;
    const int warp = tid / 32;
    const int wm = warp / 2;
    const int wn = warp % 2;

    const int col = tid % BN;
    const Pixel pixel = locate(g, p0 + col, pixels);
    const T zero = from_f32<T>(0.0f);

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            wmma::fill_fragment(acc[i][j], 0.0f);
        }
    }

    for (int k0 = 0; k0 < K; k0 += BK) {
#pragma unroll
        for (int i = 0; i < BM * BK / THREADS; ++i) {
            const int idx = tid + i * THREADS;
            const int m = idx / BK;
            const int kk = idx % BK;
            const int o = m0 + m;
            const int k = k0 + kk;
            as[m * LDA + kk] = (o < g.out_channels && k < K) ? w[(long long)o * K + k] : zero;
        }
#pragma unroll
        for (int i = 0; i < BK * BN / THREADS; ++i) {
            const int kk = tid / BN + i * (THREADS / BN);
            bs[kk * LDB + col] = from_f32<T>(patch(x, g, pixel, k0 + kk, K));
        }
        __syncthreads();
#pragma unroll
        for (int ks = 0; ks < BK; ks += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a[2];
            wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b[2];
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                // (wm * 32 + i * 16) rows of 80 bytes, plus ks * 2 bytes: multiples of 32.
                wmma::load_matrix_sync(a[i], as + (wm * 32 + i * 16) * LDA + ks, LDA);
            }
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                // ks rows of 144 bytes (ks = 0 or 16), plus (wn * 32 + j * 16) * 2 bytes.
                wmma::load_matrix_sync(b[j], bs + ks * LDB + wn * 32 + j * 16, LDB);
            }
#pragma unroll
            for (int i = 0; i < 2; ++i) {
#pragma unroll
                for (int j = 0; j < 2; ++j) {
                    wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
                }
            }
        }
        __syncthreads();
    }

    // The last __syncthreads above ends every read of the A and B tiles: C may overwrite them.
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            // (wm * 32 + i * 16) rows of 272 bytes, plus (wn * 32 + j * 16) * 4 bytes.
            wmma::store_matrix_sync(cs + (wm * 32 + i * 16) * LDC + wn * 32 + j * 16, acc[i][j],
                                    LDC, wmma::mem_row_major);
        }
    }
    __syncthreads();
    for (int idx = tid; idx < BM * BN; idx += THREADS) {
        const int m = idx / BN;
        const int n = idx % BN;
        store(g, y, bias, residual, m0 + m, p0 + n, pixels, cs[m * LDC + n]);
    }
}

}  // namespace conv
}  // namespace sdrs

// bias: f32 [out_channels] or null; residual: the output's shape and dtype, or null.
#define SDRS_CONV_ARGS(T)                                                                      \
    const T *x, const T *w, const float *bias, const T *residual, T *y, int images,            \
        int channels, int height, int width, int out_channels, int kernel_h, int kernel_w,     \
        int stride, int padding, int dilation, int out_h, int out_w
#define SDRS_CONV_GEOMETRY                                                                     \
    sdrs::conv::Geometry {                                                                     \
        images, channels, height, width, out_channels, kernel_h, kernel_w, stride, padding,    \
            dilation, out_h, out_w                                                             \
    }

#define SDRS_CONV_SIMT(T, NAME)                                                                \
    extern "C" __global__ void __launch_bounds__(sdrs::conv::simt::THREADS)                    \
        sdrs_conv2d_simt_##NAME(SDRS_CONV_ARGS(T)) {                                           \
        sdrs::conv::conv2d_simt<T>(x, w, bias, residual, y, SDRS_CONV_GEOMETRY);               \
    }
SDRS_FOR_EACH_DTYPE(SDRS_CONV_SIMT)

#define SDRS_CONV_WMMA(T, NAME)                                                                \
    extern "C" __global__ void __launch_bounds__(sdrs::conv::tc::THREADS)                      \
        sdrs_conv2d_wmma_##NAME(SDRS_CONV_ARGS(T)) {                                           \
        sdrs::conv::conv2d_wmma<T>(x, w, bias, residual, y, SDRS_CONV_GEOMETRY);               \
    }
SDRS_CONV_WMMA(__half, f16)
SDRS_CONV_WMMA(__nv_bfloat16, bf16)
