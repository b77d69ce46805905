// chainrule._core: the native kernels as NumPy functions.
//
// Each binding does four things, in order: check dtypes and contiguity, check
// shapes, allocate (or check) the outputs, then release the GIL and call the
// dispatched kernel. Dtype policy: float32 and float64 only; the dtype of the
// first float argument picks the kernel and the other float arguments must
// match it (TypeError otherwise, never a silent cast). Labels, targets and
// sample weights are converted. Non-contiguous inputs are copied.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <string>

#include "../dispatch.hpp"
#include "checks.hpp"

namespace py = pybind11;
using namespace py::literals;
using chainrule::Act;
using chainrule::idx;
using chainrule::kernels;
using namespace chainrule::bind;

namespace {

using Arr = py::array;

Act parse_act(const char* fn, const std::string& name) {
    if (name == "identity" || name == "linear") return Act::identity;
    if (name == "sigmoid" || name == "logistic") return Act::sigmoid;
    if (name == "tanh") return Act::tanh;
    if (name == "relu") return Act::relu;
    if (name == "leaky_relu") return Act::leaky_relu;
    if (name == "softmax") return Act::softmax;
    if (name == "log_softmax") return Act::log_softmax;
    value_error(std::string(fn) + ": activation is '" + name +
                "'; expected one of identity, sigmoid, tanh, relu, leaky_relu, softmax, "
                "log_softmax");
}

bool is_rowwise(Act a) { return a == Act::softmax || a == Act::log_softmax; }

void check_slope(const char* fn, Act act, double slope) {
    if (act == Act::leaky_relu && !(slope >= 0.0 && std::isfinite(slope))) {
        value_error(std::string(fn) + ": negative_slope must be finite and >= 0; got " +
                    fmt_double(slope));
    }
}

// Calls f.template operator()<float or double>() by the dtype of `first`.
template <typename F>
py::object by_dtype(const char* fn, const char* arg, py::handle first, F&& f) {
    return float_kind(fn, arg, first) == Kind::f32 ? f(float{}) : f(double{});
}

int threads() { return chainrule::num_threads(); }

// ---------------------------------------------------------------- gemm
template <typename T>
py::object gemm_impl(py::handle a_in, py::handle b_in, bool ta, bool tb, double alpha,
                     double beta, py::handle out_in) {
    const char* fn = "gemm";
    auto a = input<T>(fn, "a", a_in, 2, 2);
    auto b = input<T>(fn, "b", b_in, 2, 2);
    const idx m = ta ? a.shape(1) : a.shape(0);
    const idx k = ta ? a.shape(0) : a.shape(1);
    const idx kb = tb ? b.shape(1) : b.shape(0);
    const idx n = tb ? b.shape(0) : b.shape(1);
    if (kb != k) {
        value_error(std::string(fn) + ": b.shape is " + shape_str(b) + " with trans_b=" +
                    (tb ? "True" : "False") + "; expected op(b) to have k = " +
                    std::to_string(k) + " rows, the columns of op(a) (a.shape " +
                    shape_str(a) + ", trans_a=" + (ta ? "True" : "False") + ")");
    }
    if (beta != 0.0 && out_in.is_none()) {
        value_error(std::string(fn) + ": beta is " + fmt_double(beta) +
                    "; a nonzero beta needs out= holding C");
    }
    auto c = output<T>(fn, "out", out_in, {m, n});
    check_no_overlap(fn, "out", c, {{"a", &a}, {"b", &b}});
    if (m * n > 0) {
        const T* pa = a.data();
        const T* pb = b.data();
        T* pc = c.mutable_data();
        const idx lda = a.shape(1), ldb = b.shape(1);
        py::gil_scoped_release nogil;
        kernels<T>().gemm(ta, tb, m, n, k, static_cast<T>(alpha), pa, lda, pb, ldb,
                          static_cast<T>(beta), pc, n, threads());
    }
    return std::move(c);
}

// The public gemm: a METH_FASTCALL function in front of the pybind11 binding
// (registered as _gemm). pybind11 finds each keyword argument by name on every
// call that has any (about 0.3 us, as long as a 16 x 16 product takes), and
// gemm is the kernel called in loops on small matrices. This entry parses the
// common call itself: a and b by position, keywords of the signature with
// exact True/False, float or int values. Every other call (other types, a or b
// by keyword, a wrong keyword) goes on to _gemm unchanged, so conversions and
// error messages are pybind11's.
namespace fast_gemm {

PyObject* binding = nullptr;  // _gemm; the module holds it too
PyObject* names[5] = {};      // trans_a, trans_b, alpha, beta, out (interned)

int keyword_index(PyObject* key) {
    for (int i = 0; i < 5; ++i)
        if (key == names[i]) return i;
    for (int i = 0; i < 5; ++i)
        if (PyUnicode_Compare(key, names[i]) == 0) return i;
    PyErr_Clear();  // PyUnicode_Compare on a non-str key
    return -1;
}

// Exact bool -> 0/1; anything else -> -1 (left to pybind11).
int exact_bool(PyObject* v) { return v == Py_True ? 1 : v == Py_False ? 0 : -1; }

// Exact float or int -> true and *x; anything else -> false (left to pybind11).
bool exact_number(PyObject* v, double* x) {
    if (PyFloat_CheckExact(v)) {
        *x = PyFloat_AS_DOUBLE(v);
        return true;
    }
    if (PyLong_CheckExact(v)) {
        *x = PyLong_AsDouble(v);
        if (*x == -1.0 && PyErr_Occurred()) {
            PyErr_Clear();
            return false;
        }
        return true;
    }
    return false;
}

PyObject* call(PyObject*, PyObject* const* args, Py_ssize_t nargsf, PyObject* kwnames) {
    const Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    const Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    bool ta = false, tb = false;
    double alpha = 1.0, beta = 0.0;
    PyObject* out = Py_None;
    bool fast = nargs == 2;
    for (Py_ssize_t i = 0; fast && i < nkw; ++i) {
        PyObject* v = args[nargs + i];
        switch (keyword_index(PyTuple_GET_ITEM(kwnames, i))) {
            case 0: fast = exact_bool(v) >= 0, ta = v == Py_True; break;
            case 1: fast = exact_bool(v) >= 0, tb = v == Py_True; break;
            case 2: fast = exact_number(v, &alpha); break;
            case 3: fast = exact_number(v, &beta); break;
            case 4: out = v; break;
            default: fast = false;
        }
    }
    if (!fast) return PyObject_Vectorcall(binding, args, nargsf, kwnames);
    try {
        py::object c = by_dtype("gemm", "a", args[0], [&](auto t) {
            return gemm_impl<decltype(t)>(args[0], args[1], ta, tb, alpha, beta, out);
        });
        return c.release().ptr();
    } catch (py::error_already_set& e) {
        e.restore();
    } catch (py::builtin_exception& e) {
        e.set_error();
    } catch (const std::bad_alloc&) {
        PyErr_NoMemory();
    } catch (const std::exception& e) {
        PyErr_SetString(PyExc_RuntimeError, e.what());
    }
    return nullptr;
}

#define CHAINRULE_GEMM_DOC                                                               \
    "C = alpha * op(a) @ op(b) + beta * C.\n\n"                                             \
    "op(a) is (m, k): a.T if trans_a else a; op(b) is (k, n). float32 or float64,\n"        \
    "both the same dtype. With beta != 0, out= holds C and is updated in place;\n"          \
    "with beta == 0, out is never read. Returns C of shape (m, n)."

// The text signature line lets inspect.signature and help() show the
// parameters of this builtin.
PyMethodDef def = {
    "gemm", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&call)),
    METH_FASTCALL | METH_KEYWORDS,
    "gemm(a, b, *, trans_a=False, trans_b=False, alpha=1.0, beta=0.0, out=None)\n--\n\n"
    CHAINRULE_GEMM_DOC};

void add(py::module_& m) {
    const char* keys[5] = {"trans_a", "trans_b", "alpha", "beta", "out"};
    for (int i = 0; i < 5; ++i) {
        names[i] = PyUnicode_InternFromString(keys[i]);
        if (!names[i]) throw py::error_already_set();
    }
    binding = py::object(m.attr("_gemm")).release().ptr();  // kept for the module's life
    py::object module_name = m.attr("__name__");
    PyObject* f = PyCFunction_NewEx(&def, nullptr, module_name.ptr());
    if (!f) throw py::error_already_set();
    m.add_object("gemm", py::reinterpret_steal<py::object>(f));
}

}  // namespace fast_gemm

// ---------------------------------------------------------------- dense
template <typename T>
py::object dense_forward_impl(py::handle x_in, py::handle w_in, py::handle b_in,
                              const std::string& activation, double slope,
                              py::handle out_in) {
    const char* fn = "dense_forward";
    auto x = input<T>(fn, "x", x_in, 2, 2);
    auto w = input<T>(fn, "w", w_in, 2, 2);
    py::array_t<T, py::array::c_style> b;
    const bool has_b = !b_in.is_none();
    if (has_b) b = input<T>(fn, "b", b_in, 1, 1);
    const Act act = parse_act(fn, activation);
    check_slope(fn, act, slope);
    const idx n = x.shape(0), d_in = x.shape(1), d_out = w.shape(1);
    if (w.shape(0) != d_in) {
        value_error(std::string(fn) + ": w.shape is " + shape_str(w) +
                    "; expected (d_in, d_out) with d_in = x.shape[1] = " + std::to_string(d_in));
    }
    if (has_b && b.shape(0) != d_out) {
        value_error(std::string(fn) + ": b.shape is " + shape_str(b) +
                    "; expected (d_out,) with d_out = w.shape[1] = " + std::to_string(d_out));
    }
    auto y = output<T>(fn, "out", out_in, {n, d_out});
    check_no_overlap(fn, "out", y, {{"x", &x}, {"w", &w}, {"b", has_b ? &b : nullptr}});
    if (n * d_out > 0) {
        const T *px = x.data(), *pw = w.data(), *pb = has_b ? b.data() : nullptr;
        T* py_ = y.mutable_data();
        py::gil_scoped_release nogil;
        kernels<T>().dense_forward(px, pw, pb, py_, n, d_in, d_out, act, static_cast<T>(slope),
                                   threads());
    }
    return std::move(y);
}

template <typename T>
py::array_t<T, py::array::c_style> grad_buffer(const char* fn, const char* arg, py::handle obj,
                                               std::vector<idx> shape, bool accumulate) {
    if (accumulate && obj.is_none()) {
        value_error(std::string(fn) + ": accumulate=True needs the " + arg +
                    "= buffer to add into; got None");
    }
    return output<T>(fn, arg, obj, shape);
}

template <typename T>
py::object dense_vjp_impl(py::handle x_in, py::handle w_in, py::handle gz_in, py::handle gx_in,
                          py::handle gw_in, py::handle gb_in, bool need_gx, bool need_gw,
                          bool need_gb, bool accumulate) {
    const char* fn = "dense_vjp";
    auto x = input<T>(fn, "x", x_in, 2, 2);
    auto w = input<T>(fn, "w", w_in, 2, 2);
    auto gz = input<T>(fn, "gz", gz_in, 2, 2);
    const idx n = x.shape(0), d_in = x.shape(1), d_out = w.shape(1);
    if (w.shape(0) != d_in) {
        value_error(std::string(fn) + ": w.shape is " + shape_str(w) +
                    "; expected (d_in, d_out) with d_in = x.shape[1] = " + std::to_string(d_in));
    }
    if (gz.shape(0) != n || gz.shape(1) != d_out) {
        value_error(std::string(fn) + ": gz.shape is " + shape_str(gz) +
                    "; expected (n, d_out) = (" + std::to_string(n) + ", " +
                    std::to_string(d_out) + ")");
    }
    py::array_t<T, py::array::c_style> gx, gw, gb;
    if (need_gx) gx = grad_buffer<T>(fn, "gx", gx_in, {n, d_in}, accumulate);
    if (need_gw) gw = grad_buffer<T>(fn, "gw", gw_in, {d_in, d_out}, accumulate);
    if (need_gb) gb = grad_buffer<T>(fn, "gb", gb_in, {d_out}, accumulate);
    const std::initializer_list<std::pair<const char*, const py::array*>> ins = {
        {"x", &x}, {"w", &w}, {"gz", &gz}};
    if (need_gx) check_no_overlap(fn, "gx", gx, ins);
    if (need_gw) check_no_overlap(fn, "gw", gw, ins);
    if (need_gb) check_no_overlap(fn, "gb", gb, ins);
    {
        const T *px = x.data(), *pw = w.data(), *pgz = gz.data();
        T* pgx = need_gx ? gx.mutable_data() : nullptr;
        T* pgw = need_gw ? gw.mutable_data() : nullptr;
        T* pgb = need_gb ? gb.mutable_data() : nullptr;
        py::gil_scoped_release nogil;
        kernels<T>().dense_vjp(px, pw, pgz, pgx, pgw, pgb, n, d_in, d_out, accumulate,
                               threads());
    }
    auto opt = [](bool need, py::array& a) -> py::object {
        return need ? py::object(a) : py::object(py::none());
    };
    return py::make_tuple(opt(need_gx, gx), opt(need_gw, gw), opt(need_gb, gb));
}

// ---------------------------------------------------------------- activations
// Elementwise activations take any shape (seen as one row); softmax and
// log_softmax work along the last axis of a 1-D or 2-D array.
void rows_cols(const py::array& a, Act act, idx& rows, idx& cols) {
    if (is_rowwise(act) && a.ndim() == 2) {
        rows = a.shape(0);
        cols = a.shape(1);
    } else {
        rows = a.size() > 0 ? 1 : 0;
        cols = a.size();
    }
}

std::vector<idx> shape_of(const py::array& a) {
    return std::vector<idx>(a.shape(), a.shape() + a.ndim());
}

template <typename T>
py::object activation_forward_impl(const char* fn, Act act, py::handle x_in, double slope,
                                   py::handle out_in) {
    check_slope(fn, act, slope);
    auto x = input<T>(fn, "x", x_in, is_rowwise(act) ? 1 : 0, is_rowwise(act) ? 2 : 32);
    auto y = output<T>(fn, "out", out_in, shape_of(x));
    if (y.data() != x.data()) check_no_overlap(fn, "out", y, {{"x", &x}});
    idx rows, cols;
    rows_cols(x, act, rows, cols);
    if (rows * cols > 0) {
        const T* px = x.data();
        T* py_ = y.mutable_data();
        py::gil_scoped_release nogil;
        kernels<T>().activation_forward(act, px, py_, rows, cols, static_cast<T>(slope),
                                        threads());
    }
    return std::move(y);
}

template <typename T>
py::object activation_vjp_impl(const char* fn, Act act, py::handle y_in, py::handle gy_in,
                               double slope, py::handle out_in) {
    check_slope(fn, act, slope);
    const int lo = is_rowwise(act) ? 1 : 0, hi = is_rowwise(act) ? 2 : 32;
    auto y = input<T>(fn, "y", y_in, lo, hi);
    auto gy = input<T>(fn, "gy", gy_in, lo, hi);
    if (shape_of(gy) != shape_of(y)) {
        value_error(std::string(fn) + ": gy.shape is " + shape_str(gy) +
                    "; expected y.shape " + shape_str(y));
    }
    auto gx = output<T>(fn, "out", out_in, shape_of(y));
    if (gx.data() != gy.data()) check_no_overlap(fn, "out", gx, {{"y", &y}, {"gy", &gy}});
    else check_no_overlap(fn, "out", gx, {{"y", &y}});
    idx rows, cols;
    rows_cols(y, act, rows, cols);
    if (rows * cols > 0) {
        const T *py_ = y.data(), *pgy = gy.data();
        T* pgx = gx.mutable_data();
        py::gil_scoped_release nogil;
        kernels<T>().activation_vjp(act, py_, pgy, pgx, rows, cols, static_cast<T>(slope),
                                    threads());
    }
    return std::move(gx);
}

// ---------------------------------------------------------------- losses
double reduction_scale(const char* fn, const std::string& reduction, double count) {
    if (reduction == "sum") return 1.0;
    if (reduction != "mean") {
        value_error(std::string(fn) + ": reduction is '" + reduction +
                    "'; expected 'mean' or 'sum'");
    }
    if (!(count > 0.0)) {
        value_error(std::string(fn) +
                    ": reduction='mean' needs at least one sample with positive total weight; "
                    "got a total of " + fmt_double(count));
    }
    return 1.0 / count;
}

template <typename T>
double weights_total(const py::array_t<T, py::array::c_style>& w) {
    double s = 0.0;
    for (idx i = 0; i < w.shape(0); ++i) s += static_cast<double>(w.data()[i]);
    return s;
}

template <typename T>
py::array_t<T, py::array::c_style> sample_weights(const char* fn, py::handle obj, idx n) {
    py::array_t<T, py::array::c_style> w;
    if (obj.is_none()) return w;
    w = converted<T>(fn, "sample_weight", obj, 1, 1);
    if (w.shape(0) != n) {
        value_error(std::string(fn) + ": sample_weight.shape is " + shape_str(w) +
                    "; expected (n,) with n = " + std::to_string(n));
    }
    return w;
}

template <typename T>
py::object softmax_cross_entropy_impl(py::handle z_in, py::handle labels_in, py::handle w_in,
                                      const std::string& reduction, py::handle grad_in,
                                      bool need_grad) {
    const char* fn = "softmax_cross_entropy";
    auto z = input<T>(fn, "logits", z_in, 2, 2);
    const idx n = z.shape(0), k = z.shape(1);
    py::array lab_any = as_array(fn, "labels", labels_in);
    const char kind = lab_any.dtype().kind();
    if (kind != 'i' && kind != 'u') {
        type_error(std::string(fn) + ": labels.dtype is " + dtype_str(lab_any) +
                   "; expected an integer dtype (class indices)");
    }
    check_ndim(fn, "labels", lab_any, 1, 1);
    auto labels = py::array_t<std::int64_t, py::array::c_style | py::array::forcecast>::ensure(
        lab_any);
    if (labels.shape(0) != n) {
        value_error(std::string(fn) + ": labels.shape is " + shape_str(labels) +
                    "; expected (n,) with n = logits.shape[0] = " + std::to_string(n));
    }
    if (k == 0 && n > 0) value_error(std::string(fn) + ": logits has 0 classes");
    const std::int64_t* pl = labels.data();
    for (idx i = 0; i < n; ++i) {
        if (pl[i] < 0 || pl[i] >= k) {
            value_error(std::string(fn) + ": labels[" + std::to_string(i) + "] is " +
                        std::to_string(pl[i]) + "; expected 0 <= label < k = " +
                        std::to_string(k));
        }
    }
    auto w = sample_weights<T>(fn, w_in, n);
    const bool has_w = !w_in.is_none();
    const double scale =
        reduction_scale(fn, reduction, has_w ? weights_total(w) : static_cast<double>(n));
    py::array_t<T, py::array::c_style> g;
    if (need_grad) {
        g = output<T>(fn, "grad", grad_in, {n, k});
        check_no_overlap(fn, "grad", g, {{"logits", &z}});
    }
    double loss = 0.0;
    {
        const T* pz = z.data();
        const T* pw = has_w ? w.data() : nullptr;
        T* pg = need_grad ? g.mutable_data() : nullptr;
        py::gil_scoped_release nogil;
        loss = kernels<T>().softmax_cross_entropy(pz, pl, pw, pg, n, k, scale, threads());
    }
    return py::make_tuple(loss, need_grad ? py::object(g) : py::object(py::none()));
}

// Targets of the same shape as the logits: soft cross-entropy and BCE.
template <typename T, bool Binary>
py::object target_loss_impl(const char* fn, py::handle z_in, py::handle t_in, py::handle w_in,
                            const std::string& reduction, py::handle grad_in, bool need_grad) {
    auto z = input<T>(fn, "logits", z_in, Binary ? 1 : 2, 2);
    auto t = converted<T>(fn, "targets", t_in, z.ndim(), z.ndim());
    if (shape_of(t) != shape_of(z)) {
        value_error(std::string(fn) + ": targets.shape is " + shape_str(t) +
                    "; expected logits.shape " + shape_str(z));
    }
    const idx n = z.shape(0), k = z.ndim() == 2 ? z.shape(1) : 1;
    if (Binary) {
        const T* pt = t.data();
        for (idx i = 0; i < n * k; ++i) {
            if (pt[i] < T(0) || pt[i] > T(1)) {  // NaN passes and propagates
                value_error(std::string(fn) + ": targets hold " + fmt_double(pt[i]) +
                            " at flat index " + std::to_string(i) + "; expected values in [0, 1]");
            }
        }
    }
    auto w = sample_weights<T>(fn, w_in, n);
    const bool has_w = !w_in.is_none();
    const double per_row = Binary ? static_cast<double>(k) : 1.0;
    const double scale = reduction_scale(
        fn, reduction, (has_w ? weights_total(w) : static_cast<double>(n)) * per_row);
    py::array_t<T, py::array::c_style> g;
    if (need_grad) {
        g = output<T>(fn, "grad", grad_in, shape_of(z));
        check_no_overlap(fn, "grad", g, {{"logits", &z}, {"targets", &t}});
    }
    double loss = 0.0;
    {
        const T *pz = z.data(), *pt = t.data();
        const T* pw = has_w ? w.data() : nullptr;
        T* pg = need_grad ? g.mutable_data() : nullptr;
        py::gil_scoped_release nogil;
        loss = Binary ? kernels<T>().binary_cross_entropy(pz, pt, pw, pg, n, k, scale, threads())
                      : kernels<T>().soft_cross_entropy(pz, pt, pw, pg, n, k, scale, threads());
    }
    return py::make_tuple(loss, need_grad ? py::object(g) : py::object(py::none()));
}

// ---------------------------------------------------------------- optimizers
template <typename T>
py::array_t<T, py::array::c_style> state(const char* fn, const char* arg, py::handle obj,
                                         const std::vector<idx>& shape) {
    if (obj.is_none()) {
        value_error(std::string(fn) + ": " + arg + " is None; expected a buffer of shape " +
                    shape_str(shape));
    }
    return output<T>(fn, arg, obj, shape);
}

void check_finite(const char* fn, const char* name, double v) {
    if (!std::isfinite(v)) {
        value_error(std::string(fn) + ": " + name + " must be finite; got " + fmt_double(v));
    }
}

template <typename T>
void sgd_step_impl(py::handle p_in, py::handle g_in, py::handle buf_in, double lr,
                   double momentum, double dampening, double wd, bool nesterov,
                   bool first_step) {
    const char* fn = "sgd_step";
    for (auto [name, v] : {std::pair{"lr", lr}, {"momentum", momentum},
                           {"dampening", dampening}, {"weight_decay", wd}}) {
        check_finite(fn, name, v);
    }
    py::array p_any = as_array(fn, "param", p_in);
    auto p = state<T>(fn, "param", p_in, shape_of(p_any));
    auto g = input<T>(fn, "grad", g_in, 0, 32);
    if (g.size() != p.size()) {
        value_error(std::string(fn) + ": grad.shape is " + shape_str(g) +
                    "; expected param.shape " + shape_str(p));
    }
    py::array_t<T, py::array::c_style> buf;
    if (momentum != 0.0) buf = state<T>(fn, "momentum_buffer", buf_in, shape_of(p));
    check_no_overlap(fn, "param", p, {{"grad", &g}, {"momentum_buffer", momentum != 0.0 ? &buf : nullptr}});
    T* pp = p.mutable_data();
    const T* pg = g.data();
    T* pb = momentum != 0.0 ? buf.mutable_data() : nullptr;
    const idx size = p.size();
    py::gil_scoped_release nogil;
    kernels<T>().sgd_step(pp, pg, pb, size, T(lr), T(momentum), T(dampening), T(wd), nesterov,
                          first_step, threads());
}

template <typename T>
void adam_step_impl(py::handle p_in, py::handle g_in, py::handle m_in, py::handle v_in,
                    std::int64_t step, double lr, double b1, double b2, double eps, double wd,
                    bool decoupled) {
    const char* fn = "adam_step";
    for (auto [name, v] : {std::pair{"lr", lr}, {"beta1", b1}, {"beta2", b2}, {"eps", eps},
                           {"weight_decay", wd}}) {
        check_finite(fn, name, v);
    }
    if (step < 1) value_error(std::string(fn) + ": step must be >= 1; got " + std::to_string(step));
    py::array p_any = as_array(fn, "param", p_in);
    auto p = state<T>(fn, "param", p_in, shape_of(p_any));
    auto g = input<T>(fn, "grad", g_in, 0, 32);
    if (g.size() != p.size()) {
        value_error(std::string(fn) + ": grad.shape is " + shape_str(g) +
                    "; expected param.shape " + shape_str(p));
    }
    auto m = state<T>(fn, "exp_avg", m_in, shape_of(p));
    auto v = state<T>(fn, "exp_avg_sq", v_in, shape_of(p));
    check_no_overlap(fn, "param", p, {{"grad", &g}, {"exp_avg", &m}, {"exp_avg_sq", &v}});
    check_no_overlap(fn, "exp_avg", m, {{"exp_avg_sq", &v}});
    T *pp = p.mutable_data(), *pm = m.mutable_data(), *pv = v.mutable_data();
    const T* pg = g.data();
    const idx size = p.size();
    py::gil_scoped_release nogil;
    kernels<T>().adam_step(pp, pg, pm, pv, size, lr, b1, b2, eps, wd, decoupled,
                           step, threads());
}

template <typename T>
py::object column_sums_impl(py::handle a_in, py::handle out_in, bool accumulate) {
    const char* fn = "column_sums";
    auto a = input<T>(fn, "a", a_in, 2, 2);
    if (accumulate && out_in.is_none()) {
        value_error(std::string(fn) + ": accumulate=True needs out= to add into; got None");
    }
    auto out = output<T>(fn, "out", out_in, {static_cast<idx>(a.shape(1))});
    check_no_overlap(fn, "out", out, {{"a", &a}});
    const T* pa = a.data();
    T* po = out.mutable_data();
    const idx n = a.shape(0), d = a.shape(1);
    {
        py::gil_scoped_release nogil;
        kernels<T>().column_sums(pa, po, n, d, accumulate, threads());
    }
    return std::move(out);
}

}  // namespace

void bind_plan(py::module_& m);  // plan.cpp

PYBIND11_MODULE(_core, m) {
    m.doc() = "chainrule's native kernels (see chainrule.kernels for the documented API).";

    m.def("isa", [] { return std::string(chainrule::table().isa); },
          "The instruction set of the kernels in use: 'scalar', 'avx2' or 'avx512'.");
    m.def("available_isas", &chainrule::available_isas,
          "Instruction sets this CPU can run, lowest first.");
    m.def(
        "set_isa",
        [](const std::string& name) {
            if (!chainrule::set_isa(name)) {
                std::string have;
                for (const auto& s : chainrule::available_isas()) have += (have.empty() ? "" : ", ") + s;
                value_error("set_isa: '" + name + "' is not available; expected one of " + have);
            }
        },
        "name"_a, "Switch every kernel to the given instruction set (for tests and benchmarks).");
    m.def("_isa_env_problem", [] { return chainrule::isa_env_problem(); });
    m.def("get_num_threads", &chainrule::num_threads,
          "Threads the kernels may use for problems large enough to split.");
    m.def(
        "set_num_threads",
        [](py::object n_obj) {
            if (!py::isinstance<py::int_>(n_obj) || py::isinstance<py::bool_>(n_obj)) {
                type_error("set_num_threads: n is a " +
                           py::str(py::type::of(n_obj)).cast<std::string>() +
                           "; expected an int");
            }
            long long n = n_obj.cast<long long>();
            if (n < 1 || n > 4096) {
                value_error("set_num_threads: n must be in [1, 4096]; got " + std::to_string(n));
            }
            chainrule::set_num_threads(static_cast<int>(n));
        },
        "n"_a, "Set the number of threads; results are bit-identical for any count.");
    m.def("_build_info", [] {
        py::dict d;
#ifdef _OPENMP
        d["openmp"] = _OPENMP;
#else
        d["openmp"] = py::none();
#endif
        d["compiler"] = std::string(__VERSION__);
        d["isa_flags"] = std::string(
            "scalar: -O3; avx2: -O3 -mavx2 -mfma; avx512: -O3 -mavx512f -mavx512vl "
            "-mavx512bw -mavx512dq -mavx2 -mfma");
        return d;
    });

    // The full binding, named gemm in its messages and kept as _gemm: the
    // public gemm (fast_gemm above) parses the common calls and passes the
    // others on to it.
    m.add_object(
        "_gemm",
        py::cpp_function(
            [](py::object a, py::object b, bool ta, bool tb, double alpha, double beta,
               py::object out) {
                return by_dtype("gemm", "a", a, [&](auto t) {
                    return gemm_impl<decltype(t)>(a, b, ta, tb, alpha, beta, out);
                });
            },
            py::name("gemm"), py::scope(m), "a"_a, "b"_a, py::kw_only(), "trans_a"_a = false,
            "trans_b"_a = false, "alpha"_a = 1.0, "beta"_a = 0.0, "out"_a = py::none(),
            CHAINRULE_GEMM_DOC));
    fast_gemm::add(m);

    m.def(
        "dense_forward",
        [](py::object x, py::object w, py::object b, const std::string& act, double slope,
           py::object out) {
            return by_dtype("dense_forward", "x", x, [&](auto t) {
                return dense_forward_impl<decltype(t)>(x, w, b, act, slope, out);
            });
        },
        "x"_a, "w"_a, "b"_a = py::none(), py::kw_only(), "activation"_a = "identity",
        "negative_slope"_a = 0.01, "out"_a = py::none(),
        R"doc(y = act(x @ w + b), fused in one pass.

x : (n, d_in); w : (d_in, d_out) (scikit-learn's layout); b : (d_out,) or None.
activation: identity, sigmoid, tanh, relu, leaky_relu, softmax, log_softmax.
Returns y : (n, d_out), the dtype of x.)doc");

    m.def(
        "dense_vjp",
        [](py::object x, py::object w, py::object gz, py::object gx, py::object gw,
           py::object gb, bool need_gx, bool need_gw, bool need_gb, bool accumulate) {
            return by_dtype("dense_vjp", "x", x, [&](auto t) {
                return dense_vjp_impl<decltype(t)>(x, w, gz, gx, gw, gb, need_gx, need_gw,
                                                   need_gb, accumulate);
            });
        },
        "x"_a, "w"_a, "gz"_a, py::kw_only(), "gx"_a = py::none(), "gw"_a = py::none(),
        "gb"_a = py::none(), "need_gx"_a = true, "need_gw"_a = true, "need_gb"_a = true,
        "accumulate"_a = false,
        R"doc(Backward of z = x @ w + b: (gx, gw, gb) = (gz @ w.T, x.T @ gz, gz.sum(0)).

Entries not needed are None. accumulate=True adds into the given buffers.)doc");

    m.def(
        "activation_forward",
        [](const std::string& name, py::object x, double slope, py::object out) {
            const Act act = parse_act("activation_forward", name);
            return by_dtype("activation_forward", "x", x, [&](auto t) {
                return activation_forward_impl<decltype(t)>("activation_forward", act, x, slope,
                                                            out);
            });
        },
        "name"_a, "x"_a, py::kw_only(), "negative_slope"_a = 0.01, "out"_a = py::none(),
        "y = act(x); softmax and log_softmax along the last axis of a 1-D or 2-D x.");
    m.def(
        "activation_vjp",
        [](const std::string& name, py::object y, py::object gy, double slope, py::object out) {
            const Act act = parse_act("activation_vjp", name);
            return by_dtype("activation_vjp", "y", y, [&](auto t) {
                return activation_vjp_impl<decltype(t)>("activation_vjp", act, y, gy, slope,
                                                        out);
            });
        },
        "name"_a, "y"_a, "gy"_a, py::kw_only(), "negative_slope"_a = 0.01, "out"_a = py::none(),
        "gx = J^T gy for y = act(x), computed from the forward output y.");

    // Named twins: relu_forward(x, out=None), relu_vjp(y, gy, out=None), ...
    struct Named {
        const char* fwd;
        const char* vjp;
        Act act;
    };
    for (const Named& nm : {Named{"identity_forward", "identity_vjp", Act::identity},
                            Named{"sigmoid_forward", "sigmoid_vjp", Act::sigmoid},
                            Named{"tanh_forward", "tanh_vjp", Act::tanh},
                            Named{"relu_forward", "relu_vjp", Act::relu},
                            Named{"leaky_relu_forward", "leaky_relu_vjp", Act::leaky_relu},
                            Named{"softmax_forward", "softmax_vjp", Act::softmax},
                            Named{"log_softmax_forward", "log_softmax_vjp", Act::log_softmax}}) {
        const Act act = nm.act;
        const char* fwd = nm.fwd;
        const char* vjp = nm.vjp;
        if (act == Act::leaky_relu) {
            m.def(fwd,
                  [act, fwd](py::object x, double slope, py::object out) {
                      return by_dtype(fwd, "x", x, [&](auto t) {
                          return activation_forward_impl<decltype(t)>(fwd, act, x, slope, out);
                      });
                  },
                  "x"_a, py::kw_only(), "negative_slope"_a = 0.01, "out"_a = py::none(),
                  "y = x if x > 0 else negative_slope * x.");
            m.def(vjp,
                  [act, vjp](py::object y, py::object gy, double slope, py::object out) {
                      return by_dtype(vjp, "y", y, [&](auto t) {
                          return activation_vjp_impl<decltype(t)>(vjp, act, y, gy, slope, out);
                      });
                  },
                  "y"_a, "gy"_a, py::kw_only(), "negative_slope"_a = 0.01, "out"_a = py::none(),
                  "gx = gy where y > 0, negative_slope * gy elsewhere.");
        } else {
            m.def(fwd,
                  [act, fwd](py::object x, py::object out) {
                      return by_dtype(fwd, "x", x, [&](auto t) {
                          return activation_forward_impl<decltype(t)>(fwd, act, x, 0.0, out);
                      });
                  },
                  "x"_a, py::kw_only(), "out"_a = py::none(),
                  (std::string("Forward of the ") + fwd + " activation (see chainrule.kernels).").c_str());
            m.def(vjp,
                  [act, vjp](py::object y, py::object gy, py::object out) {
                      return by_dtype(vjp, "y", y, [&](auto t) {
                          return activation_vjp_impl<decltype(t)>(vjp, act, y, gy, 0.0, out);
                      });
                  },
                  "y"_a, "gy"_a, py::kw_only(), "out"_a = py::none(),
                  (std::string("VJP from the forward output (see chainrule.kernels): ") + vjp).c_str());
        }
    }

    m.def(
        "softmax_cross_entropy",
        [](py::object z, py::object labels, py::object w, const std::string& reduction,
           py::object grad, bool need_grad) {
            return by_dtype("softmax_cross_entropy", "logits", z, [&](auto t) {
                return softmax_cross_entropy_impl<decltype(t)>(z, labels, w, reduction, grad,
                                                               need_grad);
            });
        },
        "logits"_a, "labels"_a, py::kw_only(), "sample_weight"_a = py::none(),
        "reduction"_a = "mean", "grad"_a = py::none(), "need_grad"_a = true,
        "Softmax cross-entropy from logits (n, k) and integer labels (n,): (loss, grad).");
    m.def(
        "soft_cross_entropy",
        [](py::object z, py::object t, py::object w, const std::string& reduction,
           py::object grad, bool need_grad) {
            return by_dtype("soft_cross_entropy", "logits", z, [&](auto tag) {
                return target_loss_impl<decltype(tag), false>("soft_cross_entropy", z, t, w,
                                                              reduction, grad, need_grad);
            });
        },
        "logits"_a, "targets"_a, py::kw_only(), "sample_weight"_a = py::none(),
        "reduction"_a = "mean", "grad"_a = py::none(), "need_grad"_a = true,
        "Softmax cross-entropy from logits (n, k) and probability targets (n, k): (loss, grad).");
    m.def(
        "binary_cross_entropy",
        [](py::object z, py::object t, py::object w, const std::string& reduction,
           py::object grad, bool need_grad) {
            return by_dtype("binary_cross_entropy", "logits", z, [&](auto tag) {
                return target_loss_impl<decltype(tag), true>("binary_cross_entropy", z, t, w,
                                                             reduction, grad, need_grad);
            });
        },
        "logits"_a, "targets"_a, py::kw_only(), "sample_weight"_a = py::none(),
        "reduction"_a = "mean", "grad"_a = py::none(), "need_grad"_a = true,
        "Binary cross-entropy from logits (n,) or (n, k), targets in [0, 1]: (loss, grad).");

    m.def(
        "sgd_step",
        [](py::object p, py::object g, py::object buf, double lr, double momentum,
           double dampening, double wd, bool nesterov, bool first_step) {
            by_dtype("sgd_step", "param", p, [&](auto t) {
                sgd_step_impl<decltype(t)>(p, g, buf, lr, momentum, dampening, wd, nesterov,
                                           first_step);
                return py::object(py::none());
            });
        },
        "param"_a, "grad"_a, "momentum_buffer"_a = py::none(), py::kw_only(), "lr"_a,
        "momentum"_a = 0.0, "dampening"_a = 0.0, "weight_decay"_a = 0.0, "nesterov"_a = false,
        "first_step"_a = false, "One torch.optim.SGD step, in place.");
    m.def(
        "adam_step",
        [](py::object p, py::object g, py::object mo, py::object v, std::int64_t step, double lr,
           double b1, double b2, double eps, double wd, bool decoupled) {
            by_dtype("adam_step", "param", p, [&](auto t) {
                adam_step_impl<decltype(t)>(p, g, mo, v, step, lr, b1, b2, eps, wd, decoupled);
                return py::object(py::none());
            });
        },
        "param"_a, "grad"_a, "exp_avg"_a, "exp_avg_sq"_a, py::kw_only(), "step"_a, "lr"_a,
        "beta1"_a = 0.9, "beta2"_a = 0.999, "eps"_a = 1e-8, "weight_decay"_a = 0.0,
        "decoupled"_a = false, "One torch.optim.Adam (or AdamW if decoupled) step, in place.");
    m.def(
        "column_sums",
        [](py::object a, py::object out, bool accumulate) {
            return by_dtype("column_sums", "a", a, [&](auto t) {
                return column_sums_impl<decltype(t)>(a, out, accumulate);
            });
        },
        "a"_a, py::kw_only(), "out"_a = py::none(), "accumulate"_a = false,
        "out = a.sum(axis=0), rows added in order.");

    bind_plan(m);
}
