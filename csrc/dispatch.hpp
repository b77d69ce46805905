// Run-time choice of the kernel set. The only place that asks the CPU what it
// supports; everything else calls through table().
#pragma once

#include <string>
#include <vector>

#include "kernels/kernels.hpp"

namespace chainrule {

template <typename T>
struct KernelSet {
    void (*gemm)(bool, bool, idx, idx, idx, T, const T*, idx, const T*, idx, T, T*, idx, int);
    void (*dense_forward)(const T*, const T*, const T*, T*, idx, idx, idx, Act, T, int);
    void (*activation_forward)(Act, const T*, T*, idx, idx, T, int);
    void (*activation_vjp)(Act, const T*, const T*, T*, idx, idx, T, int);
    void (*dense_vjp)(const T*, const T*, const T*, T*, T*, T*, idx, idx, idx, bool, int);
    void (*column_sums)(const T*, T*, idx, idx, bool, int);
    double (*softmax_cross_entropy)(const T*, const std::int64_t*, const T*, T*, idx, idx,
                                    double, int);
    double (*soft_cross_entropy)(const T*, const T*, const T*, T*, idx, idx, double, int);
    double (*binary_cross_entropy)(const T*, const T*, const T*, T*, idx, idx, double, int);
    void (*sgd_step)(T*, const T*, T*, idx, T, T, T, T, bool, bool, int);
    void (*adam_step)(T*, const T*, T*, T*, idx, double, double, double, double, double, bool,
                      std::int64_t, int);
};

struct KernelTable {
    const char* isa;
    KernelSet<float> f32;
    KernelSet<double> f64;
};

// The table in use: the best ISA this CPU supports, or CHAINRULE_ISA if set.
const KernelTable& table();
template <typename T>
const KernelSet<T>& kernels();

// ISAs this CPU can run, lowest first ("scalar" is always there).
std::vector<std::string> available_isas();
// Switch the table; returns false if `name` is unknown or unsupported here.
bool set_isa(const std::string& name);
// Set by CHAINRULE_ISA when it named an ISA we could not honour ("" otherwise).
const std::string& isa_env_problem();

// Threads used by kernels that are large enough to split.
int num_threads();
void set_num_threads(int n);

}  // namespace chainrule
