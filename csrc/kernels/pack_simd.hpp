// SIMD packing shared by the AVX2 and AVX-512 GEMMs (see gemm_impl.hpp,
// pack_a_sliver and pack_b_panel). Included by each ISA's microkernel.hpp
// after its micro::Vec<T> and its in-register micro::transpose(reg[W]) for
// W x W blocks, so these templates are built once per ISA namespace.
#pragma once

namespace chainrule {
namespace CHAINRULE_ISA {
namespace micro {

// dst[p * ldd + j] = src[j * lds + p] for j < rows, p < kc: `rows` (<= ldd)
// strided source rows become kc destination rows, in blocks of W x W.
// Destination lanes rows..ldd-1 of each row are left alone (callers zero
// them or overwrite them).
template <typename T>
inline void transpose_rows(const T* src, idx lds, int rows, idx kc, T* dst, idx ldd) {
    using V = Vec<T>;
    using reg = typename V::reg;
    constexpr int W = V::W;
    idx p0 = 0;
    for (; p0 + W <= kc; p0 += W) {
        for (int g = 0; g < rows; g += W) {
            const int gr = rows - g < W ? rows - g : W;
            const typename V::mask km = V::first(gr);
            reg r[W];
            for (int q = 0; q < W; ++q)
                r[q] = q < gr ? V::load(src + (g + q) * lds + p0) : V::zero();
            transpose(r);
            T* d = dst + p0 * ldd + g;
            for (int q = 0; q < W; ++q) V::store(km, d + q * ldd, r[q]);
        }
    }
    for (; p0 < kc; ++p0)
        for (int j = 0; j < rows; ++j) dst[p0 * ldd + j] = src[j * lds + p0];
}

// dst[p * n + j] = src[p * lds + j], j < n (n <= 2 W): rows copied with masks.
template <typename T>
inline void copy_rows(const T* src, idx lds, int n, idx kc, T* dst) {
    using V = Vec<T>;
    constexpr int W = V::W;
    const typename V::mask k0 = V::first(n), k1 = V::first(n - W);
    if (n > W) {
        for (idx p = 0; p < kc; ++p) {
            V::store(dst + p * n, V::load(src + p * lds));
            V::store(k1, dst + p * n + W, V::load(k1, src + p * lds + W));
        }
    } else {
        for (idx p = 0; p < kc; ++p) V::store(k0, dst + p * n, V::load(k0, src + p * lds));
    }
}

// What gemm_impl.hpp's packers look for in MicroKernel<T> (which inherits
// it): dst[p * ldd + j] = src[j * lds + p] (transpose), or kc rows of n
// values copied (copy).
template <typename T>
struct SimdPacking {
    static constexpr bool kSimdPack = true;
    static void pack_transpose(const T* src, idx lds, int rows, idx kc, T* dst, idx ldd) {
        transpose_rows<T>(src, lds, rows, kc, dst, ldd);
    }
    static void pack_copy(const T* src, idx lds, int n, idx kc, T* dst) {
        copy_rows<T>(src, lds, n, kc, dst);
    }
};

}  // namespace micro
}  // namespace CHAINRULE_ISA
}  // namespace chainrule
