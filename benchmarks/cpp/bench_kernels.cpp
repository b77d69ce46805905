// Microbenchmarks of the native kernels, per kernel, per ISA, per size.
//
// Calls chainrule::<isa>::<kernel> directly (no dispatch) for every ISA this
// CPU supports, at 1 and 2 threads, and reports the median of several
// repeats: GFLOP/s for gemm / dense_forward / dense_vjp (also as a percentage
// of the measured single-core FMA peak of that ISA and dtype, times the thread
// count) and GB/s for the activations.
//
//   bench_kernels [--quick] [--json PATH] [--isa scalar|avx2|avx512] [--threads N]
//
// The host is shared and noisy: compare numbers from the same run only.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include <immintrin.h>

#include "kernels/kernels.hpp"

using chainrule::Act;
using chainrule::idx;

namespace {

struct Options {
    bool quick = false;
    std::string json;
    std::string isa;   // empty: all supported
    int max_threads = 2;
};

double now_s() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch())
        .count();
}

// Median seconds per call: each repeat runs the call enough times to last
// about `min_time`; one untimed warm-up call first (page faults, thread pool).
double time_call(const std::function<void()>& f, int repeats, double min_time) {
    f();
    double t0 = now_s();
    f();
    const double once = std::max(now_s() - t0, 1e-9);
    const int inner = std::max(1, int(min_time / once));
    std::vector<double> ts;
    for (int r = 0; r < repeats; ++r) {
        t0 = now_s();
        for (int i = 0; i < inner; ++i) f();
        ts.push_back((now_s() - t0) / inner);
    }
    std::sort(ts.begin(), ts.end());
    return ts[ts.size() / 2];
}

// ------------------------------------------------------------------ FMA peak
// A register-only loop of independent FMA chains: 16 accumulators cover the
// FMA latency (4 cycles) times the two FMA ports. Without -ffast-math the
// chains cannot be simplified away; the sink keeps the result alive.
volatile float peak_sink;

#define CHAINRULE_PEAK_LOOP(REG, SET1, FMA, ADD, LANES)                             \
    REG acc[16];                                                                   \
    for (int i = 0; i < 16; ++i) acc[i] = SET1(float(i) * 1e-3f);                  \
    const REG x = SET1(0.999999f), y = SET1(1e-7f);                                \
    const double t0 = now_s();                                                     \
    for (long it = 0; it < iters; ++it) {                                          \
        _Pragma("GCC unroll 16")                                                   \
        for (int i = 0; i < 16; ++i) acc[i] = FMA(acc[i], x, y);                   \
    }                                                                              \
    const double t = now_s() - t0;                                                 \
    for (int i = 1; i < 16; ++i) acc[0] = ADD(acc[0], acc[i]);                     \
    float out[LANES];                                                              \
    std::memcpy(out, &acc[0], sizeof(out));                                        \
    peak_sink = out[0];                                                            \
    return 2.0 * 16 * LANES * double(iters) / t;

__attribute__((target("avx512f"))) double peak_avx512(long iters) {
    CHAINRULE_PEAK_LOOP(__m512, _mm512_set1_ps, _mm512_fmadd_ps, _mm512_add_ps, 16)
}
__attribute__((target("avx2,fma"))) double peak_avx2(long iters) {
    CHAINRULE_PEAK_LOOP(__m256, _mm256_set1_ps, _mm256_fmadd_ps, _mm256_add_ps, 8)
}
// SSE2 has no FMA: a mul + add pair per lane counts as two flops.
inline __m128 mul_add128(__m128 a, __m128 b, __m128 c) { return _mm_add_ps(_mm_mul_ps(a, b), c); }
double peak_sse2(long iters) {
    CHAINRULE_PEAK_LOOP(__m128, _mm_set1_ps, mul_add128, _mm_add_ps, 4)
}
#undef CHAINRULE_PEAK_LOOP

// The same FMA rate with the AVX-512 GEMM micro-kernel's instruction mix
// (csrc/kernels/avx512/microkernel.hpp): 26 accumulators, fed each step by 2
// vector loads and 13 broadcast loads from a small buffer in L1. It bounds
// any GEMM built on that kernel, whatever the packing and blocking around it.
__attribute__((target("avx512f"))) double peak_avx512_kernel_mix(long iters) {
    alignas(64) static float a[16 * 16], b[16 * 32];
    for (float& v : a) v = 1e-3f;
    for (float& v : b) v = 2e-3f;
    __m512 c[26];
    for (auto& v : c) v = _mm512_setzero_ps();
    const double t0 = now_s();
    for (long it = 0; it < iters; ++it) {
        const float* ap = a + (it & 15) * 16;
        const float* bp = b + (it & 15) * 32;
        const __m512 b0 = _mm512_loadu_ps(bp), b1 = _mm512_loadu_ps(bp + 16);
        _Pragma("GCC unroll 13")
        for (int i = 0; i < 13; ++i) {
            const __m512 ai = _mm512_set1_ps(ap[i]);
            c[2 * i] = _mm512_fmadd_ps(ai, b0, c[2 * i]);
            c[2 * i + 1] = _mm512_fmadd_ps(ai, b1, c[2 * i + 1]);
        }
    }
    const double t = now_s() - t0;
    for (int i = 1; i < 26; ++i) c[0] = _mm512_add_ps(c[0], c[i]);
    float out[16];
    std::memcpy(out, &c[0], sizeof(out));
    peak_sink = out[0];
    return 2.0 * 26 * 16 * double(iters) / t;
}

double kernel_mix_peak(bool quick) {
    const long iters = quick ? 2000000 : 10000000;
    double best = 0;
    for (int r = 0; r < 7; ++r) best = std::max(best, peak_avx512_kernel_mix(iters));
    return best;
}

// Float32 flop/s of one core (float64: half). The best of several runs, not
// the median: another process on the core can only lower it.
double fma_peak(const std::string& isa, bool quick) {
    const long iters = quick ? 2000000 : 10000000;
    double best = 0;
    for (int r = 0; r < 7; ++r)
        best = std::max(best, isa == "avx512" ? peak_avx512(iters)
                              : isa == "avx2" ? peak_avx2(iters)
                                              : peak_sse2(iters));
    return best;
}

// ------------------------------------------------------------------ kernels per ISA
template <typename T>
struct Kernels {
    void (*gemm)(bool, bool, idx, idx, idx, T, const T*, idx, const T*, idx, T, T*, idx, int);
    void (*dense_forward)(const T*, const T*, const T*, T*, idx, idx, idx, Act, T, int);
    void (*dense_vjp)(const T*, const T*, const T*, T*, T*, T*, idx, idx, idx, bool, int);
    void (*act_forward)(Act, const T*, T*, idx, idx, T, int);
    void (*act_vjp)(Act, const T*, const T*, T*, idx, idx, T, int);
};

#define CHAINRULE_KERNELS(ISA, T)                                                             \
    Kernels<T> {                                                                              \
        chainrule::ISA::gemm<T>, chainrule::ISA::dense_forward<T>, chainrule::ISA::dense_vjp<T>, \
            chainrule::ISA::activation_forward<T>, chainrule::ISA::activation_vjp<T>          \
    }

template <typename T>
Kernels<T> kernels_for(const std::string& isa) {
    if (isa == "avx512") return CHAINRULE_KERNELS(avx512, T);
    if (isa == "avx2") return CHAINRULE_KERNELS(avx2, T);
    return CHAINRULE_KERNELS(scalar, T);
}

template <typename T>
std::vector<T> random_vec(std::size_t size, unsigned seed) {
    std::mt19937 rng(seed);
    std::uniform_real_distribution<double> d(-1.0, 1.0);
    std::vector<T> v(size);
    for (auto& x : v) x = T(d(rng));
    return v;
}

// ------------------------------------------------------------------ results
struct Result {
    std::string name;  // kernel/isa/dtype/size
    std::string kernel, isa, dtype, shape;
    int threads;
    double seconds, rate;  // rate: GFLOP/s or GB/s
    std::string unit;
    double pct_peak;       // < 0: not applicable
};

std::vector<Result> results;

void report(const Result& r) {
    results.push_back(r);
    if (r.pct_peak >= 0)
        std::printf("%-44s %2d thr %10.1f us %9.1f %s %6.1f%%\n", r.name.c_str(), r.threads,
                    r.seconds * 1e6, r.rate, r.unit.c_str(), r.pct_peak);
    else
        std::printf("%-44s %2d thr %10.1f us %9.1f %s\n", r.name.c_str(), r.threads,
                    r.seconds * 1e6, r.rate, r.unit.c_str());
    std::fflush(stdout);
}

template <typename T>
const char* dtype_name() {
    return sizeof(T) == 4 ? "f32" : "f64";
}

template <typename T>
void bench_gemm(const std::string& isa, const Options& opt, double peak32,
                const std::vector<int>& threads) {
    const Kernels<T> k = kernels_for<T>(isa);
    const double peak = sizeof(T) == 4 ? peak32 : peak32 / 2;
    std::vector<idx> sizes = {64, 128, 256, 512, 1024, 2048};
    // The portable path is an order of magnitude slower; keep its run short.
    const idx max_size = opt.quick ? (isa == "scalar" ? 256 : 1024) : (isa == "scalar" ? 1024 : 2048);
    const char* trans_names[4] = {"nn", "nt", "tn", "tt"};
    for (idx s : sizes) {
        if (s > max_size) continue;
        auto a = random_vec<T>(s * s, 1), b = random_vec<T>(s * s, 2);
        std::vector<T> c(s * s);
        for (int t = 0; t < 4; ++t) {
            if (opt.quick && t != 0 && s != 256) continue;  // quick: all transposes at 256 only
            const bool ta = t & 2, tb = t & 1;
            for (int nt : threads) {
                const double flops = 2.0 * s * s * s;
                const double sec = time_call(
                    [&] {
                        k.gemm(ta, tb, s, s, s, T(1), a.data(), s, b.data(), s, T(0), c.data(), s,
                               nt);
                    },
                    opt.quick ? 3 : 7, opt.quick ? 0.02 : 0.1);
                const double gf = flops / sec * 1e-9;
                Result r{"gemm_" + std::string(trans_names[t]) + "/" + isa + "/" + dtype_name<T>() +
                             "/" + std::to_string(s),
                         "gemm_" + std::string(trans_names[t]), isa, dtype_name<T>(),
                         std::to_string(s) + "x" + std::to_string(s) + "x" + std::to_string(s), nt,
                         sec, gf, "GFLOP/s", 100.0 * gf * 1e9 / (peak * nt)};
                report(r);
            }
        }
    }
}

template <typename T>
void bench_dense(const std::string& isa, const Options& opt, double peak32,
                 const std::vector<int>& threads) {
    const Kernels<T> k = kernels_for<T>(isa);
    const double peak = sizeof(T) == 4 ? peak32 : peak32 / 2;
    const idx shapes[4][3] = {{128, 784, 256}, {256, 784, 1024}, {256, 1024, 1024}, {64, 64, 128}};
    for (auto& sh : shapes) {
        const idx n = sh[0], di = sh[1], dout = sh[2];
        auto x = random_vec<T>(n * di, 3), w = random_vec<T>(di * dout, 4);
        auto b = random_vec<T>(dout, 5), gz = random_vec<T>(n * dout, 6);
        std::vector<T> y(n * dout), gx(n * di), gw(di * dout), gb(dout);
        const std::string shape = std::to_string(n) + "x" + std::to_string(di) + "x" +
                                  std::to_string(dout);
        for (int nt : threads) {
            const int reps = opt.quick ? 3 : 7;
            const double mt = opt.quick ? 0.02 : 0.1;
            double sec = time_call(
                [&] {
                    k.dense_forward(x.data(), w.data(), b.data(), y.data(), n, di, dout, Act::relu,
                                    T(0), nt);
                },
                reps, mt);
            double gf = 2.0 * n * di * dout / sec * 1e-9;
            report({"dense_forward_relu/" + isa + "/" + dtype_name<T>() + "/" + shape,
                    "dense_forward_relu", isa, dtype_name<T>(), shape, nt, sec, gf, "GFLOP/s",
                    100.0 * gf * 1e9 / (peak * nt)});
            sec = time_call(
                [&] {
                    k.dense_vjp(x.data(), w.data(), gz.data(), gx.data(), gw.data(), gb.data(), n,
                                di, dout, false, nt);
                },
                reps, mt);
            gf = 4.0 * n * di * dout / sec * 1e-9;  // gx and gw; gb is negligible
            report({"dense_vjp/" + isa + "/" + dtype_name<T>() + "/" + shape, "dense_vjp", isa,
                    dtype_name<T>(), shape, nt, sec, gf, "GFLOP/s",
                    100.0 * gf * 1e9 / (peak * nt)});
        }
    }
}

template <typename T>
void bench_activations(const std::string& isa, const Options& opt,
                       const std::vector<int>& threads) {
    const Kernels<T> k = kernels_for<T>(isa);
    const idx n = 1000, d = 1000;  // 1M elements
    auto x = random_vec<T>(n * d, 7), gy = random_vec<T>(n * d, 8);
    std::vector<T> y(n * d), gx(n * d);
    const std::pair<Act, const char*> acts[3] = {
        {Act::sigmoid, "sigmoid"}, {Act::tanh, "tanh"}, {Act::relu, "relu"}};
    for (auto& a : acts) {
        for (int nt : threads) {
            const int reps = opt.quick ? 3 : 7;
            const double mt = opt.quick ? 0.02 : 0.1;
            double sec = time_call(
                [&] { k.act_forward(a.first, x.data(), y.data(), n, d, T(0.01), nt); }, reps, mt);
            report({std::string(a.second) + "_forward/" + isa + "/" + dtype_name<T>() + "/1M",
                    std::string(a.second) + "_forward", isa, dtype_name<T>(), "1000x1000", nt,
                    sec, 2.0 * n * d * sizeof(T) / sec * 1e-9, "GB/s", -1});
            sec = time_call(
                [&] { k.act_vjp(a.first, y.data(), gy.data(), gx.data(), n, d, T(0.01), nt); },
                reps, mt);
            report({std::string(a.second) + "_vjp/" + isa + "/" + dtype_name<T>() + "/1M",
                    std::string(a.second) + "_vjp", isa, dtype_name<T>(), "1000x1000", nt, sec,
                    3.0 * n * d * sizeof(T) / sec * 1e-9, "GB/s", -1});
        }
    }
}

std::string cpu_model() {
    std::ifstream f("/proc/cpuinfo");
    std::string line;
    while (std::getline(f, line)) {
        if (line.rfind("model name", 0) == 0) {
            const auto p = line.find(':');
            if (p != std::string::npos) return line.substr(p + 2);
        }
    }
    return "unknown";
}

std::string json_escape(const std::string& s) {
    std::string o;
    for (char ch : s) {
        if (ch == '"' || ch == '\\') o += '\\';
        o += ch;
    }
    return o;
}

void write_json(const std::string& path, const std::vector<std::string>& isas,
                const std::vector<double>& peaks, const Options& opt) {
    FILE* f = std::fopen(path.c_str(), "w");
    if (!f) {
        std::fprintf(stderr, "bench_kernels: cannot write --json %s\n", path.c_str());
        std::exit(1);
    }
    std::fprintf(f, "{\n  \"context\": {\"cpu\": \"%s\", \"isas\": [", json_escape(cpu_model()).c_str());
    for (std::size_t i = 0; i < isas.size(); ++i)
        std::fprintf(f, "%s\"%s\"", i ? ", " : "", isas[i].c_str());
    std::fprintf(f, "], \"fma_peak_gflops_f32_1core\": {");
    for (std::size_t i = 0; i < isas.size(); ++i)
        std::fprintf(f, "%s\"%s\": %.2f", i ? ", " : "", isas[i].c_str(), peaks[i] * 1e-9);
    std::fprintf(f, "}, \"max_threads\": %d, \"quick\": %s, \"statistic\": \"median\"},\n",
                 opt.max_threads, opt.quick ? "true" : "false");
    std::fprintf(f, "  \"results\": [\n");
    for (std::size_t i = 0; i < results.size(); ++i) {
        const Result& r = results[i];
        std::fprintf(f,
                     "    {\"name\": \"%s\", \"kernel\": \"%s\", \"isa\": \"%s\", \"dtype\": \"%s\", "
                     "\"shape\": \"%s\", \"threads\": %d, \"seconds\": %.9g, \"%s\": %.3f",
                     r.name.c_str(), r.kernel.c_str(), r.isa.c_str(), r.dtype.c_str(),
                     r.shape.c_str(), r.threads, r.seconds,
                     r.unit == "GB/s" ? "gbps" : "gflops", r.rate);
        if (r.pct_peak >= 0) std::fprintf(f, ", \"pct_peak\": %.2f", r.pct_peak);
        std::fprintf(f, "}%s\n", i + 1 < results.size() ? "," : "");
    }
    std::fprintf(f, "  ]\n}\n");
    std::fclose(f);
}

}  // namespace

int main(int argc, char** argv) {
    Options opt;
    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        if (a == "--quick") opt.quick = true;
        else if (a == "--json" && i + 1 < argc) opt.json = argv[++i];
        else if (a == "--isa" && i + 1 < argc) opt.isa = argv[++i];
        else if (a == "--threads" && i + 1 < argc) opt.max_threads = std::atoi(argv[++i]);
        else {
            std::fprintf(stderr,
                         "usage: %s [--quick] [--json PATH] [--isa scalar|avx2|avx512] "
                         "[--threads N]\n",
                         argv[0]);
            return 2;
        }
    }

    __builtin_cpu_init();
    std::vector<std::string> isas = {"scalar"};
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) isas.push_back("avx2");
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
        isas.push_back("avx512");
    if (!opt.isa.empty()) {
        if (std::find(isas.begin(), isas.end(), opt.isa) == isas.end()) {
            std::fprintf(stderr, "bench_kernels: --isa %s is not supported by this CPU\n",
                         opt.isa.c_str());
            return 2;
        }
        isas = {opt.isa};
    }
    std::vector<int> threads = {1};
    if (opt.max_threads >= 2) threads.push_back(opt.max_threads);

    std::printf("cpu: %s\n", cpu_model().c_str());
    std::vector<double> peaks;
    for (const auto& isa : isas) {
        peaks.push_back(fma_peak(isa, opt.quick));
        std::printf("FMA peak %-7s 1 core: %.1f GFLOP/s f32, %.1f f64\n", isa.c_str(),
                    peaks.back() * 1e-9, peaks.back() * 0.5e-9);
    }
    for (std::size_t i = 0; i < isas.size(); ++i) {
        if (isas[i] != "avx512") continue;
        const double mix = kernel_mix_peak(opt.quick);
        std::printf("FMA peak avx512  1 core with the GEMM micro-kernel's loads: %.1f GFLOP/s f32 "
                    "(%.0f%% of the register-only peak)\n",
                    mix * 1e-9, 100.0 * mix / peaks[i]);
    }
    std::printf("%% = GFLOP/s / (threads x 1-core peak of the ISA and dtype); median of repeats\n");

    // Most important first, so that an interrupted run still says something.
    for (std::size_t i = isas.size(); i-- > 0;) {
        const std::string& isa = isas[i];
        bench_gemm<float>(isa, opt, peaks[i], threads);
        bench_gemm<double>(isa, opt, peaks[i], threads);
        bench_dense<float>(isa, opt, peaks[i], threads);
        bench_dense<double>(isa, opt, peaks[i], threads);
        bench_activations<float>(isa, opt, threads);
        bench_activations<double>(isa, opt, threads);
    }
    if (!opt.json.empty()) write_json(opt.json, isas, peaks, opt);
    return 0;
}
