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

// The activation code the tiles apply in registers for this epilogue
// (common.hpp, kTileRelu), or kTileNoAct where the ISA's tiles do not (or for
// other activations): activation_block then runs on the stored tile.
template <typename T>
int tile_act(const Epilogue<T>& ep) {
    if (!MicroKernel<T>::kFusedAct) return detail::kTileNoAct;
    return ep.act == Act::relu         ? detail::kTileRelu
           : ep.act == Act::leaky_relu ? detail::kTileLeakyRelu
                                       : detail::kTileNoAct;
}

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
    if constexpr (MicroKernel<T>::kSimdPack) {
        // In-register transposes of W x W blocks; the padding columns zeroed.
        for (idx s = 0; s * NR < nc; ++s) {
            const int nr = int(min_i(NR, nc - s * NR));
            T* ds = dst + s * kc * NR;
            MicroKernel<T>::pack_transpose(b + (j0 + s * NR) * ldb + p0, ldb, nr, kc, ds, NR);
            if (nr < NR)
                for (idx p = 0; p < kc; ++p)
                    for (int j = nr; j < NR; ++j) ds[p * NR + j] = T(0);
        }
        return;
    }
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
    if constexpr (MicroKernel<T>::kSimdPack) {
        if (mr == MR) {
            if (trans_a)
                MicroKernel<T>::pack_copy(a + p0 * lda + i0, lda, MR, kc, dst);
            else
                MicroKernel<T>::pack_transpose(a + i0 * lda + p0, lda, MR, kc, dst, MR);
            return;
        }
    }
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

// How gemm_blocked cuts K and N and whether it packs A, from the whole
// product's shape (never a thread's share of it, so the bits do not depend on
// the thread count).
//
// Where the micro-kernel can (MicroKernel::kAInPlace), a row-major A is read
// in place (MicroKernel::run_a: the same FMAs in the same order as from a
// packed sliver) instead of packed. With no A sliver to keep in L1, the K
// blocks go up to kAInPlaceMaxKC deep and the B panel to kAInPlacePanelBytes
// (N blocks of kAInPlaceNCBytes per row of B): fewer K blocks mean fewer
// passes of C through the caches, and nothing is packed. A is then read once
// per N block, so a wide B keeps packing A when A's K block exceeds
// kAInPlaceMaxABytes (float64 2048^3 read A from memory 16 times and fell to
// 0.92x). Measured on AVX-512 against packed A with 256 x 1024 float
// panels, 1 thread, float32: 1024x256x784 141 -> 165 GFLOP/s, 1024x1024x784
// 1.05-1.12x, 1024^3 1.04-1.06x, 256x1024x784 1.03-1.05x (2 threads
// 1.07-1.09x); float64 (128-wide N blocks) 256x1024x784 1.06x.
constexpr idx kAInPlaceMaxKC = 1024;
constexpr double kAInPlacePanelBytes = 1024.0 * 1024.0;
constexpr idx kAInPlaceNCBytes = 1024;
constexpr double kAInPlaceMaxABytes = 8.0 * 1024.0 * 1024.0;

struct Blocking {
    idx kc;           // K block depth (the last block may be shorter)
    idx nc;           // N block width cap
    bool a_in_place;  // A read in place (run_a), not packed
};

template <typename T>
Blocking blocking_for(bool trans_a, idx m, idx n, idx k) {
    using MK = MicroKernel<T>;
    constexpr idx align = 64 / sizeof(T);
    const Blocking packed = {balanced_block(k, MK::KC, align), MK::NC, false};
    if (!MK::kAInPlace || trans_a) return packed;
    const idx nc = kAInPlaceNCBytes / idx(sizeof(T));
    const idx width = min_i(round_up(n, MK::NR), nc);
    const idx fit = idx(kAInPlacePanelBytes / (double(width) * sizeof(T)));
    const idx cap = min_i(kAInPlaceMaxKC, fit > MK::KC ? fit : MK::KC);
    if (n > nc && double(m) * double(min_i(k, cap)) * sizeof(T) > kAInPlaceMaxABytes)
        return packed;
    return {balanced_block(k, cap, align), nc, true};
}

// Deepest K block of any Blocking: sizes the packing buffers.
template <typename T>
constexpr idx max_kc() {
    return MicroKernel<T>::kAInPlace && kAInPlaceMaxKC > MicroKernel<T>::KC ? kAInPlaceMaxKC
                                                                             : MicroKernel<T>::KC;
}

// The blocked loops over one block of C, on the calling thread.
// bpanel holds blk.kc x nc_cap values, asliver blk.kc x MR (unused when A is
// read in place).
template <typename T>
void gemm_blocked(bool trans_a, bool trans_b, idx m, idx n, idx k, T alpha, const T* a, idx lda,
                  const T* b, idx ldb, T beta, T* c, idx ldc, const Epilogue<T>& ep, idx nc_cap,
                  const Blocking& blk, T* bpanel, T* asliver) {
    using MK = MicroKernel<T>;
    constexpr int MR = MK::MR;
    constexpr int NR = MK::NR;
    const idx kc_blk = blk.kc;
    const idx nc_blk = balanced_block(n, nc_cap, NR);
    const int fused_act = tile_act(ep);
    const bool elementwise_act = ep.act != Act::identity && fused_act == detail::kTileNoAct;
    const bool a_in_place = blk.a_in_place;

    for (idx jc = 0; jc < n; jc += nc_blk) {
        const idx nc = min_i(nc_blk, n - jc);
        const idx n_slivers = ceil_div(nc, NR);
        const T* bias = ep.bias ? ep.bias + jc : nullptr;

        for (idx pc = 0; pc < k; pc += kc_blk) {
            const idx kc = min_i(kc_blk, k - pc);
            const bool last = pc + kc == k;
            pack_b_panel<T, NR>(trans_b, b, ldb, pc, kc, jc, nc, bpanel);
            const T alpha_beta[4] = {alpha, pc == 0 ? beta : T(1),
                                     T(last ? fused_act : detail::kTileNoAct), ep.slope};
            for (idx i0 = 0; i0 < m; i0 += MR) {
                const int mr = int(min_i(MR, m - i0));
                if (!a_in_place) pack_a_sliver<T, MR>(trans_a, a, lda, i0, mr, pc, kc, asliver);
                for (idx s = 0; s < n_slivers; ++s) {
                    const idx j0 = s * NR;
                    const int nr = int(min_i(NR, nc - j0));
                    T* ct = c + i0 * ldc + jc + j0;
                    const T* tile_bias = last && bias ? bias + j0 : nullptr;
                    if constexpr (MK::kAInPlace) {
                        if (a_in_place)
                            MK::run_a(kc, a + i0 * lda + pc, lda, bpanel + s * kc * NR, ct, ldc,
                                      mr, nr, alpha_beta, tile_bias);
                        else
                            MK::run(kc, asliver, bpanel + s * kc * NR, ct, ldc, mr, nr,
                                    alpha_beta, tile_bias);
                    } else {
                        MK::run(kc, asliver, bpanel + s * kc * NR, ct, ldc, mr, nr, alpha_beta,
                                tile_bias);
                    }
                    if (last && elementwise_act)
                        detail::activation_block<T>(ep.act, ct, mr, nr, ldc, ep.slope);
                }
            }
        }
    }
}

// Out of memory: one B sliver at a time from the stack, one thread. Same K
// blocking, so the same bits as the normal path. Kept out of line so that the
// common path does not reserve this stack frame (up to 141 KiB).
template <typename T>
__attribute__((noinline)) void gemm_on_stack(bool trans_a, bool trans_b, idx m, idx n, idx k,
                                             T alpha, const T* a, idx lda, const T* b, idx ldb,
                                             T beta, T* c, idx ldc, const Epilogue<T>& ep,
                                             const Blocking& blk) {
    using MK = MicroKernel<T>;
    alignas(64) T bbuf[max_kc<T>() * MK::NR];
    alignas(64) T abuf[MK::KC * MK::MR];  // A is packed only with K blocks of at most KC
    gemm_blocked<T>(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, ep, MK::NR,
                    blk, bbuf, abuf);
}

// ---------------------------------------------------------------- direct path
//
// Small problems (see use_direct) skip packing: A and B are read where they
// lie, so a call costs its FMAs plus a few hundred cycles, with no scratch
// allocation. The tile is M x (NV vectors) of C: each k step loads NV vectors
// of row p of op(B) and broadcasts one value of op(A) per row. Masked (only
// the last vector, only for the last column block) handles narrow n, so
// n = 10 computes one vector, not a 32-wide sliver. op(B) must have its rows
// contiguous (B not transposed, or a transposed B packed into a stack strip
// by gemm_direct). Every element of C is one sequential sum over all of k,
// whatever the thread count.

// The deep direct path reads B's k x 2W strip in place: the first row tile of
// each strip brings it in (from L3, or from the other core, which wrote it in
// the last update or gathered the batch), the other tiles find it in L2. That
// first tile prefetches the row of B kPrefetchRows steps ahead (2 cache lines
// of a 128-byte row segment), so those misses overlap the FMAs. Explicit
// prefetcht0: GCC 12 emits no __builtin_prefetch in these kernels. Measured
// inside (c)'s training step (784-256-128-10, batch 128, float32), where the
// forward 128x256x784 took 237-274 -> 213-250 us on 2 threads and 343-391 ->
// 337-357 us on 1, and 128x128x256 50-54 -> 44-48 us on 2; 16 and 64 rows
// ahead did as well as 32. The whole step (bench_train, 4 alternating runs)
// went 1067-1111 -> 1037-1103 us on 1 thread and stayed at 665-719 on 2.
// With B already in cache (the same product in a loop) there is no change.
constexpr idx kPrefetchRows = 32;

// Row p of op(B): NV vectors, the last one masked (kl) when Masked.
template <class V, typename T, int NV, bool Masked, class Mask>
inline void load_row(const T* b, Mask kl, typename V::reg* bv) {
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v)
        bv[v] = Masked && v == NV - 1 ? V::load(kl, b + v * V::W) : V::load(b + v * V::W);
}

// op(A)(i, p) = a[p * lda + i] (trans_a) or a[i * lda + p].
template <class V, typename T, int M, int NV, bool Masked, bool AT, bool PF = false>
inline void direct_tile(idx k, const T* __restrict a, idx lda, const T* __restrict b, idx ldb,
                        T* c, idx ldc, int nr, const T* alpha_beta, const T* bias) {
    using reg = typename V::reg;
    constexpr int W = V::W;
    const typename V::mask kl = V::first(nr - (NV - 1) * W);
    reg acc[M][NV];
#pragma GCC unroll 16
    for (int i = 0; i < M; ++i)
#pragma GCC unroll 2
        for (int v = 0; v < NV; ++v) acc[i][v] = V::zero();

    // One k step: row p of op(B) times each row's op(A) value.
    auto k_step = [&](auto a_of_row) {
        reg bv[NV];
        if constexpr (PF) {
            const char* q = reinterpret_cast<const char*>(b + kPrefetchRows * ldb);
            asm("prefetcht0 %0" : : "m"(*q));
            if constexpr (NV * W * sizeof(T) > 64) asm("prefetcht0 %0" : : "m"(*(q + 64)));
        }
        load_row<V, T, NV, Masked>(b, kl, bv);
#pragma GCC unroll 16
        for (int i = 0; i < M; ++i) {
            const reg ai = V::set1(a_of_row(i));
#pragma GCC unroll 2
            for (int v = 0; v < NV; ++v) acc[i][v] = V::fmadd(ai, bv[v], acc[i][v]);
        }
        b += ldb;
    };
    if constexpr (AT) {
#pragma GCC unroll 2
        for (idx p = 0; p < k; ++p) {
            k_step([&](int i) { return a[i]; });
            a += lda;
        }
    } else {
        detail::RowsOfA<T, M> rows(a, lda);
#pragma GCC unroll 2
        for (idx p = 0; p < k; ++p) {
            k_step([&](int i) { return rows[i]; });
            rows.next();
        }
    }

    const T alpha = alpha_beta[0], beta = alpha_beta[1];
    const int act = int(alpha_beta[2]);
    const reg va = V::set1(alpha), vb = V::set1(beta), vslope = V::set1(alpha_beta[3]);
    reg vbias[NV];
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v)
        vbias[v] = !bias ? V::zero()
                   : Masked && v == NV - 1 ? V::load(kl, bias + v * W) : V::load(bias + v * W);
    const bool read_c = beta != T(0);
#pragma GCC unroll 16
    for (int i = 0; i < M; ++i) {
        T* ci = c + i * ldc;
#pragma GCC unroll 2
        for (int v = 0; v < NV; ++v) {
            const bool mv = Masked && v == NV - 1;
            reg r = V::mul(va, acc[i][v]);
            if (read_c) r = V::fmadd(vb, mv ? V::load(kl, ci + v * W) : V::load(ci + v * W), r);
            if (bias) r = V::add(r, vbias[v]);
            if (act != detail::kTileNoAct) r = V::act(act, r, vslope);
            if (mv)
                V::store(kl, ci + v * W, r);
            else
                V::store(ci + v * W, r);
        }
    }
}

// One column block of C (width nr <= 2 W) for rows [0, m): row tiles of MRD.
template <class V, typename T, int MRD, int NV, bool Masked, bool AT>
void direct_column(idx m, idx k, const T* a, idx lda, const T* b, idx ldb, T* c, idx ldc, int nr,
                   const T* alpha_beta, const T* bias) {
    idx i0 = 0;
    // The first row tile prefetches B ahead (kPrefetchRows), for deep K only.
    if (!AT && k >= 256 && MRD <= m) {
        direct_tile<V, T, MRD, NV, Masked, AT, true>(k, a, lda, b, ldb, c, ldc, nr, alpha_beta,
                                                     bias);
        i0 = MRD;
    }
    for (; i0 + MRD <= m; i0 += MRD)
        direct_tile<V, T, MRD, NV, Masked, AT>(k, AT ? a + i0 : a + i0 * lda, lda, b, ldb,
                                               c + i0 * ldc, ldc, nr, alpha_beta, bias);
    const int mr = int(m - i0);
    if (mr == 0) return;
    const T* at = AT ? a + i0 : a + i0 * lda;
    T* ct = c + i0 * ldc;
    switch (mr) {
#define CHAINRULE_DT_CASE(R)                                                                  \
    case R:                                                                                   \
        if constexpr (R < MRD)                                                                \
            direct_tile<V, T, R, NV, Masked, AT>(k, at, lda, b, ldb, ct, ldc, nr, alpha_beta, \
                                                 bias);                                       \
        return;
        CHAINRULE_DT_CASE(1)
        CHAINRULE_DT_CASE(2)
        CHAINRULE_DT_CASE(3)
        CHAINRULE_DT_CASE(4)
        CHAINRULE_DT_CASE(5)
        CHAINRULE_DT_CASE(6)
        CHAINRULE_DT_CASE(7)
        CHAINRULE_DT_CASE(8)
        CHAINRULE_DT_CASE(9)
        CHAINRULE_DT_CASE(10)
        CHAINRULE_DT_CASE(11)
        CHAINRULE_DT_CASE(12)
        CHAINRULE_DT_CASE(13)
#undef CHAINRULE_DT_CASE
        default: return;
    }
}

// Largest k of the direct path; a transposed B strip is k x 2 W on the stack
// (64 KiB for either dtype on AVX-512).
constexpr idx kDirectMaxK = 512;

// A row-major B is read in place, so k is bounded only by the stack strip
// that a transposed B needs (a 1 x 784 by 784 x 10 product, one sample
// through a layer, stays on this path).
constexpr idx kDirectMaxKInPlace = 4096;

// Deeper products with A and B both row-major (a layer's forward X W on a
// mini-batch) also take the direct path where the ISA allows it
// (MicroKernel::kDirectDeep): B's k x 2W column strip is then read from L2 in
// place, one 2W-wide row segment per k step, so B is never packed. That pays
// when A is short (its rows are re-read for every strip) and the strip's rows
// spread over enough cache sets: rows of at most 512 bytes, or 1 KiB for at
// most 128 rows of A. Measured on AVX-512 in float32 against the blocked path
// (A read in place, deep K blocks): 128x256x784 1.03-1.06x, 64x256x784
// 1.14x, 32x128x784 1.35x, 192x128x784 1.02x; from 256 rows on the blocked
// path is as fast or faster (1024x128x784 0.95x); 2 KiB rows (n = 512) fell
// to 0.5-0.9x, as did k = 2048 with 1 KiB rows.
constexpr idx kDirectDeepMaxK = 1024;
// Rows of A per pass over B's strips: a panel of at most 512 KiB of A stays in
// L2 while the strips stream past it (256 KiB panels measured slower).
constexpr double kDirectPanelBytes = 512.0 * 1024.0;

// The short rule of use_direct (fewer rows of A than one direct tile).
constexpr idx kShortMaxK = 1024;
constexpr double kShortMaxRowBytes = 16384.0;

// Shape-only choice (never the thread count, so the bits do not depend on
// it): all of k in one pass, and op(B) small enough to stay in L2 while
// every row tile sweeps it, or (above) a deep product read in place.
template <typename T>
bool use_direct(bool trans_a, bool trans_b, idx m, idx n, idx k, idx ldb) {
    using MK = MicroKernel<T>;
    if constexpr (!MK::kDirect) {
        (void)trans_a; (void)trans_b; (void)m; (void)n; (void)k; (void)ldb;
        return false;
    } else {
        if (k <= (trans_b ? kDirectMaxK : kDirectMaxKInPlace) &&
            double(n) * double(k) <= 65536.0 && double(m) * double(n) * double(k) <= 16777216.0)
            return true;
        // Fewer rows of A than one tile: each row-major B strip is read once,
        // in place, by a tile of just those rows, where the blocked path would
        // pack B and run a partial sliver. Measured on AVX-512 against it
        // (float32 unless said): 10 x 1024 x 256 1.58x, 6 x 3000 x 1000
        // 1.42x, 10 x 4000 x 1000 1.73x, float64 10 x 1024 x 256 1.18x. Not
        // for deep K or long rows, where the strip's rows are pages apart
        // (8 x 1024 x 4096 float64 0.39x, 13 x 4096 x 4096 0.27x), nor for a
        // full tile (13 x 2000 x 300 0.90x).
        if (!trans_b && m < MK::MRD && k <= kShortMaxK &&
            double(ldb) * double(sizeof(T)) <= kShortMaxRowBytes)
            return true;
        if constexpr (!MK::kDirectDeep) {
            return false;
        } else {
            const double row_bytes = double(ldb) * double(sizeof(T));
            return !trans_a && !trans_b && k <= kDirectDeepMaxK && m < 256 &&
                   (row_bytes <= 512.0 || (row_bytes <= 1024.0 && m <= 128));
        }
    }
}

// Rows [i0, i1) of C through the direct tiles; column blocks of 2 W outer so
// that the k x 2W strip of op(B) stays in L1 across the row tiles. strip
// (k x 2W values) is needed only when trans_b.
template <typename T>
void direct_rows(bool trans_a, bool trans_b, idx i0, idx i1, idx n, idx k, const T* alpha_beta,
                 const T* a, idx lda, const T* b, idx ldb, T* c, idx ldc, const Epilogue<T>& ep,
                 T* strip) {
    using MK = MicroKernel<T>;
    using V = typename MK::V;
    constexpr int W = V::W, MRD = MK::MRD, NB = 2 * W;
    const idx m = i1 - i0;
    const T* ar = trans_a ? a + i0 : a + i0 * lda;
    T* cr = c + i0 * ldc;
    for (idx j0 = 0; j0 < n; j0 += NB) {
        const int nr = int(min_i(NB, n - j0));
        const T* bs = b + j0;
        idx lds = ldb;
        if (trans_b) {
            // B is stored (n, k): gather its rows j0.. into k rows of NB.
            // Row by row of B: contiguous reads, and the NB-strided writes
            // stay within the strip, which is in L1.
            const T* src = b + j0 * ldb;
            if constexpr (MK::kSimdPack) {
                MK::pack_transpose(src, ldb, nr, k, strip, NB);  // lanes past nr: never read
            } else {
                for (int j = 0; j < nr; ++j) {
                    const T* r = src + j * ldb;
                    T* d = strip + j;
                    for (idx p = 0; p < k; ++p) d[p * NB] = r[p];
                }
            }
            bs = strip;
            lds = NB;
        }
        T* ct = cr + j0;
        const T* bias = ep.bias ? ep.bias + j0 : nullptr;
#define CHAINRULE_DIRECT(NV, MASKED)                                                              \
    (trans_a ? direct_column<V, T, MRD, NV, MASKED, true>(m, k, ar, lda, bs, lds, ct, ldc, nr,   \
                                                          alpha_beta, bias)                      \
             : direct_column<V, T, MRD, NV, MASKED, false>(m, k, ar, lda, bs, lds, ct, ldc, nr,  \
                                                           alpha_beta, bias))
        if (nr == NB)
            CHAINRULE_DIRECT(2, false);
        else if (nr > W)
            CHAINRULE_DIRECT(2, true);
        else
            CHAINRULE_DIRECT(1, true);
#undef CHAINRULE_DIRECT
    }
    // The other activations (sigmoid, tanh) over the whole block at once, not
    // per 2W-wide column block: one call over contiguous C (a 64 x 64 layer:
    // 1 call of 4096 values instead of 128 of 32; (e)'s step 136 -> 132 us).
    if (ep.act != Act::identity && tile_act(ep) == detail::kTileNoAct)
        detail::activation_block<T>(ep.act, cr, m, n, ldc, ep.slope);
}

// The direct path for a transposed B: the strip lives on the stack, in a
// frame of its own so that the other paths do not reserve it.
template <typename T>
__attribute__((noinline)) void direct_rows_tb(bool trans_a, idx i0, idx i1, idx n, idx k,
                                              const T* alpha_beta, const T* a, idx lda,
                                              const T* b, idx ldb, T* c, idx ldc,
                                              const Epilogue<T>& ep) {
    alignas(64) T strip[kDirectMaxK * 2 * MicroKernel<T>::V::W];
    direct_rows<T>(trans_a, true, i0, i1, n, k, alpha_beta, a, lda, b, ldb, c, ldc, ep, strip);
}

// C = alpha op(A) op(B) + beta C (+ epilogue) for shapes that use_direct
// accepts, in panels of rows of A that stay in L2. Threads (only above
// kParallelFlops) take whole row tiles, or, for a row-major B wider than A is
// tall, whole 2W-wide column strips: each thread then reads only its columns
// of B (a layer's weights) and all of the shorter A, rather than all of B.
// Either way each element of C is one tile's sum over all of k: the same bits.
template <typename T>
void gemm_direct(bool trans_a, bool trans_b, idx m, idx n, idx k, T alpha, const T* a, idx lda,
                 const T* b, idx ldb, T beta, T* c, idx ldc, const Epilogue<T>& ep,
                 int nthreads) {
    constexpr int MRD = MicroKernel<T>::MRD;
    constexpr idx NB = 2 * MicroKernel<T>::V::W;
    const T alpha_beta[4] = {alpha, beta, T(tile_act(ep)), ep.slope};
    const idx tiles = ceil_div(m, MRD), strips = ceil_div(n, NB);
    const idx panel_tiles = idx(kDirectPanelBytes / (double(k) * double(sizeof(T)))) / MRD;
    const idx panel = MRD * (panel_tiles > 1 ? panel_tiles : 1);
    // Rows [i0, i1) by columns [j0, j1) of C, panel by panel.
    auto block = [&](idx i0, idx i1, idx j0, idx j1) {
        Epilogue<T> epj = ep;
        if (ep.bias) epj.bias = ep.bias + j0;
        const T* bj = trans_b ? b + j0 * ldb : b + j0;
        for (idx p0 = i0; p0 < i1; p0 += panel) {
            const idx p1 = min_i(i1, p0 + panel);
            if (trans_b)
                direct_rows_tb<T>(trans_a, p0, p1, j1 - j0, k, alpha_beta, a, lda, bj, ldb,
                                  c + j0, ldc, epj);
            else
                direct_rows<T>(trans_a, false, p0, p1, j1 - j0, k, alpha_beta, a, lda, bj, ldb,
                               c + j0, ldc, epj, nullptr);
        }
    };
    idx nt = detail::threads_for(2.0 * double(m) * double(n) * double(k), detail::kParallelFlops,
                                 nthreads);
    const bool split_n = !trans_b && n > m && strips >= nt;
    nt = min_i(nt, split_n ? strips : tiles);
    if (nt <= 1) {
        block(0, m, 0, n);
        return;
    }
#pragma omp parallel for num_threads(int(nt)) schedule(static, 1)
    for (idx t = 0; t < nt; ++t) {
        if (split_n)
            block(0, m, NB * (strips * t / nt), min_i(n, NB * (strips * (t + 1) / nt)));
        else
            block(min_i(m, MRD * (tiles * t / nt)), min_i(m, MRD * (tiles * (t + 1) / nt)), 0, n);
    }
}

// ---------------------------------------------------------------- narrow C
//
// C narrower than one vector with a transposed A: the weight gradient
// X^T gZ of a layer with few outputs (1024 x 10 from 256 samples). Its own
// tiles would fill n of W lanes and broadcast one value of A per row and k
// step; its transpose C^T = op(B)^T A (n x m) is a short, wide product whose
// single row tile reads A in place, once, with every lane used (1024 x 10 x
// 256, float32 AVX-512: 91 -> 35 us). C^T goes to the thread's scratch (the
// direct path uses none) and is then written into C with beta by the tiles'
// fused multiply-add: every element is still alpha times one sum over all of
// k, then beta C. Returns false (nothing done) when the shape does not suit,
// there is an epilogue (dense_forward never transposes A), or scratch fails.
template <typename T>
bool narrow_transposed(bool trans_a, bool trans_b, idx m, idx n, idx k, T alpha, const T* a,
                       idx lda, const T* b, idx ldb, T beta, T* c, idx ldc, const Epilogue<T>& ep,
                       int nthreads) {
    using MK = MicroKernel<T>;
    if (!trans_a || n >= MK::V::W || m <= MK::MRD || ep.bias || ep.act != Act::identity)
        return false;
    // C^T (n x m) = op(B)^T (n x k) . A (k x m, row-major as stored).
    if (!use_direct<T>(!trans_b, false, n, m, k, lda)) return false;
    T* ct = detail::thread_scratch<T>(std::size_t(n * m));
    if (!ct) return false;
    gemm_direct<T>(!trans_b, false, n, m, k, alpha, b, ldb, a, lda, T(0), ct, m, Epilogue<T>{},
                   nthreads);
    for (idx i = 0; i < m; ++i) {
        T* ci = c + i * ldc;
        if (beta == T(0)) {
            for (idx j = 0; j < n; ++j) ci[j] = ct[j * m + i];
        } else {
            for (idx j = 0; j < n; ++j) ci[j] = detail::fmadd(beta, ci[j], ct[j * m + i]);
        }
    }
    return true;
}

// ---------------------------------------------------------------- n == 1
//
// One output column (a layer with one output: its forward and its dW) is a
// matrix-vector product; the tiles above would use one lane of 16. Vector
// x[p] = op(B)(p, 0) is x[p * incx]; C is a column with stride ldc.

// op(A) = A^T (A stored (k, m)): c[i] = sum_p a[p, i] x[p], vectorised along
// i, each lane summed over p in order, as the tiles do (the same bits).
template <class V, typename T, int NV, bool Masked>
inline void gemv_t_block(idx k, const T* a, idx lda, const T* x, idx incx, int nr,
                         const T* alpha_beta, const T* bias, T* c, idx ldc) {
    using reg = typename V::reg;
    constexpr int W = V::W;
    const auto kl = V::first(nr - (NV - 1) * W);
    reg acc[NV];
    for (int v = 0; v < NV; ++v) acc[v] = V::zero();
    for (idx p = 0; p < k; ++p) {
        const reg xp = V::set1(x[p * incx]);
        const T* ap = a + p * lda;
#pragma GCC unroll 16
        for (int v = 0; v < NV; ++v) {
            const reg av = Masked && v == NV - 1 ? V::load(kl, ap + v * W) : V::load(ap + v * W);
            acc[v] = V::fmadd(av, xp, acc[v]);
        }
    }
    const T alpha = alpha_beta[0], beta = alpha_beta[1];
    alignas(64) T out[NV * W];
    for (int v = 0; v < NV; ++v) {
        const reg r = V::mul(V::set1(alpha), acc[v]);
        V::store(out + v * W, r);
    }
    // beta * C and the bias in scalar form, in the tiles' order of operations.
    for (int j = 0; j < nr; ++j) {
        T* cj = c + j * ldc;
        T v = beta != T(0) ? detail::fmadd(beta, *cj, out[j]) : out[j];
        if (bias) v = v + *bias;
        *cj = v;
    }
}

// op(A) = A (A stored (m, k)): c[i] = dot(a[i, :], x), R rows at a time,
// vectorised along p; the W partial sums of a row are added in lane order.
template <class V, typename T, int R>
inline void gemv_n_rows(idx k, const T* a, idx lda, const T* x, const T* alpha_beta,
                        const T* bias, T* c, idx ldc) {
    using reg = typename V::reg;
    constexpr int W = V::W;
    reg acc[R];
    for (int r = 0; r < R; ++r) acc[r] = V::zero();
    idx p = 0;
    for (; p + W <= k; p += W) {
        const reg xv = V::load(x + p);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) acc[r] = V::fmadd(V::load(a + r * lda + p), xv, acc[r]);
    }
    if (p < k) {
        const auto kl = V::first(int(k - p));
        const reg xv = V::load(kl, x + p);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) acc[r] = V::fmadd(V::load(kl, a + r * lda + p), xv, acc[r]);
    }
    const T alpha = alpha_beta[0], beta = alpha_beta[1];
    for (int r = 0; r < R; ++r) {
        alignas(64) T lanes[W];
        V::store(lanes, acc[r]);
        T sum = lanes[0];
        for (int q = 1; q < W; ++q) sum += lanes[q];
        T* cr = c + r * ldc;
        T v = alpha * sum;
        if (beta != T(0)) v = detail::fmadd(beta, *cr, v);
        if (bias) v = v + *bias;
        *cr = v;
    }
}

// Rows [i0, i1) of the n == 1 product.
template <typename T>
void gemv_rows(bool trans_a, idx i0, idx i1, idx k, const T* alpha_beta, const T* a, idx lda,
               const T* x, idx incx, T* c, idx ldc, const Epilogue<T>& ep) {
    using V = typename MicroKernel<T>::V;
    // Blocks of 1 KiB of each row of A (16 accumulators on AVX-512, 8 on AVX2's
    // 16 registers): fewer passes down A's strided rows.
    constexpr int W = V::W, NV = W * int(sizeof(T)) == 64 ? 16 : 8;
    if (trans_a) {
        idx i = i0;
        for (; i + NV * W <= i1; i += NV * W)
            gemv_t_block<V, T, NV, false>(k, a + i, lda, x, incx, NV * W, alpha_beta, ep.bias,
                                          c + i * ldc, ldc);
        for (; i < i1; i += W)
            gemv_t_block<V, T, 1, true>(k, a + i, lda, x, incx, int(min_i(W, i1 - i)), alpha_beta,
                                        ep.bias, c + i * ldc, ldc);
    } else {
        // Dot products need x with unit stride (the caller checks). Eight rows
        // at a time: eight FMA chains to hide the FMA latency.
        idx i = i0;
        for (; i + 8 <= i1; i += 8)
            gemv_n_rows<V, T, 8>(k, a + i * lda, lda, x, alpha_beta, ep.bias, c + i * ldc, ldc);
        for (; i < i1; ++i)
            gemv_n_rows<V, T, 1>(k, a + i * lda, lda, x, alpha_beta, ep.bias, c + i * ldc, ldc);
    }
    if (ep.act != Act::identity)
        detail::activation_block<T>(ep.act, c + i0 * ldc, i1 - i0, 1, ldc, ep.slope);
}

template <typename T>
void gemv(bool trans_a, idx m, idx k, T alpha, const T* a, idx lda, const T* x, idx incx, T beta,
          T* c, idx ldc, const Epilogue<T>& ep, int nthreads) {
    const T alpha_beta[2] = {alpha, beta};
    constexpr idx chunk = 128;  // rows per thread are whole chunks
    const idx chunks = ceil_div(m, chunk);
    idx nt = detail::threads_for(2.0 * double(m) * double(k), detail::kParallelFlops, nthreads);
    nt = min_i(nt, chunks);
    if (nt <= 1) {
        gemv_rows<T>(trans_a, 0, m, k, alpha_beta, a, lda, x, incx, c, ldc, ep);
        return;
    }
#pragma omp parallel for num_threads(int(nt)) schedule(static, 1)
    for (idx t = 0; t < nt; ++t)
        gemv_rows<T>(trans_a, min_i(m, chunk * (chunks * t / nt)),
                     min_i(m, chunk * (chunks * (t + 1) / nt)), k, alpha_beta, a, lda, x, incx, c,
                     ldc, ep);
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
    if constexpr (MK::kDirect) {
        // One output column: a matrix-vector product (row-wise activations
        // need the tiles' path below).
        const idx incx = trans_b ? 1 : ldb;
        const bool row_act = ep.act == Act::softmax || ep.act == Act::log_softmax;
        if (n == 1 && !row_act && (trans_a || incx == 1)) {
            gemv<T>(trans_a, m, k, alpha, a, lda, b, incx, beta, c, ldc, ep, nthreads);
            return;
        }
        if (narrow_transposed<T>(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc,
                                 ep, nthreads))
            return;
        if (use_direct<T>(trans_a, trans_b, m, n, k, ldb)) {
            gemm_direct<T>(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, ep,
                           nthreads);
            return;
        }
    }

    const idx m_slivers = ceil_div(m, MR), n_slivers = ceil_div(n, NR);
    idx nt = detail::threads_for(2.0 * double(m) * double(n) * double(k), detail::kParallelFlops,
                                 nthreads);
    // Split the dimension that duplicates less packing (the other operand is
    // packed by every thread) and that has a sliver for every thread.
    const bool split_n = n >= m ? n_slivers >= nt || n_slivers >= m_slivers
                                : m_slivers < nt && n_slivers > m_slivers;
    nt = min_i(nt, split_n ? n_slivers : m_slivers);

    const Blocking blk = blocking_for<T>(trans_a, m, n, k);
    const idx kc_max = min_i(k, blk.kc);
    const idx nc_max = min_i(NR * (split_n ? ceil_div(n_slivers, nt) : n_slivers), blk.nc);
    constexpr idx align = 64 / sizeof(T);
    const idx b_size = round_up(kc_max * nc_max, align), a_size = round_up(kc_max * MR, align);
    T* const scratch = detail::thread_scratch<T>(std::size_t((b_size + a_size) * nt));
    if (!scratch) {
        gemm_on_stack<T>(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, ep, blk);
        return;
    }

    if (nt <= 1) {
        gemm_blocked<T>(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, ep, blk.nc,
                        blk, scratch, scratch + b_size);
        return;
    }
#pragma omp parallel for num_threads(int(nt)) schedule(static, 1)
    for (idx t = 0; t < nt; ++t) {
        T* bpanel = scratch + (b_size + a_size) * t;
        T* asliver = bpanel + b_size;
        if (split_n) {
            const idx j0 = NR * (n_slivers * t / nt), j1 = min_i(n, NR * (n_slivers * (t + 1) / nt));
            Epilogue<T> ept = ep;
            if (ep.bias) ept.bias = ep.bias + j0;
            const T* bt = trans_b ? b + j0 * ldb : b + j0;
            gemm_blocked<T>(trans_a, trans_b, m, j1 - j0, k, alpha, a, lda, bt, ldb, beta, c + j0,
                            ldc, ept, blk.nc, blk, bpanel, asliver);
        } else {
            const idx i0 = MR * (m_slivers * t / nt), i1 = min_i(m, MR * (m_slivers * (t + 1) / nt));
            const T* at = trans_a ? a + i0 : a + i0 * lda;
            gemm_blocked<T>(trans_a, trans_b, i1 - i0, n, k, alpha, at, lda, b, ldb, beta,
                            c + i0 * ldc, ldc, ep, blk.nc, blk, bpanel, asliver);
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
