// GEMM and the dense layer kernels, shared by every ISA.
//
// BLIS layout, written for row-major C. For each NC-wide column block of C
// and each KC-deep slice of K, op(B) is packed once into a KC x NC panel of
// NR-wide slivers (kept in L2), then every MR-tall sliver of op(A) is packed
// (kept in L1) and swept across all B slivers by the ISA's micro-kernel
// (MicroKernel<T> from <isa>/microkernel.hpp), which holds an MR x NR block of
// C in registers. Packing absorbs the transposes and zero-pads the edges, so
// the micro-kernel sees one layout.
//
// Threads split only M and N (slivers of A x groups of B slivers); the K
// blocking depends only on k, so every element of C is summed in the same
// order for any thread count and the results are bit-identical.
//
// Write-back: the first K block computes alpha*AB + beta*C (C unread when
// beta == 0), later blocks add alpha*AB. On the last K block the optional
// epilogue adds a bias per column (in registers) and applies an elementwise
// activation to the tile while it is still in L1.
#pragma once

#include <cstring>

namespace chainrule {
namespace CHAINRULE_ISA {
namespace gemm_detail {

template <typename T>
struct Epilogue {
    const T* bias = nullptr;   // (n) added to every row; null: none
    Act act = Act::identity;   // elementwise activations only
    T slope = T(0);            // leaky_relu
};

inline idx min_i(idx a, idx b) { return a < b ? a : b; }
inline idx ceil_div(idx a, idx b) { return (a + b - 1) / b; }
inline idx round_up(idx a, idx b) { return ceil_div(a, b) * b; }

// Splits `total` into ceil(total / cap) near-equal blocks, each a multiple of
// `unit` (except possibly the last): avoids a thin remainder block that would
// reload C (K) or repack A (N) for little work. Depends only on its arguments.
inline idx balanced_block(idx total, idx cap, idx unit) {
    const idx blocks = ceil_div(total, cap);
    return min_i(cap, round_up(ceil_div(total, blocks), unit));
}

// op(B)[p0:p0+kc, j0:j0+nr] -> dst, kc rows of NR values, columns nr..NR zero.
template <typename T, int NR>
void pack_b_sliver(bool trans_b, const T* b, idx ldb, idx p0, idx kc, idx j0, idx nr, T* dst) {
    if (!trans_b) {
        const T* src = b + p0 * ldb + j0;
        if (nr == NR) {
            for (idx p = 0; p < kc; ++p) std::memcpy(dst + p * NR, src + p * ldb, NR * sizeof(T));
        } else {
            for (idx p = 0; p < kc; ++p) {
                T* d = dst + p * NR;
                for (idx j = 0; j < nr; ++j) d[j] = src[p * ldb + j];
                for (idx j = nr; j < NR; ++j) d[j] = T(0);
            }
        }
    } else {
        // B is stored (n, k): each column of the sliver is a contiguous row of B.
        // Work in strips of 8 k values so that the reads stream and the
        // writes stay within a few cache lines.
        const T* src = b + j0 * ldb + p0;
        idx p = 0;
        for (; p + 8 <= kc; p += 8) {
            T* d = dst + p * NR;
            for (idx j = 0; j < nr; ++j) {
                const T* s = src + j * ldb + p;
                for (int q = 0; q < 8; ++q) d[q * NR + j] = s[q];
            }
            for (idx j = nr; j < NR; ++j)
                for (int q = 0; q < 8; ++q) d[q * NR + j] = T(0);
        }
        for (; p < kc; ++p) {
            T* d = dst + p * NR;
            for (idx j = 0; j < nr; ++j) d[j] = src[j * ldb + p];
            for (idx j = nr; j < NR; ++j) d[j] = T(0);
        }
    }
}

// op(A)[i0:i0+mr, p0:p0+kc] -> dst, kc columns of MR values, rows mr..MR zero.
template <typename T, int MR>
void pack_a_sliver(bool trans_a, const T* a, idx lda, idx i0, idx mr, idx p0, idx kc, T* dst) {
    if (trans_a) {
        // A is stored (k, m): each packed column is contiguous in A.
        const T* src = a + p0 * lda + i0;
        for (idx p = 0; p < kc; ++p) {
            T* d = dst + p * MR;
            for (idx i = 0; i < mr; ++i) d[i] = src[p * lda + i];
            for (idx i = mr; i < MR; ++i) d[i] = T(0);
        }
    } else {
        const T* src = a + i0 * lda + p0;
        for (idx i = 0; i < mr; ++i) {
            const T* s = src + i * lda;
            for (idx p = 0; p < kc; ++p) dst[p * MR + i] = s[p];
        }
        for (idx i = mr; i < MR; ++i)
            for (idx p = 0; p < kc; ++p) dst[p * MR + i] = T(0);
    }
}

// k == 0 or alpha == 0 (BLAS convention: A and B are then not read):
// C = beta * C (zeros when beta == 0, C unread) followed by the epilogue.
template <typename T>
void scale_rows(idx m, idx n, T beta, T* c, idx ldc, const Epilogue<T>& ep, int nthreads) {
    const int nt = detail::threads_for(double(m) * double(n), double(detail::kParallelElems),
                                       nthreads);
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (idx i = 0; i < m; ++i) {
        T* ci = c + i * ldc;
        if (beta == T(0)) {
            for (idx j = 0; j < n; ++j) ci[j] = T(0);
        } else {
            for (idx j = 0; j < n; ++j) ci[j] = beta * ci[j];
        }
        if (ep.bias) {
            for (idx j = 0; j < n; ++j) ci[j] += ep.bias[j];
        }
        if (ep.act != Act::identity) detail::activation_block<T>(ep.act, ci, 1, n, ldc, ep.slope);
    }
}

// The blocked loops for one thread of a team of `nth` (nth == 1: no team).
// bpanel holds kc_max x nc_cap, asliver holds kc_max x MR for this thread.
template <typename T>
void gemm_blocked(int tid, int nth, bool trans_a, bool trans_b, idx m, idx n, idx k, T alpha,
                  const T* a, idx lda, const T* b, idx ldb, T beta, T* c, idx ldc,
                  const Epilogue<T>& ep, idx nc_cap, T* bpanel, T* asliver) {
    using MK = MicroKernel<T>;
    constexpr int MR = MK::MR;
    constexpr int NR = MK::NR;
    const idx kc_blk = balanced_block(k, MK::KC, 8);
    const idx nc_blk = balanced_block(n, nc_cap, NR);
    const idx m_slivers = ceil_div(m, MR);
    const bool elementwise_act = ep.act != Act::identity;

    for (idx jc = 0; jc < n; jc += nc_blk) {
        const idx nc = min_i(nc_blk, n - jc);
        const idx n_slivers = ceil_div(nc, NR);
        // With few A slivers, also split the B slivers into groups so that
        // every thread gets work; a group never changes any summation.
        idx groups = 1;
        if (nth > 1 && m_slivers < 4 * nth) groups = min_i(n_slivers, ceil_div(4 * nth, m_slivers));
        const idx items = m_slivers * groups;
        const T* bias = ep.bias ? ep.bias + jc : nullptr;

        for (idx pc = 0; pc < k; pc += kc_blk) {
            const idx kc = min_i(kc_blk, k - pc);
            const bool last = pc + kc == k;

            for (idx s = tid; s < n_slivers; s += nth) {
                pack_b_sliver<T, NR>(trans_b, b, ldb, pc, kc, jc + s * NR,
                                     min_i(NR, nc - s * NR), bpanel + s * kc * NR);
            }
            // Guarded: an orphaned barrier would bind to a caller's team.
            if (nth > 1) {
#pragma omp barrier
            }

            const T alpha_beta[2] = {alpha, pc == 0 ? beta : T(1)};
            const idx lo = items * tid / nth, hi = items * (tid + 1) / nth;
            idx packed = -1;
            for (idx it = lo; it < hi; ++it) {
                const idx is = it / groups, g = it % groups;
                const idx i0 = is * MR;
                const int mr = int(min_i(MR, m - i0));
                if (is != packed) {
                    pack_a_sliver<T, MR>(trans_a, a, lda, i0, mr, pc, kc, asliver);
                    packed = is;
                }
                const idx s_hi = n_slivers * (g + 1) / groups;
                for (idx s = n_slivers * g / groups; s < s_hi; ++s) {
                    const idx j0 = s * NR;
                    const int nr = int(min_i(NR, nc - j0));
                    T* ct = c + i0 * ldc + jc + j0;
                    MK::run(kc, asliver, bpanel + s * kc * NR, ct, ldc, mr, nr, alpha_beta,
                            last && bias ? bias + j0 : nullptr);
                    if (last && elementwise_act)
                        detail::activation_block<T>(ep.act, ct, mr, nr, ldc, ep.slope);
                }
            }
            // The next K block overwrites the shared B panel.
            if (nth > 1) {
#pragma omp barrier
            }
        }
    }
}

// Out of memory: one B sliver at a time from the stack, one thread. Same K
// blocking, so the same bits as the normal path. Kept out of line so that the
// common path does not reserve this stack frame.
template <typename T>
__attribute__((noinline)) void gemm_on_stack(bool trans_a, bool trans_b, idx m, idx n, idx k,
                                             T alpha, const T* a, idx lda, const T* b, idx ldb,
                                             T beta, T* c, idx ldc, const Epilogue<T>& ep) {
    using MK = MicroKernel<T>;
    alignas(64) T bbuf[MK::KC * MK::NR];
    alignas(64) T abuf[MK::KC * MK::MR];
    gemm_blocked<T>(0, 1, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, ep,
                    MK::NR, bbuf, abuf);
}

template <typename T>
void gemm_driver(bool trans_a, bool trans_b, idx m, idx n, idx k, T alpha, const T* a, idx lda,
                 const T* b, idx ldb, T beta, T* c, idx ldc, const Epilogue<T>& ep,
                 int nthreads) {
    using MK = MicroKernel<T>;
    constexpr int MR = MK::MR;
    constexpr int NR = MK::NR;
    if (m <= 0 || n <= 0) return;
    if (k <= 0 || alpha == T(0)) {
        scale_rows(m, n, beta, c, ldc, ep, nthreads);
        return;
    }

    const idx kc_max = min_i(k, MK::KC);
    const idx nc_max = min_i(round_up(n, NR), MK::NC);
    // No more threads than independent output blocks.
    const idx blocks = ceil_div(m, MR) * ceil_div(nc_max, NR);
    int nt = detail::threads_for(2.0 * double(m) * double(n) * double(k), detail::kParallelFlops,
                                 nthreads);
    if (nt > blocks) nt = int(blocks);

    constexpr idx align = 64 / sizeof(T);
    const idx a_stride = round_up(kc_max * MR, align);
    detail::Scratch<T> bpanel(std::size_t(kc_max * nc_max));
    detail::Scratch<T> aslivers(std::size_t(a_stride * nt));
    if (!bpanel.ptr || !aslivers.ptr) {
        gemm_on_stack<T>(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, ep);
        return;
    }

    if (nt <= 1) {
        gemm_blocked<T>(0, 1, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, ep,
                        MK::NC, bpanel.ptr, aslivers.ptr);
        return;
    }
#pragma omp parallel num_threads(nt)
    {
#ifdef _OPENMP
        const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
#else
        const int tid = 0, nth = 1;
#endif
        gemm_blocked<T>(tid, nth, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc,
                        ep, MK::NC, bpanel.ptr, aslivers.ptr + a_stride * tid);
    }
}

}  // namespace gemm_detail

template <typename T>
void gemm(bool trans_a, bool trans_b, idx m, idx n, idx k, T alpha, const T* a, idx lda,
          const T* b, idx ldb, T beta, T* c, idx ldc, int nthreads) {
    gemm_detail::gemm_driver<T>(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc,
                                gemm_detail::Epilogue<T>{}, nthreads);
}

template <typename T>
void dense_forward(const T* x, const T* w, const T* b, T* y, idx n, idx d_in, idx d_out, Act act,
                   T slope, int nthreads) {
    const bool row_act = act == Act::softmax || act == Act::log_softmax;
    gemm_detail::Epilogue<T> ep;
    ep.bias = b;
    ep.act = row_act ? Act::identity : act;
    ep.slope = slope;
    gemm_detail::gemm_driver<T>(false, false, n, d_out, d_in, T(1), x, d_in, w, d_out, T(0), y,
                                d_out, ep, nthreads);
    // Row-wise activations need whole rows, which a C tile does not have.
    if (row_act && n > 0 && d_out > 0) activation_forward<T>(act, y, y, n, d_out, slope, nthreads);
}

template <typename T>
void dense_vjp(const T* x, const T* w, const T* gz, T* gx, T* gw, T* gb, idx n, idx d_in,
               idx d_out, bool accumulate, int nthreads) {
    const T beta = accumulate ? T(1) : T(0);
    // gx(n, d_in) = gz(n, d_out) @ w(d_in, d_out)^T
    if (gx) gemm<T>(false, true, n, d_in, d_out, T(1), gz, d_out, w, d_out, beta, gx, d_in, nthreads);
    // gw(d_in, d_out) = x(n, d_in)^T @ gz(n, d_out)
    if (gw) gemm<T>(true, false, d_in, d_out, n, T(1), x, d_in, gz, d_out, beta, gw, d_out, nthreads);
    if (gb) column_sums<T>(gz, gb, n, d_out, accumulate, nthreads);
}

}  // namespace CHAINRULE_ISA
}  // namespace chainrule
