// Portable GEMM micro-kernel: an MR x NR block of C in a local array that the
// compiler keeps in registers and vectorises along NR (SSE2 on the x86-64
// baseline: 4 rows x 2 xmm = 8 accumulators for either dtype).
//
// Packed operands (see gemm_impl.hpp): A sliver is kc x MR, B sliver kc x NR.
// Without FMA the products are rounded before the add, as any scalar code is.
#pragma once

namespace chainrule {
namespace CHAINRULE_ISA {

template <typename T>
struct MicroKernel {
    static constexpr int MR = 4;
    static constexpr int NR = 16 / sizeof(T) * 2;  // two SSE vectors per row
    static constexpr idx KC = 256;
    static constexpr idx NC = sizeof(T) == 4 ? 512 : 256;
    // No unpacked small-problem path: the scalar ISA always packs.
    static constexpr bool kAInPlace = false;  // A is always packed (gemm_blocked)
    static constexpr bool kDirect = false;
    static constexpr bool kSimdPack = false;  // generic packing loops (gemm_impl.hpp)

    // C[0:mr, 0:nr] (row stride ldc) = alpha * A.B + beta * C + bias[0:nr],
    // {alpha, beta} = alpha_beta[0:2]; no fused activation (alpha_beta[2:4],
    // common.hpp), gemm_blocked applies it after.
    static constexpr bool kFusedAct = false;
    // 1 <= mr <= MR, 1 <= nr <= NR; beta == 0: C is not read; bias may be null.
    // Padded rows/columns of the packed operands are zero, so the full block
    // is always computed and only the valid part written.
    static void run(idx kc, const T* __restrict a, const T* __restrict b, T* c, idx ldc, int mr,
                    int nr, const T* alpha_beta, const T* bias) {
        T acc[MR][NR] = {};
        for (idx p = 0; p < kc; ++p) {
#pragma GCC unroll 4
            for (int i = 0; i < MR; ++i) {
                const T ai = a[i];
#pragma GCC unroll 8
                for (int j = 0; j < NR; ++j) acc[i][j] += ai * b[j];
            }
            a += MR;
            b += NR;
        }
        const T alpha = alpha_beta[0], beta = alpha_beta[1];
        for (int i = 0; i < mr; ++i) {
            T* ci = c + i * ldc;
            for (int j = 0; j < nr; ++j) {
                T r = alpha * acc[i][j];
                if (beta != T(0)) r += beta * ci[j];
                if (bias) r += bias[j];
                ci[j] = r;
            }
        }
    }
};

}  // namespace CHAINRULE_ISA
}  // namespace chainrule
