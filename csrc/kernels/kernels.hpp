// The kernel interface shared by every ISA.
//
// Each ISA folder (scalar/, avx2/, avx512/) compiles the same templates with
// its own flags inside its own namespace, chainrule::<isa>, and explicitly
// instantiates them for float and double. dispatch.cpp picks one set at run
// time. Kernels trust their inputs (the bindings validate), never throw and
// never see Python objects. All matrices are row-major and contiguous unless a
// leading dimension says otherwise.
//
// Determinism: every kernel gives bit-identical results for any `nthreads`.
// Work is split over independent outputs and every reduction runs in a fixed
// order that does not depend on the thread count.
#pragma once

#include <cstdint>

namespace chainrule {

using idx = std::int64_t;

// Activation codes; the same numbers are used by the bindings.
enum class Act : int {
    identity = 0,
    sigmoid = 1,
    tanh = 2,
    relu = 3,
    leaky_relu = 4,
    softmax = 5,      // along rows
    log_softmax = 6,  // along rows
};

// Below this many flops a kernel stays on the calling thread. Waking OpenMP
// workers that have idled while Python ran costs ~65 us (perf-notes.md), so a
// second thread pays only for ~100 us of single-thread work or more: about
// 1.6e7 flops at ~150 GFLOP/s. Lower thresholds measured slower at 2 threads
// on small MLP layers, and far slower on a loaded machine. (MlpPlan uses it
// for the work it splits itself.)
constexpr double kParallelFlops = 1.6e7;

// Scale on the kernels' parallel thresholds (common.hpp, threads_for) for the
// calling thread; 1 unless a WarmThreads is alive on it. Defined in dispatch.cpp.
double parallel_threshold_scale();

// Lowers the parallel thresholds on this thread while it lives. For a run of
// kernel calls with no Python in between (MlpPlan's training step): there the
// OpenMP workers are still spinning from the previous region, so a region
// costs about 1 us instead of the ~65 us of waking idle workers
// (perf-notes.md), and smaller kernels pay for a second thread. Which kernels
// split never changes a result (they are bit-identical for any thread count).
class WarmThreads {
   public:
    explicit WarmThreads(double scale);
    ~WarmThreads();
    WarmThreads(const WarmThreads&) = delete;
    WarmThreads& operator=(const WarmThreads&) = delete;

   private:
    double previous_;
};

// Declares the kernel templates inside namespace chainrule::ISA.
#define CHAINRULE_DECLARE_KERNELS(ISA)                                              \
    namespace ISA {                                                                 \
    /* C(m,n) = alpha * op(A) @ op(B) + beta * C.                                   \
       op(A) is (m,k): A is stored (m,k) with row stride lda, or (k,m) if trans_a.  \
       op(B) is (k,n): B is stored (k,n) with row stride ldb, or (n,k) if trans_b.  \
       With beta == 0, C is never read (it may hold NaN). */                         \
    template <typename T>                                                           \
    void gemm(bool trans_a, bool trans_b, idx m, idx n, idx k, T alpha,            \
              const T* a, idx lda, const T* b, idx ldb, T beta, T* c, idx ldc,      \
              int nthreads);                                                        \
    /* y(n,d_out) = act(x(n,d_in) @ w(d_in,d_out) + b(d_out)); b may be null.       \
       Bias and elementwise activations are applied in the GEMM's write-back. */    \
    template <typename T>                                                           \
    void dense_forward(const T* x, const T* w, const T* b, T* y, idx n, idx d_in,   \
                       idx d_out, Act act, T slope, int nthreads);                  \
    /* y(n,d) = act(x(n,d)); x and y may alias. slope is leaky_relu's. */           \
    template <typename T>                                                           \
    void activation_forward(Act act, const T* x, T* y, idx n, idx d, T slope,       \
                            int nthreads);                                          \
    /* gx = J^T gy, from the forward output y (n,d); gx may alias gy.               \
       leaky_relu needs slope >= 0 so that sign(y) == sign(x). */                   \
    template <typename T>                                                           \
    void activation_vjp(Act act, const T* y, const T* gy, T* gx, idx n, idx d,      \
                        T slope, int nthreads);                                     \
    /* From z = x @ w + b: gx = gz @ w^T (n,d_in), gw = x^T @ gz (d_in,d_out),      \
       gb = column sums of gz (d_out). Any output may be null (not computed).       \
       accumulate: add into the outputs instead of overwriting them. */            \
    template <typename T>                                                           \
    void dense_vjp(const T* x, const T* w, const T* gz, T* gx, T* gw, T* gb,        \
                   idx n, idx d_in, idx d_out, bool accumulate, int nthreads);      \
    /* Column sums of a (n,d) into out (d), summing rows in order; accumulate adds. */ \
    template <typename T>                                                           \
    void column_sums(const T* a, T* out, idx n, idx d, bool accumulate, int nthreads); \
    /* Softmax cross-entropy from logits z (n,k) and labels in [0,k):               \
       loss = scale * sum_i w_i * (logsumexp(z_i) - z_i[label_i]),                  \
       grad = scale * w_i * (softmax(z_i) - onehot(label_i)).                       \
       weights (n) and grad may be null (weights then count 1). */                 \
    template <typename T>                                                           \
    double softmax_cross_entropy(const T* logits, const std::int64_t* labels,       \
                                 const T* weights, T* grad, idx n, idx k,           \
                                 double scale, int nthreads);                       \
    /* The same with probability targets t (n,k), rows summing to 1:               \
       loss = scale * sum_i w_i * sum_j t_ij * (logsumexp(z_i) - z_ij),             \
       grad = scale * w_i * (softmax(z_i) * sum_j t_ij - t_i). */                   \
    template <typename T>                                                           \
    double soft_cross_entropy(const T* logits, const T* targets, const T* weights,  \
                              T* grad, idx n, idx k, double scale, int nthreads);   \
    /* Binary cross-entropy from logits z (n,k), targets t in [0,1]:                \
       loss = scale * sum_i w_i * sum_j (softplus(z_ij) - t_ij * z_ij),             \
       grad = scale * w_i * (sigmoid(z_ij) - t_ij). Stable for any finite z. */     \
    template <typename T>                                                           \
    double binary_cross_entropy(const T* logits, const T* targets,                  \
                                const T* weights, T* grad, idx n, idx k,            \
                                double scale, int nthreads);                        \
    /* One torch.optim.SGD step over `size` elements (see optim.py for the         \
       formulas). buf is the momentum buffer, null when momentum == 0 (in double); \
       first_step: buf is initialised to the gradient, as PyTorch does. */          \
    template <typename T>                                                           \
    void sgd_step(T* p, const T* g, T* buf, idx size, T lr, T momentum,             \
                  T dampening, T weight_decay, bool nesterov, bool first_step,     \
                  int nthreads);                                                    \
    /* One torch.optim.Adam (decoupled == false) or AdamW (decoupled == true)       \
       step; step counts from 1. m and v are the moment buffers. The scalars       \
       come in double, as PyTorch's Python floats: 1 - beta2 rounded from double   \
       (not from a float beta2) keeps v within an ulp of PyTorch's in float32. */  \
    template <typename T>                                                           \
    void adam_step(T* p, const T* g, T* m, T* v, idx size, double lr, double beta1,  \
                   double beta2, double eps, double weight_decay, bool decoupled,   \
                   std::int64_t step, int nthreads);                                \
    }

CHAINRULE_DECLARE_KERNELS(scalar)
CHAINRULE_DECLARE_KERNELS(avx2)
CHAINRULE_DECLARE_KERNELS(avx512)

}  // namespace chainrule
