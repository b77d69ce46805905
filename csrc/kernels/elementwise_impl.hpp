// Elementwise kernels: activations and their VJPs, losses, column sums and
// optimizer steps, compiled once per ISA (included by {isa}/kernels.cpp after
// common.hpp, inside no namespace).
//
// Vectorisation: the transcendental functions below (exp, log1p, sigmoid,
// tanh) are branch-free scalar code on float/double and int bit patterns, so
// that g++ -O3 turns the plain loops that call them into SSE2, AVX2 or
// AVX-512 code under each ISA's flags. Reductions cannot be vectorised by the
// compiler without -ffast-math, so they keep kLanes independent partial sums
// that are combined in a fixed order at the end of a row.
//
// Numerics (no -ffast-math, so NaN and inf propagate): exp is a Cody-Waite
// range reduction plus a polynomial (Cephes' for float, Taylor to degree 13
// for double) with the 2^n scale split in two factors so that subnormal
// results and overflow to inf come out right. sigmoid uses exp(-|x|) and
// never overflows; tanh is Cephes' odd polynomial (float) or rational
// function (double) below 0.625 and 1 - 2 / (exp(2|x|) + 1) above.
//
// Determinism: elementwise results do not depend on where a block starts
// (explicit fma via fmadd(), the same code for vector body and tail), rows
// are independent, and every sum runs in a fixed order inside one thread;
// loss totals add per-row values in row order.
#pragma once

#include <cstdint>
#include <cstring>

// no-trapping-math: the selects in the loops below (clamps, sign tests) are
// if-converted into vector blends only when floating-point traps need not be
// preserved; no result changes (NaN and inf still propagate).
// fp-contract=off: the compiler may not fuse a * b + c on its own, so a value
// is rounded the same way whichever loop (vector body, tail, serial or
// parallel path) it is inlined into; the only fused operations are the
// explicit fmadd() calls. Both are restored at the end of this file.
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math", "fp-contract=off")

namespace chainrule {
namespace CHAINRULE_ISA {
namespace detail {

// Partial sums per reduction: one AVX-512 register of float.
constexpr idx kLanes = 16;
// Elements per parallel block of the flat elementwise kernels (a multiple of
// every vector width, so blocks start at the same alignment as the array).
constexpr idx kFlatBlock = 8192;

// ---------------------------------------------------------------- helpers

inline float fmadd(float a, float b, float c) {
#ifdef __FMA__
    return __builtin_fmaf(a, b, c);
#else
    return a * b + c;
#endif
}
inline double fmadd(double a, double b, double c) {
#ifdef __FMA__
    return __builtin_fma(a, b, c);
#else
    return a * b + c;
#endif
}

inline std::int32_t bits_of(float f) {
    std::int32_t i;
    std::memcpy(&i, &f, sizeof i);
    return i;
}
inline std::int64_t bits_of(double f) {
    std::int64_t i;
    std::memcpy(&i, &f, sizeof i);
    return i;
}
inline float float_of(std::int32_t i) {
    float f;
    std::memcpy(&f, &i, sizeof f);
    return f;
}
inline double double_of(std::int64_t i) {
    double f;
    std::memcpy(&f, &i, sizeof f);
    return f;
}

inline float abs_of(float x) { return __builtin_fabsf(x); }
inline double abs_of(double x) { return __builtin_fabs(x); }
inline float copysign_of(float a, float s) { return __builtin_copysignf(a, s); }
// Builtins rather than std:: overloads: an inline std:: function that is not
// inlined (option mismatch with this file's pragma) would become a weak symbol
// shared by all three ISA objects.
inline float sqrt_of(float x) { return __builtin_sqrtf(x); }
inline double sqrt_of(double x) { return __builtin_sqrt(x); }
inline double copysign_of(double a, double s) { return __builtin_copysign(a, s); }

template <typename T>
inline T neg_inf() {
    return -static_cast<T>(__builtin_inf());
}

// ---------------------------------------------------------------- exp

// exp(x) for float, about 1 ulp. x is clamped to [-104, 89] (exp underflows
// to 0 below and overflows to inf above). The clamps keep NaN (they compile to
// vmaxps/vminps with x as the operand returned when unordered), and NaN then
// flows through the arithmetic: its bit pattern only produces some finite or
// infinite scale factor, and NaN times anything is NaN.
inline float exp_fast(float x) {
    float xc = -104.0f > x ? -104.0f : x;
    xc = 89.0f < xc ? 89.0f : xc;
    // Rounds x / ln2 to an integer n: adding 1.5 * 2^23 leaves n in the low
    // mantissa bits, which also gives n as an int without a conversion.
    const float magic = 12582912.0f;
    const float t = fmadd(xc, 1.44269504088896341f, magic);
    const float n = t - magic;
    const std::int32_t ni = static_cast<std::int32_t>(static_cast<std::uint32_t>(bits_of(t)) -
                                                      static_cast<std::uint32_t>(bits_of(magic)));
    float r = fmadd(n, -0.693359375f, xc);  // ln2 = 0.693359375 - 2.12194440e-4
    r = fmadd(n, 2.12194440e-4f, r);
    float p = 1.9875691500e-4f;
    p = fmadd(p, r, 1.3981999507e-3f);
    p = fmadd(p, r, 8.3334519073e-3f);
    p = fmadd(p, r, 4.1665795894e-2f);
    p = fmadd(p, r, 1.6666665459e-1f);
    p = fmadd(p, r, 5.0000001201e-1f);
    p = fmadd(p, r * r, r) + 1.0f;
    // 2^n as two factors 2^n1 * 2^n2, each a normal number for n in
    // [-150, 128], so that subnormal results are rounded only once.
    // Unsigned arithmetic: for NaN input ni is arbitrary, and must not overflow.
    const std::uint32_t nu = static_cast<std::uint32_t>(ni);
    const std::uint32_t n1 = ((nu + 256u) >> 1) - 128u;
    const std::uint32_t n2 = nu - n1;
    return p * float_of(static_cast<std::int32_t>((n1 + 127u) << 23)) *
           float_of(static_cast<std::int32_t>((n2 + 127u) << 23));
}

// exp(x) for double, about 1 ulp; same scheme, Taylor polynomial of degree 13
// on |r| <= ln2 / 2, 64-bit shifts only logical (AVX2 has no vpsraq).
inline double exp_fast(double x) {
    double xc = -746.0 > x ? -746.0 : x;
    xc = 710.0 < xc ? 710.0 : xc;
    const double magic = 6755399441055744.0;  // 1.5 * 2^52
    const double t = fmadd(xc, 1.4426950408889634074, magic);
    const double n = t - magic;
    const std::int64_t ni = static_cast<std::int64_t>(static_cast<std::uint64_t>(bits_of(t)) -
                                                      static_cast<std::uint64_t>(bits_of(magic)));
    double r = fmadd(n, -6.93147180369123816490e-01, xc);  // fdlibm's ln2 hi/lo
    r = fmadd(n, -1.90821492927058770002e-10, r);
    double p = 1.0 / 6227020800.0;  // 1/13!
    p = fmadd(p, r, 1.0 / 479001600.0);
    p = fmadd(p, r, 1.0 / 39916800.0);
    p = fmadd(p, r, 1.0 / 3628800.0);
    p = fmadd(p, r, 1.0 / 362880.0);
    p = fmadd(p, r, 1.0 / 40320.0);
    p = fmadd(p, r, 1.0 / 5040.0);
    p = fmadd(p, r, 1.0 / 720.0);
    p = fmadd(p, r, 1.0 / 120.0);
    p = fmadd(p, r, 1.0 / 24.0);
    p = fmadd(p, r, 1.0 / 6.0);
    p = fmadd(p, r, 0.5);
    p = fmadd(p, r * r, r) + 1.0;
    const std::uint64_t nu = static_cast<std::uint64_t>(ni);
    const std::uint64_t n1 = ((nu + 2048u) >> 1) - 1024u;
    const std::uint64_t n2 = nu - n1;
    return p * double_of(static_cast<std::int64_t>((n1 + 1023u) << 52)) *
           double_of(static_cast<std::int64_t>((n2 + 1023u) << 52));
}

// ---------------------------------------------------------------- log1p

// log1p(u) for u in [0, 1] (the softplus term log1p(exp(-|z|))), a few ulp.
// fdlibm's log: 1 + u = 2^k (1 + f) with k in {0, 1} and f computed from u
// exactly (k = 0: f = u; k = 1: f = (u - 1) / 2), so no bits of u are lost.
inline float log1p_unit(float u) {
    const bool k = u > 0.41421356f;
    const float f = k ? (u - 1.0f) * 0.5f : u;
    const float s = f / (2.0f + f);
    const float z = s * s;
    const float w = z * z;
    const float t1 = w * fmadd(w, 0.24279078841f, 0.40000972152f);
    const float t2 = z * fmadd(w, 0.28498786688f, 0.66666662693f);
    const float rr = t2 + t1;
    const float hfsq = 0.5f * f * f;
    const float kf = k ? 1.0f : 0.0f;
    return kf * 6.9313812256e-01f - ((hfsq - (s * (hfsq + rr) + kf * 9.0580006145e-06f)) - f);
}

inline double log1p_unit(double u) {
    const bool k = u > 0.41421356237309503;
    const double f = k ? (u - 1.0) * 0.5 : u;
    const double s = f / (2.0 + f);
    const double z = s * s;
    const double w = z * z;
    const double t1 = w * fmadd(w, fmadd(w, 1.531383769920937332e-01, 2.222219843214978396e-01),
                                3.999999999940941908e-01);
    const double t2 = z * fmadd(w, fmadd(w, fmadd(w, 1.479819860511658591e-01,
                                                  1.818357216161805012e-01),
                                         2.857142874366239149e-01),
                                6.666666666666735130e-01);
    const double rr = t2 + t1;
    const double hfsq = 0.5 * f * f;
    const double kf = k ? 1.0 : 0.0;
    return kf * 6.93147180369123816490e-01 -
           ((hfsq - (s * (hfsq + rr) + kf * 1.90821492927058770002e-10)) - f);
}

// ---------------------------------------------------------------- sigmoid, tanh

// 1 / (1 + exp(-x)) as (x >= 0 ? 1 : e) / (1 + e) with e = exp(-|x|) <= 1.
template <typename T>
inline T sigmoid_one(T x) {
    const T e = exp_fast(-abs_of(x));
    // A select of two computed values, which compilers turn into a blend (a
    // select between 1 and e was kept as a branch and blocked vectorisation).
    const T pos = T(1) / (T(1) + e);
    const T neg = e / (T(1) + e);
    return x >= T(0) ? pos : neg;
}

// Cephes tanhf: odd polynomial below 0.625, 1 - 2 / (exp(2|x|) + 1) above
// (no cancellation there since the result is >= 0.55). NaN takes the exp path.
inline float tanh_one(float x) {
    const float z = abs_of(x);
    const float s = z * z;
    float p = -5.70498872745e-3f;
    p = fmadd(p, s, 2.06390887954e-2f);
    p = fmadd(p, s, -5.37397155531e-2f);
    p = fmadd(p, s, 1.33314422036e-1f);
    p = fmadd(p, s, -3.33332819422e-1f);
    const float small = fmadd(p * s, z, z);
    const float e = exp_fast(2.0f * z);
    const float big = 1.0f - 2.0f / (e + 1.0f);
    return copysign_of(z < 0.625f ? small : big, x);
}

// Cephes tanh: rational function P(s) / Q(s) in s = x^2 below 0.625.
inline double tanh_one(double x) {
    const double z = abs_of(x);
    const double s = z * z;
    double pn = -9.64399179425052238628e-1;
    pn = fmadd(pn, s, -9.92877231001918586564e1);
    pn = fmadd(pn, s, -1.61468768441708447952e3);
    double qd = s + 1.12811678491632931402e2;
    qd = fmadd(qd, s, 2.23548839060100448583e3);
    qd = fmadd(qd, s, 4.84406305325125486048e3);
    const double small = fmadd(z * s, pn / qd, z);
    const double e = exp_fast(2.0 * z);
    const double big = 1.0 - 2.0 / (e + 1.0);
    return copysign_of(z < 0.625 ? small : big, x);
}

// ---------------------------------------------------------------- flat maps

// Kept out of line: inlined into act_map's switch, GCC saw "control flow in
// loop" and left the AVX2/AVX-512 sigmoid scalar (4x slower than SSE2).
template <typename T>
__attribute__((noinline)) void sigmoid_map(const T* x, T* y, idx count) {
    for (idx i = 0; i < count; ++i) y[i] = sigmoid_one(x[i]);
}
template <typename T>
__attribute__((noinline)) void tanh_map(const T* x, T* y, idx count) {
    for (idx i = 0; i < count; ++i) y[i] = tanh_one(x[i]);
}


// y[i] = act(x[i]) for the elementwise activations; x and y may be the same.
template <typename T>
inline void act_map(Act act, const T* x, T* y, idx count, T slope) {
    switch (act) {
    case Act::sigmoid:
        sigmoid_map(x, y, count);
        break;
    case Act::tanh:
        tanh_map(x, y, count);
        break;
    case Act::relu:
        // `x <= 0 ? 0 : x` keeps NaN (the comparison is false).
        for (idx i = 0; i < count; ++i) y[i] = x[i] <= T(0) ? T(0) : x[i];
        break;
    case Act::leaky_relu:
        for (idx i = 0; i < count; ++i) y[i] = x[i] < T(0) ? x[i] * slope : x[i];
        break;
    default:  // identity; softmax rows are handled by the callers
        if (x != y) std::memmove(y, x, static_cast<std::size_t>(count) * sizeof(T));
        break;
    }
}

// gx[i] from y[i] and gy[i] for the elementwise activations; gx may alias gy.
template <typename T>
inline void act_vjp_map(Act act, const T* y, const T* gy, T* gx, idx count, T slope) {
    switch (act) {
    case Act::sigmoid:
        for (idx i = 0; i < count; ++i) gx[i] = gy[i] * (y[i] * (T(1) - y[i]));
        break;
    case Act::tanh:
        for (idx i = 0; i < count; ++i) gx[i] = gy[i] * (T(1) - y[i] * y[i]);
        break;
    case Act::relu:
        // A product, not a select, so that NaN in gy stays NaN.
        for (idx i = 0; i < count; ++i) gx[i] = gy[i] * (y[i] > T(0) ? T(1) : T(0));
        break;
    case Act::leaky_relu:
        for (idx i = 0; i < count; ++i) gx[i] = gy[i] * (y[i] > T(0) ? T(1) : slope);
        break;
    default:  // identity
        if (gx != gy) std::memmove(gx, gy, static_cast<std::size_t>(count) * sizeof(T));
        break;
    }
}

// ---------------------------------------------------------------- row reductions

// max over x[0..n); NaN entries are skipped (they reach the output through
// exp anyway); -inf for n == 0.
template <typename T>
inline T row_max(const T* x, idx n) {
    T lane[kLanes];
    for (idx j = 0; j < kLanes; ++j) lane[j] = neg_inf<T>();
    idx i = 0;
    for (; i + kLanes <= n; i += kLanes)
        for (idx j = 0; j < kLanes; ++j) lane[j] = x[i + j] > lane[j] ? x[i + j] : lane[j];
    for (idx j = 0; i + j < n; ++j) lane[j] = x[i + j] > lane[j] ? x[i + j] : lane[j];
    T m = lane[0];
    for (idx j = 1; j < kLanes; ++j) m = lane[j] > m ? lane[j] : m;
    return m;
}

// Sum of x[0..n) in S, lane by lane, lanes combined in order.
template <typename S, typename T>
inline S row_sum(const T* x, idx n) {
    S lane[kLanes] = {};
    idx i = 0;
    for (; i + kLanes <= n; i += kLanes)
        for (idx j = 0; j < kLanes; ++j) lane[j] += static_cast<S>(x[i + j]);
    for (idx j = 0; i + j < n; ++j) lane[j] += static_cast<S>(x[i + j]);
    S s = lane[0];
    for (idx j = 1; j < kLanes; ++j) s += lane[j];
    return s;
}

// Sum of a[i] * b[i] in double.
template <typename T>
inline double row_dot(const T* a, const T* b, idx n) {
    double lane[kLanes] = {};
    idx i = 0;
    for (; i + kLanes <= n; i += kLanes)
        for (idx j = 0; j < kLanes; ++j)
            lane[j] += static_cast<double>(a[i + j]) * static_cast<double>(b[i + j]);
    for (idx j = 0; i + j < n; ++j)
        lane[j] += static_cast<double>(a[i + j]) * static_cast<double>(b[i + j]);
    double s = lane[0];
    for (idx j = 1; j < kLanes; ++j) s += lane[j];
    return s;
}

// y[i] = exp(x[i] - m); x and y may be the same.
template <typename T>
inline void exp_shift(const T* x, T* y, idx n, T m) {
    for (idx i = 0; i < n; ++i) y[i] = exp_fast(x[i] - m);
}

// Sum of exp(x[i] - m) without storing the exps.
template <typename T>
inline T sum_exp_shift(const T* x, idx n, T m) {
    constexpr idx kChunk = 256;
    T buf[kChunk];
    T lane[kLanes] = {};
    for (idx i0 = 0; i0 < n; i0 += kChunk) {
        const idx c = n - i0 < kChunk ? n - i0 : kChunk;
        exp_shift(x + i0, buf, c, m);
        idx i = 0;
        for (; i + kLanes <= c; i += kLanes)
            for (idx j = 0; j < kLanes; ++j) lane[j] += buf[i + j];
        for (idx j = 0; i + j < c; ++j) lane[j] += buf[i + j];
    }
    T s = lane[0];
    for (idx j = 1; j < kLanes; ++j) s += lane[j];
    return s;
}

// Softmax / log-softmax of one row, max-subtracted; x and y may be the same.
template <typename T>
inline void softmax_row(const T* x, T* y, idx d) {
    const T m = row_max(x, d);
    exp_shift(x, y, d, m);
    const T s = row_sum<T>(y, d);
    for (idx i = 0; i < d; ++i) y[i] = y[i] / s;
}

template <typename T>
inline void log_softmax_row(const T* x, T* y, idx d) {
    const T m = row_max(x, d);
    const T s = sum_exp_shift(x, d, m);
    const T lse = static_cast<T>(static_cast<double>(m) + __builtin_log(static_cast<double>(s)));
    for (idx i = 0; i < d; ++i) y[i] = x[i] - lse;
}

// Runs f(i) for i in [0, n), spread over nt threads when nt > 1; a single
// thread never opens a parallel region.
template <typename F>
inline void for_each_index(idx n, int nt, F f) {
    if (nt > 1 && n > 1) {
#pragma omp parallel for num_threads(nt) schedule(static)
        for (idx i = 0; i < n; ++i) f(i);
    } else {
        for (idx i = 0; i < n; ++i) f(i);
    }
}

// Total over rows [0, n) of the values f(i0, rows, out) writes to out[0..rows)
// for blocks of `block` (<= kLanes) rows starting at i0, added in row order
// whatever nt is. With nt > 1 the per-row values go through scratch memory.
template <typename F>
inline double ordered_block_total(idx n, idx block, int nt, F f) {
    const idx blocks = (n + block - 1) / block;
    if (nt > 1 && blocks > 1) {
        Scratch<double> part(static_cast<std::size_t>(n));
        if (part.ptr) {
            double* pp = part.ptr;
#pragma omp parallel for num_threads(nt) schedule(static)
            for (idx b = 0; b < blocks; ++b)
                f(b * block, n - b * block < block ? n - b * block : block, pp + b * block);
            double total = 0.0;
            for (idx i = 0; i < n; ++i) total += pp[i];
            return total;
        }
    }
    double total = 0.0;
    double vals[kLanes];
    for (idx b = 0; b < blocks; ++b) {
        const idx rows = n - b * block < block ? n - b * block : block;
        f(b * block, rows, vals);
        for (idx r = 0; r < rows; ++r) total += vals[r];
    }
    return total;
}

// Total of f(i) over rows [0, n), added in row order whatever nt is.
template <typename F>
inline double ordered_row_total(idx n, int nt, F f) {
    return ordered_block_total(n, 1, nt, [&](idx i, idx, double* out) { out[0] = f(i); });
}

inline bool is_rowwise(Act act) { return act == Act::softmax || act == Act::log_softmax; }


// ---------------------------------------------------------------- activation_block

// In-place activation of a rows x cols block with row stride ld, on the
// calling thread (the GEMM applies it to each output tile). softmax and
// log_softmax treat each row of the block as a whole row.
template <typename T>
void activation_block(Act act, T* y, idx rows, idx cols, idx ld, T slope) {
    if (rows <= 0 || cols <= 0 || act == Act::identity) return;
    if (is_rowwise(act)) {
        for (idx r = 0; r < rows; ++r) {
            T* yr = y + r * ld;
            if (act == Act::softmax)
                softmax_row(yr, yr, cols);
            else
                log_softmax_row(yr, yr, cols);
        }
        return;
    }
    if (ld == cols) {
        act_map(act, y, y, rows * cols, slope);
        return;
    }
    for (idx r = 0; r < rows; ++r) act_map(act, y + r * ld, y + r * ld, cols, slope);
}

}  // namespace detail

// ---------------------------------------------------------------- activations

template <typename T>
void activation_forward(Act act, const T* x, T* y, idx n, idx d, T slope, int nthreads) {
    if (n <= 0 || d <= 0) return;
    // kParallelElems elements per call, whatever the activation: waking an
    // idle worker costs about as much as 64K sigmoids (perf-notes.md).
    const int nt = detail::threads_for(static_cast<double>(n) * static_cast<double>(d),
                                       static_cast<double>(detail::kParallelElems), nthreads);
    if (detail::is_rowwise(act)) {
        const bool soft = act == Act::softmax;
        detail::for_each_index(n, nt, [=](idx i) {
            if (soft)
                detail::softmax_row(x + i * d, y + i * d, d);
            else
                detail::log_softmax_row(x + i * d, y + i * d, d);
        });
        return;
    }
    const idx total = n * d;
    if (nt <= 1) {
        detail::act_map(act, x, y, total, slope);
        return;
    }
    const idx blocks = (total + detail::kFlatBlock - 1) / detail::kFlatBlock;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (idx b = 0; b < blocks; ++b) {
        const idx i0 = b * detail::kFlatBlock;
        const idx c = total - i0 < detail::kFlatBlock ? total - i0 : detail::kFlatBlock;
        detail::act_map(act, x + i0, y + i0, c, slope);
    }
}

template <typename T>
void activation_vjp(Act act, const T* y, const T* gy, T* gx, idx n, idx d, T slope,
                    int nthreads) {
    if (n <= 0 || d <= 0) return;
    const int nt = detail::threads_for(static_cast<double>(n) * static_cast<double>(d),
                                       static_cast<double>(detail::kParallelElems), nthreads);
    if (detail::is_rowwise(act)) {
        const bool soft = act == Act::softmax;
        detail::for_each_index(n, nt, [=](idx i) {
            const T* yr = y + i * d;
            const T* gyr = gy + i * d;
            T* gxr = gx + i * d;
            if (soft) {
                // gx = y * (gy - sum(gy * y))
                const T s = static_cast<T>(detail::row_dot(gyr, yr, d));
                for (idx j = 0; j < d; ++j) gxr[j] = yr[j] * (gyr[j] - s);
            } else {
                // gx = gy - exp(y) * sum(gy)
                const T s = static_cast<T>(detail::row_sum<double>(gyr, d));
                for (idx j = 0; j < d; ++j) gxr[j] = gyr[j] - detail::exp_fast(yr[j]) * s;
            }
        });
        return;
    }
    const idx total = n * d;
    if (nt <= 1) {
        detail::act_vjp_map(act, y, gy, gx, total, slope);
        return;
    }
    const idx blocks = (total + detail::kFlatBlock - 1) / detail::kFlatBlock;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (idx b = 0; b < blocks; ++b) {
        const idx i0 = b * detail::kFlatBlock;
        const idx c = total - i0 < detail::kFlatBlock ? total - i0 : detail::kFlatBlock;
        detail::act_vjp_map(act, y + i0, gy + i0, gx + i0, c, slope);
    }
}

// ---------------------------------------------------------------- column sums

template <typename T>
void column_sums(const T* a, T* out, idx n, idx d, bool accumulate, int nthreads) {
    if (d <= 0) return;
    if (n <= 0) {
        if (!accumulate)
            for (idx j = 0; j < d; ++j) out[j] = T(0);
        return;
    }
    constexpr idx kCols = 256;  // columns per block: a 1-2 KiB accumulator
    const idx blocks = (d + kCols - 1) / kCols;
    const int nt = detail::threads_for(static_cast<double>(n) * static_cast<double>(d),
                                       static_cast<double>(detail::kParallelElems), nthreads);
    detail::for_each_index(blocks, nt, [=](idx b) {
        const idx j0 = b * kCols;
        const idx w = d - j0 < kCols ? d - j0 : kCols;
        T acc[kCols];
        for (idx j = 0; j < w; ++j) acc[j] = a[j0 + j];
        for (idx i = 1; i < n; ++i) {
            const T* row = a + i * d + j0;
            for (idx j = 0; j < w; ++j) acc[j] += row[j];
        }
        T* o = out + j0;
        if (accumulate)
            for (idx j = 0; j < w; ++j) o[j] += acc[j];
        else
            for (idx j = 0; j < w; ++j) o[j] = acc[j];
    });
}

// ---------------------------------------------------------------- losses

namespace detail {

// Softmax cross-entropy of rows [i0, i0 + rows) (rows <= kLanes) with at most
// kLanes classes, the rows side by side: the block is transposed so that each
// class is one run of kLanes values, one per row, and every step (max, exp,
// sum, gradient) is a loop across rows, which vectorises, instead of a loop
// along a row shorter than one vector (10 classes: 72 -> ~25 ns a row). The
// per-element arithmetic and the order of the max and of the sum (class by
// class) are those of the row-at-a-time loop in softmax_cross_entropy, so the
// bits are too. loss[r] = w_r * (logsumexp - z[label]) in double.
template <typename T>
void softmax_ce_rows(const T* logits, const std::int64_t* labels, const T* weights, T* grad,
                     idx i0, idx rows, idx k, double scale, double* loss) {
    constexpr idx R = kLanes;
    T zt[kLanes * R];  // zt[j * R + r] = logits[i0 + r, j]; rows past `rows` zero
    T et[kLanes * R];
    for (idx r = 0; r < R; ++r)
        for (idx j = 0; j < k; ++j) zt[j * R + r] = r < rows ? logits[(i0 + r) * k + j] : T(0);
    // row_max: the first class, then each later one if greater (NaN never is).
    T m[R];
    for (idx r = 0; r < R; ++r) m[r] = zt[r] > neg_inf<T>() ? zt[r] : neg_inf<T>();
    for (idx j = 1; j < k; ++j)
        for (idx r = 0; r < R; ++r) m[r] = zt[j * R + r] > m[r] ? zt[j * R + r] : m[r];
    for (idx j = 0; j < k; ++j)
        for (idx r = 0; r < R; ++r) et[j * R + r] = exp_fast(zt[j * R + r] - m[r]);
    // row_sum: class 0 first, then the others in order.
    T s[R];
    for (idx r = 0; r < R; ++r) s[r] = et[r];
    for (idx j = 1; j < k; ++j)
        for (idx r = 0; r < R; ++r) s[r] += et[j * R + r];
    for (idx r = 0; r < rows; ++r) {
        const idx label = static_cast<idx>(labels[i0 + r]);
        const double w = weights ? static_cast<double>(weights[i0 + r]) : 1.0;
        const double lse = static_cast<double>(m[r]) + __builtin_log(static_cast<double>(s[r]));
        loss[r] = w * (lse - static_cast<double>(zt[label * R + r]));
    }
    if (!grad) return;
    T c[R];
    for (idx r = 0; r < R; ++r)
        c[r] = static_cast<T>(scale * (weights && r < rows ? static_cast<double>(weights[i0 + r])
                                                           : 1.0));
    for (idx j = 0; j < k; ++j)
        for (idx r = 0; r < R; ++r) zt[j * R + r] = c[r] * (et[j * R + r] / s[r]);
    for (idx r = 0; r < rows; ++r) {
        const idx label = static_cast<idx>(labels[i0 + r]);
        zt[label * R + r] = c[r] * (et[label * R + r] / s[r] - T(1));
        T* g = grad + (i0 + r) * k;
        for (idx j = 0; j < k; ++j) g[j] = zt[j * R + r];
    }
}

}  // namespace detail

template <typename T>
double softmax_cross_entropy(const T* logits, const std::int64_t* labels, const T* weights,
                             T* grad, idx n, idx k, double scale, int nthreads) {
    if (n <= 0 || k <= 0) return 0.0;
    const int nt = detail::threads_for(static_cast<double>(n) * static_cast<double>(k),
                                       static_cast<double>(detail::kParallelElems), nthreads);
    if (k <= detail::kLanes) {
        return scale * detail::ordered_block_total(n, detail::kLanes, nt,
                                                   [=](idx i0, idx rows, double* out) {
            detail::softmax_ce_rows(logits, labels, weights, grad, i0, rows, k, scale, out);
        });
    }
    auto row = [=](idx i) -> double {
        const T* z = logits + i * k;
        const idx label = static_cast<idx>(labels[i]);
        const double w = weights ? static_cast<double>(weights[i]) : 1.0;
        const T m = detail::row_max(z, k);
        const T zl = z[label];  // read before grad (which may alias logits) is written
        T s;
        if (grad) {
            T* g = grad + i * k;
            detail::exp_shift(z, g, k, m);
            s = detail::row_sum<T>(g, k);
            const T el = g[label];
            const T c = static_cast<T>(scale * w);
            for (idx j = 0; j < k; ++j) g[j] = c * (g[j] / s);
            g[label] = c * (el / s - T(1));
        } else {
            s = detail::sum_exp_shift(z, k, m);
        }
        const double lse = static_cast<double>(m) + __builtin_log(static_cast<double>(s));
        return w * (lse - static_cast<double>(zl));
    };
    return scale * detail::ordered_row_total(n, nt, row);
}

template <typename T>
double soft_cross_entropy(const T* logits, const T* targets, const T* weights, T* grad, idx n,
                          idx k, double scale, int nthreads) {
    if (n <= 0 || k <= 0) return 0.0;
    const int nt = detail::threads_for(static_cast<double>(n) * static_cast<double>(k),
                                       static_cast<double>(detail::kParallelElems), nthreads);
    auto row = [=](idx i) -> double {
        const T* z = logits + i * k;
        const T* t = targets + i * k;
        const double w = weights ? static_cast<double>(weights[i]) : 1.0;
        const T m = detail::row_max(z, k);
        const T s = detail::sum_exp_shift(z, k, m);
        const double lse = static_cast<double>(m) + __builtin_log(static_cast<double>(s));
        // loss = sum_j t_j (lse - z_j): no cancellation between lse * sum(t)
        // and sum(t z) when the prediction is confident.
        double lane[detail::kLanes] = {};
        idx j = 0;
        for (; j + detail::kLanes <= k; j += detail::kLanes)
            for (idx l = 0; l < detail::kLanes; ++l)
                lane[l] += static_cast<double>(t[j + l]) * (lse - static_cast<double>(z[j + l]));
        for (idx l = 0; j + l < k; ++l)
            lane[l] += static_cast<double>(t[j + l]) * (lse - static_cast<double>(z[j + l]));
        double loss = lane[0];
        for (idx l = 1; l < detail::kLanes; ++l) loss += lane[l];
        if (grad) {
            T* g = grad + i * k;
            const T st = static_cast<T>(detail::row_sum<double>(t, k));
            const T c = static_cast<T>(scale * w);
            for (idx q = 0; q < k; ++q) g[q] = c * (detail::exp_fast(z[q] - m) / s * st - t[q]);
        }
        return w * loss;
    };
    return scale * detail::ordered_row_total(n, nt, row);
}

template <typename T>
double binary_cross_entropy(const T* logits, const T* targets, const T* weights, T* grad,
                            idx n, idx k, double scale, int nthreads) {
    if (n <= 0 || k <= 0) return 0.0;
    const int nt = detail::threads_for(static_cast<double>(n) * static_cast<double>(k),
                                       static_cast<double>(detail::kParallelElems), nthreads);
    auto row = [=](idx i) -> double {
        const T* z = logits + i * k;
        const T* t = targets + i * k;
        const double w = weights ? static_cast<double>(weights[i]) : 1.0;
        T* g = grad ? grad + i * k : nullptr;
        const T c = static_cast<T>(scale * w);
        constexpr idx kChunk = 256;
        T e[kChunk];
        T l1p[kChunk];
        double lane[detail::kLanes] = {};
        for (idx j0 = 0; j0 < k; j0 += kChunk) {
            const idx cnt = k - j0 < kChunk ? k - j0 : kChunk;
            const T* zc = z + j0;
            const T* tc = t + j0;
            for (idx j = 0; j < cnt; ++j) e[j] = detail::exp_fast(-detail::abs_of(zc[j]));
            for (idx j = 0; j < cnt; ++j) l1p[j] = detail::log1p_unit(e[j]);
            // softplus(z) - t z = max(z, 0) - t z + log1p(exp(-|z|)), with the
            // first two terms as z (1 - t) or -t z so that nothing cancels.
            idx j = 0;
            for (; j + detail::kLanes <= cnt; j += detail::kLanes)
                for (idx l = 0; l < detail::kLanes; ++l) {
                    const double zd = static_cast<double>(zc[j + l]);
                    const double td = static_cast<double>(tc[j + l]);
                    const double lin = zd >= 0.0 ? zd * (1.0 - td) : -td * zd;
                    lane[l] += lin + static_cast<double>(l1p[j + l]);
                }
            for (idx l = 0; j + l < cnt; ++l) {
                const double zd = static_cast<double>(zc[j + l]);
                const double td = static_cast<double>(tc[j + l]);
                const double lin = zd >= 0.0 ? zd * (1.0 - td) : -td * zd;
                lane[l] += lin + static_cast<double>(l1p[j + l]);
            }
            if (g) {
                T* gc = g + j0;
                for (idx q = 0; q < cnt; ++q) {
                    const T num = zc[q] >= T(0) ? T(1) : e[q];
                    gc[q] = c * (num / (T(1) + e[q]) - tc[q]);
                }
            }
        }
        double loss = lane[0];
        for (idx l = 1; l < detail::kLanes; ++l) loss += lane[l];
        return w * loss;
    };
    return scale * detail::ordered_row_total(n, nt, row);
}

// ---------------------------------------------------------------- optimizers

namespace detail {

// Runs f(i0, count) over [0, size) in kFlatBlock pieces, in parallel when the
// problem is large; every element sees the same arithmetic either way.
template <typename F>
inline void flat_blocks(idx size, int nthreads, double cost, F f) {
    if (size <= 0) return;
    const int nt = threads_for(static_cast<double>(size) * cost,
                               static_cast<double>(kParallelElems), nthreads);
    if (nt <= 1) {
        f(idx(0), size);
        return;
    }
    const idx blocks = (size + kFlatBlock - 1) / kFlatBlock;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (idx b = 0; b < blocks; ++b) {
        const idx i0 = b * kFlatBlock;
        f(i0, size - i0 < kFlatBlock ? size - i0 : kFlatBlock);
    }
}

}  // namespace detail

template <typename T>
void sgd_step(T* p, const T* g, T* buf, idx size, T lr, T momentum, T dampening,
              T weight_decay, bool nesterov, bool first_step, int nthreads) {
    const T damp1 = T(1) - dampening;
    detail::flat_blocks(size, nthreads, 1.0, [=](idx i0, idx cnt) {
        T* pp = p + i0;
        const T* gg = g + i0;
        T* bb = buf ? buf + i0 : nullptr;
        // PyTorch adds the decay only when it is non-zero (0 * inf = NaN).
        // One loop per case, so that each one vectorises without branches.
        const T wd = weight_decay;
        // The binding passes a buffer exactly when momentum != 0 in double; a
        // momentum that rounds to 0 in float still updates it, as PyTorch does.
        if (!bb) {
            if (wd != T(0))
                for (idx i = 0; i < cnt; ++i) pp[i] = pp[i] - lr * (gg[i] + wd * pp[i]);
            else
                for (idx i = 0; i < cnt; ++i) pp[i] = pp[i] - lr * gg[i];
        } else if (first_step) {
            for (idx i = 0; i < cnt; ++i) {
                const T d = wd != T(0) ? gg[i] + wd * pp[i] : gg[i];
                bb[i] = d;
                pp[i] = pp[i] - lr * (nesterov ? d + momentum * d : d);
            }
        } else {
            for (idx i = 0; i < cnt; ++i) {
                const T d = wd != T(0) ? gg[i] + wd * pp[i] : gg[i];
                const T b = momentum * bb[i] + damp1 * d;
                bb[i] = b;
                pp[i] = pp[i] - lr * (nesterov ? d + momentum * b : b);
            }
        }
    });
}

template <typename T>
void adam_step(T* p, const T* g, T* m, T* v, idx size, double lr_d, double beta1_d,
               double beta2_d, double eps_d, double weight_decay_d, bool decoupled,
               std::int64_t step, int nthreads) {
    const double bc1 = 1.0 - __builtin_pow(beta1_d, static_cast<double>(step));
    const double bc2 = 1.0 - __builtin_pow(beta2_d, static_cast<double>(step));
    const T step_size = static_cast<T>(lr_d / bc1);
    const T bc2_sqrt = static_cast<T>(__builtin_sqrt(bc2));
    const T decay = static_cast<T>(1.0 - lr_d * weight_decay_d);
    const T beta1 = static_cast<T>(beta1_d), beta2 = static_cast<T>(beta2_d);
    const T b1c = static_cast<T>(1.0 - beta1_d);
    const T b2c = static_cast<T>(1.0 - beta2_d);
    const T eps = static_cast<T>(eps_d);
    const T weight_decay = static_cast<T>(weight_decay_d);
    const bool l2 = !decoupled && weight_decay_d != 0.0;
    const bool shrink = decoupled && weight_decay_d != 0.0;
    detail::flat_blocks(size, nthreads, 1.0, [=](idx i0, idx cnt) {
        T* pp = p + i0;
        const T* gg = g + i0;
        T* mm = m + i0;
        T* vv = v + i0;
        for (idx i = 0; i < cnt; ++i) {
            T pi = pp[i];
            T gi = gg[i];
            if (l2) gi = gi + weight_decay * pi;
            if (shrink) pi = pi * decay;
            const T mi = beta1 * mm[i] + b1c * gi;
            const T vi = beta2 * vv[i] + b2c * (gi * gi);
            mm[i] = mi;
            vv[i] = vi;
            const T denom = detail::sqrt_of(vi) / bc2_sqrt + eps;
            pp[i] = pi - step_size * (mi / denom);
        }
    });
}

}  // namespace CHAINRULE_ISA
}  // namespace chainrule

#pragma GCC pop_options
