// AVX-512 GEMM micro-kernel: an MR x NR block of C held in zmm registers.
//
// Row-major C is vectorised along its rows (the N direction): each row of the
// block is two zmm registers, and every k step broadcasts one packed A value
// per row against two packed B vectors. With MR = 13 rows that is 26
// accumulators + 2 B vectors + 1 broadcast = 29 of the 32 zmm registers, and
// 26 FMAs per 15 loads, enough to keep both FMA ports busy. (14 rows would
// fit in 31 registers, but GCC 12 then spills one accumulator to the stack
// in the k loop; 13 rows measured 2-3% faster on the MLP shapes.)
//
// Packed operands (see gemm_impl.hpp): A sliver is kc x MR (one column of the
// sliver per k step), B sliver is kc x NR, both contiguous.
#pragma once

#include <immintrin.h>

namespace chainrule {
namespace CHAINRULE_ISA {
namespace micro {

// Thin wrappers so one kernel template serves float and double.
template <typename T>
struct Vec;

template <>
struct Vec<float> {
    using reg = __m512;
    using mask = __mmask16;
    static constexpr int W = 16;
    static reg zero() { return _mm512_setzero_ps(); }
    static reg set1(float x) { return _mm512_set1_ps(x); }
    static reg load(const float* p) { return _mm512_loadu_ps(p); }
    static reg load(mask k, const float* p) { return _mm512_maskz_loadu_ps(k, p); }
    static void store(float* p, reg v) { _mm512_storeu_ps(p, v); }
    static void store(mask k, float* p, reg v) { _mm512_mask_storeu_ps(p, k, v); }
    static reg fmadd(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
    static reg mul(reg a, reg b) { return _mm512_mul_ps(a, b); }
    static reg add(reg a, reg b) { return _mm512_add_ps(a, b); }
    // Lanes [0, n) set; n may be <= 0 or >= W.
    static mask first(int n) {
        return n >= W ? mask(0xFFFF) : n <= 0 ? mask(0) : mask((1u << n) - 1u);
    }
    // act_map's relu (x <= 0 -> +0) or leaky_relu (x < 0 -> x * slope); NaN kept.
    static reg act(int code, reg x, reg slope) {
        if (code == detail::kTileRelu)
            return _mm512_mask_mov_ps(x, _mm512_cmp_ps_mask(x, zero(), _CMP_LE_OQ), zero());
        return _mm512_mask_mul_ps(x, _mm512_cmp_ps_mask(x, zero(), _CMP_LT_OQ), x, slope);
    }
};

template <>
struct Vec<double> {
    using reg = __m512d;
    using mask = __mmask8;
    static constexpr int W = 8;
    static reg zero() { return _mm512_setzero_pd(); }
    static reg set1(double x) { return _mm512_set1_pd(x); }
    static reg load(const double* p) { return _mm512_loadu_pd(p); }
    static reg load(mask k, const double* p) { return _mm512_maskz_loadu_pd(k, p); }
    static void store(double* p, reg v) { _mm512_storeu_pd(p, v); }
    static void store(mask k, double* p, reg v) { _mm512_mask_storeu_pd(p, k, v); }
    static reg fmadd(reg a, reg b, reg c) { return _mm512_fmadd_pd(a, b, c); }
    static reg mul(reg a, reg b) { return _mm512_mul_pd(a, b); }
    static reg add(reg a, reg b) { return _mm512_add_pd(a, b); }
    static mask first(int n) {
        return n >= W ? mask(0xFF) : n <= 0 ? mask(0) : mask((1u << n) - 1u);
    }
    static reg act(int code, reg x, reg slope) {
        if (code == detail::kTileRelu)
            return _mm512_mask_mov_pd(x, _mm512_cmp_pd_mask(x, zero(), _CMP_LE_OQ), zero());
        return _mm512_mask_mul_pd(x, _mm512_cmp_pd_mask(x, zero(), _CMP_LT_OQ), x, slope);
    }
};

// C[0:M, 0:nr] = act(alpha * A.B + beta * C + bias), with beta == 0 meaning "C
// is not read" and act from alpha_beta[2:4] (common.hpp, kTileRelu). M is a
// template parameter so that an edge sliver with few rows runs only its own
// FMAs (m = 1 inference costs 1/13 of a full tile, not all of it); the column
// edge uses masked loads/stores, so no tile buffer is needed.
// AIn: A is read where it lies (row i of the tile at a + i * lda, one
// column per k step) instead of from a packed MR-wide sliver.
template <typename T, int M, int MR, bool AIn = false>
inline void kernel_rows(idx kc, const T* __restrict a, const T* __restrict b, T* c, idx ldc,
                        int nr, const T* alpha_beta, const T* bias, idx lda = 0) {
    using V = Vec<T>;
    using reg = typename V::reg;
    constexpr int W = V::W;

    // The C tile is written at the end; start fetching it now (it is read
    // whenever beta != 0, i.e. on every K block after the first).
    for (int i = 0; i < M; ++i) {
        _mm_prefetch(reinterpret_cast<const char*>(c + i * ldc), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(c + i * ldc + W), _MM_HINT_T0);
    }

    reg c0[M], c1[M];
#pragma GCC unroll 14
    for (int i = 0; i < M; ++i) {
        c0[i] = V::zero();
        c1[i] = V::zero();
    }

    // One k step: B's two vectors (streaming from L2, fetched 8 steps ahead;
    // only A stays in L1) times each row's A value.
    auto k_step = [&](auto a_of_row) {
        _mm_prefetch(reinterpret_cast<const char*>(b + 8 * 2 * W), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(b + 8 * 2 * W + W), _MM_HINT_T0);
        const reg b0 = V::load(b);
        const reg b1 = V::load(b + W);
#pragma GCC unroll 14
        for (int i = 0; i < M; ++i) {
            const reg ai = V::set1(a_of_row(i));
            c0[i] = V::fmadd(ai, b0, c0[i]);
            c1[i] = V::fmadd(ai, b1, c1[i]);
        }
        b += 2 * W;
    };
    if constexpr (AIn) {
        CHAINRULE_ISA::detail::RowsOfA<T, M> rows(a, lda);
#pragma GCC unroll 2
        for (idx p = 0; p < kc; ++p) {
            k_step([&](int i) { return rows[i]; });
            rows.next();
        }
    } else {
#pragma GCC unroll 4
        for (idx p = 0; p < kc; ++p) {
            k_step([&](int i) { return a[i]; });
            a += MR;
        }
    }

    const T alpha = alpha_beta[0], beta = alpha_beta[1];
    const int act = int(alpha_beta[2]);
    const reg vslope = V::set1(alpha_beta[3]);
    const typename V::mask k0 = V::first(nr), k1 = V::first(nr - W);
    const reg va = V::set1(alpha);
    const reg vb = V::set1(beta);
    const bool has_bias = bias != nullptr;
    const reg bias0 = has_bias ? V::load(k0, bias) : V::zero();
    const reg bias1 = has_bias ? V::load(k1, bias + W) : V::zero();
#pragma GCC unroll 14
    for (int i = 0; i < M; ++i) {
        T* ci = c + i * ldc;
        reg r0 = V::mul(va, c0[i]);
        reg r1 = V::mul(va, c1[i]);
        if (beta != T(0)) {
            r0 = V::fmadd(vb, V::load(k0, ci), r0);
            r1 = V::fmadd(vb, V::load(k1, ci + W), r1);
        }
        if (has_bias) {
            r0 = V::add(r0, bias0);
            r1 = V::add(r1, bias1);
        }
        if (act != detail::kTileNoAct) {
            r0 = V::act(act, r0, vslope);
            r1 = V::act(act, r1, vslope);
        }
        V::store(k0, ci, r0);
        V::store(k1, ci + W, r1);
    }
}


// ---------------------------------------------------------------- packing
//
// In-register transposes for packing (gemm_impl.hpp): a transposed operand
// is W rows x W columns at a time, W loads, a fixed shuffle network and W
// stores, instead of one scalar load and store per value.

// out[j] 128-bit lane L = in[L] lane j: a 4 x 4 transpose of 128-bit lanes
// (8 shuffles; lanes are moved whole, so it serves doubles too).
inline void transpose_lanes(const __m512 in[4], __m512 out[4]) {
    const __m512 x0 = _mm512_shuffle_f32x4(in[0], in[1], 0x44);
    const __m512 x1 = _mm512_shuffle_f32x4(in[0], in[1], 0xEE);
    const __m512 x2 = _mm512_shuffle_f32x4(in[2], in[3], 0x44);
    const __m512 x3 = _mm512_shuffle_f32x4(in[2], in[3], 0xEE);
    out[0] = _mm512_shuffle_f32x4(x0, x2, 0x88);
    out[1] = _mm512_shuffle_f32x4(x0, x2, 0xDD);
    out[2] = _mm512_shuffle_f32x4(x1, x3, 0x88);
    out[3] = _mm512_shuffle_f32x4(x1, x3, 0xDD);
}

// r[i] lane q -> r[q] lane i, 16 x 16 floats (64 shuffles).
inline void transpose(__m512 r[16]) {
    __m512 t[16];
    for (int i = 0; i < 8; ++i) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    // u[4j + e], 128-bit lane L: rows 4j..4j+3 of column 4L + e.
    __m512 u[16];
    for (int j = 0; j < 4; ++j) {
        const __m512d a = _mm512_castps_pd(t[4 * j]), b = _mm512_castps_pd(t[4 * j + 2]);
        const __m512d c = _mm512_castps_pd(t[4 * j + 1]), d = _mm512_castps_pd(t[4 * j + 3]);
        u[4 * j] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
        u[4 * j + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
        u[4 * j + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d));
        u[4 * j + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
    }
    // A 4 x 4 transpose of 128-bit lanes for each e.
    for (int e = 0; e < 4; ++e) {
        const __m512 in[4] = {u[e], u[4 + e], u[8 + e], u[12 + e]};
        __m512 out[4];
        transpose_lanes(in, out);
        for (int j = 0; j < 4; ++j) r[4 * j + e] = out[j];
    }
}

// The same for 8 x 8 doubles (24 shuffles).
inline void transpose(__m512d r[8]) {
    __m512d t[8];
    for (int i = 0; i < 4; ++i) {
        t[2 * i] = _mm512_unpacklo_pd(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_pd(r[2 * i], r[2 * i + 1]);
    }
    // t[2i + e], 128-bit lane L: rows 2i, 2i+1 of column 2L + e.
    for (int e = 0; e < 2; ++e) {
        const __m512 in[4] = {_mm512_castpd_ps(t[e]), _mm512_castpd_ps(t[2 + e]),
                              _mm512_castpd_ps(t[4 + e]), _mm512_castpd_ps(t[6 + e])};
        __m512 out[4];
        transpose_lanes(in, out);
        for (int j = 0; j < 4; ++j) r[2 * j + e] = _mm512_castps_pd(out[j]);
    }
}

}  // namespace micro
}  // namespace CHAINRULE_ISA
}  // namespace chainrule

#include "../pack_simd.hpp"

namespace chainrule {
namespace CHAINRULE_ISA {

// Traits consumed by gemm_impl.hpp. The KC x MR sliver of A stays in L1
// while the B slivers stream past it from the KC x NC panel in L2 (48 KiB L1d
// and 2 MiB L2 per core on the target Xeons); tuned by measurement.
template <typename T>
struct MicroKernel : micro::SimdPacking<T> {  // SIMD packing: pack_simd.hpp
    static constexpr int MR = 13;
    static constexpr int NR = 2 * micro::Vec<T>::W;
    // float: A sliver 13 x 256 x 4 B = 13 KiB, B panel 256 x 1024 x 4 B = 1 MiB
    // (a 1024-wide layer packs A once); double: 13 x 256 x 8 B = 26 KiB and
    // 256 x 512 x 8 B = 1 MiB. KC 256 and 384 measured within noise of each
    // other; 256 leaves L1 room for the B sliver streaming past A.
    static constexpr idx KC = sizeof(T) == 4 ? 256 : 256;
    static constexpr idx NC = sizeof(T) == 4 ? 1024 : 512;

    // The unpacked small-problem path (gemm_impl.hpp, direct_tile): vector
    // type and rows per tile (MRD x 2 vectors: 26 accumulators, as above; at
    // 14 rows GCC spilled in the k loop here too, though (e) and 64^3 timed
    // the same either way).
    using V = micro::Vec<T>;
    static constexpr bool kDirect = true;
    static constexpr bool kDirectDeep = true;  // see use_direct (gemm_impl.hpp)
    static constexpr int MRD = 13;


    // C[0:mr, 0:nr] (row stride ldc) = act(alpha * A.B + beta * C + bias[0:nr])
    // with {alpha, beta, act, slope} = alpha_beta[0:4] (common.hpp: in memory
    // so that the compiler does not pin them in a vector register across the
    // k loop, which needs every register for the accumulators).
    // 1 <= mr <= MR, 1 <= nr <= NR; beta == 0: C is not read; bias may be null.
    static constexpr bool kFusedAct = true;
    static void run(idx kc, const T* a, const T* b, T* c, idx ldc, int mr, int nr,
                    const T* alpha_beta, const T* bias) {
        rows<false>(kc, a, 0, b, c, ldc, mr, nr, alpha_beta, bias);
    }

    // As run, with A read in place: row i of the tile at a + i * lda
    // (gemm_blocked uses it when A is row-major and meets few B slivers).
    static constexpr bool kAInPlace = true;
    static void run_a(idx kc, const T* a, idx lda, const T* b, T* c, idx ldc, int mr, int nr,
                      const T* alpha_beta, const T* bias) {
        rows<true>(kc, a, lda, b, c, ldc, mr, nr, alpha_beta, bias);
    }

  private:
    template <bool AIn>
    static void rows(idx kc, const T* a, idx lda, const T* b, T* c, idx ldc, int mr, int nr,
                     const T* alpha_beta, const T* bias) {
        switch (mr) {
#define CHAINRULE_MK_CASE(M)                                                                  \
    case M:                                                                                   \
        micro::kernel_rows<T, M, MR, AIn>(kc, a, b, c, ldc, nr, alpha_beta, bias, lda);       \
        return;
            CHAINRULE_MK_CASE(13)
            CHAINRULE_MK_CASE(12)
            CHAINRULE_MK_CASE(11)
            CHAINRULE_MK_CASE(10)
            CHAINRULE_MK_CASE(9)
            CHAINRULE_MK_CASE(8)
            CHAINRULE_MK_CASE(7)
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
