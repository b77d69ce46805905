// AVX2 + FMA GEMM micro-kernel: an MR x NR block of C held in ymm registers.
//
// Same scheme as the AVX-512 kernel with 16 registers: each row of the block
// is two ymm vectors, so MR = 6 gives 12 accumulators + 2 B vectors + 1
// broadcast = 15 registers. Column edges use vmaskmov loads/stores.
//
// Packed operands (see gemm_impl.hpp): A sliver is kc x MR, B sliver kc x NR.
#pragma once

#include <immintrin.h>

namespace chainrule {
namespace CHAINRULE_ISA {
namespace micro {

template <typename T>
struct Vec;

template <>
struct Vec<float> {
    using reg = __m256;
    using mask = __m256i;
    static constexpr int W = 8;
    static reg zero() { return _mm256_setzero_ps(); }
    static reg set1(float x) { return _mm256_set1_ps(x); }
    static reg load(const float* p) { return _mm256_loadu_ps(p); }
    static void store(float* p, reg v) { _mm256_storeu_ps(p, v); }
    // Lanes [0, n) active; n may be <= 0 or >= W.
    static __m256i first(int n) {
        return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    }
    static reg load(__m256i k, const float* p) { return _mm256_maskload_ps(p, k); }
    static void store(__m256i k, float* p, reg v) { _mm256_maskstore_ps(p, k, v); }
    static reg fmadd(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
    static reg mul(reg a, reg b) { return _mm256_mul_ps(a, b); }
    static reg add(reg a, reg b) { return _mm256_add_ps(a, b); }
    // act_map's relu (x <= 0 -> +0) or leaky_relu (x < 0 -> x * slope); NaN kept.
    static reg act(int code, reg x, reg slope) {
        if (code == detail::kTileRelu)
            return _mm256_blendv_ps(x, zero(), _mm256_cmp_ps(x, zero(), _CMP_LE_OQ));
        return _mm256_blendv_ps(x, _mm256_mul_ps(x, slope), _mm256_cmp_ps(x, zero(), _CMP_LT_OQ));
    }
};

template <>
struct Vec<double> {
    using reg = __m256d;
    using mask = __m256i;
    static constexpr int W = 4;
    static reg zero() { return _mm256_setzero_pd(); }
    static reg set1(double x) { return _mm256_set1_pd(x); }
    static reg load(const double* p) { return _mm256_loadu_pd(p); }
    static void store(double* p, reg v) { _mm256_storeu_pd(p, v); }
    static __m256i first(int n) {
        return _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), _mm256_setr_epi64x(0, 1, 2, 3));
    }
    static reg load(__m256i k, const double* p) { return _mm256_maskload_pd(p, k); }
    static void store(__m256i k, double* p, reg v) { _mm256_maskstore_pd(p, k, v); }
    static reg fmadd(reg a, reg b, reg c) { return _mm256_fmadd_pd(a, b, c); }
    static reg mul(reg a, reg b) { return _mm256_mul_pd(a, b); }
    static reg add(reg a, reg b) { return _mm256_add_pd(a, b); }
    static reg act(int code, reg x, reg slope) {
        if (code == detail::kTileRelu)
            return _mm256_blendv_pd(x, zero(), _mm256_cmp_pd(x, zero(), _CMP_LE_OQ));
        return _mm256_blendv_pd(x, _mm256_mul_pd(x, slope), _mm256_cmp_pd(x, zero(), _CMP_LT_OQ));
    }
};

// One output row: act(alpha * acc + beta * C + bias) (beta == 0: C not read;
// act: common.hpp, kTileRelu). Masked is a compile-time choice so that full
// tiles use plain moves.
template <typename T, bool Masked>
inline void write_row(T* ci, typename Vec<T>::reg acc0, typename Vec<T>::reg acc1,
                      typename Vec<T>::reg va, typename Vec<T>::reg vb, bool read_c,
                      const T* bias, int act, typename Vec<T>::reg slope, __m256i k0,
                      __m256i k1) {
    using V = Vec<T>;
    constexpr int W = V::W;
    typename V::reg r0 = V::mul(va, acc0), r1 = V::mul(va, acc1);
    if (read_c) {
        r0 = V::fmadd(vb, Masked ? V::load(k0, ci) : V::load(ci), r0);
        r1 = V::fmadd(vb, Masked ? V::load(k1, ci + W) : V::load(ci + W), r1);
    }
    if (bias) {
        r0 = V::add(r0, Masked ? V::load(k0, bias) : V::load(bias));
        r1 = V::add(r1, Masked ? V::load(k1, bias + W) : V::load(bias + W));
    }
    if (act != detail::kTileNoAct) {
        r0 = V::act(act, r0, slope);
        r1 = V::act(act, r1, slope);
    }
    if (Masked) {
        V::store(k0, ci, r0);
        V::store(k1, ci + W, r1);
    } else {
        V::store(ci, r0);
        V::store(ci + W, r1);
    }
}

template <typename T, int M, int MR>
inline void kernel_rows(idx kc, const T* __restrict a, const T* __restrict b, T* c, idx ldc,
                        int nr, const T* alpha_beta, const T* bias) {
    using V = Vec<T>;
    using reg = typename V::reg;
    constexpr int W = V::W;
    for (int i = 0; i < M; ++i) _mm_prefetch(reinterpret_cast<const char*>(c + i * ldc), _MM_HINT_T0);

    reg c0[M], c1[M];
#pragma GCC unroll 6
    for (int i = 0; i < M; ++i) {
        c0[i] = V::zero();
        c1[i] = V::zero();
    }
#pragma GCC unroll 4
    for (idx p = 0; p < kc; ++p) {
        const reg b0 = V::load(b);
        const reg b1 = V::load(b + W);
#pragma GCC unroll 6
        for (int i = 0; i < M; ++i) {
            const reg ai = V::set1(a[i]);
            c0[i] = V::fmadd(ai, b0, c0[i]);
            c1[i] = V::fmadd(ai, b1, c1[i]);
        }
        a += MR;
        b += 2 * W;
    }

    const T alpha = alpha_beta[0], beta = alpha_beta[1];
    const int act = int(alpha_beta[2]);
    const reg va = V::set1(alpha), vb = V::set1(beta), vslope = V::set1(alpha_beta[3]);
    const bool read_c = beta != T(0);
    if (nr == 2 * W) {
        const __m256i none = _mm256_setzero_si256();
#pragma GCC unroll 6
        for (int i = 0; i < M; ++i)
            write_row<T, false>(c + i * ldc, c0[i], c1[i], va, vb, read_c, bias, act, vslope,
                                none, none);
    } else {
        const __m256i k0 = V::first(nr), k1 = V::first(nr - W);
#pragma GCC unroll 6
        for (int i = 0; i < M; ++i)
            write_row<T, true>(c + i * ldc, c0[i], c1[i], va, vb, read_c, bias, act, vslope, k0,
                               k1);
    }
}

// In-register transposes for packing (pack_simd.hpp): r[i] lane q -> r[q]
// lane i, 8 x 8 floats (24 shuffles) and 4 x 4 doubles (8).
inline void transpose(__m256 r[8]) {
    __m256 t[8];
    for (int i = 0; i < 4; ++i) {
        t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    // u[4j + e], 128-bit lane L: rows 4j..4j+3 of column 4L + e.
    __m256 u[8];
    for (int j = 0; j < 2; ++j) {
        u[4 * j] = _mm256_shuffle_ps(t[4 * j], t[4 * j + 2], 0x44);
        u[4 * j + 1] = _mm256_shuffle_ps(t[4 * j], t[4 * j + 2], 0xEE);
        u[4 * j + 2] = _mm256_shuffle_ps(t[4 * j + 1], t[4 * j + 3], 0x44);
        u[4 * j + 3] = _mm256_shuffle_ps(t[4 * j + 1], t[4 * j + 3], 0xEE);
    }
    for (int e = 0; e < 4; ++e) {
        r[e] = _mm256_permute2f128_ps(u[e], u[4 + e], 0x20);
        r[4 + e] = _mm256_permute2f128_ps(u[e], u[4 + e], 0x31);
    }
}

inline void transpose(__m256d r[4]) {
    const __m256d t0 = _mm256_unpacklo_pd(r[0], r[1]), t1 = _mm256_unpackhi_pd(r[0], r[1]);
    const __m256d t2 = _mm256_unpacklo_pd(r[2], r[3]), t3 = _mm256_unpackhi_pd(r[2], r[3]);
    r[0] = _mm256_permute2f128_pd(t0, t2, 0x20);
    r[1] = _mm256_permute2f128_pd(t1, t3, 0x20);
    r[2] = _mm256_permute2f128_pd(t0, t2, 0x31);
    r[3] = _mm256_permute2f128_pd(t1, t3, 0x31);
}

}  // namespace micro
}  // namespace CHAINRULE_ISA
}  // namespace chainrule

#include "../pack_simd.hpp"

namespace chainrule {
namespace CHAINRULE_ISA {

// Traits consumed by gemm_impl.hpp. AVX2-only CPUs often have 256 KiB - 1 MiB
// of L2, so the packed B panel is kept near 384 KiB.
template <typename T>
struct MicroKernel : micro::SimdPacking<T> {  // SIMD packing: pack_simd.hpp
    static constexpr int MR = 6;
    static constexpr int NR = 2 * micro::Vec<T>::W;
    static constexpr idx KC = 256;
    static constexpr idx NC = sizeof(T) == 4 ? 384 : 192;

    // The unpacked small-problem path (gemm_impl.hpp, direct_tile): vector
    // type and rows per tile (MRD x 2 vectors: 12 accumulators, as above).
    using V = micro::Vec<T>;
    static constexpr bool kAInPlace = false;  // A is always packed (gemm_blocked)
    static constexpr bool kDirect = true;
    // Deep products with B read in place (use_direct, gemm_impl.hpp): no gain
    // here (float32 128x256x784 0.87x, 64x128x784 1.05x of the packed path).
    static constexpr bool kDirectDeep = false;
    static constexpr int MRD = 6;

    // C[0:mr, 0:nr] (row stride ldc) = act(alpha * A.B + beta * C + bias[0:nr])
    // with {alpha, beta, act, slope} = alpha_beta[0:4] (common.hpp: in memory
    // so that the compiler does not pin them in a vector register across the
    // k loop, which needs every register for the accumulators).
    // 1 <= mr <= MR, 1 <= nr <= NR; beta == 0: C is not read; bias may be null.
    static constexpr bool kFusedAct = true;
    static void run(idx kc, const T* a, const T* b, T* c, idx ldc, int mr, int nr,
                    const T* alpha_beta, const T* bias) {
        switch (mr) {
#define CHAINRULE_MK_CASE(M) \
    case M: micro::kernel_rows<T, M, MR>(kc, a, b, c, ldc, nr, alpha_beta, bias); return;
            CHAINRULE_MK_CASE(6)
            CHAINRULE_MK_CASE(5)
            CHAINRULE_MK_CASE(4)
            CHAINRULE_MK_CASE(3)
            CHAINRULE_MK_CASE(2)
            CHAINRULE_MK_CASE(1)
#undef CHAINRULE_MK_CASE
            default: return;
        }
    }
};

}  // namespace CHAINRULE_ISA
}  // namespace chainrule
