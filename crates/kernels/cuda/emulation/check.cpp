// Runs our CUDA kernels (cuda/*.cu, through emu.h) on the host against straightforward f64
// references, on small odd shapes that still cover every tile, edge and code path: each flash
// attention tile (D = 1 .. 256, Dv != D, strided heads, one key, one query), both conv2d kernels
// (padding, stride, dilation, 1x1, channel counts no tile divides, the fused bias and residual),
// GroupNorm with several statistics chunks and SiLU, GEGLU. The launch shapes mirror
// src/cuda/*.rs. Tolerances as sdrs_kernels::cuda::self_check. Build and run with run.sh.

#include "kernels.cu"

#include <string>

using sdrs::from_f32;
using sdrs::to_f32;

static int failures = 0;
static int checks = 0;

template <typename T> const char* dtype_name();
template <> const char* dtype_name<float>() { return "f32"; }
template <> const char* dtype_name<__half>() { return "f16"; }
template <> const char* dtype_name<__nv_bfloat16>() { return "bf16"; }

template <typename T> double relative_tolerance();
template <> double relative_tolerance<float>() { return 1e-4; }
template <> double relative_tolerance<__half>() { return 1e-3; }
template <> double relative_tolerance<__nv_bfloat16>() { return 8e-3; }

// Seeded values uniform in offset ± amplitude, rounded to T.
template <typename T>
std::vector<T> random(size_t n, uint64_t seed, float amplitude, float offset = 0.0f) {
    std::vector<T> out(n);
    uint64_t state = seed * 0x9e3779b97f4a7c15ull + 1;
    for (auto& x : out) {
        state = state * 6364136223846793005ull + 1442695040888963407ull;
        const float unit = (float)(state >> 40) / (float)(1u << 23) - 1.0f;
        x = from_f32<T>(offset + amplitude * unit);
    }
    return out;
}

template <typename T>
void report(const std::string& name, const std::vector<T>& got, const std::vector<double>& want) {
    double reference_max = 0.0, worst = 0.0;
    bool nan = false;
    for (size_t i = 0; i < want.size(); ++i) {
        reference_max = std::max(reference_max, std::fabs(want[i]));
        const double diff = std::fabs((double)to_f32(got[i]) - want[i]);
        nan |= std::isnan(diff);
        worst = std::max(worst, diff);
    }
    const double tolerance = relative_tolerance<T>() * std::max(reference_max, 1e-6);
    const bool pass = !nan && worst <= tolerance;
    ++checks;
    failures += !pass;
    std::printf("%s %s %s: max |diff| %.3e, tolerance %.3e%s\n", pass ? "pass" : "FAIL", name.c_str(),
                dtype_name<T>(), worst, tolerance, nan ? " (NaN)" : "");
}

// ---------------------------------------------------------------- flash attention

template <typename T>
using FlashFn = void (*)(const T*, const T*, const T*, T*, int, int, int, int, int, long long,
                         long long, long long, long long, long long, long long, long long,
                         long long, long long, float);
template <typename T> FlashFn<T> flash_fn(int tile);
#define FLASH_FN(T, NAME)                                  \
    template <> FlashFn<T> flash_fn<T>(int tile) {         \
        switch (tile) {                                    \
            case 64: return sdrs_flash_attention_##NAME##_d64;   \
            case 96: return sdrs_flash_attention_##NAME##_d96;   \
            case 128: return sdrs_flash_attention_##NAME##_d128; \
            case 160: return sdrs_flash_attention_##NAME##_d160; \
            case 256: return sdrs_flash_attention_##NAME##_d256; \
        }                                                  \
        return nullptr;                                    \
    }
SDRS_FOR_EACH_DTYPE(FLASH_FN)

// Heads stored [B, H, L, D] or, `transposed`, [B, L, H, D] (SD's projections, viewed as heads).
struct HeadLayout {
    long long sb, sh, sl;
    static HeadLayout of(int h, int l, int d, bool transposed) {
        return transposed ? HeadLayout{(long long)l * h * d, d, (long long)h * d}
                          : HeadLayout{(long long)h * l * d, (long long)l * d, d};
    }
    long long at(int b, int hi, int i, int c) const { return b * sb + hi * sh + i * sl + c; }
};

template <typename T>
void flash_case(int b, int h, int lq, int lk, int d, int dv, bool transposed, uint64_t seed) {
    const int tiles[] = {64, 96, 128, 160, 256};
    int tile = 0;
    for (int t : tiles) {
        if (t >= std::max(d, dv)) {
            tile = t;
            break;
        }
    }
    const int rows = tile <= 96 ? 8 : 4;  // src/cuda/attention.rs: queries_per_warp
    const unsigned smem = 4 * ((4 * rows) * (tile + 4) + 32 * (tile + 4) + 32 * tile + 4 * rows * 32);
    auto q = random<T>((size_t)b * h * lq * d, seed, 3.0f);
    auto k = random<T>((size_t)b * h * lk * d, seed + 1, 3.0f);
    auto v = random<T>((size_t)b * h * lk * dv, seed + 2, 3.0f);
    const HeadLayout lq_ = HeadLayout::of(h, lq, d, transposed);
    const HeadLayout lk_ = HeadLayout::of(h, lk, d, transposed);
    const HeadLayout lv_ = HeadLayout::of(h, lk, dv, transposed);
    const float scale = 1.0f / std::sqrt((float)d);
    std::vector<T> out((size_t)b * h * lq * dv, from_f32<T>(NAN));
    auto fn = flash_fn<T>(tile);
    emu::launch({(unsigned)((lq + 4 * rows - 1) / (4 * rows)), (unsigned)(b * h), 1}, 128, smem, [&] {
        fn(q.data(), k.data(), v.data(), out.data(), h, lq, lk, d, dv, lq_.sb, lq_.sh, lq_.sl,
           lk_.sb, lk_.sh, lk_.sl, lv_.sb, lv_.sh, lv_.sl, scale);
    });
    std::vector<double> want(out.size());
    std::vector<double> p(lk);
    for (int bi = 0; bi < b; ++bi) {
        for (int hi = 0; hi < h; ++hi) {
            for (int i = 0; i < lq; ++i) {
                double m = -INFINITY, sum = 0.0;
                for (int j = 0; j < lk; ++j) {
                    double s = 0.0;
                    for (int c = 0; c < d; ++c) {
                        s += (double)to_f32(q[lq_.at(bi, hi, i, c)]) * scale *
                             (double)to_f32(k[lk_.at(bi, hi, j, c)]);
                    }
                    p[j] = s;
                    m = std::max(m, s);
                }
                for (int j = 0; j < lk; ++j) {
                    p[j] = std::exp(p[j] - m);
                    sum += p[j];
                }
                for (int c = 0; c < dv; ++c) {
                    double o = 0.0;
                    for (int j = 0; j < lk; ++j) {
                        o += p[j] * (double)to_f32(v[lv_.at(bi, hi, j, c)]);
                    }
                    want[(((size_t)bi * h + hi) * lq + i) * dv + c] = o / sum;
                }
            }
        }
    }
    char name[160];
    std::snprintf(name, sizeof name, "flash attention D=%d Dv=%d %dx%dx%dx%d%s (tile %d)", d, dv, b, h,
                  lq, lk, transposed ? " strided" : "", tile);
    report<T>(name, out, want);
}

// ---------------------------------------------------------------- conv2d

template <typename T>
using ConvFn = void (*)(const T*, const T*, const float*, const T*, T*, int, int, int, int, int, int,
                        int, int, int, int, int, int);

template <typename T>
void conv_case(ConvFn<T> fn, const char* kernel, unsigned threads, int n, int c, int hgt, int wid,
               int o, int kh, int kw, int stride, int pad, int dil, bool with_bias, bool with_residual,
               uint64_t seed) {
    const int out_h = (hgt + 2 * pad - dil * (kh - 1) - 1) / stride + 1;
    const int out_w = (wid + 2 * pad - dil * (kw - 1) - 1) / stride + 1;
    auto x = random<T>((size_t)n * c * hgt * wid, seed, 1.0f);
    auto w = random<T>((size_t)o * c * kh * kw, seed + 1, 1.0f / std::sqrt((float)(c * kh * kw)));
    auto bias = random<float>(o, seed + 2, 0.5f);
    const size_t out_count = (size_t)n * o * out_h * out_w;
    auto residual = random<T>(out_count, seed + 3, 1.0f);
    std::vector<T> out(out_count, from_f32<T>(NAN));
    const long long pixels = (long long)n * out_h * out_w;
    emu::launch({(unsigned)((pixels + 63) / 64), (unsigned)((o + 63) / 64), 1}, threads, 0, [&] {
        fn(x.data(), w.data(), with_bias ? bias.data() : nullptr,
           with_residual ? residual.data() : nullptr, out.data(), n, c, hgt, wid, o, kh, kw, stride, pad,
           dil, out_h, out_w);
    });
    std::vector<double> want(out_count);
    for (int ni = 0; ni < n; ++ni) {
        for (int oi = 0; oi < o; ++oi) {
            for (int oy = 0; oy < out_h; ++oy) {
                for (int ox = 0; ox < out_w; ++ox) {
                    double s = with_bias ? bias[oi] : 0.0;
                    for (int ci = 0; ci < c; ++ci) {
                        for (int ky = 0; ky < kh; ++ky) {
                            for (int kx = 0; kx < kw; ++kx) {
                                const int iy = oy * stride - pad + ky * dil;
                                const int ix = ox * stride - pad + kx * dil;
                                if (iy < 0 || iy >= hgt || ix < 0 || ix >= wid) continue;
                                s += (double)to_f32(x[(((size_t)ni * c + ci) * hgt + iy) * wid + ix]) *
                                     (double)to_f32(w[(((size_t)oi * c + ci) * kh + ky) * kw + kx]);
                            }
                        }
                    }
                    const size_t index = (((size_t)ni * o + oi) * out_h + oy) * out_w + ox;
                    if (with_residual) s += (double)to_f32(residual[index]);
                    want[index] = s;
                }
            }
        }
    }
    char name[200];
    std::snprintf(name, sizeof name, "conv2d %s %dx%dx%dx%d -> %d k%dx%d s%d p%d d%d%s%s", kernel, n, c,
                  hgt, wid, o, kh, kw, stride, pad, dil, with_bias ? " +bias" : "",
                  with_residual ? " +residual" : "");
    report<T>(name, out, want);
}

template <typename T> ConvFn<T> conv_simt();
template <typename T> ConvFn<T> conv_wmma();
template <> ConvFn<float> conv_simt<float>() { return sdrs_conv2d_simt_f32; }
template <> ConvFn<__half> conv_simt<__half>() { return sdrs_conv2d_simt_f16; }
template <> ConvFn<__nv_bfloat16> conv_simt<__nv_bfloat16>() { return sdrs_conv2d_simt_bf16; }
template <> ConvFn<__half> conv_wmma<__half>() { return sdrs_conv2d_wmma_f16; }
template <> ConvFn<__nv_bfloat16> conv_wmma<__nv_bfloat16>() { return sdrs_conv2d_wmma_bf16; }
template <> ConvFn<float> conv_wmma<float>() { return nullptr; }  // no f32 tensor-core kernel

template <typename T>
void conv_cases(bool tensor_cores) {
    struct Case { int n, c, h, w, o, kh, kw, stride, pad, dil; bool bias, residual; };
    const Case cases[] = {
        {2, 37, 17, 23, 70, 3, 3, 1, 1, 1, true, true},    // odd everything, 2 channel tiles
        {1, 8, 15, 15, 5, 3, 3, 1, 2, 2, true, false},     // dilation 2
        {1, 16, 33, 33, 16, 3, 3, 2, 1, 1, false, false},  // stride 2, no bias
        {1, 20, 9, 11, 40, 1, 1, 1, 0, 1, true, true},     // 1x1
        {1, 1, 5, 4, 130, 3, 3, 1, 1, 1, true, false},     // K = 9 < one K step, 3 channel tiles
        {1, 3, 7, 6, 4, 3, 2, 1, 0, 1, true, true},        // non-square kernel, no padding
    };
    uint64_t seed = 100;
    for (const Case& k : cases) {
        if (tensor_cores) {
            conv_case<T>(conv_wmma<T>(), "wmma", 128, k.n, k.c, k.h, k.w, k.o, k.kh, k.kw, k.stride,
                         k.pad, k.dil, k.bias, k.residual, seed);
        } else {
            conv_case<T>(conv_simt<T>(), "simt", 256, k.n, k.c, k.h, k.w, k.o, k.kh, k.kw, k.stride,
                         k.pad, k.dil, k.bias, k.residual, seed);
        }
        seed += 7;
    }
}

// ---------------------------------------------------------------- group norm, geglu

template <typename T> struct Norm;
#define NORM_FN(T, NAME)                                                         \
    template <> struct Norm<T> {                                                 \
        static constexpr auto partial = sdrs_group_norm_partial_##NAME;          \
        static constexpr auto apply = sdrs_group_norm_apply_##NAME;              \
        static constexpr auto geglu = sdrs_geglu_##NAME;                         \
    };
SDRS_FOR_EACH_DTYPE(NORM_FN)

template <typename T>
void group_norm_case(int n, int c, int spatial, int groups, float eps, float offset, int chunk,
                     bool silu, uint64_t seed) {
    const long long total = (long long)n * c * spatial;
    const long long group_elems = (long long)(c / groups) * spatial;
    const int chunks = (int)((group_elems + chunk - 1) / chunk);
    const int stat_groups = n * groups;
    auto x = random<T>(total, seed, 1.0f, offset);
    auto weight = random<float>(c, seed + 1, 0.5f, 1.0f);
    auto bias = random<float>(c, seed + 2, 0.5f);
    std::vector<float> partials((size_t)stat_groups * chunks * 3, NAN), stats(stat_groups * 2, NAN);
    std::vector<T> out(total, from_f32<T>(NAN));
    emu::launch({(unsigned)chunks, (unsigned)stat_groups, 1}, 256, 0,
                [&] { Norm<T>::partial(x.data(), partials.data(), group_elems, chunk, chunks); });
    emu::launch({(unsigned)stat_groups, 1, 1}, 256, 0,
                [&] { sdrs_group_norm_finalize(partials.data(), stats.data(), chunks, eps); });
    // Fewer blocks than values: the grid-stride loop does the rest.
    emu::launch({3, 1, 1}, 256, 0, [&] {
        Norm<T>::apply(x.data(), stats.data(), weight.data(), bias.data(), out.data(), total, spatial, c,
                       c / groups, silu);
    });
    std::vector<double> want(total);
    for (int g = 0; g < stat_groups; ++g) {
        double sum = 0.0, sq = 0.0;
        for (long long i = 0; i < group_elems; ++i) {
            sum += to_f32(x[g * group_elems + i]);
        }
        const double mean = sum / group_elems;
        for (long long i = 0; i < group_elems; ++i) {
            const double delta = to_f32(x[g * group_elems + i]) - mean;
            sq += delta * delta;
        }
        const double rstd = 1.0 / std::sqrt(sq / group_elems + eps);
        for (long long i = 0; i < group_elems; ++i) {
            const int channel = (int)((g % groups) * (c / groups) + i / spatial);
            double y = (to_f32(x[g * group_elems + i]) - mean) * rstd * weight[channel] + bias[channel];
            if (silu) y = y / (1.0 + std::exp(-y));
            want[g * group_elems + i] = y;
        }
    }
    char name[160];
    std::snprintf(name, sizeof name, "group norm%s [%d, %d, %d] groups %d, %d chunks", silu ? " + silu" : "",
                  n, c, spatial, groups, chunks);
    report<T>(name, out, want);
}

template <typename T>
void geglu_case(int rows, int half, uint64_t seed) {
    auto x = random<T>((size_t)rows * 2 * half, seed, 3.0f);
    std::vector<T> out((size_t)rows * half, from_f32<T>(NAN));
    emu::launch({2, 1, 1}, 256, 0, [&] { Norm<T>::geglu(x.data(), out.data(), rows, half); });
    std::vector<double> want(out.size());
    for (int r = 0; r < rows; ++r) {
        for (int i = 0; i < half; ++i) {
            const double a = to_f32(x[(size_t)r * 2 * half + i]);
            const double g = to_f32(x[(size_t)r * 2 * half + half + i]);
            want[(size_t)r * half + i] = a * 0.5 * g * (1.0 + std::erf(g / std::sqrt(2.0)));
        }
    }
    report<T>("geglu [" + std::to_string(rows) + ", " + std::to_string(2 * half) + "]", out, want);
}

template <typename T>
void all_cases(bool tensor_cores) {
    uint64_t seed = 1;
    for (int d : {1, 8, 40, 64, 80, 96, 128, 160, 256}) {
        flash_case<T>(1, 2, 45, 77, d, d, false, seed += 3);
    }
    flash_case<T>(2, 3, 33, 1, 40, 40, false, seed += 3);     // one key
    flash_case<T>(1, 2, 1, 70, 64, 64, false, seed += 3);     // one query
    flash_case<T>(1, 2, 65, 100, 64, 40, false, seed += 3);   // Dv != D
    flash_case<T>(2, 3, 40, 77, 80, 80, true, seed += 3);     // strided heads
    flash_case<T>(1, 1, 17, 33, 160, 160, true, seed += 3);
    conv_cases<T>(false);
    if (tensor_cores) conv_cases<T>(true);
    for (bool silu : {false, true}) {
        group_norm_case<T>(2, 64, 17 * 19, 32, 1e-5f, 0.0f, 100, silu, seed += 3);  // 7 chunks
        group_norm_case<T>(1, 6, 5, 3, 1e-5f, 0.5f, 8192, silu, seed += 3);
        group_norm_case<T>(1, 8, 3000, 2, 1e-6f, 3.0f, 1024, silu, seed += 3);  // off zero, 12 chunks
        group_norm_case<T>(1, 32, 1, 32, 1e-5f, 0.0f, 8192, silu, seed += 3);   // one value a group
    }
    geglu_case<T>(7, 5, seed += 3);
    geglu_case<T>(77, 64, seed += 3);
    geglu_case<T>(3, 1, seed += 3);
}

int main() {
    all_cases<float>(false);
    all_cases<__half>(true);
    all_cases<__nv_bfloat16>(true);
    std::printf("%d checks, %d failed\n", checks, failures);
    return failures != 0;
}
