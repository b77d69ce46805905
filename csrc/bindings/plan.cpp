// chainrule._core.MLPPlan: the compiled training step of a multilayer
// perceptron (see csrc/plan.hpp). Checks everything once per call, then runs
// the whole step with the GIL released.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "../plan.hpp"
#include "checks.hpp"

namespace py = pybind11;
using namespace py::literals;
using namespace chainrule;
using namespace chainrule::bind;

namespace {

Act act_from_name(const std::string& name) {
    static const char* names[] = {"identity", "sigmoid", "tanh", "relu",
                                  "leaky_relu", "softmax", "log_softmax"};
    for (int i = 0; i < 7; ++i) {
        if (name == names[i]) return static_cast<Act>(i);
    }
    if (name == "logistic") return Act::sigmoid;
    value_error("MLPPlan: activation '" + name +
                "' is unknown; expected identity, sigmoid, tanh, relu, leaky_relu, softmax or "
                "log_softmax");
}

LossKind loss_from_name(const std::string& name) {
    if (name == "softmax_cross_entropy") return LossKind::softmax_cross_entropy;
    if (name == "binary_cross_entropy") return LossKind::binary_cross_entropy;
    if (name == "squared_error") return LossKind::squared_error;
    value_error("MLPPlan.train_step: loss is '" + name +
                "'; expected softmax_cross_entropy, binary_cross_entropy or squared_error");
}

// update= for MLPPlan.train_step: {"kind": "sgd", "lr", "momentum",
// "dampening", "weight_decay", "nesterov", "first_step", "momentum_buffer"}
// or {"kind": "adam", "lr", "beta1", "beta2", "eps", "weight_decay",
// "decoupled", "step", "exp_avg", "exp_avg_sq"}; everything but kind and lr
// optional, with torch.optim's defaults. Unknown keys are an error (a typo
// would otherwise train with a default).
inline std::string type_name(py::handle obj) {
    return py::str(py::type::of(obj).attr("__name__")).cast<std::string>();
}

template <typename T>
void parse_update(const char* fn, py::handle obj, idx n_params, const py::array& params,
                  const py::array& grads, FusedUpdate<T>& u, py::array_t<T, py::array::c_style>& s0,
                  py::array_t<T, py::array::c_style>& s1) {
    if (!py::isinstance<py::dict>(obj)) {
        type_error(std::string(fn) + ": update is a " + type_name(obj) +
                   "; expected a dict such as {'kind': 'sgd', 'lr': 0.01}");
    }
    py::dict d = py::reinterpret_borrow<py::dict>(obj);
    if (!d.contains("kind") || !d.contains("lr")) {
        value_error(std::string(fn) + ": update needs 'kind' ('sgd' or 'adam') and 'lr'");
    }
    const std::string kind = py::str(d["kind"]).cast<std::string>();
    std::vector<std::string> allowed;
    if (kind == "sgd") {
        u.kind = FusedUpdate<T>::Kind::sgd;
        allowed = {"kind", "lr", "momentum", "dampening", "weight_decay", "nesterov", "first_step",
                   "momentum_buffer"};
    } else if (kind == "adam") {
        u.kind = FusedUpdate<T>::Kind::adam;
        allowed = {"kind", "lr", "beta1", "beta2", "eps", "weight_decay", "decoupled", "step",
                   "exp_avg", "exp_avg_sq"};
    } else {
        value_error(std::string(fn) + ": update['kind'] is '" + kind + "'; expected 'sgd' or 'adam'");
    }
    for (auto item : d) {
        const std::string key = py::str(item.first).cast<std::string>();
        if (std::find(allowed.begin(), allowed.end(), key) == allowed.end()) {
            value_error(std::string(fn) + ": update has an unknown key '" + key + "' for kind '" +
                        kind + "'");
        }
    }
    auto num = [&](const char* key, double dflt) {
        if (!d.contains(key)) return dflt;
        double v;
        try {
            v = d[key].cast<double>();
        } catch (const py::cast_error&) {
            type_error(std::string(fn) + ": update['" + key + "'] must be a number; got " +
                       type_name(d[key]));
        }
        if (!std::isfinite(v)) {
            value_error(std::string(fn) + ": update['" + key + "'] must be finite; got " +
                        fmt_double(v));
        }
        return v;
    };
    auto flag = [&](const char* key) {
        if (!d.contains(key)) return false;
        py::object v = d[key];
        if (!py::isinstance<py::bool_>(v)) {
            type_error(std::string(fn) + ": update['" + key + "'] must be a bool; got " +
                       type_name(v));
        }
        return v.cast<bool>();
    };
    auto buffer = [&](const char* key, py::array_t<T, py::array::c_style>& out) {
        if (!d.contains(key)) {
            value_error(std::string(fn) + ": update needs '" + key + "', a flat " + dtype_name<T>() +
                        " array of " + std::to_string(n_params) + " values");
        }
        std::string arg = std::string("update['") + key + "']";
        out = output<T>(fn, arg.c_str(), d[key], {n_params});
        check_no_overlap(fn, arg.c_str(), out, {{"params", &params}, {"grads", &grads}});
        return out.mutable_data();
    };
    u.lr = num("lr", 0.0);
    u.weight_decay = num("weight_decay", 0.0);
    if (u.kind == FusedUpdate<T>::Kind::sgd) {
        u.momentum = num("momentum", 0.0);
        u.dampening = num("dampening", 0.0);
        u.nesterov = flag("nesterov");
        u.first_step = flag("first_step");
        if (u.momentum != 0.0) u.state0 = buffer("momentum_buffer", s0);
    } else {
        u.beta1 = num("beta1", 0.9);
        u.beta2 = num("beta2", 0.999);
        u.eps = num("eps", 1e-8);
        u.decoupled = flag("decoupled");
        if (d.contains("step")) {
            py::object v = d["step"];
            if (!py::isinstance<py::int_>(v) || py::isinstance<py::bool_>(v)) {
                type_error(std::string(fn) + ": update['step'] must be an int; got " +
                           type_name(v));
            }
            u.step = v.cast<std::int64_t>();
        }
        if (u.step < 1) {
            value_error(std::string(fn) + ": update['step'] must be >= 1; got " +
                        std::to_string(u.step));
        }
        u.state0 = buffer("exp_avg", s0);
        u.state1 = buffer("exp_avg_sq", s1);
        check_no_overlap(fn, "update['exp_avg']", s0, {{"update['exp_avg_sq']", &s1}});
    }
}

class PyPlan {
   public:
    PyPlan(std::vector<idx> dims, std::vector<std::string> acts, const std::string& dtype,
           double slope) {
        if (dims.size() < 2) {
            value_error("MLPPlan: dims has " + std::to_string(dims.size()) +
                        " entries; expected at least 2 (inputs and outputs)");
        }
        for (idx d : dims) {
            if (d < 1) value_error("MLPPlan: dims must all be >= 1; got " + shape_str(dims));
        }
        if (acts.size() != dims.size() - 1) {
            value_error("MLPPlan: " + std::to_string(acts.size()) +
                        " activations given; expected one per layer, " +
                        std::to_string(dims.size() - 1));
        }
        MlpShape shape;
        shape.dims = dims;
        for (size_t i = 0; i < acts.size(); ++i) {
            Act a = act_from_name(acts[i]);
            if (i + 1 < acts.size() && (a == Act::softmax || a == Act::log_softmax)) {
                value_error("MLPPlan: hidden activation " + std::to_string(i) + " is '" + acts[i] +
                            "'; softmax is supported on the output layer only");
            }
            shape.acts.push_back(a);
        }
        if (!(slope >= 0.0)) value_error("MLPPlan: negative_slope must be >= 0");
        shape.slope = slope;
        // Parameter count must fit an index, whatever the dims say.
        idx total = 0;
        for (size_t l = 1; l < dims.size(); ++l) {
            idx wsz;
            if (__builtin_mul_overflow(dims[l - 1], dims[l], &wsz) ||
                __builtin_add_overflow(total, wsz, &total) ||
                __builtin_add_overflow(total, dims[l], &total)) {
                value_error("MLPPlan: dims " + shape_str(dims) + " need more parameters than a "
                            "64-bit count can hold");
            }
        }
        if (dtype == "float32") f32_ = std::make_unique<MlpPlan<float>>(shape);
        else if (dtype == "float64") f64_ = std::make_unique<MlpPlan<double>>(shape);
        else type_error("MLPPlan: dtype is '" + dtype + "'; expected 'float32' or 'float64'");
    }

    const MlpShape& shape() const { return f32_ ? f32_->shape() : f64_->shape(); }
    std::string dtype() const { return f32_ ? "float32" : "float64"; }

    double train_step(py::handle params, py::handle grads, py::handle x, py::handle targets,
                      const std::string& loss_name, py::handle indices, py::handle weights,
                      py::handle scale, double l2, bool accumulate, py::handle norms,
                      py::handle update) {
        if (f32_) return step<float>(*f32_, params, grads, x, targets, loss_name, indices, weights,
                                     scale, l2, accumulate, norms, update);
        return step<double>(*f64_, params, grads, x, targets, loss_name, indices, weights, scale,
                            l2, accumulate, norms, update);
    }

    py::object forward(py::handle params, py::handle x, py::handle out) {
        if (f32_) return fwd<float>(*f32_, params, x, out);
        return fwd<double>(*f64_, params, x, out);
    }

    std::size_t workspace_bytes() const {
        return f32_ ? f32_->workspace_bytes() : f64_->workspace_bytes();
    }

   private:
    template <typename T>
    static py::array_t<T, py::array::c_style> flat(const char* fn, const char* arg, py::handle obj,
                                                   idx size, bool writable) {
        if (!py::isinstance<py::array>(obj)) {
            type_error(std::string(fn) + ": " + arg + " is a " +
                       py::str(py::type::of(obj)).cast<std::string>() + "; expected a flat " +
                       dtype_name<T>() + " ndarray");
        }
        py::array a = py::reinterpret_borrow<py::array>(obj);
        if (writable) return output<T>(fn, arg, obj, {size});
        // Read-only use still needs the caller's memory (no per-step copy).
        if (a.dtype().num() != (sizeof(T) == 4 ? kNpyFloat : kNpyDouble)) {
            type_error(std::string(fn) + ": " + arg + ".dtype is " + dtype_str(a) + "; expected " +
                       dtype_name<T>());
        }
        if (a.ndim() != 1 || a.shape(0) != size) {
            value_error(std::string(fn) + ": " + arg + ".shape is " + shape_str(a) +
                        "; expected (" + std::to_string(size) + ",)");
        }
        return input<T>(fn, arg, obj, 1, 1);
    }

    template <typename T>
    double step(MlpPlan<T>& plan, py::handle p_in, py::handle g_in, py::handle x_in,
                py::handle t_in, const std::string& loss_name, py::handle idx_in,
                py::handle w_in, py::handle scale_in, double l2, bool accumulate,
                py::handle norms_in, py::handle update_in) {
        const char* fn = "MLPPlan.train_step";
        const MlpShape& s = plan.shape();
        const LossKind loss = loss_from_name(loss_name);
        const idx n_params = s.n_params();
        const bool fused = !update_in.is_none();
        // With a fused update the parameters are written in place.
        auto params = flat<T>(fn, "params", p_in, n_params, fused);
        auto grads = flat<T>(fn, "grads", g_in, n_params, true);
        check_no_overlap(fn, "grads", grads, {{"params", &params}});
        FusedUpdate<T> upd;
        py::array_t<T, py::array::c_style> state0, state1;
        if (fused) {
            if (accumulate) {
                value_error(std::string(fn) + ": accumulate=True with an update; expected one or "
                            "the other (an update needs the whole batch's gradient)");
            }
            parse_update<T>(fn, update_in, n_params, params, grads, upd, state0, state1);
        }
        auto x = input<T>(fn, "x", x_in, 2, 2);
        const idx rows = x.shape(0), d0 = s.dims.front(), k = s.dims.back();
        if (x.shape(1) != d0) {
            value_error(std::string(fn) + ": x.shape is " + shape_str(x) +
                        "; expected (n, " + std::to_string(d0) + ")");
        }
        // The batch: all rows, or the rows named by indices.
        py::array_t<std::int64_t, py::array::c_style> ind;
        idx n = rows;
        if (!idx_in.is_none()) {
            py::array any = as_array(fn, "indices", idx_in);
            if (any.dtype().kind() != 'i' && any.dtype().kind() != 'u') {
                type_error(std::string(fn) + ": indices.dtype is " + dtype_str(any) +
                           "; expected an integer dtype");
            }
            check_ndim(fn, "indices", any, 1, 1);
            ind = py::array_t<std::int64_t, py::array::c_style | py::array::forcecast>::ensure(any);
            n = ind.shape(0);
            for (idx i = 0; i < n; ++i) {
                if (ind.data()[i] < 0 || ind.data()[i] >= rows) {
                    value_error(std::string(fn) + ": indices[" + std::to_string(i) + "] is " +
                                std::to_string(ind.data()[i]) + "; expected 0 <= index < " +
                                std::to_string(rows));
                }
            }
        }
        if (n == 0) value_error(std::string(fn) + ": the batch is empty; expected >= 1 row");
        const std::int64_t* pidx = idx_in.is_none() ? nullptr : ind.data();
        auto row_of = [&](idx i) { return pidx ? pidx[i] : i; };

        py::array_t<std::int64_t, py::array::c_style> labels;
        py::array_t<T, py::array::c_style> tvals;
        const void* ptarget = nullptr;
        if (loss == LossKind::softmax_cross_entropy) {
            py::array any = as_array(fn, "targets", t_in);
            if (any.dtype().kind() != 'i' && any.dtype().kind() != 'u') {
                type_error(std::string(fn) + ": targets.dtype is " + dtype_str(any) +
                           "; expected integer class labels for softmax_cross_entropy");
            }
            check_ndim(fn, "targets", any, 1, 1);
            labels = py::array_t<std::int64_t, py::array::c_style | py::array::forcecast>::ensure(any);
            if (labels.shape(0) != rows) {
                value_error(std::string(fn) + ": targets.shape is " + shape_str(labels) +
                            "; expected (" + std::to_string(rows) + ",), one label per row of x");
            }
            for (idx i = 0; i < n; ++i) {
                const std::int64_t v = labels.data()[row_of(i)];
                if (v < 0 || v >= k) {
                    value_error(std::string(fn) + ": label " + std::to_string(v) + " at row " +
                                std::to_string(row_of(i)) + "; expected 0 <= label < " +
                                std::to_string(k));
                }
            }
            ptarget = labels.data();
        } else {
            tvals = input<T>(fn, "targets", t_in, 1, 2);
            const bool ok = tvals.shape(0) == rows &&
                            (tvals.ndim() == 2 ? tvals.shape(1) == k : k == 1);
            if (!ok) {
                value_error(std::string(fn) + ": targets.shape is " + shape_str(tvals) +
                            "; expected (" + std::to_string(rows) + ", " + std::to_string(k) + ")");
            }
            ptarget = tvals.data();
        }
        py::array_t<T, py::array::c_style> w;
        if (!w_in.is_none()) {
            w = converted<T>(fn, "sample_weight", w_in, 1, 1);
            if (w.shape(0) != rows) {
                value_error(std::string(fn) + ": sample_weight.shape is " + shape_str(w) +
                            "; expected (" + std::to_string(rows) + ",)");
            }
        }
        double scale;
        if (scale_in.is_none()) {
            double total = 0.0;
            if (!w_in.is_none()) for (idx i = 0; i < n; ++i) total += w.data()[row_of(i)];
            else total = static_cast<double>(n);
            if (loss != LossKind::softmax_cross_entropy) total *= static_cast<double>(k);
            if (!(total > 0.0)) {
                value_error(std::string(fn) + ": the batch's total sample weight is " +
                            fmt_double(total) + "; expected > 0 for a mean");
            }
            scale = 1.0 / total;
        } else {
            scale = scale_in.cast<double>();
        }
        py::array_t<double, py::array::c_style> norms;
        if (!norms_in.is_none()) {
            norms = output<double>(fn, "grad_norms", norms_in,
                                   {static_cast<idx>(s.dims.size() - 1)});
        }
        // Read-only params are never written: train_step writes them only with an update.
        T* pp = const_cast<T*>(params.data());
        T* pg = grads.mutable_data();
        const T* px = x.data();
        const T* pw = w_in.is_none() ? nullptr : w.data();
        double* pn = norms_in.is_none() ? nullptr : norms.mutable_data();
        py::gil_scoped_release nogil;
        return plan.train_step(pp, pg, px, rows, pidx, n, ptarget, pw, loss, scale, l2,
                               accumulate, pn, num_threads(), fused ? &upd : nullptr);
    }

    template <typename T>
    py::object fwd(MlpPlan<T>& plan, py::handle p_in, py::handle x_in, py::handle out_in) {
        const char* fn = "MLPPlan.forward";
        const MlpShape& s = plan.shape();
        auto params = flat<T>(fn, "params", p_in, s.n_params(), false);
        auto x = input<T>(fn, "x", x_in, 2, 2);
        if (x.shape(1) != s.dims.front()) {
            value_error(std::string(fn) + ": x.shape is " + shape_str(x) + "; expected (n, " +
                        std::to_string(s.dims.front()) + ")");
        }
        const idx n = x.shape(0);
        auto out = output<T>(fn, "out", out_in, {n, s.dims.back()});
        check_no_overlap(fn, "out", out, {{"x", &x}, {"params", &params}});
        if (n > 0) {
            const T *pp = params.data(), *px = x.data();
            T* po = out.mutable_data();
            py::gil_scoped_release nogil;
            plan.forward(pp, px, n, po, num_threads());
        }
        return std::move(out);
    }

    std::unique_ptr<MlpPlan<float>> f32_;
    std::unique_ptr<MlpPlan<double>> f64_;
};

}  // namespace

void bind_plan(py::module_& m) {
    py::class_<PyPlan>(m, "MLPPlan", R"doc(Compiled training step of a multilayer perceptron.

MLPPlan(dims, activations, dtype="float32", negative_slope=0.01)

dims = [d_0, ..., d_L]; activations has one name per layer, the last applied
only by forward() (the training loss takes logits). Parameters live in one
flat buffer W1, b1, W2, b2, ... with each W row-major (d_in, d_out); the
gradients use the same layout. Not for concurrent use from several threads
(calls on one plan serialise).)doc")
        .def(py::init<std::vector<idx>, std::vector<std::string>, const std::string&, double>(),
             "dims"_a, "activations"_a, "dtype"_a = "float32", "negative_slope"_a = 0.01)
        .def_property_readonly("dims", [](const PyPlan& p) { return p.shape().dims; })
        .def_property_readonly("dtype", &PyPlan::dtype)
        .def_property_readonly("n_params", [](const PyPlan& p) { return p.shape().n_params(); })
        .def_property_readonly("workspace_bytes", &PyPlan::workspace_bytes)
        .def("train_step", &PyPlan::train_step, "params"_a, "grads"_a, "x"_a, "targets"_a,
             py::kw_only(), "loss"_a, "indices"_a = py::none(), "sample_weight"_a = py::none(),
             "scale"_a = py::none(), "l2"_a = 0.0, "accumulate"_a = false, "grad_norms"_a = py::none(),
             "update"_a = py::none(),
             R"doc(Gather, forward, loss and backward for one mini-batch; returns the loss.

x (rows, d_0) is the whole data set and indices (n,) pick the batch (all rows
if None). targets: integer labels (rows,) for softmax_cross_entropy, values
(rows, d_L) otherwise. Loss = scale * sum_i w_i loss_i + l2/2 * sum ||W||^2;
scale defaults to the mean (over rows, and over outputs for BCE and squared
error). Writes d loss / d params into grads (adds with accumulate=True).

update: also take one optimizer step in the same call, each layer's (W, b)
updated as soon as its gradient is final, bit for bit what sgd_step /
adam_step on the flat buffers would do afterwards: {'kind': 'sgd', 'lr': ...,
'momentum', 'dampening', 'weight_decay', 'nesterov', 'first_step',
'momentum_buffer'} or {'kind': 'adam', 'lr': ..., 'beta1', 'beta2', 'eps',
'weight_decay', 'decoupled', 'step', 'exp_avg', 'exp_avg_sq'} (buffers flat,
like params). Skipped if the loss is not finite (params keep their values).)doc")
        .def("forward", &PyPlan::forward, "params"_a, "x"_a, py::kw_only(), "out"_a = py::none(),
             "Inference: out (n, d_L) = the network applied to x (n, d_0).");
}
