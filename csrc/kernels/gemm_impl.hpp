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
// Threads split only M or N (whole slivers, see gemm_driver); the K blocking
// depends only on k, so every element of C is summed in the same order for
// any thread count and the results are bit-identical.
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

// op(B)[p0:p0+kc, j0:j0+nc] -> dst as ceil(nc / NR) slivers of kc x NR
// values (sliver s at dst + s * kc * NR), columns past nc zero.
template <typename T, int NR>
void pack_b_panel(bool trans_b, const T* b, idx ldb, idx p0, idx kc, idx j0, idx nc, T* dst) {
    const idx full = nc / NR, rem = nc - full * NR;
    if (!trans_b) {
        // Walk B row by row so the reads stream through memory (a sliver at a
        // time would touch a new page for every 128 bytes).
        for (idx p = 0; p < kc; ++p) {
            const T* src = b + (p0 + p) * ldb + j0;
            T* d = dst + p * NR;
            for (idx s = 0; s < full; ++s) std::memcpy(d + s * kc * NR, src + s * NR, NR * sizeof(T));
            if (rem) {
                T* dr = d + full * kc * NR;
                for (idx j = 0; j < rem; ++j) dr[j] = src[full * NR + j];
                for (idx j = rem; j < NR; ++j) dr[j] = T(0);
            }
        }
        return;
    }
    // B is stored (n, k): each column of a sliver is a contiguous row of B.
    // Strips of one cache line of k per row keep each line's reads in one
    // burst (the NR rows may share an L1 set) and the writes within a few lines.
    constexpr int L = 64 / sizeof(T);
    for (idx s = 0; s * NR < nc; ++s) {
        const idx nr = min_i(NR, nc - s * NR);
        const T* src = b + (j0 + s * NR) * ldb + p0;
        T* ds = dst + s * kc * NR;
        for (idx pb = 0; pb < kc; pb += L) {
            const int w = int(min_i(L, kc - pb));
            T* d = ds + pb * NR;
            for (idx j = 0; j < nr; ++j) {
                const T* r = src + j * ldb + pb;
                for (int q = 0; q < w; ++q) d[q * NR + j] = r[q];
            }
            for (idx j = nr; j < NR; ++j)
                for (int q = 0; q < w; ++q) d[q * NR + j] = T(0);
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
        // A is stored (m, k): a transpose. Reading MR row streams at once and
        // writing dst in order keeps both sides sequential; the fixed trip
        // count of a full sliver lets the compiler unroll the inner loop.
        const T* src = a + i0 * lda + p0;
        if (mr == MR) {
            const T* rows[MR];
            for (int i = 0; i < MR; ++i) rows[i] = src + i * lda;
            for (idx p = 0; p < kc; ++p) {
                T* d = dst + p * MR;
                for (int i = 0; i < MR; ++i) d[i] = rows[i][p];
            }
        } else {
            for (idx p = 0; p < kc; ++p) {
                T* d = dst + p * MR;
                for (idx i = 0; i < mr; ++i) d[i] = src[i * lda + p];
                for (idx i = mr; i < MR; ++i) d[i] = T(0);
            }
        }
    }
}

// k == 0 or alpha == 0 (BLAS convention: A and B are then not read):
// C = beta * C (zeros when beta == 0, C unread) followed by the epilogue.
template <typename T>
void scale_row(idx n, T beta, T* ci, const Epilogue<T>& ep) {
    if (beta == T(0)) {
        for (idx j = 0; j < n; ++j) ci[j] = T(0);
    } else {
        for (idx j = 0; j < n; ++j) ci[j] = beta * ci[j];
    }
    if (ep.bias) {
        for (idx j = 0; j < n; ++j) ci[j] += ep.bias[j];
    }
    if (ep.act != Act::identity) detail::activation_block<T>(ep.act, ci, 1, n, n, ep.slope);
}

template <typename T>
void scale_rows(idx m, idx n, T beta, T* c, idx ldc, const Epilogue<T>& ep, int nthreads) {
    const int nt = detail::threads_for(double(m) * double(n), double(detail::kParallelElems),
                                       nthreads);
    if (nt <= 1) {
        for (idx i = 0; i < m; ++i) scale_row(n, beta, c + i * ldc, ep);
        return;
    }
#pragma omp parallel for num_threads(nt) schedule(static)
    for (idx i = 0; i < m; ++i) scale_row(n, beta, c + i * ldc, ep);
}

// The blocked loops over one block of C, on the calling thread.
// bpanel holds kc_max x nc_cap values, asliver kc_max x MR.
template <typename T>
void gemm_blocked(bool trans_a, bool trans_b, idx m, idx n, idx k, T alpha, const T* a, idx lda,
                  const T* b, idx ldb, T beta, T* c, idx ldc, const Epilogue<T>& ep, idx nc_cap,
                  T* bpanel, T* asliver) {
    using MK = MicroKernel<T>;
    constexpr int MR = MK::MR;
    constexpr int NR = MK::NR;
    const idx kc_blk = balanced_block(k, MK::KC, 8);
    const idx nc_blk = balanced_block(n, nc_cap, NR);
    const bool elementwise_act = ep.act != Act::identity;

    for (idx jc = 0; jc < n; jc += nc_blk) {
        const idx nc = min_i(nc_blk, n - jc);
        const idx n_slivers = ceil_div(nc, NR);
        const T* bias = ep.bias ? ep.bias + jc : nullptr;

        for (idx pc = 0; pc < k; pc += kc_blk) {
            const idx kc = min_i(kc_blk, k - pc);
            const bool last = pc + kc == k;
            pack_b_panel<T, NR>(trans_b, b, ldb, pc, kc, jc, nc, bpanel);
            const T alpha_beta[2] = {alpha, pc == 0 ? beta : T(1)};
            for (idx i0 = 0; i0 < m; i0 += MR) {
                const int mr = int(min_i(MR, m - i0));
                pack_a_sliver<T, MR>(trans_a, a, lda, i0, mr, pc, kc, asliver);
                for (idx s = 0; s < n_slivers; ++s) {
                    const idx j0 = s * NR;
                    const int nr = int(min_i(NR, nc - j0));
                    T* ct = c + i0 * ldc + jc + j0;
                    MK::run(kc, asliver, bpanel + s * kc * NR, ct, ldc, mr, nr, alpha_beta,
                            last && bias ? bias + j0 : nullptr);
                    if (last && elementwise_act)
                        detail::activation_block<T>(ep.act, ct, mr, nr, ldc, ep.slope);
                }
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
    gemm_blocked<T>(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, ep, MK::NR,
                    bbuf, abuf);
}

// Threads: C is cut into `nt` blocks of whole slivers along N (each thread
// packs its own columns of B and all of A) or, when C is taller than wide,
// along M (each packs all of B). Each block is an independent single-thread
// GEMM with its own packing buffers, so the region has no barrier: on a
// shared, oversubscribed host a descheduled thread delays only its own block.
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

    const idx m_slivers = ceil_div(m, MR), n_slivers = ceil_div(n, NR);
    idx nt = detail::threads_for(2.0 * double(m) * double(n) * double(k), detail::kParallelFlops,
                                 nthreads);
    // Split the dimension that duplicates less packing (the other operand is
    // packed by every thread) and that has a sliver for every thread.
    const bool split_n = n >= m ? n_slivers >= nt || n_slivers >= m_slivers
                                : m_slivers < nt && n_slivers > m_slivers;
    nt = min_i(nt, split_n ? n_slivers : m_slivers);

    const idx kc_max = min_i(k, MK::KC);
    const idx nc_max = min_i(NR * (split_n ? ceil_div(n_slivers, nt) : n_slivers), MK::NC);
    constexpr idx align = 64 / sizeof(T);
    const idx b_size = round_up(kc_max * nc_max, align), a_size = round_up(kc_max * MR, align);
    detail::Scratch<T> scratch(std::size_t((b_size + a_size) * nt));
    if (!scratch.ptr) {
        gemm_on_stack<T>(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, ep);
        return;
    }

    if (nt <= 1) {
        gemm_blocked<T>(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, ep, MK::NC,
                        scratch.ptr, scratch.ptr + b_size);
        return;
    }
#pragma omp parallel for num_threads(int(nt)) schedule(static, 1)
    for (idx t = 0; t < nt; ++t) {
        T* bpanel = scratch.ptr + (b_size + a_size) * t;
        T* asliver = bpanel + b_size;
        if (split_n) {
            const idx j0 = NR * (n_slivers * t / nt), j1 = min_i(n, NR * (n_slivers * (t + 1) / nt));
            Epilogue<T> ept = ep;
            if (ep.bias) ept.bias = ep.bias + j0;
            const T* bt = trans_b ? b + j0 * ldb : b + j0;
            gemm_blocked<T>(trans_a, trans_b, m, j1 - j0, k, alpha, a, lda, bt, ldb, beta, c + j0,
                            ldc, ept, MK::NC, bpanel, asliver);
        } else {
            const idx i0 = MR * (m_slivers * t / nt), i1 = min_i(m, MR * (m_slivers * (t + 1) / nt));
            const T* at = trans_a ? a + i0 : a + i0 * lda;
            gemm_blocked<T>(trans_a, trans_b, i1 - i0, n, k, alpha, at, lda, b, ldb, beta,
                            c + i0 * ldc, ldc, ep, MK::NC, bpanel, asliver);
        }
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
