"""Property-based tests (hypothesis) for every kernel in chainrule.kernels.

gemm, dense_forward and dense_vjp have theirs in test_dispatch.py. Here:
activation_forward / activation_vjp for all seven activations (and the named
twins), the three losses, sgd_step, adam_step, column_sums,
MLPPlan.train_step and MLPPlan.forward, and random Sequential networks
against central finite differences.

Each example draws shapes (0 and 1 included, and now and then one above the
kernels' parallel threshold of 2**18 elements, so that a second thread really
runs), a memory layout for every input (C, Fortran, transposed, strided with
NaN in the gaps, reversed, byte-swapped), the dtype, the parameters, the ISA
and the thread count; compares with the float64 twin in chainrule.reference
under conftest's tolerances; then repeats the call at the other thread count
(1 <-> 2) and demands the same bits.

Error scales: where a result can cancel to ~0 (a softmax VJP, a loss of a
well-classified sample, an optimizer update), the tolerance is taken against
the sum of the magnitudes that went into it, as conftest's gemm_scale does
for products, never against the possibly tiny result.

For a long search: CHAINRULE_HYPOTHESIS_EXAMPLES=2000 pytest tests/test_properties.py
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

import chainrule as cr
from chainrule import _core
from conftest import DTYPES, K, R, assert_close, available_isas, bits_equal, tolerance

# The autouse fixture restores the ISA and thread count once per test, not per
# example; every example sets both itself, so sharing it is safe.
_N = int(os.environ.get("CHAINRULE_HYPOTHESIS_EXAMPLES", "80"))
PROPERTY = settings(max_examples=_N, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])
NETWORKS = settings(PROPERTY, max_examples=max(_N * 3 // 5, 5))

ELEMENTWISE = ("identity", "sigmoid", "tanh", "relu", "leaky_relu")
ROWWISE = ("softmax", "log_softmax")
ALL_ACTS = ELEMENTWISE + ROWWISE
assert set(ALL_ACTS) == set(K.ACTIVATIONS)

LAYOUTS = ("C", "F", "T", "strided", "reversed", "swapped")
# A shape above the parallel threshold (2**18 elements), drawn about one time
# in six (see --hypothesis-show-statistics).
BIG_2D = (520, 513)

dims = st.integers(0, 9) | st.sampled_from([0, 1, 7, 8, 9, 15, 16, 17, 31, 33, 65])
pos_dims = st.integers(1, 9) | st.sampled_from([1, 7, 8, 9, 15, 16, 17, 33])
big = st.integers(0, 3).map(lambda i: i == 3)
layouts = st.sampled_from(LAYOUTS)
dtypes = st.sampled_from(DTYPES)
threads = st.sampled_from([1, 2])
isas = st.sampled_from(available_isas())
seeds = st.integers(0, 2**32 - 1)
# Input magnitudes: from the linear region to far past saturation (1e4: e^-x
# underflows, the stable formulas must still give finite results).
spreads = st.sampled_from([0.1, 1.0, 4.0, 30.0, 1e4])
# Now and then a tenth of the inputs are NaN, +inf or -inf (which must land
# where the reference puts them).
specials = st.integers(0, 4).map(lambda i: i == 4)


def relayout(a, layout):
    """The values of ``a`` in another memory layout (a view where one exists)."""
    a = np.asarray(a)
    if layout == "C" or a.ndim == 0 and layout != "swapped":
        return np.array(a, order="C")  # (np.ascontiguousarray makes a 0-d array 1-d)
    if layout == "F":
        return np.asfortranarray(a)
    if layout == "T":  # the transpose of a C array: Fortran-ordered for 2-D
        return np.ascontiguousarray(a.T).T
    if layout == "strided":  # every other element of a NaN-filled buffer
        fill = np.nan if a.dtype.kind == "f" else 0
        buf = np.full(tuple(2 * s + 1 for s in a.shape), fill, a.dtype)
        view = buf[tuple(slice(1, None, 2) for _ in a.shape)]
        view[...] = a
        return view
    if layout == "reversed":  # negative strides
        flip = tuple(slice(None, None, -1) for _ in a.shape)
        return np.ascontiguousarray(a[flip])[flip]
    if layout == "swapped":
        return a.astype(a.dtype.newbyteorder(">"))
    raise AssertionError(layout)


def configure(isa_name, n_threads, size=0):
    K.set_isa(isa_name)
    K.set_num_threads(n_threads)
    event("above the parallel threshold" if size >= 2**18 else "below the parallel threshold")


def other_threads(n_threads):
    K.set_num_threads(3 - n_threads)


def f64(a):
    return np.asarray(a, dtype=np.float64)


def tiny(dtype):
    """An error scale under which the tolerance allows an absolute error of
    about the smallest normal number: subnormal results have no relative
    accuracy to keep."""
    return float(np.finfo(dtype).tiny) / tolerance(dtype)


def sprinkle(rng, a, on, values=(np.nan, np.inf, -np.inf)):
    """a with about a tenth of its entries replaced by the given values."""
    if on and a.size:
        a = a.copy()
        flat = a.reshape(-1)
        hit = rng.random(flat.size) < 0.1
        flat[hit] = rng.choice(values, size=int(hit.sum()))
    return a


def same_bits_up_to_nan(x, y):
    """bits_equal, except that NaNs need only be NaN in both. The sign of a
    NaN made from two NaN operands is the compiler's choice of operand order
    (x86 returns the first), which can differ between the serial and the
    OpenMP copy of one loop; nothing else may."""
    x, y = np.asarray(x), np.asarray(y)
    if x.dtype != y.dtype or x.shape != y.shape:
        return False
    nan = np.isnan(x)
    return bool(np.array_equal(nan, np.isnan(y))) and bits_equal(x[~nan], y[~nan])


def finite_scale(scale):
    """Error scales are sums of magnitudes; where an input was not finite
    the expected value is not finite either and is compared exactly."""
    return np.nan_to_num(np.asarray(scale, np.float64), nan=0.0, posinf=0.0)


# ------------------------------------------------------------------ activations

@st.composite
def activation_problems(draw):
    name = draw(st.sampled_from(ALL_ACTS))
    if draw(big):
        shape = BIG_2D if name in ROWWISE or draw(st.booleans()) else (BIG_2D[0] * BIG_2D[1],)
    elif name in ROWWISE:
        shape = tuple(draw(st.lists(dims, min_size=1, max_size=2)))
    else:
        shape = tuple(draw(st.lists(dims, min_size=0, max_size=3)))
    return name, shape


@PROPERTY
@given(problem=activation_problems(), dtype=dtypes, layout=layouts, spread=spreads,
       slope=st.sampled_from([0.0, 0.01, 0.3, 1.0, 2.5]), n_threads=threads, isa_name=isas,
       out_kind=st.sampled_from(["none", "out", "in_place", "named"]), special=specials,
       seed=seeds)
def test_activation_forward_property(problem, dtype, layout, spread, slope, n_threads, isa_name,
                                     out_kind, special, seed):
    name, shape = problem
    configure(isa_name, n_threads, int(np.prod(shape)))
    rng = np.random.default_rng(seed)
    x0 = np.asarray(rng.uniform(-spread, spread, size=shape), dtype=dtype)
    x0 = sprinkle(rng, x0, special)
    x = relayout(x0, layout)
    kw = {"negative_slope": slope} if name == "leaky_relu" else {}
    if out_kind == "out":
        out = np.full(shape, np.nan, dtype)
        y = K.activation_forward(name, x, out=out, **kw)
        assert y is out
    elif out_kind == "in_place":
        x = x0.copy()
        y = K.activation_forward(name, x, out=x, **kw)
        assert y is x
    elif out_kind == "named":
        y = getattr(K, f"{name}_forward")(x, **kw)
    else:
        y = K.activation_forward(name, x, **kw)
    assert y.shape == shape and y.dtype == dtype and y.flags.c_contiguous
    np.testing.assert_array_equal(x0, x if out_kind != "in_place" else x0)  # input untouched
    with np.errstate(invalid="ignore", over="ignore"):
        ref = R.activation_forward(name, x0, negative_slope=slope)
        if name == "log_softmax":
            # y = x - lse: the rounding of x and of lse, not of the (small) result
            scale = np.abs(f64(x0)) + np.abs(f64(x0) - ref)
        else:
            finite = np.abs(ref[np.isfinite(ref)])
            scale = float(finite.max()) if finite.size else 0.0
    kk = shape[-1] if name in ROWWISE and shape else 1
    assert_close(y, ref, dtype, k=kk, scale=finite_scale(scale) + tiny(dtype),
                 err_msg=f"{name} {shape} {layout}")
    other_threads(n_threads)
    again = K.activation_forward(name, relayout(x0, layout), **kw)
    assert same_bits_up_to_nan(again, y), "result depends on the thread count"


@PROPERTY
@given(problem=activation_problems(), dtype=dtypes, layouts_=st.tuples(layouts, layouts),
       spread=spreads, slope=st.sampled_from([0.0, 0.01, 0.3, 1.0, 2.5]), n_threads=threads,
       isa_name=isas, out_kind=st.sampled_from(["none", "out", "in_place", "named"]),
       special=specials, seed=seeds)
def test_activation_vjp_property(problem, dtype, layouts_, spread, slope, n_threads, isa_name,
                                 out_kind, special, seed):
    name, shape = problem
    configure(isa_name, n_threads, int(np.prod(shape)))
    rng = np.random.default_rng(seed)
    kw = {"negative_slope": slope} if name == "leaky_relu" else {}
    # y is a genuine forward output (the VJP reads it, e.g. exp(y) for log_softmax).
    x0 = sprinkle(rng, np.asarray(rng.uniform(-spread, spread, size=shape), dtype=dtype), special)
    y0 = K.activation_forward(name, x0, **kw)
    # NaN in gy, not inf: an inf gradient times a weight that underflows to 0
    # in float32 but not in the float64 reference (exp(y) of log_softmax) is
    # NaN in one and inf in the other, both correctly rounded.
    gy0 = sprinkle(rng, np.asarray(rng.uniform(-1, 1, size=shape), dtype=dtype), special,
                   values=(np.nan,))
    y, gy = relayout(y0, layouts_[0]), relayout(gy0, layouts_[1])
    if out_kind == "out":
        out = np.full(shape, np.nan, dtype)
        gx = K.activation_vjp(name, y, gy, out=out, **kw)
        assert gx is out
    elif out_kind == "in_place":  # gx over gy is allowed
        gy = gy0.copy()
        gx = K.activation_vjp(name, y, gy, out=gy, **kw)
        assert gx is gy
    elif out_kind == "named":
        gx = getattr(K, f"{name}_vjp")(y, gy, **kw)
    else:
        gx = K.activation_vjp(name, y, gy, **kw)
    assert gx.shape == shape and gx.dtype == dtype
    a_y, a_gy = np.abs(f64(y0)), np.abs(f64(gy0))
    with np.errstate(invalid="ignore", over="ignore"):
        ref = R.activation_vjp(name, y0, gy0, negative_slope=slope)
        if name == "sigmoid":
            scale = a_gy * a_y * (1.0 + a_y)
        elif name == "tanh":
            scale = a_gy * (1.0 + a_y * a_y)
        elif name == "softmax":
            scale = a_y * (a_gy + (a_gy * a_y).sum(axis=-1, keepdims=True))
        elif name == "log_softmax":
            scale = a_gy + np.exp(f64(y0)) * a_gy.sum(axis=-1, keepdims=True)
        else:
            scale = a_gy * max(1.0, slope)
    kk = shape[-1] if name in ROWWISE and shape else 1
    assert_close(gx, ref, dtype, k=kk, scale=finite_scale(scale) + tiny(dtype),
                 err_msg=f"{name} {shape} {layouts_}")
    other_threads(n_threads)
    again = K.activation_vjp(name, relayout(y0, layouts_[0]), relayout(gy0, layouts_[1]), **kw)
    assert same_bits_up_to_nan(again, gx), "result depends on the thread count"


# ------------------------------------------------------------------ losses

@st.composite
def loss_problems(draw, binary=False):
    if draw(big):
        n, k = BIG_2D
    else:
        n, k = draw(dims), draw(pos_dims)
    one_d = binary and draw(st.booleans())  # BCE also takes logits of shape (n,)
    weights = draw(st.sampled_from(["none", "f64", "f32", "int", "with_zeros"]))
    return n, (1 if one_d else k), one_d, weights


def _weights(rng, kind, n):
    if kind == "none":
        return None
    if kind == "int":
        return rng.integers(1, 4, n)
    w = rng.uniform(0.1, 2.0, n)
    if kind == "with_zeros":
        w[rng.random(n) < 0.3] = 0.0
    return w.astype(np.float32 if kind == "f32" else np.float64)


def _check_loss(fn, ref_fn, z0, t0, w, layouts_, reduction, need_grad, grad_buf, dtype, n_threads,
                loss_scale, grad_scale, n_terms, k):
    z, t = relayout(z0, layouts_[0]), relayout(t0, layouts_[1])
    w_in = None if w is None else relayout(w, layouts_[2])
    total = len(z0) if w is None else float(f64(w).sum())
    if reduction == "mean" and not total > 0:
        with pytest.raises(ValueError, match="reduction='mean' needs at least one sample"):
            fn(z, t, sample_weight=w_in, reduction=reduction)
        return
    grad = np.full(z0.shape, np.nan, dtype) if grad_buf else None
    loss, g = fn(z, t, sample_weight=w_in, reduction=reduction, grad=grad, need_grad=need_grad)
    assert isinstance(loss, float)
    ref_loss, ref_g = ref_fn(z0, t0, sample_weight=w, reduction=reduction)
    assert_close(np.asarray(loss), ref_loss, dtype, k=n_terms, scale=loss_scale + tiny(dtype),
                 err_msg=f"loss, {reduction}")
    if not need_grad:
        assert g is None
    else:
        if grad_buf:
            assert g is grad
        assert g.shape == z0.shape and g.dtype == dtype
        assert_close(g, ref_g, dtype, k=k, scale=grad_scale + tiny(dtype),
                     err_msg=f"grad, {reduction}")
    other_threads(n_threads)
    z, t = relayout(z0, layouts_[0]), relayout(t0, layouts_[1])
    loss2, g2 = fn(z, t, sample_weight=w_in, reduction=reduction, need_grad=need_grad)
    assert loss2 == loss or (np.isnan(loss) and np.isnan(loss2)), "loss depends on threads"
    if need_grad:
        assert bits_equal(g2, g), "grad depends on the thread count"


def _reduction_factor(reduction, w, n, per_row=1):
    if reduction == "sum":
        return 1.0
    return 1.0 / ((f64(w).sum() if w is not None else n) * per_row)


def _w_or_ones(w, n):
    return np.ones(n) if w is None else f64(w)


@PROPERTY
@given(problem=loss_problems(), dtype=dtypes, layouts_=st.tuples(layouts, layouts, layouts),
       label_dtype=st.sampled_from([np.int64, np.int32, np.int16, np.uint8]),
       reduction=st.sampled_from(["mean", "sum"]), need_grad=st.booleans(),
       grad_buf=st.booleans(), spread=spreads, n_threads=threads, isa_name=isas, seed=seeds)
def test_softmax_cross_entropy_property(problem, dtype, layouts_, label_dtype, reduction,
                                        need_grad, grad_buf, spread, n_threads, isa_name, seed):
    n, k, _, wkind = problem
    assume(k <= 255 or label_dtype != np.uint8)
    configure(isa_name, n_threads, n * k)
    rng = np.random.default_rng(seed)
    z0 = rng.uniform(-spread, spread, (n, k)).astype(dtype)
    labels = rng.integers(0, k, n).astype(label_dtype)
    w = _weights(rng, wkind, n)
    s = _reduction_factor(reduction, w, n) if (w is None or f64(w).sum() > 0) and n else 1.0
    ww = np.abs(_w_or_ones(w, n))
    zmax = np.abs(f64(z0)).max(axis=1) if k else np.zeros(n)
    # l_i = lse_i - z_iy: error ~ eps (|lse| + |z_iy|); g = p - onehot: error ~ eps
    loss_scale = s * float(np.sum(ww * (2 * zmax + np.log(k) + 1.0)))
    grad_scale = s * ww[:, None] * np.ones((1, k))
    _check_loss(K.softmax_cross_entropy, R.softmax_cross_entropy, z0, labels, w, layouts_,
                reduction, need_grad, grad_buf, dtype, n_threads, loss_scale, grad_scale,
                n * k, k)


@PROPERTY
@given(problem=loss_problems(), dtype=dtypes, layouts_=st.tuples(layouts, layouts, layouts),
       target_kind=st.sampled_from(["probabilities", "one_hot", "unnormalised", "f32", "int"]),
       reduction=st.sampled_from(["mean", "sum"]), need_grad=st.booleans(),
       grad_buf=st.booleans(), spread=spreads, n_threads=threads, isa_name=isas, seed=seeds)
def test_soft_cross_entropy_property(problem, dtype, layouts_, target_kind, reduction, need_grad,
                                     grad_buf, spread, n_threads, isa_name, seed):
    n, k, _, wkind = problem
    configure(isa_name, n_threads, n * k)
    rng = np.random.default_rng(seed)
    z0 = rng.uniform(-spread, spread, (n, k)).astype(dtype)
    if target_kind == "one_hot" or target_kind == "int":
        t0 = np.eye(k)[rng.integers(0, k, n)].reshape(n, k)
        t0 = t0.astype(np.int64) if target_kind == "int" else t0
    else:
        t0 = rng.random((n, k))
        if target_kind != "unnormalised":
            t0 /= np.maximum(t0.sum(axis=1, keepdims=True), 1e-300)
        if target_kind == "f32":
            t0 = t0.astype(np.float32)
    w = _weights(rng, wkind, n)
    s = _reduction_factor(reduction, w, n) if (w is None or f64(w).sum() > 0) and n else 1.0
    ww = np.abs(_w_or_ones(w, n))
    tt = f64(t0)
    zmax = np.abs(f64(z0)).max(axis=1) if k else np.zeros(n)
    tsum = tt.sum(axis=1)
    loss_scale = s * float(np.sum(ww * tsum * (2 * zmax + np.log(k) + 1.0)))
    grad_scale = s * ww[:, None] * (tsum[:, None] + tt + 1.0)
    _check_loss(K.soft_cross_entropy, R.soft_cross_entropy, z0, t0, w, layouts_, reduction,
                need_grad, grad_buf, dtype, n_threads, loss_scale, grad_scale, n * k, k)


@PROPERTY
@given(problem=loss_problems(binary=True), dtype=dtypes,
       layouts_=st.tuples(layouts, layouts, layouts),
       target_kind=st.sampled_from(["probabilities", "labels", "f32", "bool"]),
       reduction=st.sampled_from(["mean", "sum"]), need_grad=st.booleans(),
       grad_buf=st.booleans(), spread=spreads, n_threads=threads, isa_name=isas, seed=seeds)
def test_binary_cross_entropy_property(problem, dtype, layouts_, target_kind, reduction,
                                       need_grad, grad_buf, spread, n_threads, isa_name, seed):
    n, k, one_d, wkind = problem
    configure(isa_name, n_threads, n * k)
    rng = np.random.default_rng(seed)
    shape = (n,) if one_d else (n, k)
    z0 = rng.uniform(-spread, spread, shape).astype(dtype)
    if target_kind == "probabilities":
        t0 = rng.random(shape)
    elif target_kind == "f32":
        t0 = rng.random(shape).astype(np.float32)
    else:
        t0 = rng.random(shape) < 0.5
        t0 = t0 if target_kind == "bool" else t0.astype(np.int32)
    w = _weights(rng, wkind, n)
    s = (_reduction_factor(reduction, w, n, k)
         if (w is None or f64(w).sum() > 0) and n else 1.0)
    ww = np.abs(_w_or_ones(w, n))
    ww = ww if one_d else ww[:, None]
    zz, tt = f64(z0), f64(t0)
    softplus = np.maximum(zz, 0) + np.log1p(np.exp(-np.abs(zz)))
    loss_scale = s * float(np.sum(ww * (softplus + tt * np.abs(zz) + 1.0)))
    grad_scale = s * ww * np.ones(shape)
    _check_loss(K.binary_cross_entropy, R.binary_cross_entropy, z0, t0, w, layouts_, reduction,
                need_grad, grad_buf, dtype, n_threads, loss_scale, grad_scale, n * k, 1)


# ------------------------------------------------------------------ optimizers

@st.composite
def flat_shapes(draw):
    if draw(big):
        return draw(st.sampled_from([(BIG_2D[0] * BIG_2D[1],), BIG_2D]))
    return tuple(draw(st.lists(dims, min_size=1, max_size=3)))


@PROPERTY
@given(shape=flat_shapes(), dtype=dtypes, grad_layout=layouts,
       lr=st.sampled_from([1e-3, 0.1, 1.0]) | st.floats(1e-4, 2.0),
       momentum=st.sampled_from([0.0, 0.0, 0.5, 0.9]) | st.floats(0.0, 0.99),
       dampening=st.sampled_from([0.0, 0.1, 0.5]),
       weight_decay=st.sampled_from([0.0, 1e-4, 0.1]), nesterov=st.booleans(),
       first_step=st.booleans(), n_threads=threads, isa_name=isas, seed=seeds)
def test_sgd_step_property(shape, dtype, grad_layout, lr, momentum, dampening, weight_decay,
                           nesterov, first_step, n_threads, isa_name, seed):
    configure(isa_name, n_threads, int(np.prod(shape)))
    rng = np.random.default_rng(seed)
    p0 = rng.uniform(-1, 1, shape).astype(dtype)
    g0 = rng.uniform(-1, 1, shape).astype(dtype)
    b0 = rng.uniform(-1, 1, shape).astype(dtype)
    hyper = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                 nesterov=nesterov, first_step=first_step)

    def run():
        p, buf = p0.copy(), b0.copy()
        res = K.sgd_step(p, relayout(g0, grad_layout), buf if momentum else None, **hyper)
        assert res is None
        return p, buf

    p, buf = run()
    pr, br = f64(p0).copy(), f64(b0).copy()
    R.sgd_step(pr, g0, br, **hyper)
    # The same update on magnitudes: every term adds, so this bounds the rounding.
    ap, ag, ab = np.abs(f64(p0)), np.abs(f64(g0)), np.abs(f64(b0))
    d_abs = ag + weight_decay * ap
    if momentum:
        buf_abs = d_abs if first_step else momentum * ab + abs(1 - dampening) * d_abs
        upd_abs = d_abs + momentum * buf_abs if nesterov else buf_abs
        assert_close(buf, br, dtype, scale=buf_abs + tiny(dtype), c=24, err_msg="momentum_buffer")
    else:
        upd_abs = d_abs
        assert bits_equal(buf, b0), "the buffer is not used without momentum"
    assert_close(p, pr, dtype, scale=ap + lr * upd_abs + tiny(dtype), c=24, err_msg="param")
    other_threads(n_threads)
    p2, buf2 = run()
    assert bits_equal(p2, p) and bits_equal(buf2, buf), "result depends on the thread count"


@PROPERTY
@given(shape=flat_shapes(), dtype=dtypes, grad_layout=layouts,
       step=st.sampled_from([1, 2, 10]) | st.integers(1, 100_000),
       lr=st.sampled_from([1e-3, 0.01, 0.5]) | st.floats(1e-5, 1.0),
       beta1=st.sampled_from([0.0, 0.9]) | st.floats(0.0, 0.99),
       beta2=st.sampled_from([0.999, 0.99, 0.5]) | st.floats(0.0, 0.9999),
       eps=st.sampled_from([1e-8, 1e-6, 1e-3]), weight_decay=st.sampled_from([0.0, 1e-2, 0.5]),
       decoupled=st.booleans(), n_threads=threads, isa_name=isas, seed=seeds)
def test_adam_step_property(shape, dtype, grad_layout, step, lr, beta1, beta2, eps, weight_decay,
                            decoupled, n_threads, isa_name, seed):
    configure(isa_name, n_threads, int(np.prod(shape)))
    rng = np.random.default_rng(seed)
    p0 = rng.uniform(-1, 1, shape).astype(dtype)
    g0 = rng.uniform(-1, 1, shape).astype(dtype)
    m0 = rng.uniform(-0.5, 0.5, shape).astype(dtype)
    v0 = rng.uniform(0, 0.5, shape).astype(dtype)
    hyper = dict(step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                 decoupled=decoupled)

    def run():
        p, m, v = p0.copy(), m0.copy(), v0.copy()
        assert K.adam_step(p, relayout(g0, grad_layout), m, v, **hyper) is None
        return p, m, v

    p, m, v = run()
    pr, mr, vr = f64(p0).copy(), f64(m0).copy(), f64(v0).copy()
    # The hyper-parameters reach the kernel in double (1 - beta2 is formed
    # there, as PyTorch does from its Python floats), so float32 is judged
    # against the reference on the exact values too.
    R.adam_step(pr, g0, mr, vr, **hyper)
    # Error scales: g + wd * p, and so m and v, can cancel; the update divides
    # by sqrt(v), so an error in a small v moves it by up to the difference
    # the smallest v within v's own tolerance would make.
    ap, ag, am, av = (np.abs(f64(a)) for a in (p0, g0, m0, v0))
    g_abs = ag + (0.0 if decoupled else weight_decay * ap)
    m_abs = beta1 * am + (1 - beta1) * g_abs
    v_abs = beta2 * av + (1 - beta2) * g_abs * g_abs
    bc1, bc2 = 1 - beta1 ** step, 1 - beta2 ** step
    denom = np.sqrt(vr) / np.sqrt(bc2) + eps
    denom_lo = np.sqrt(np.maximum(vr - tolerance(dtype, c=24) * v_abs, 0)) / np.sqrt(bc2) + eps
    shift = (lr / bc1) * np.abs(mr) * (1 / denom_lo - 1 / denom) / tolerance(dtype, c=32)
    p_scale = ap + (lr / bc1) * m_abs / denom + shift
    assert_close(m, mr, dtype, scale=m_abs + tiny(dtype), c=24, err_msg="exp_avg")
    assert_close(v, vr, dtype, scale=v_abs + tiny(dtype), c=24, err_msg="exp_avg_sq")
    assert_close(p, pr, dtype, scale=p_scale + tiny(dtype), c=32, err_msg="param")
    other_threads(n_threads)
    again = run()
    assert all(bits_equal(a, b) for a, b in zip(again, (p, m, v))), "depends on thread count"


# ------------------------------------------------------------------ column sums

@PROPERTY
@given(n=dims, d=dims, large=big, dtype=dtypes, layout=layouts, use_out=st.booleans(),
       accumulate=st.booleans(), n_threads=threads, isa_name=isas, seed=seeds)
def test_column_sums_property(n, d, large, dtype, layout, use_out, accumulate, n_threads, isa_name,
                              seed):
    if large:
        n, d = BIG_2D
    configure(isa_name, n_threads, n * d)
    rng = np.random.default_rng(seed)
    a0 = rng.uniform(-1, 1, (n, d)).astype(dtype)
    o0 = rng.uniform(-1, 1, d).astype(dtype)
    if accumulate and not use_out:
        with pytest.raises(ValueError, match="accumulate=True needs out="):
            K.column_sums(relayout(a0, layout), accumulate=True)
        return

    def run():
        out = o0.copy() if accumulate else (np.full(d, np.nan, dtype) if use_out else None)
        res = K.column_sums(relayout(a0, layout), out=out, accumulate=accumulate)
        assert out is None or res is out
        return res

    got = run()
    assert got.shape == (d,) and got.dtype == dtype
    ref = R.column_sums(a0, out=f64(o0).copy() if accumulate else None, accumulate=accumulate)
    scale = np.abs(f64(a0)).sum(axis=0) + (np.abs(f64(o0)) if accumulate else 0.0)
    assert_close(got, ref, dtype, k=n + 1, scale=scale + tiny(dtype))
    # "rows added in order": a float64 sequential loop in the kernel's dtype agrees exactly
    if n and d and not accumulate and n * d < 4096:
        seq = a0[0].copy()
        for row in a0[1:]:
            seq = seq + row
        assert bits_equal(got, seq), "column_sums does not add the rows in order"
    other_threads(n_threads)
    assert bits_equal(run(), got), "result depends on the thread count"


# ------------------------------------------------------------------ MLPPlan

PLAN_LOSSES = ("softmax_cross_entropy", "binary_cross_entropy", "squared_error")


def _plan_layers(P, dims_):
    out, o = [], 0
    for a, b in zip(dims_[:-1], dims_[1:]):
        out.append((f64(P[o:o + a * b]).reshape(a, b), f64(P[o + a * b:o + a * b + b])))
        o += a * b + b
    assert o == P.size
    return out


def plan_reference(P, dims_, acts, X, t, loss, idx, w, scale, l2, slope):
    """Loss and d loss / d params of one MLPPlan.train_step, in float64 NumPy,
    with the error scale of each: the same computation on magnitudes (|x|,
    |W|, |b|, each activation's derivative bounded by max(1, slope)), so that
    every sum adds and no cancellation can make the scale small."""
    layers = _plan_layers(P, dims_)
    grow = max(1.0, slope)
    h = f64(X)[idx]
    h_abs = np.abs(h)
    inputs, inputs_abs = [], []
    for i, (W, b) in enumerate(layers):
        inputs.append(h)
        inputs_abs.append(h_abs)
        h = h @ W + b
        h_abs = h_abs @ np.abs(W) + np.abs(b)
        if i < len(layers) - 1:
            h = R._act(acts[i], h, slope)
            h_abs = np.abs(h) + grow * h_abs
    z, z_abs = h, h_abs
    n, k = z.shape
    ws = np.ones(n) if w is None else f64(w)[idx]
    if scale is None:
        scale = 1.0 / (ws.sum() * (1 if loss == "softmax_cross_entropy" else k))
    if loss == "softmax_cross_entropy":
        lp = R._act("log_softmax", z)
        tt = np.eye(k)[np.asarray(t)[idx]]
        rows = -(lp * tt).sum(axis=1)
        gz = np.exp(lp) - tt
        gz_abs = np.exp(lp) + tt
    elif loss == "binary_cross_entropy":
        tt = f64(t)[idx].reshape(n, k)
        rows = (np.maximum(z, 0) + np.log1p(np.exp(-np.abs(z))) - tt * z).sum(axis=1)
        gz = R._act("sigmoid", z) - tt
        gz_abs = R._act("sigmoid", z) + tt
    else:
        tt = f64(t)[idx].reshape(n, k)
        diff = z - tt
        rows = (diff * diff).sum(axis=1)
        gz = 2.0 * diff
        gz_abs = 2.0 * (np.abs(z) + np.abs(tt))
    value = scale * float(np.sum(ws * rows))
    value_abs = abs(scale) * float(np.sum(np.abs(ws)[:, None] * (z_abs + np.abs(tt) + 1) ** 2))
    gz = scale * ws[:, None] * gz
    # the logits' own error moves every loss gradient by at most 2x as much
    gz_abs = abs(scale) * np.abs(ws)[:, None] * (gz_abs + 2.0 * z_abs)
    grads, grads_abs = [None] * len(layers), [None] * len(layers)
    for i in range(len(layers) - 1, -1, -1):
        W, _ = layers[i]
        grads[i] = (inputs[i].T @ gz + l2 * W, gz.sum(axis=0))
        grads_abs[i] = (inputs_abs[i].T @ gz_abs + abs(l2) * np.abs(W), gz_abs.sum(axis=0))
        if i:
            gz = R._act_vjp(acts[i - 1], inputs[i], gz @ W.T, slope)
            gz_abs = grow * (gz_abs @ np.abs(W).T)
    value += 0.5 * l2 * sum(float((W * W).sum()) for W, _ in layers)
    value_abs += 0.5 * abs(l2) * sum(float((W * W).sum()) for W, _ in layers)
    flat = lambda gs: np.concatenate([np.concatenate([gw.ravel(), gb]) for gw, gb in gs])
    return value, flat(grads), value_abs, flat(grads_abs)


def plan_forward_reference(P, dims_, acts, X, slope):
    """MLPPlan.forward in float64, and the error scale of each output."""
    h = f64(X)
    h_abs = np.abs(h)
    grow = max(1.0, slope)
    for i, (W, b) in enumerate(_plan_layers(P, dims_)):
        z = h @ W + b
        h_abs = h_abs @ np.abs(W) + np.abs(b)
        h = R._act(acts[i], z, slope)
        h_abs = np.abs(h) + grow * h_abs
    return h, h_abs


@st.composite
def plans(draw):
    if draw(big):
        dims_ = [450, 64, 10]
        rows = 600
    else:
        dims_ = draw(st.lists(pos_dims, min_size=2, max_size=5))
        rows = draw(st.integers(1, 40))
    acts = [draw(st.sampled_from(ELEMENTWISE)) for _ in dims_[1:-1]]
    acts.append(draw(st.sampled_from(ALL_ACTS)))
    return dims_, acts, rows


@PROPERTY
@given(plan_=plans(), dtype=dtypes, loss=st.sampled_from(PLAN_LOSSES),
       slope=st.sampled_from([0.0, 0.01, 0.3]), x_layout=layouts,
       batch=st.sampled_from(["all", "indices", "repeats"]),
       weights=st.sampled_from(["none", "f64", "with_zeros"]),
       scale=st.sampled_from([None, None, 1.0, 0.25]), l2=st.sampled_from([0.0, 0.0, 0.1]),
       accumulate=st.booleans(), norms=st.booleans(), n_threads=threads, isa_name=isas,
       seed=seeds)
def test_plan_train_step_property(plan_, dtype, loss, slope, x_layout, batch, weights, scale, l2,
                                  accumulate, norms, n_threads, isa_name, seed):
    dims_, acts, rows = plan_
    configure(isa_name, n_threads, rows * dims_[0] * dims_[1])
    rng = np.random.default_rng(seed)
    plan = _core.MLPPlan(dims_, acts, np.dtype(dtype).name, negative_slope=slope)
    assert plan.dims == dims_ and plan.n_params == sum(
        a * b + b for a, b in zip(dims_[:-1], dims_[1:]))
    P = (rng.standard_normal(plan.n_params) * 0.5).astype(dtype)
    X0 = rng.standard_normal((rows, dims_[0])).astype(dtype)
    k = dims_[-1]
    if loss == "softmax_cross_entropy":
        t = rng.integers(0, k, rows)
    elif loss == "binary_cross_entropy":
        t = rng.random((rows, k)).astype(dtype)
    else:
        t = rng.standard_normal((rows, k)).astype(dtype)
    if batch == "all":
        idx = None
    elif batch == "indices":
        idx = rng.permutation(rows)[:rng.integers(1, rows + 1)]
    else:
        idx = rng.integers(0, rows, rng.integers(1, 2 * rows + 1))
    w = _weights(rng, weights, rows)
    batch_rows = np.arange(rows) if idx is None else idx
    if scale is None and w is not None and not f64(w)[batch_rows].sum() > 0:
        w[batch_rows[0]] = 1.0  # a mean over zero total weight is an error, tested elsewhere
    G0 = rng.uniform(-1, 1, plan.n_params).astype(dtype)
    N0 = rng.uniform(0, 1, len(dims_) - 1)

    def run():
        G = G0.copy() if accumulate else np.full(plan.n_params, np.nan, dtype)
        gn = N0.copy() if norms else None
        value = plan.train_step(P, G, relayout(X0, x_layout), t, loss=loss, indices=idx,
                                sample_weight=w, scale=scale, l2=l2, accumulate=accumulate,
                                grad_norms=gn)
        return value, G, gn

    value, G, gn = run()
    ref_value, ref_G, value_abs, G_abs = plan_reference(P, dims_, acts, X0, t, loss, batch_rows,
                                                        w, scale, l2, slope)
    if accumulate:
        ref_G = ref_G + f64(G0)
        G_abs = G_abs + np.abs(f64(G0))
    kk = max(len(batch_rows), max(dims_))
    assert_close(np.asarray(value), ref_value, dtype, k=kk, scale=value_abs, err_msg="loss")
    assert_close(G, ref_G, dtype, k=kk, scale=G_abs + tiny(dtype),
                 err_msg=f"grads of dims {dims_}, acts {acts}")
    if norms:  # added to the buffer: each layer's ||(dW, db)||_2 of the grads written
        o, expected = 0, []
        for a, b in zip(dims_[:-1], dims_[1:]):
            expected.append(np.linalg.norm(f64(G[o:o + a * b + b])))
            o += a * b + b
        assert gn.dtype == np.float64
        # (the squares may be formed in the plan's dtype)
        assert_close(gn, N0 + np.array(expected), dtype, k=plan.n_params, err_msg="grad_norms")
    other_threads(n_threads)
    value2, G2, gn2 = run()
    assert value2 == value and bits_equal(G2, G), "train_step depends on the thread count"
    # Inference through the same plan, with the output activation.
    out = plan.forward(P, relayout(X0, x_layout))
    assert out.shape == (rows, k) and out.dtype == dtype
    ref_out, out_abs = plan_forward_reference(P, dims_, acts, X0, slope)
    assert_close(out, ref_out, dtype, k=max(dims_), scale=out_abs + tiny(dtype),
                 err_msg="forward")
    K.set_num_threads(n_threads)
    assert bits_equal(plan.forward(P, X0), out), "forward depends on the thread count"


# ------------------------------------------------------------------ random networks

ACT_LAYERS = {
    "sigmoid": lambda s: cr.Sigmoid(),
    "tanh": lambda s: cr.Tanh(),
    "relu": lambda s: cr.ReLU(),
    "leaky_relu": lambda s: cr.LeakyReLU(s),
    "identity": lambda s: cr.Identity(),
}


@st.composite
def networks(draw):
    d_in = draw(st.integers(1, 6))
    widths = draw(st.lists(st.integers(1, 6), min_size=1, max_size=4))
    layers, acts, d = [], [], d_in
    for i, width in enumerate(widths):
        layers.append(cr.Dense(d, width, bias=draw(st.booleans())))
        d = width
        last = i == len(widths) - 1
        act = draw(st.sampled_from(["none"] + list(ACT_LAYERS) + (["softmax", "log_softmax"]
                                                                  if last else [])))
        acts.append(act)
        if act in ACT_LAYERS:
            layers.append(ACT_LAYERS[act](draw(st.sampled_from([0.0, 0.05, 0.3]))))
        elif act == "softmax":
            layers.append(cr.Softmax())
        elif act == "log_softmax":
            layers.append(cr.LogSoftmax())
    return d_in, d, layers


def _no_kinks_near(model, X, margin=1e-3):
    """No input to a ReLU/LeakyReLU lies within margin of its kink (where
    finite differences straddle two slopes)."""
    h = np.asarray(X, np.float64)
    for layer in model.layers:
        if isinstance(layer, (cr.ReLU, cr.LeakyReLU)) and np.any(np.abs(h) < margin):
            return False
        h = layer.forward(h)
    return True


@NETWORKS
@given(net=networks(), loss_name=st.sampled_from(["mse", "ce", "bce", "ce_sum", "mse_sum"]),
       n=st.integers(1, 6), dtype=dtypes, seed=seeds)
def test_random_network_gradients_match_finite_differences(net, loss_name, n, dtype, seed):
    d_in, d_out, layers = net
    rng = np.random.default_rng(seed)
    model = cr.Sequential(*layers, dtype=dtype, seed=int(seed % 2**31))
    for layer in model.layers:  # non-zero biases, so they matter
        if isinstance(layer, cr.Dense) and layer.bias is not None:
            layer.bias.data = rng.uniform(-0.5, 0.5, layer.bias.shape)
    X = rng.standard_normal((n, d_in))
    if loss_name.startswith("ce"):
        loss = cr.CrossEntropy(reduction="sum" if loss_name == "ce_sum" else "mean")
        y = rng.integers(0, d_out, n)
    elif loss_name == "bce":
        loss = cr.BinaryCrossEntropy()
        y = rng.random((n, d_out))
    else:
        loss = cr.MSE(reduction="sum" if loss_name == "mse_sum" else "mean")
        y = rng.standard_normal((n, d_out))
    check_model = model.copy(dtype="float64")
    assume(_no_kinks_near(check_model, X))
    # The forward pass against a NumPy composition of the reference twins,
    # with the error scale of each output (the same pass on magnitudes).
    h, h_abs = X.copy(), np.abs(X)
    for layer in check_model.layers:
        if isinstance(layer, cr.Dense):
            b = None if layer.bias is None else layer.bias.data
            h = R.dense_forward(h, layer.weight.data, b)
            h_abs = h_abs @ np.abs(layer.weight.data) + (0 if b is None else np.abs(b))
        elif not isinstance(layer, cr.Identity):
            slope = getattr(layer, "negative_slope", 0.01)
            h = R.activation_forward(layer.activation, h, negative_slope=slope)
            h_abs = np.abs(h) + max(1.0, slope) * h_abs
    assert_close(check_model.forward(X), h, np.float64, k=64, scale=h_abs)
    if dtype == np.float32:  # the float32 model agrees to float32 accuracy
        assert_close(model.forward(X.astype(np.float32)), h, np.float32, k=64, scale=h_abs)
    # Backprop against central differences, in float64. A difference quotient
    # of L carries a rounding error of about 1e-16 |L| / eps, so gradients are
    # judged relative to max(|g|, 1e-5 |L|) (gradcheck's atol).
    if loss_name.startswith("ce"):
        value = R.softmax_cross_entropy(h, y, reduction=loss.reduction)[0]
    elif loss_name == "bce":
        value = R.binary_cross_entropy(h, y)[0]
    else:
        value = float(((h - y) ** 2).sum()) / (h.size if loss.reduction == "mean" else 1)
    result = cr.gradcheck(model, loss, X, y, eps=1e-5, atol=1e-5 * max(1.0, abs(value)),
                          dtype="float64")
    assert result.n_checked == sum(p.size for p in model.parameters())
    assert float(result) < 1e-4, result


# ------------------------------------------------------------------ self-checks

@pytest.mark.parametrize("layout", LAYOUTS)
def test_relayout_keeps_values_and_changes_memory(layout):
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    b = relayout(a, layout)
    np.testing.assert_array_equal(b, a)
    assert b.flags.c_contiguous == (layout in ("C", "swapped"))
    assert (b.dtype.byteorder == ">") == (layout == "swapped")


def test_tolerance_is_tighter_for_float64():
    assert tolerance(np.float64, 100) < tolerance(np.float32, 1)
