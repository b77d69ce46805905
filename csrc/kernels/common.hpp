// Helpers shared by every ISA's kernels. Included once per ISA translation
// unit; everything that is compiled with ISA flags lives in chainrule::CHAINRULE_ISA
// so that the linker never merges an AVX-512 copy of a function into the
// scalar path (no std containers or out-of-line std templates in kernel code).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "kernels.hpp"

#ifndef CHAINRULE_ISA
#error "define CHAINRULE_ISA (scalar, avx2 or avx512) before including common.hpp"
#endif

namespace chainrule {
namespace CHAINRULE_ISA {
namespace detail {

// Below kParallelFlops (kernels.hpp) a kernel stays on the calling thread.
using ::chainrule::kParallelFlops;
// Elementwise kernels: elements per call before a second thread pays off
// (2^18 sigmoids take ~180 us; memory-bound ones gain little from 2 threads).
constexpr idx kParallelElems = 1 << 18;

// Threads for `work`: 1 below the threshold (scaled down inside a WarmThreads,
// see kernels.hpp), else nthreads.
inline int threads_for(double work, double threshold, int nthreads) {
    if (nthreads <= 1) return 1;
    return work < threshold * parallel_threshold_scale() ? 1 : nthreads;
}

// 64-byte aligned scratch memory that frees itself. Returns nullptr on failure;
// callers fall back to a path that needs no scratch or report through a flag.
template <typename T>
struct Scratch {
    T* ptr = nullptr;
    explicit Scratch(std::size_t count) {
        std::size_t bytes = (count * sizeof(T) + 63) / 64 * 64;
        if (bytes == 0) bytes = 64;
        ptr = static_cast<T*>(std::aligned_alloc(64, bytes));
    }
    ~Scratch() { std::free(ptr); }
    Scratch(const Scratch&) = delete;
    Scratch& operator=(const Scratch&) = delete;
};

// Per-thread scratch kept from one call to the next (the GEMM's packing
// panels). A fresh block of a megabyte or more comes from mmap, so a training
// loop that allocated it per call would fault in and zero new pages every
// time (about 2% of a step on a wide MLP). It grows to the largest request
// and is freed when the thread exits. One buffer per T: a caller must not
// hold it across a call that may use it too (no GEMM calls another GEMM).
// Returns nullptr if it cannot grow.
template <typename T>
T* thread_scratch(std::size_t count) {
    struct Buffer {
        void* ptr = nullptr;
        std::size_t bytes = 0;
        ~Buffer() { std::free(ptr); }
    };
    static thread_local Buffer buffer;
    std::size_t bytes = (count * sizeof(T) + 63) / 64 * 64;
    if (bytes == 0) bytes = 64;
    if (bytes > buffer.bytes) {
        void* grown = std::aligned_alloc(64, bytes);
        if (!grown) return nullptr;
        std::free(buffer.ptr);
        buffer.ptr = grown;
        buffer.bytes = bytes;
    }
    return static_cast<T*>(buffer.ptr);
}

// The epilogue scalars of the GEMM micro-kernels and direct tiles, passed in
// memory so that the compiler does not pin them in registers across the k
// loop: {alpha, beta, activation code, slope}. The code (as a T) asks the tile
// to apply relu or leaky_relu in registers after the bias, with act_map's
// arithmetic (elementwise_impl.hpp), where the ISA's kernels can
// (MicroKernel::kFusedAct); 0: none.
constexpr int kTileNoAct = 0, kTileRelu = 1, kTileLeakyRelu = 2;

// An M-row tile of a row-major A read where it lies: element (i, p) is
// a[i * lda + p], walked one column (p) per k step. Rows go in groups of
// four, one moving pointer per group plus the offsets lda, 2 lda and 3 lda,
// which keeps the addressing in a few registers (13 row pointers would not
// fit beside the accumulators). Used by the direct tiles (gemm_impl.hpp) and
// the AVX-512 micro-kernel's in-place A.
template <typename T, int M>
struct RowsOfA {
    static constexpr int G = (M + 3) / 4;
    const T* group[G];
    idx l1, l2, l3;
    RowsOfA(const T* a, idx lda) : l1(lda), l2(2 * lda), l3(3 * lda) {
#pragma GCC unroll 4
        for (int g = 0; g < G; ++g) group[g] = a + 4 * g * lda;
    }
    // A(i, p) for the current column p.
    T operator[](int i) const {
        const idx off = i % 4 == 0 ? 0 : i % 4 == 1 ? l1 : i % 4 == 2 ? l2 : l3;
        return group[i / 4][off];
    }
    void next() {
#pragma GCC unroll 4
        for (int g = 0; g < G; ++g) ++group[g];
    }
};

}  // namespace detail
}  // namespace CHAINRULE_ISA
}  // namespace chainrule
