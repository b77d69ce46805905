#include "dispatch.hpp"

#include <atomic>
#include <cstdlib>
#include <thread>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace chainrule {
namespace {

// cpuid leaf 7 / xgetbv checks: the CPU must have the instructions AND the OS
// must save the wide registers, or AVX code faults. Portable-only builds
// (CHAINRULE_PORTABLE_ONLY) never call them.
[[maybe_unused]] bool os_saves(unsigned long long mask) {
#if defined(__x86_64__) || defined(__i386__)
    unsigned eax, ebx, ecx, edx;
    __asm__("cpuid" : "=a"(eax), "=b"(ebx), "=c"(ecx), "=d"(edx) : "a"(1), "c"(0));
    if (!(ecx & (1u << 27))) return false;  // OSXSAVE
    unsigned lo, hi;
    __asm__("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    unsigned long long xcr0 = (static_cast<unsigned long long>(hi) << 32) | lo;
    return (xcr0 & mask) == mask;
#else
    (void)mask;
    return false;
#endif
}

[[maybe_unused]] bool cpu_has_avx2() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && os_saves(0x6);
#else
    return false;
#endif
}

[[maybe_unused]] bool cpu_has_avx512() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    return cpu_has_avx2() && __builtin_cpu_supports("avx512f") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") && os_saves(0xE6);
#else
    return false;
#endif
}

#define CHAINRULE_SET(NS, T)                                                                 \
    KernelSet<T> {                                                                           \
        &NS::gemm<T>, &NS::dense_forward<T>, &NS::activation_forward<T>,                     \
            &NS::activation_vjp<T>, &NS::dense_vjp<T>, &NS::column_sums<T>,                  \
            &NS::softmax_cross_entropy<T>, &NS::soft_cross_entropy<T>,                       \
            &NS::binary_cross_entropy<T>, &NS::sgd_step<T>, &NS::adam_step<T>                \
    }

const KernelTable kScalar{"scalar", CHAINRULE_SET(scalar, float), CHAINRULE_SET(scalar, double)};
// CMake defines CHAINRULE_PORTABLE_ONLY where the AVX objects are not built
// (non-x86 CPUs); the AVX tables then do not exist and never get picked.
#ifndef CHAINRULE_PORTABLE_ONLY
const KernelTable kAvx2{"avx2", CHAINRULE_SET(avx2, float), CHAINRULE_SET(avx2, double)};
const KernelTable kAvx512{"avx512", CHAINRULE_SET(avx512, float), CHAINRULE_SET(avx512, double)};
#endif

const KernelTable* table_for(const std::string& name) {
    if (name == "scalar") return &kScalar;
#ifndef CHAINRULE_PORTABLE_ONLY
    if (name == "avx2") return cpu_has_avx2() ? &kAvx2 : nullptr;
    if (name == "avx512") return cpu_has_avx512() ? &kAvx512 : nullptr;
#endif
    return nullptr;
}

const KernelTable* best_table() {
#ifndef CHAINRULE_PORTABLE_ONLY
    if (cpu_has_avx512()) return &kAvx512;
    if (cpu_has_avx2()) return &kAvx2;
#endif
    return &kScalar;
}

std::string g_env_problem;

const KernelTable* initial_table() {
    const KernelTable* best = best_table();
    if (const char* env = std::getenv("CHAINRULE_ISA")) {
        if (*env == '\0') return best;
        if (const KernelTable* forced = table_for(env)) return forced;
        g_env_problem = env;
    }
    return best;
}

std::atomic<const KernelTable*> g_table{initial_table()};

int initial_threads() {
    if (const char* env = std::getenv("OMP_NUM_THREADS")) {
        int n = std::atoi(env);  // OpenMP allows a list "4,2"; the first entry counts
        if (n > 0) return n;
    }
#ifdef _OPENMP
    return omp_get_num_procs();
#else
    unsigned n = std::thread::hardware_concurrency();
    return n > 0 ? static_cast<int>(n) : 1;
#endif
}

std::atomic<int> g_threads{initial_threads()};

thread_local double g_threshold_scale = 1.0;

}  // namespace

double parallel_threshold_scale() { return g_threshold_scale; }

WarmThreads::WarmThreads(double scale) : previous_(g_threshold_scale) {
    g_threshold_scale = scale;
}
WarmThreads::~WarmThreads() { g_threshold_scale = previous_; }

const KernelTable& table() { return *g_table.load(std::memory_order_acquire); }

template <>
const KernelSet<float>& kernels<float>() { return table().f32; }
template <>
const KernelSet<double>& kernels<double>() { return table().f64; }

std::vector<std::string> available_isas() {
    std::vector<std::string> out{"scalar"};
#ifndef CHAINRULE_PORTABLE_ONLY
    if (cpu_has_avx2()) out.push_back("avx2");
    if (cpu_has_avx512()) out.push_back("avx512");
#endif
    return out;
}

bool set_isa(const std::string& name) {
    const KernelTable* t = table_for(name);
    if (!t) return false;
    g_table.store(t, std::memory_order_release);
    return true;
}

const std::string& isa_env_problem() { return g_env_problem; }

int num_threads() { return g_threads.load(std::memory_order_relaxed); }
void set_num_threads(int n) { g_threads.store(n < 1 ? 1 : n, std::memory_order_relaxed); }

}  // namespace chainrule
