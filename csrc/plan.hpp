// A compiled plan for a multilayer perceptron: one native call per
// mini-batch runs gather, forward, loss, backward (and the L2 term) over
// preallocated buffers. Python still chooses the batches and owns the
// parameters, which live in one flat buffer laid out W1, b1, W2, b2, ...
// (each W row-major (d_in, d_out)); the gradients share that layout.
//
// Orchestration only: every flop goes through the dispatched kernel table,
// so this file is compiled once, without ISA flags.
#pragma once

#include <cstdint>
#include <mutex>
#include <vector>

#include "dispatch.hpp"

namespace chainrule {

enum class LossKind : int {
    softmax_cross_entropy = 0,  // integer labels (n,), logits (n, k)
    binary_cross_entropy = 1,   // targets (n, k) in [0, 1], logits (n, k)
    squared_error = 2,          // targets (n, k); loss = scale * sum w_i (p - t)^2
};

// An optimizer step fused into train_step (see MlpPlan::train_step). The
// state buffers have the parameters' flat layout: SGD's momentum buffer
// (null without momentum), Adam's exp_avg and exp_avg_sq.
template <typename T>
struct FusedUpdate {
    enum class Kind : int { sgd = 0, adam = 1 } kind = Kind::sgd;
    double lr = 0.0;
    double weight_decay = 0.0;
    // SGD
    double momentum = 0.0, dampening = 0.0;
    bool nesterov = false, first_step = false;
    // Adam (step counts from 1)
    double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
    bool decoupled = false;
    std::int64_t step = 1;
    T* state0 = nullptr;
    T* state1 = nullptr;
};

struct MlpShape {
    std::vector<idx> dims;     // d_0 (inputs) ... d_L (outputs)
    std::vector<Act> acts;     // L activations; acts[L-1] applies at inference only
    double slope = 0.01;       // leaky_relu's negative slope
    idx n_params() const;      // total of W and b sizes
};

template <typename T>
class MlpPlan {
   public:
    explicit MlpPlan(MlpShape shape);

    const MlpShape& shape() const { return shape_; }

    // One training step's gradient. x holds the whole data set (rows, d_0);
    // `indices` (n) picks the batch rows, or is null for rows 0..n-1.
    // targets: int64 labels for softmax CE, else T values (n, d_L) (or
    // gathered by the same indices). weights: per-row, nullable.
    // Writes (or adds, with accumulate) d loss / d params into grads and
    // returns the loss: scale * sum_i w_i loss_i + l2/2 * sum ||W||^2 with
    // l2 * W added to each weight gradient.
    // grad_norms (L, nullable): adds each layer's ||(dW, db)||_2 (partial sums
    // in T per block, blocks added in double), so the per-layer gradient norms
    // cost no extra pass from Python.
    //
    // update (nullable): also take one optimizer step, layer by layer during
    // backward: W_l and b_l are updated as soon as their gradient is final
    // (after the gradient with respect to the layer's input has used the old
    // W_l): one native call per mini-batch. The arithmetic is that of
    // sgd_step / adam_step over the whole flat buffer afterwards, bit for bit. Skipped when the loss is not finite, so the parameters stay
    // those before the batch. params must then be writable; accumulate must
    // be false (the binding checks).
    double train_step(T* params, T* grads, const T* x, idx rows, const std::int64_t* indices,
                      idx n, const void* targets, const T* weights, LossKind loss, double scale,
                      double l2, bool accumulate, double* grad_norms, int nthreads,
                      const FusedUpdate<T>* update = nullptr);

    // Inference: out (n, d_L) = the network applied to x (n, d_0), with the
    // output activation acts[L-1] (softmax for probabilities, say).
    void forward(const T* params, const T* x, idx n, T* out, int nthreads);

    // Bytes of workspace held now (for memory accounting).
    std::size_t workspace_bytes() const {
        return (acts_.capacity() + grad_.capacity() + panel_.capacity()) * sizeof(T);
    }

   private:
    void reserve(idx n);

    MlpShape shape_;
    idx capacity_ = 0;
    idx widest_ = 0;        // max(d_1 .. d_L)
    // Per-layer pointers, sized once so a step allocates nothing.
    std::vector<const T*> a_, w_, b_;
    std::vector<T*> gw_, gb_;
    std::vector<T> acts_;   // A_0 (gathered batch), A_1 ... A_L, one after another
    std::vector<T> grad_;   // two ping-pong buffers of n * max(d_1..d_L)
    std::vector<T> target_rows_;  // gathered float targets
    std::vector<std::int64_t> label_rows_;
    std::vector<T> weight_rows_;
    std::vector<T> panel_;  // per thread: a panel of the output layer's input gradient
    std::mutex mutex_;      // one plan used from two threads serialises, never corrupts
};

}  // namespace chainrule
