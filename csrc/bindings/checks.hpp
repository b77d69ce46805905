// Argument checking for the bindings: dtype, ndim, contiguity, shapes and
// output buffers, with messages that name the function and argument and say
// what was expected and what was got. The only other file that sees pybind11
// is module.cpp.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <initializer_list>
#include <string>
#include <vector>

namespace chainrule {
namespace bind {

namespace py = pybind11;
using idx = std::int64_t;

[[noreturn]] inline void type_error(const std::string& msg) { throw py::type_error(msg); }
[[noreturn]] inline void value_error(const std::string& msg) { throw py::value_error(msg); }

inline std::string shape_str(const py::array& a) {
    std::string s = "(";
    for (py::ssize_t i = 0; i < a.ndim(); ++i) {
        if (i) s += ", ";
        s += std::to_string(a.shape(i));
    }
    return s + (a.ndim() == 1 ? ",)" : ")");
}

inline std::string shape_str(const std::vector<idx>& shape) {
    std::string s = "(";
    for (size_t i = 0; i < shape.size(); ++i) {
        if (i) s += ", ";
        s += std::to_string(shape[i]);
    }
    return s + (shape.size() == 1 ? ",)" : ")");
}

inline std::string dtype_str(const py::array& a) { return py::str(a.dtype()).cast<std::string>(); }

template <typename T>
const char* dtype_name() {
    return sizeof(T) == 4 ? "float32" : "float64";
}

// NumPy type numbers of float32 and float64 (NPY_FLOAT, NPY_DOUBLE). Byte
// order is not part of the number, so '>f4' is accepted and converted.
constexpr int kNpyFloat = 11;
constexpr int kNpyDouble = 12;

enum class Kind { f32, f64 };

// Turns any array-like into an ndarray without copying an ndarray.
inline py::array as_array(const char* fn, const char* arg, py::handle obj) {
    if (obj.is_none()) {
        type_error(std::string(fn) + ": " + arg + " is None; expected a float32 or float64 array");
    }
    // An ndarray is taken as it is: PyArray_FromAny's dtype and shape
    // discovery would cost more than a small kernel (a 16 x 16 GEMM).
    if (py::isinstance<py::array>(obj)) return py::reinterpret_borrow<py::array>(obj);
    py::array a = py::array::ensure(obj);
    if (!a) {
        PyErr_Clear();
        type_error(std::string(fn) + ": " + arg + " is a " +
                   py::str(py::type::of(obj)).cast<std::string>() +
                   "; expected a float32 or float64 array");
    }
    return a;
}

// Which kernel set serves this call: decided by the first float argument.
inline Kind float_kind(const char* fn, const char* arg, py::handle obj) {
    py::array a = as_array(fn, arg, obj);
    const int num = a.dtype().num();
    if (num == kNpyFloat) return Kind::f32;
    if (num == kNpyDouble) return Kind::f64;
    type_error(std::string(fn) + ": " + arg + ".dtype is " + dtype_str(a) +
               "; expected float32 or float64 (other dtypes are not converted: use .astype)");
}

inline void check_ndim(const char* fn, const char* arg, const py::array& a, int lo, int hi) {
    const int nd = static_cast<int>(a.ndim());
    if (nd < lo || nd > hi) {
        std::string want = lo == hi ? std::to_string(lo)
                                    : std::to_string(lo) + " or " + std::to_string(hi);
        value_error(std::string(fn) + ": " + arg + ".ndim is " + std::to_string(nd) +
                    " (shape " + shape_str(a) + "); expected " + want);
    }
}

// A C-contiguous copy of `a` when it is not one already. A copy that cannot
// be had raises MemoryError naming the function and argument.
template <typename T>
py::array_t<T, py::array::c_style> contiguous(const char* fn, const char* arg, const py::array& a) {
    // Already what the kernel reads (the common case): no conversion call.
    const int flags = py::detail::array_proxy(a.ptr())->flags;
    constexpr int ready = py::detail::npy_api::NPY_ARRAY_C_CONTIGUOUS_ |
                          py::detail::npy_api::NPY_ARRAY_ALIGNED_;
    if ((flags & ready) == ready && a.dtype().num() == (sizeof(T) == 4 ? kNpyFloat : kNpyDouble) &&
        a.dtype().byteorder() != '>') {
        return py::reinterpret_borrow<py::array_t<T, py::array::c_style>>(a);
    }
    auto c = py::array_t<T, py::array::c_style | py::array::forcecast>::ensure(a);
    if (!c) {  // ensure() has cleared the error; with the dtype checked, memory is what failed
        const std::string msg = std::string(fn) + ": cannot make a contiguous copy of " + arg +
                                " (shape " + shape_str(a) + ", " +
                                std::to_string(a.size()) + " elements): out of memory";
        PyErr_SetString(PyExc_MemoryError, msg.c_str());
        throw py::error_already_set();
    }
    return c;
}

// A C-contiguous array of T. The dtype must already be T (no silent
// float64 -> float32 casts); a non-contiguous or byte-swapped input is copied.
template <typename T>
py::array_t<T, py::array::c_style> input(const char* fn, const char* arg, py::handle obj,
                                         int ndim_lo, int ndim_hi) {
    py::array a = as_array(fn, arg, obj);
    const int want = sizeof(T) == 4 ? kNpyFloat : kNpyDouble;
    if (a.dtype().num() != want) {
        type_error(std::string(fn) + ": " + arg + ".dtype is " + dtype_str(a) + "; expected " +
                   dtype_name<T>() + " like the other inputs");
    }
    check_ndim(fn, arg, a, ndim_lo, ndim_hi);
    return contiguous<T>(fn, arg, a);
}

// Like input<T>, but converts any real dtype to T: for targets and weights,
// which are not the data the kernel computes in.
template <typename T>
py::array_t<T, py::array::c_style> converted(const char* fn, const char* arg, py::handle obj,
                                             int ndim_lo, int ndim_hi) {
    py::array a = as_array(fn, arg, obj);
    const char kind = a.dtype().kind();
    if (kind != 'f' && kind != 'i' && kind != 'u' && kind != 'b') {
        type_error(std::string(fn) + ": " + arg + ".dtype is " + dtype_str(a) +
                   "; expected a real number dtype");
    }
    check_ndim(fn, arg, a, ndim_lo, ndim_hi);
    return contiguous<T>(fn, arg, a);
}

inline idx checked_product(const char* fn, const std::vector<idx>& shape) {
    idx total = 1;
    for (idx s : shape) {
        if (s < 0) value_error(std::string(fn) + ": negative dimension in " + shape_str(shape));
        if (__builtin_mul_overflow(total, s, &total)) {
            value_error(std::string(fn) + ": an output of shape " + shape_str(shape) +
                        " has more elements than a 64-bit count can hold");
        }
    }
    return total;
}

inline bool overlaps(const py::array& a, const py::array& b) {
    if (a.nbytes() == 0 || b.nbytes() == 0) return false;
    auto a0 = reinterpret_cast<std::uintptr_t>(a.data());
    auto b0 = reinterpret_cast<std::uintptr_t>(b.data());
    return a0 < b0 + static_cast<std::uintptr_t>(b.nbytes()) &&
           b0 < a0 + static_cast<std::uintptr_t>(a.nbytes());
}

// The output buffer: a new array, or the caller's `out`, which must be a
// C-contiguous, writeable T array of exactly `shape` (it is never copied,
// since the caller wants the result in it).
template <typename T>
py::array_t<T, py::array::c_style> output(const char* fn, const char* arg, py::handle obj,
                                          const std::vector<idx>& shape) {
    checked_product(fn, shape);
    if (obj.is_none()) {
        std::vector<py::ssize_t> s(shape.begin(), shape.end());
        return py::array_t<T, py::array::c_style>(s);  // MemoryError if it cannot be had
    }
    if (!py::isinstance<py::array>(obj)) {
        type_error(std::string(fn) + ": " + arg + " is a " +
                   py::str(py::type::of(obj)).cast<std::string>() + "; expected a " +
                   dtype_name<T>() + " ndarray");
    }
    py::array a = py::reinterpret_borrow<py::array>(obj);
    const int want = sizeof(T) == 4 ? kNpyFloat : kNpyDouble;
    if (a.dtype().num() != want || a.dtype().byteorder() == '>') {
        type_error(std::string(fn) + ": " + arg + ".dtype is " + dtype_str(a) + "; expected " +
                   dtype_name<T>());
    }
    bool same = a.ndim() == static_cast<py::ssize_t>(shape.size());
    for (size_t i = 0; same && i < shape.size(); ++i) same = a.shape(i) == shape[i];
    if (!same) {
        value_error(std::string(fn) + ": " + arg + ".shape is " + shape_str(a) + "; expected " +
                    shape_str(shape));
    }
    const int flags = py::detail::array_proxy(a.ptr())->flags;
    if (!(flags & py::detail::npy_api::NPY_ARRAY_C_CONTIGUOUS_) ||
        !(flags & py::detail::npy_api::NPY_ARRAY_ALIGNED_)) {
        value_error(std::string(fn) + ": " + arg +
                    " must be C-contiguous and aligned; got a strided view (use "
                    "np.ascontiguousarray or leave it None)");
    }
    if (!a.writeable()) value_error(std::string(fn) + ": " + arg + " is read-only");
    return py::reinterpret_borrow<py::array_t<T, py::array::c_style>>(obj);
}

// An output must not share memory with an input it is computed from
// (the kernels read inputs while writing outputs).
inline void check_no_overlap(const char* fn, const char* out_name, const py::array& out,
                             std::initializer_list<std::pair<const char*, const py::array*>> ins) {
    for (const auto& in : ins) {
        if (in.second && overlaps(out, *in.second)) {
            value_error(std::string(fn) + ": " + out_name + " shares memory with " + in.first +
                        "; expected a separate buffer");
        }
    }
}

inline std::string fmt_double(double v) {
    std::string s = py::str(py::float_(v)).cast<std::string>();
    return s;
}

}  // namespace bind
}  // namespace chainrule
