#include "plan.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace chainrule {

idx MlpShape::n_params() const {
    idx total = 0;
    for (size_t l = 1; l < dims.size(); ++l) total += dims[l - 1] * dims[l] + dims[l];
    return total;
}

template <typename T>
MlpPlan<T>::MlpPlan(MlpShape shape) : shape_(std::move(shape)) {
    const size_t L = shape_.dims.size() - 1;
    for (size_t l = 1; l <= L; ++l) widest_ = std::max(widest_, shape_.dims[l]);
    a_.resize(L + 1);
    w_.resize(L + 1);
    b_.resize(L + 1);
    gw_.resize(L + 1);
    gb_.resize(L + 1);
}

template <typename T>
void MlpPlan<T>::reserve(idx n) {
    if (n <= capacity_) return;
    idx per_row = 0;
    for (idx dim : shape_.dims) per_row += dim;
    acts_.assign(static_cast<size_t>(n * per_row), T(0));
    grad_.assign(static_cast<size_t>(2 * n * widest_), T(0));
    target_rows_.assign(static_cast<size_t>(n * shape_.dims.back()), T(0));
    label_rows_.assign(static_cast<size_t>(n), 0);
    weight_rows_.assign(static_cast<size_t>(n), T(0));
    capacity_ = n;
}

namespace {

// Parallel thresholds inside a training step, relative to a lone kernel call.
// 1/8: on (c) (784-256-128-10, batch 128) at 2 threads a step took 0.91x the
// time of the default thresholds, on (d) 0.97x; the small networks' kernels
// stay below even the lowered thresholds.
constexpr double kWarmScale = 0.125;
// Gathering the batch rows: bytes at which a second thread pays (before the
// scale above), as for the memory-bound elementwise kernels.
constexpr double kParallelGatherBytes = 1 << 20;

int thread_index() {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

// The output layer's input gradient (see train_step) goes a panel of rows at
// a time through a buffer of about this size, which stays in L2.
constexpr std::size_t kPanelBytes = 128 * 1024;
// ... for at most this many outputs: every product then sums all of its k in
// one K block (KC >= 256 on every ISA), as the whole product would, so the
// panels give the same bits as dense_vjp.
constexpr idx kPanelMaxOutputs = 256;
// ... and only for an A_{L-1} of at least this size: a smaller one and the
// separate buffer both stay in L2, and the extra calls (W_L^T, one product
// and one VJP per panel) made (b) (64 x 128 of A_1) 5% slower.
constexpr double kPanelMinHiddenBytes = 512.0 * 1024.0;

// Squared error is cheap and has no SIMD twin in the kernel table.
template <typename T>
double squared_error(const T* p, const T* t, const T* w, T* g, idx n, idx k, double scale) {
    double total = 0.0;
    for (idx i = 0; i < n; ++i) {
        const double wi = w ? static_cast<double>(w[i]) : 1.0;
        double row = 0.0;
        // The difference is rounded to T first, as MSE in losses.py does, so
        // the two paths give the same gradients.
        const T two_scale = static_cast<T>(2.0 * scale);
        for (idx j = 0; j < k; ++j) {
            const T diff = p[i * k + j] - t[i * k + j];
            row += static_cast<double>(diff) * static_cast<double>(diff);
            g[i * k + j] = w ? diff * two_scale * w[i] : diff * two_scale;
        }
        total += wi * row;
    }
    return scale * total;
}

// sum of v[i]^2 in double, in blocks of kBlock values summed in T across
// kLanes independent partial sums (so the compiler can vectorise them): the
// same value as a double loop up to T rounding within a block.
template <typename T>
double sum_squares(const T* v, idx size) {
    constexpr int kLanes = 16;
    constexpr idx kBlock = 1024;
    double total = 0.0;
    for (idx i0 = 0; i0 < size; i0 += kBlock) {
        const idx i1 = std::min(size, i0 + kBlock);
        T part[kLanes] = {};
        idx i = i0;
        for (; i + kLanes <= i1; i += kLanes)
            for (int q = 0; q < kLanes; ++q) part[q] += v[i + q] * v[i + q];
        double block = 0.0;
        for (; i < i1; ++i) block += static_cast<double>(v[i]) * static_cast<double>(v[i]);
        for (int q = 0; q < kLanes; ++q) block += static_cast<double>(part[q]);
        total += block;
    }
    return total;
}

}  // namespace

template <typename T>
double MlpPlan<T>::train_step(T* params, T* grads, const T* x, idx rows,
                              const std::int64_t* indices, idx n, const void* targets,
                              const T* weights, LossKind loss, double scale, double l2,
                              bool accumulate, double* grad_norms, int nthreads,
                              const FusedUpdate<T>* update) {
    std::lock_guard<std::mutex> lock(mutex_);
    (void)rows;
    // Kernel follows kernel with no Python in between: the workers stay warm.
    const WarmThreads warm(kWarmScale);
    const auto& K = kernels<T>();
    const auto& d = shape_.dims;
    const size_t L = d.size() - 1;
    reserve(n);

    // Gather the batch (shuffled indices, never a shuffled copy of the data).
    const T* a_prev = x;
    const idx k_out = d[L];
    const T* tgt = static_cast<const T*>(targets);
    const std::int64_t* lab = static_cast<const std::int64_t*>(targets);
    const T* wts = weights;
    if (indices) {
        T* a0 = acts_.data();
        const size_t row_bytes = static_cast<size_t>(d[0]) * sizeof(T);
        // Split across threads from 128 KiB (1 MiB at the default thresholds).
        const bool split = nthreads > 1 && static_cast<double>(n) * static_cast<double>(row_bytes) >=
                                               kParallelGatherBytes * kWarmScale;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (split)
        for (idx i = 0; i < n; ++i) std::memcpy(a0 + i * d[0], x + indices[i] * d[0], row_bytes);
        a_prev = a0;
        if (loss == LossKind::softmax_cross_entropy) {
            for (idx i = 0; i < n; ++i) label_rows_[i] = lab[indices[i]];
            lab = label_rows_.data();
        } else {
            const size_t tbytes = static_cast<size_t>(k_out) * sizeof(T);
            for (idx i = 0; i < n; ++i)
                std::memcpy(target_rows_.data() + i * k_out, tgt + indices[i] * k_out, tbytes);
            tgt = target_rows_.data();
        }
        if (weights) {
            for (idx i = 0; i < n; ++i) weight_rows_[i] = weights[indices[i]];
            wts = weight_rows_.data();
        }
    }

    // Forward: A_l = act_l(A_{l-1} W_l + b_l); the last layer stays linear
    // (logits), its activation fused into the loss.
    auto& a = a_;
    auto& w = w_;
    auto& b = b_;
    a[0] = a_prev;
    T* out = acts_.data() + n * d[0];
    const T* p = params;
    for (size_t l = 1; l <= L; ++l) {
        w[l] = p;
        b[l] = p + d[l - 1] * d[l];
        p = b[l] + d[l];
        const Act act = l == L ? Act::identity : shape_.acts[l - 1];
        K.dense_forward(a[l - 1], w[l], b[l], out, n, d[l - 1], d[l], act, T(shape_.slope),
                        nthreads);
        a[l] = out;
        out += n * d[l];
    }

    // Loss and its gradient with respect to the logits.
    T* gz = grad_.data();
    T* ga = grad_.data() + capacity_ * widest_;
    double value = 0.0;
    switch (loss) {
        case LossKind::softmax_cross_entropy:
            value = K.softmax_cross_entropy(a[L], lab, wts, gz, n, k_out, scale, nthreads);
            break;
        case LossKind::binary_cross_entropy:
            value = K.binary_cross_entropy(a[L], tgt, wts, gz, n, k_out, scale, nthreads);
            break;
        case LossKind::squared_error:
            value = squared_error(a[L], tgt, wts, gz, n, k_out, scale);
            break;
    }

    // Backward: the chain rule, one layer at a time. The first layer's
    // input gradient is never needed for training, so it is not computed.
    // gz and ga take turns in the two grad_ buffers (gz may also be A_{L-1},
    // below); ga always names a grad_ buffer that is free.
    T* const bufs[2] = {gz, ga};
    auto other = [&](T* p) { return p == bufs[0] ? bufs[1] : bufs[0]; };
    T* g = grads;
    auto& gw = gw_;
    auto& gb = gb_;
    for (size_t l = 1; l <= L; ++l) {
        gw[l] = g;
        gb[l] = g + d[l - 1] * d[l];
        g = gb[l] + d[l];
    }
    const T l2t = static_cast<T>(l2);
    if (l2 != 0.0) {
        double sq = 0.0;
        for (size_t l = 1; l <= L; ++l) sq += sum_squares(w[l], d[l - 1] * d[l]);
        value += 0.5 * l2 * sq;
    }
    if (update && !std::isfinite(value)) update = nullptr;  // keep the weights of before
    for (size_t l = L; l >= 1; --l) {
        const Act act_in = l > 1 ? shape_.acts[l - 2] : Act::identity;
        const bool rowwise = act_in == Act::softmax || act_in == Act::log_softmax;
        const double hidden_bytes = double(n) * double(d[l - 1]) * sizeof(T);
        if (l == L && l > 1 && !rowwise && d[l] <= kPanelMaxOutputs &&
            hidden_bytes >= kPanelMinHiddenBytes) {
            // The output layer's input gradient, (gZ_L W_L^T) * act'(A_{L-1}),
            // is written over A_{L-1}, which nothing reads after dW_L: A_{L-1}
            // is what the forward pass wrote last, so it is still in cache,
            // where a separate n x d_{L-1} buffer would be written cold (on
            // (d), 1 MiB: ~0.2 ms of a step).
            K.dense_vjp(a[l - 1], w[l], gz, nullptr, gw[l], gb[l], n, d[l - 1], d[l],
                        accumulate, nthreads);
            const idx d_in = d[l - 1];
            const idx rows =
                std::max<idx>(1, static_cast<idx>(kPanelBytes / (d_in * sizeof(T))));
            const idx panels = (n + rows - 1) / rows;
            const bool split = nthreads > 1 && panels > 1 &&
                               2.0 * double(n) * double(d_in) * double(d[l]) >=
                                   kParallelFlops * kWarmScale;
            const int nt = split ? nthreads : 1;
            // panel_: W_L^T, so that every panel's product reads its B
            // row-major, in place (a transposed B would be regathered by every
            // panel), then one panel buffer per thread.
            const size_t per_thread = static_cast<size_t>(rows * d_in);
            const size_t wt_size = static_cast<size_t>(d_in * d[l]);
            if (panel_.size() < wt_size + per_thread * nt)
                panel_.assign(wt_size + per_thread * nt, T(0));
            T* const wt = panel_.data();
            for (idx i = 0; i < d_in; ++i)
                for (idx j = 0; j < d[l]; ++j) wt[j * d_in + i] = w[l][i * d[l] + j];
            // A_{L-1} lies in acts_, which this plan owns.
            T* const hidden = acts_.data() + (a[l - 1] - acts_.data());
#pragma omp parallel for num_threads(nt) schedule(static) if (split)
            for (idx p = 0; p < panels; ++p) {
                const idx r0 = p * rows, r = std::min(rows, n - r0);
                T* buf = wt + wt_size + per_thread * static_cast<size_t>(thread_index());
                K.gemm(false, false, r, d_in, d[l], T(1), gz + r0 * d[l], d[l], wt, d_in, T(0),
                       buf, d_in, 1);
                K.activation_vjp(act_in, hidden + r0 * d_in, buf, hidden + r0 * d_in, r, d_in,
                                 T(shape_.slope), 1);
            }
            gz = hidden;
        } else {
            T* gx = l > 1 ? ga : nullptr;
            // gx is scratch and always overwritten; only gw and gb accumulate.
            if (gx && accumulate) {
                K.dense_vjp(a[l - 1], w[l], gz, gx, nullptr, nullptr, n, d[l - 1], d[l], false,
                            nthreads);
                gx = nullptr;
            }
            K.dense_vjp(a[l - 1], w[l], gz, gx, gw[l], gb[l], n, d[l - 1], d[l], accumulate,
                        nthreads);
            if (l > 1) {
                K.activation_vjp(act_in, a[l - 1], ga, ga, n, d[l - 1], T(shape_.slope),
                                 nthreads);
                gz = ga;
                ga = other(ga);
            }
        }
        // Layer l's gradient is final: the L2 term, its norm, then (fused) its update.
        const idx w_size = d[l - 1] * d[l];
        if (l2 != 0.0) {
            const T* wl = w[l];
            T* gl = gw[l];
            for (idx i = 0; i < w_size; ++i) gl[i] += l2t * wl[i];
        }
        if (grad_norms) grad_norms[l - 1] += std::sqrt(sum_squares(gw[l], w_size + d[l]));
        if (update) {
            // W_l and b_l are one run of the flat buffer, as are their state slices.
            const idx off = static_cast<idx>(w[l] - params);
            T* pl = params + off;
            const T* gl = gw[l];
            const FusedUpdate<T>& u = *update;
            T* s0 = u.state0 ? u.state0 + off : nullptr;
            T* s1 = u.state1 ? u.state1 + off : nullptr;
            if (u.kind == FusedUpdate<T>::Kind::sgd) {
                K.sgd_step(pl, gl, s0, w_size + d[l], T(u.lr), T(u.momentum), T(u.dampening),
                           T(u.weight_decay), u.nesterov, u.first_step, nthreads);
            } else {
                K.adam_step(pl, gl, s0, s1, w_size + d[l], u.lr, u.beta1, u.beta2, u.eps,
                            u.weight_decay, u.decoupled, u.step, nthreads);
            }
        }
    }
    return value;
}

template <typename T>
void MlpPlan<T>::forward(const T* params, const T* x, idx n, T* out, int nthreads) {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto& K = kernels<T>();
    const auto& d = shape_.dims;
    const size_t L = d.size() - 1;
    reserve(n);
    const T* a_prev = x;
    T* buf = acts_.data() + n * d[0];
    const T* p = params;
    for (size_t l = 1; l <= L; ++l) {
        const T* w = p;
        const T* b = p + d[l - 1] * d[l];
        p = b + d[l];
        T* dst = l == L ? out : buf;
        K.dense_forward(a_prev, w, b, dst, n, d[l - 1], d[l], shape_.acts[l - 1], T(shape_.slope),
                        nthreads);
        a_prev = dst;
        buf += n * d[l];
    }
}

template class MlpPlan<float>;
template class MlpPlan<double>;

}  // namespace chainrule
