// Explicit instantiation of every kernel template for float and double in the
// ISA namespace of the including translation unit.
#pragma once

namespace chainrule {
namespace CHAINRULE_ISA {

#define CHAINRULE_INSTANTIATE(T)                                                            \
    template void gemm<T>(bool, bool, idx, idx, idx, T, const T*, idx, const T*, idx, T,    \
                          T*, idx, int);                                                    \
    template void dense_forward<T>(const T*, const T*, const T*, T*, idx, idx, idx, Act, T, \
                                   int);                                                    \
    template void activation_forward<T>(Act, const T*, T*, idx, idx, T, int);               \
    template void activation_vjp<T>(Act, const T*, const T*, T*, idx, idx, T, int);         \
    template void dense_vjp<T>(const T*, const T*, const T*, T*, T*, T*, idx, idx, idx,     \
                               bool, int);                                                  \
    template void column_sums<T>(const T*, T*, idx, idx, bool, int);                        \
    template double softmax_cross_entropy<T>(const T*, const std::int64_t*, const T*, T*,   \
                                             idx, idx, double, int);                        \
    template double soft_cross_entropy<T>(const T*, const T*, const T*, T*, idx, idx,       \
                                          double, int);                                     \
    template double binary_cross_entropy<T>(const T*, const T*, const T*, T*, idx, idx,     \
                                            double, int);                                   \
    template void sgd_step<T>(T*, const T*, T*, idx, T, T, T, T, bool, bool, int);          \
    template void adam_step<T>(T*, const T*, T*, T*, idx, double, double, double, double, double, bool,              \
                               std::int64_t, int);

CHAINRULE_INSTANTIATE(float)
CHAINRULE_INSTANTIATE(double)

#undef CHAINRULE_INSTANTIATE

}  // namespace CHAINRULE_ISA
}  // namespace chainrule
