"""Bad input at the native boundary: clear errors, never a crash.

Wrong dtypes raise TypeError; wrong ndim, shapes and buffers raise ValueError,
with messages that name the function and the argument. Zero-sized dimensions
give the right empty (or bias-only) results. NaN and inf flow through.
Absurd sizes raise MemoryError or ValueError; those run in a subprocess so a
crash fails the test instead of killing pytest.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import K, R, assert_close, available_isas, random

F32, F64 = np.float32, np.float64


def _run_python(code: str, env_extra: dict | None = None, timeout: float = 120):
    env = dict(os.environ)
    env.pop("CHAINRULE_ISA", None)
    if env_extra:
        env.update(env_extra)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------ dtypes


@pytest.mark.parametrize("bad", [np.int64, np.int32, np.float16, np.complex64, np.bool_],
                         ids=lambda t: np.dtype(t).name)
def test_gemm_rejects_other_dtypes(bad):
    a = np.ones((3, 4), bad)
    with pytest.raises(TypeError, match=rf"gemm: a\.dtype is {np.dtype(bad).name}; "
                                        r"expected float32 or float64"):
        K.gemm(a, np.ones((4, 2), F32))
    with pytest.raises(TypeError, match=rf"gemm: b\.dtype is {np.dtype(bad).name}; "
                                        r"expected float32 like the other inputs"):
        K.gemm(np.ones((3, 4), F32), np.ones((4, 2), bad))


def test_python_lists_are_not_silently_cast():
    # A list of floats becomes float64; of ints, int64 (rejected).
    out = K.gemm([[1.0, 2.0]], [[3.0], [4.0]])
    assert out.dtype == F64 and out[0, 0] == 11.0
    with pytest.raises(TypeError, match=r"gemm: a\.dtype is int64"):
        K.gemm([[1, 2]], [[3.0], [4.0]])


@pytest.mark.parametrize("first, second", [(F32, F64), (F64, F32)], ids=["f32+f64", "f64+f32"])
def test_mixed_dtypes_raise_type_error(first, second):
    f, s = np.dtype(first).name, np.dtype(second).name
    x, w, b = np.ones((2, 3), first), np.ones((3, 4), second), np.ones(4, first)
    with pytest.raises(TypeError, match=rf"gemm: b\.dtype is {s}; expected {f}"):
        K.gemm(np.ones((2, 3), first), np.ones((3, 4), second))
    with pytest.raises(TypeError, match=rf"dense_forward: w\.dtype is {s}; expected {f}"):
        K.dense_forward(x, w, b)
    with pytest.raises(TypeError, match=rf"dense_forward: b\.dtype is {s}; expected {f}"):
        K.dense_forward(x, np.ones((3, 4), first), np.ones(4, second))
    with pytest.raises(TypeError, match=rf"dense_vjp: gz\.dtype is {s}; expected {f}"):
        K.dense_vjp(x, np.ones((3, 4), first), np.ones((2, 4), second))
    with pytest.raises(TypeError, match=rf"activation_vjp: gy\.dtype is {s}; expected {f}"):
        K.activation_vjp("tanh", np.ones(3, first), np.ones(3, second))
    with pytest.raises(TypeError, match=rf"sgd_step: grad\.dtype is {s}; expected {f}"):
        K.sgd_step(np.ones(3, first), np.ones(3, second), lr=0.1)
    with pytest.raises(TypeError, match=rf"adam_step: exp_avg\.dtype is {s}; expected {f}"):
        K.adam_step(np.ones(3, first), np.ones(3, first), np.ones(3, second),
                    np.ones(3, first), step=1, lr=0.1)


def test_none_and_non_arrays():
    with pytest.raises(TypeError, match=r"gemm: a is None; expected a float32 or float64 array"):
        K.gemm(None, np.ones((2, 2)))
    with pytest.raises(TypeError, match=r"dense_forward: x\.dtype is <U"):
        K.dense_forward("abc", np.ones((2, 2)))
    with pytest.raises(TypeError, match=r"gemm: out is a .*list.*; expected a float64 ndarray"):
        K.gemm(np.ones((2, 2)), np.ones((2, 2)), out=[[0.0, 0.0], [0.0, 0.0]])


def test_labels_and_targets_dtypes():
    z = np.zeros((3, 4), F32)
    with pytest.raises(TypeError, match=r"softmax_cross_entropy: labels\.dtype is float64; "
                                        r"expected an integer dtype"):
        K.softmax_cross_entropy(z, np.zeros(3))
    with pytest.raises(TypeError, match=r"soft_cross_entropy: targets\.dtype is complex128; "
                                        r"expected a real number dtype"):
        K.soft_cross_entropy(z, np.zeros((3, 4), complex))
    with pytest.raises(TypeError, match=r"softmax_cross_entropy: logits\.dtype is int64"):
        K.softmax_cross_entropy(np.zeros((3, 4), np.int64), np.zeros(3, int))


# ------------------------------------------------------------------ ndim and shapes


def test_wrong_ndim():
    with pytest.raises(ValueError, match=r"gemm: a\.ndim is 1 \(shape \(3,\)\); expected 2"):
        K.gemm(np.ones(3), np.ones((3, 2)))
    with pytest.raises(ValueError, match=r"gemm: b\.ndim is 3 \(shape \(1, 3, 2\)\); expected 2"):
        K.gemm(np.ones((2, 3)), np.ones((1, 3, 2)))
    with pytest.raises(ValueError, match=r"dense_forward: b\.ndim is 2 \(shape \(1, 4\)\); expected 1"):
        K.dense_forward(np.ones((2, 3)), np.ones((3, 4)), np.ones((1, 4)))
    with pytest.raises(ValueError, match=r"activation_forward: x\.ndim is 3 .*expected 1 or 2"):
        K.activation_forward("softmax", np.ones((2, 3, 4)))
    with pytest.raises(ValueError, match=r"softmax_forward: x\.ndim is 0 .*expected 1 or 2"):
        K.softmax_forward(np.float64(1.0))
    with pytest.raises(ValueError, match=r"softmax_cross_entropy: logits\.ndim is 1"):
        K.softmax_cross_entropy(np.ones(3), np.zeros(3, int))
    with pytest.raises(ValueError, match=r"softmax_cross_entropy: labels\.ndim is 2"):
        K.softmax_cross_entropy(np.ones((3, 2)), np.zeros((3, 1), int))
    # Elementwise activations take any shape, 0-D included.
    assert K.relu_forward(np.float64(-2.0)).shape == ()
    assert K.tanh_forward(np.zeros((2, 1, 3, 1), F32)).shape == (2, 1, 3, 1)


def test_mismatched_shapes():
    with pytest.raises(ValueError, match=r"gemm: b\.shape is \(4, 2\) with trans_b=False; "
                                         r"expected op\(b\) to have k = 3 rows"):
        K.gemm(np.ones((2, 3)), np.ones((4, 2)))
    with pytest.raises(ValueError, match=r"trans_a=True"):
        K.gemm(np.ones((2, 3)), np.ones((3, 2)), trans_a=True)
    K.gemm(np.ones((2, 3)), np.ones((2, 2)), trans_a=True)  # (3,2)@(2,2) is fine
    with pytest.raises(ValueError, match=r"dense_forward: w\.shape is \(5, 3\); expected "
                                         r"\(d_in, d_out\) with d_in = x\.shape\[1\] = 4"):
        K.dense_forward(np.ones((2, 4)), np.ones((5, 3)))
    with pytest.raises(ValueError, match=r"dense_forward: b\.shape is \(4,\); expected \(d_out,\) "
                                         r"with d_out = w\.shape\[1\] = 3"):
        K.dense_forward(np.ones((2, 4)), np.ones((4, 3)), np.ones(4))
    with pytest.raises(ValueError, match=r"dense_vjp: gz\.shape is \(2, 4\); expected "
                                         r"\(n, d_out\) = \(2, 3\)"):
        K.dense_vjp(np.ones((2, 4)), np.ones((4, 3)), np.ones((2, 4)))
    with pytest.raises(ValueError, match=r"dense_vjp: w\.shape is"):
        K.dense_vjp(np.ones((2, 4)), np.ones((3, 3)), np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"activation_vjp: gy\.shape is \(3,\); expected "
                                         r"y\.shape \(4,\)"):
        K.activation_vjp("sigmoid", np.ones(4), np.ones(3))
    with pytest.raises(ValueError, match=r"softmax_cross_entropy: labels\.shape is \(2,\); "
                                         r"expected \(n,\) with n = logits\.shape\[0\] = 3"):
        K.softmax_cross_entropy(np.ones((3, 2)), np.zeros(2, int))
    with pytest.raises(ValueError, match=r"binary_cross_entropy: targets\.shape is \(3, 1\); "
                                         r"expected logits\.shape \(3, 2\)"):
        K.binary_cross_entropy(np.ones((3, 2)), np.zeros((3, 1)))
    with pytest.raises(ValueError, match=r"binary_cross_entropy: targets\.ndim is 2"):
        K.binary_cross_entropy(np.ones(3), np.zeros((3, 1)))
    with pytest.raises(ValueError, match=r"soft_cross_entropy: sample_weight\.shape is \(2,\); "
                                         r"expected \(n,\) with n = 3"):
        K.soft_cross_entropy(np.ones((3, 2)), np.ones((3, 2)), sample_weight=np.ones(2))
    with pytest.raises(ValueError, match=r"sgd_step: grad\.shape is \(4,\); expected "
                                         r"param\.shape \(3,\)"):
        K.sgd_step(np.ones(3), np.ones(4), lr=0.1)
    with pytest.raises(ValueError, match=r"adam_step: exp_avg_sq\.shape is \(4,\); "
                                         r"expected \(3,\)"):
        K.adam_step(np.ones(3), np.ones(3), np.ones(3), np.ones(4), step=1, lr=0.1)
    with pytest.raises(ValueError, match=r"column_sums: out\.shape is \(3,\); expected \(2,\)"):
        K.column_sums(np.ones((3, 2)), out=np.zeros(3))


def test_bad_values():
    with pytest.raises(ValueError, match=r"activation is 'swish'; expected one of identity"):
        K.activation_forward("swish", np.ones(3))
    with pytest.raises(ValueError, match=r"dense_forward: activation is 'gelu'"):
        K.dense_forward(np.ones((2, 2)), np.ones((2, 2)), activation="gelu")
    for slope in (-0.1, np.nan, np.inf):
        with pytest.raises(ValueError, match=r"negative_slope must be finite and >= 0"):
            K.leaky_relu_forward(np.ones(3), negative_slope=slope)
        with pytest.raises(ValueError, match=r"negative_slope must be finite and >= 0"):
            K.activation_vjp("leaky_relu", np.ones(3), np.ones(3), negative_slope=slope)
    with pytest.raises(ValueError, match=r"reduction is 'avg'; expected 'mean' or 'sum'"):
        K.softmax_cross_entropy(np.ones((2, 2)), np.zeros(2, int), reduction="avg")
    with pytest.raises(ValueError, match=r"reduction='mean' needs at least one sample with "
                                         r"positive total weight; got a total of 0\.0"):
        K.binary_cross_entropy(np.ones(2), np.ones(2), sample_weight=np.zeros(2))
    with pytest.raises(ValueError, match=r"gemm: beta is 0\.5; a nonzero beta needs out="):
        K.gemm(np.ones((2, 2)), np.ones((2, 2)), beta=0.5)
    with pytest.raises(ValueError, match=r"sgd_step: lr must be finite; got nan"):
        K.sgd_step(np.ones(3), np.ones(3), lr=float("nan"))
    with pytest.raises(ValueError, match=r"adam_step: beta2 must be finite; got inf"):
        K.adam_step(np.ones(3), np.ones(3), np.ones(3), np.ones(3), step=1, lr=0.1,
                    beta2=float("inf"))
    with pytest.raises(ValueError, match=r"adam_step: step must be >= 1; got 0"):
        K.adam_step(np.ones(3), np.ones(3), np.ones(3), np.ones(3), step=0, lr=0.1)
    with pytest.raises(ValueError, match=r"sgd_step: momentum_buffer is None; expected a "
                                         r"buffer of shape \(3,\)"):
        K.sgd_step(np.ones(3), np.ones(3), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match=r"dense_vjp: accumulate=True needs the gx= buffer"):
        K.dense_vjp(np.ones((2, 2)), np.ones((2, 2)), np.ones((2, 2)), accumulate=True)
    with pytest.raises(ValueError, match=r"column_sums: accumulate=True needs out="):
        K.column_sums(np.ones((2, 2)), accumulate=True)


@pytest.mark.parametrize("label", [3, 7, -1])
def test_labels_out_of_range(label):
    z = np.zeros((4, 3), F32)
    labels = np.array([0, 1, label, 2])
    with pytest.raises(ValueError, match=rf"softmax_cross_entropy: labels\[2\] is {label}; "
                                         r"expected 0 <= label < k = 3"):
        K.softmax_cross_entropy(z, labels)
    with pytest.raises(ValueError, match=r"softmax_cross_entropy: labels\[0\] is 0; "
                                         r"expected 0 <= label < k = 0|logits has 0 classes"):
        K.softmax_cross_entropy(np.zeros((1, 0), F32), np.zeros(1, int))


@pytest.mark.parametrize("bad", [1.5, -0.25, np.inf, -np.inf])
def test_bce_targets_outside_unit_interval(bad, dtype):
    t = np.array([0.0, 1.0, 0.5, bad], dtype)
    with pytest.raises(ValueError, match=r"binary_cross_entropy: targets hold .* at flat index 3; "
                                         r"expected values in \[0, 1\]"):
        K.binary_cross_entropy(np.zeros(4, dtype), t)
    with pytest.raises(ValueError, match=r"at flat index 5"):
        K.binary_cross_entropy(np.zeros((2, 3), dtype),
                               np.array([[0, 1, 0.5], [0, 0, bad]], dtype))


# ------------------------------------------------------------------ out buffers


def _out_cases(dtype):
    other = F64 if dtype == F32 else F32
    other_name = np.dtype(other).name
    strided = np.zeros((3, 4), dtype)[:, ::2]
    ro = np.zeros((3, 2), dtype)
    ro.flags.writeable = False
    fortran = np.zeros((3, 2), dtype, order="F")
    return [
        (np.zeros((2, 3), dtype), ValueError, r"out\.shape is \(2, 3\); expected \(3, 2\)"),
        (np.zeros(6, dtype), ValueError, r"out\.shape is \(6,\); expected \(3, 2\)"),
        (np.zeros((3, 2), other), TypeError, rf"out\.dtype is {other_name}; expected"),
        (np.zeros((3, 2), np.int32), TypeError, r"out\.dtype is int32"),
        (np.zeros((3, 2), np.dtype(dtype).newbyteorder(">")), TypeError, r"out\.dtype is"),
        (strided, ValueError, r"out must be C-contiguous and aligned"),
        (fortran, ValueError, r"out must be C-contiguous and aligned"),
        (ro, ValueError, r"out is read-only"),
    ]


def test_bad_out_buffers(dtype):
    a, b = np.ones((3, 4), dtype), np.ones((4, 2), dtype)
    for out, exc, msg in _out_cases(dtype):
        with pytest.raises(exc, match=r"gemm: " + msg):
            K.gemm(a, b, out=out)
        with pytest.raises(exc, match=r"dense_forward: " + msg):
            K.dense_forward(a, b, out=out)
        with pytest.raises(exc, match=r"activation_forward: " + msg):
            K.activation_forward("relu", np.ones((3, 2), dtype), out=out)
        with pytest.raises(exc, match=r"softmax_vjp: " + msg):
            K.softmax_vjp(np.ones((3, 2), dtype), np.ones((3, 2), dtype), out=out)
        grad_msg = msg.replace("out", "grad")
        with pytest.raises(exc, match=r"softmax_cross_entropy: " + grad_msg):
            K.softmax_cross_entropy(np.ones((3, 2), dtype), np.zeros(3, int), grad=out)
        gw_msg = msg.replace("out", "gw")
        with pytest.raises(exc, match=r"dense_vjp: " + gw_msg):
            K.dense_vjp(np.ones((5, 3), dtype), np.ones((3, 2), dtype), np.ones((5, 2), dtype),
                        gw=out)


def test_bad_state_buffers(dtype):
    p = np.ones((3, 2), dtype)
    g = np.ones((3, 2), dtype)
    for buf, exc, msg in _out_cases(dtype):
        with pytest.raises(exc, match=r"sgd_step: " + msg.replace("out", "momentum_buffer")):
            K.sgd_step(p.copy(), g, buf, lr=0.1, momentum=0.9)
        with pytest.raises(exc, match=r"adam_step: " + msg.replace("out", "exp_avg")):
            K.adam_step(p.copy(), g, buf, np.ones_like(p), step=1, lr=0.1)
    ro = np.ones(3, dtype)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match=r"sgd_step: param is read-only"):
        K.sgd_step(ro, np.ones(3, dtype), lr=0.1)
    with pytest.raises(ValueError, match=r"adam_step: param must be C-contiguous"):
        K.adam_step(np.ones(6, dtype)[::2], np.ones(3, dtype), np.ones(3, dtype),
                    np.ones(3, dtype), step=1, lr=0.1)


def test_outputs_that_overlap_inputs_are_refused():
    a = np.ones((4, 4))
    with pytest.raises(ValueError, match=r"gemm: out shares memory with a; expected a separate"):
        K.gemm(a, np.ones((4, 4)), out=a)
    with pytest.raises(ValueError, match=r"out shares memory with b"):
        b = np.ones((4, 4))
        K.gemm(np.ones((4, 4)), b, out=b)
    with pytest.raises(ValueError, match=r"dense_forward: out shares memory with x"):
        K.dense_forward(a, np.ones((4, 4)), out=a)
    big = np.ones(8)
    with pytest.raises(ValueError, match=r"activation_forward: out shares memory with x"):
        K.activation_forward("relu", big[:4], out=big[2:6])
    p = np.ones(6)
    with pytest.raises(ValueError, match=r"sgd_step: param shares memory with grad"):
        K.sgd_step(p, p, lr=0.1)
    with pytest.raises(ValueError, match=r"adam_step: exp_avg shares memory with exp_avg_sq"):
        m = np.zeros(6)
        K.adam_step(np.ones(6), np.ones(6), m, m, step=1, lr=0.1)
    z = np.ones((2, 3))
    with pytest.raises(ValueError, match=r"softmax_cross_entropy: grad shares memory with logits"):
        K.softmax_cross_entropy(z, np.zeros(2, int), grad=z)


# ------------------------------------------------------------------ zero-sized


@pytest.mark.parametrize("trans_a, trans_b", [(False, False), (True, True)])
def test_gemm_zero_sized(isa, trans_a, trans_b, dtype):
    def ab(m, n, k):
        a = np.ones((k, m) if trans_a else (m, k), dtype)
        b = np.ones((n, k) if trans_b else (k, n), dtype)
        return a, b

    for m, n in ((0, 5), (5, 0), (0, 0)):
        c = K.gemm(*ab(m, n, 3), trans_a=trans_a, trans_b=trans_b)
        assert c.shape == (m, n) and c.dtype == dtype
    # k = 0: an empty sum is 0, and beta still scales C.
    out = np.full((4, 3), np.nan, dtype)
    c = K.gemm(*ab(4, 3, 0), trans_a=trans_a, trans_b=trans_b, out=out)
    assert c is out and (out == 0).all()
    out = np.full((4, 3), 2.0, dtype)
    K.gemm(*ab(4, 3, 0), trans_a=trans_a, trans_b=trans_b, beta=0.5, out=out)
    assert (out == 1.0).all()
    assert (K.gemm(*ab(4, 3, 0), trans_a=trans_a, trans_b=trans_b) == 0).all()


@pytest.mark.parametrize("activation", ["identity", "sigmoid", "relu", "softmax", "log_softmax"])
def test_dense_forward_zero_sized(isa, activation, dtype):
    b = np.array([0.5, -1.0, 2.0], dtype)
    # d_in = 0: y = act(b) in every row.
    y = K.dense_forward(np.ones((4, 0), dtype), np.ones((0, 3), dtype), b, activation=activation)
    ref = R.dense_forward(np.ones((4, 0)), np.ones((0, 3)), b.astype(F64), activation=activation)
    assert y.shape == (4, 3)
    assert_close(y, ref, dtype, k=3)
    y = K.dense_forward(np.ones((4, 0), dtype), np.ones((0, 3), dtype), activation=activation,
                        out=np.full((4, 3), np.nan, dtype))
    assert_close(y, R.dense_forward(np.ones((4, 0)), np.ones((0, 3)), activation=activation),
                 dtype, k=3)
    assert K.dense_forward(np.ones((0, 5), dtype), np.ones((5, 3), dtype), b,
                           activation=activation).shape == (0, 3)
    assert K.dense_forward(np.ones((4, 5), dtype), np.ones((5, 0), dtype), np.ones(0, dtype),
                           activation=activation).shape == (4, 0)


def test_dense_vjp_zero_sized(isa, dtype, rng):
    # n = 0: nothing flows back; gw and gb are zero (or the accumulated buffers).
    gx, gw, gb = K.dense_vjp(np.ones((0, 3), dtype), np.ones((3, 2), dtype),
                             np.ones((0, 2), dtype),
                             gw=np.full((3, 2), np.nan, dtype), gb=np.full(2, np.nan, dtype))
    assert gx.shape == (0, 3)
    assert (gw == 0).all() and (gb == 0).all()
    gw0, gb0 = np.full((3, 2), 1.5, dtype), np.full(2, -2.0, dtype)
    _, gw, gb = K.dense_vjp(np.ones((0, 3), dtype), np.ones((3, 2), dtype),
                            np.ones((0, 2), dtype), gw=gw0.copy(), gb=gb0.copy(),
                            need_gx=False, accumulate=True)
    assert (gw == 1.5).all() and (gb == -2.0).all()
    # d_in = 0: gx and gw are empty; gb is still the column sums.
    gz = random(rng, (5, 3), dtype)
    gx, gw, gb = K.dense_vjp(np.ones((5, 0), dtype), np.ones((0, 3), dtype), gz)
    assert gx.shape == (5, 0) and gw.shape == (0, 3)
    assert_close(gb, gz.astype(F64).sum(axis=0), dtype, k=5)
    # d_out = 0: gx is zero.
    gx, gw, gb = K.dense_vjp(np.ones((5, 2), dtype), np.ones((2, 0), dtype),
                             np.ones((5, 0), dtype), gx=np.full((5, 2), np.nan, dtype))
    assert (gx == 0).all() and gw.shape == (2, 0) and gb.shape == (0,)


def test_other_kernels_zero_sized(isa, dtype):
    for name in ("identity", "sigmoid", "tanh", "relu", "leaky_relu", "softmax", "log_softmax"):
        for shape in ((0,), (0, 3), (3, 0)):
            y = K.activation_forward(name, np.ones(shape, dtype))
            assert y.shape == shape
            assert K.activation_vjp(name, y, np.ones(shape, dtype)).shape == shape
    assert (K.column_sums(np.ones((0, 3), dtype)) == 0).all()
    assert K.column_sums(np.ones((3, 0), dtype)).shape == (0,)
    loss, g = K.softmax_cross_entropy(np.ones((0, 3), dtype), np.zeros(0, int), reduction="sum")
    assert loss == 0.0 and g.shape == (0, 3)
    loss, g = K.binary_cross_entropy(np.ones((0,), dtype), np.zeros(0), reduction="sum")
    assert loss == 0.0 and g.shape == (0,)
    with pytest.raises(ValueError, match=r"needs at least one sample"):
        K.soft_cross_entropy(np.ones((0, 3), dtype), np.zeros((0, 3)))
    p = np.ones(0, dtype)
    K.sgd_step(p, np.ones(0, dtype), np.ones(0, dtype), lr=0.1, momentum=0.9)
    K.adam_step(p, np.ones(0, dtype), np.ones(0, dtype), np.ones(0, dtype), step=1, lr=0.1)


# ------------------------------------------------------------------ NaN / inf data


def test_nan_inf_propagate_through_products(isa, dtype):
    a = np.ones((17, 19), dtype)
    b = np.ones((19, 33), dtype)
    a[3, 5] = np.nan
    b[7, 20] = np.inf
    c = K.gemm(a, b)
    assert np.isnan(c[3]).all()  # NaN row
    rest = np.delete(c, 3, axis=0)
    assert np.isposinf(rest[:, 20]).all() and np.isfinite(np.delete(rest, 20, axis=1)).all()
    y = K.dense_forward(a, b, np.zeros(33, dtype), activation="sigmoid")
    assert np.isnan(y[3]).all()
    gx, gw, gb = K.dense_vjp(a, b, np.ones((17, 33), dtype))
    assert np.isnan(gw[5]).all() and np.isposinf(gx[:, 7]).all()


def test_nan_inf_propagate_through_losses(isa, dtype):
    z = np.zeros((3, 4), dtype)
    z[1, 2] = np.nan
    loss, g = K.softmax_cross_entropy(z, np.array([0, 1, 2]))
    assert np.isnan(loss) and np.isnan(g[1]).all() and np.isfinite(g[[0, 2]]).all()
    loss, g = K.binary_cross_entropy(z, np.full((3, 4), 0.5))
    assert np.isnan(loss) and np.isnan(g[1, 2]) and np.isfinite(np.delete(g.ravel(), 6)).all()
    loss, g = K.binary_cross_entropy(np.zeros(4, dtype), np.array([0.0, np.nan, 1.0, 0.5]))
    assert np.isnan(loss) and np.isnan(g[1])  # NaN targets pass the range check and propagate
    zi = np.zeros((2, 3), dtype)
    zi[0, 0] = np.inf
    loss, g = K.soft_cross_entropy(zi, np.full((2, 3), 1 / 3))
    assert not np.isfinite(loss) or np.isnan(loss)  # no crash; the inf row is not finite


def test_nan_in_optimizer_state_propagates(isa, dtype):
    p = np.array([1.0, 2.0, 3.0], dtype)
    g = np.array([np.nan, 0.5, np.inf], dtype)
    K.sgd_step(p, g, lr=0.1)
    assert np.isnan(p[0]) and p[1] == dtype(2.0) - dtype(0.1) * dtype(0.5) and np.isneginf(p[2])
    p = np.ones(3, dtype)
    m, v = np.zeros(3, dtype), np.zeros(3, dtype)
    K.adam_step(p, np.array([np.nan, 1.0, -1.0], dtype), m, v, step=1, lr=0.1)
    assert np.isnan(p[0]) and np.isfinite(p[1:]).all()


# ------------------------------------------------------------------ absurd sizes


# Each case: (the kernel whose name a ValueError must start with, code).
ABSURD = {
    # The output would hold 2**80 elements: the count itself overflows.
    "gemm_overflowing_count": ("gemm", """
        a = np.empty((2**40, 0), np.float32); b = np.empty((0, 2**40), np.float32)
        K.gemm(a, b)
    """),
    "gemm_trans_overflow": ("gemm", """
        a = np.empty((0, 2**40), np.float64); b = np.empty((2**40, 0), np.float64)
        K.gemm(a, b, trans_a=True, trans_b=True)
    """),
    "dense_forward_overflow": ("dense_forward", """
        K.dense_forward(np.empty((2**40, 0)), np.empty((0, 2**40)))
    """),
    # Outputs of 4 and 32 PiB: more than the address space.
    "gemm_petabytes": ("gemm", """
        a = np.empty((2**25, 0), np.float32); b = np.empty((0, 2**25), np.float32)
        K.gemm(a, b)
    """),
    "dense_forward_petabytes": ("dense_forward", """
        K.dense_forward(np.empty((2**26, 0)), np.empty((0, 2**26)), activation="relu")
    """),
    # Inputs that are broadcast views (stride 0) must be copied, and the copy
    # cannot be had.
    "gemm_copy_of_broadcast_input": ("gemm", """
        a = np.broadcast_to(np.ones((1, 1), np.float32), (2**40, 1))
        K.gemm(a, np.ones((1, 1), np.float32))
    """),
    "dense_vjp_copy_of_broadcast_w": ("dense_vjp", """
        w = np.broadcast_to(np.float64(0.5), (2**25, 2**25))
        K.dense_vjp(np.empty((0, 2**25)), w, np.empty((0, 2**25)))
    """),
    "activation_copy_of_broadcast_input": ("sigmoid_forward", """
        K.sigmoid_forward(np.broadcast_to(np.float64(1.0), (2**22, 2**22)))
    """),
    "loss_copy_of_broadcast_logits": ("binary_cross_entropy", """
        z = np.broadcast_to(np.float32(0.0), (2**40,))
        K.binary_cross_entropy(z, np.broadcast_to(np.float32(0.5), (2**40,)))
    """),
    "optimizer_copy_of_broadcast_grad": ("sgd_step", """
        p = np.zeros(2**20, np.float32)
        K.sgd_step(p, np.broadcast_to(np.float32(1.0), (2**20, 2**20)), lr=0.1)
    """),
}

@pytest.mark.parametrize("case", list(ABSURD))
def test_absurd_sizes_raise_in_subprocess(case):
    fn, body = ABSURD[case]
    code = f"""
import numpy as np
import chainrule.kernels as K
try:
{textwrap.indent(textwrap.dedent(body), '    ')}
except (MemoryError, ValueError) as e:
    print("RAISED", type(e).__name__, str(e)[:300])
else:
    print("NO ERROR")
"""
    proc = _run_python(code, timeout=120)
    assert proc.returncode == 0, (
        f"subprocess died with code {proc.returncode} (a crash?)\n"
        f"stdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-2000:]}")
    line = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert line.startswith("RAISED"), proc.stdout + proc.stderr
    # MemoryError from NumPy's allocator, or an error that names the kernel.
    assert (line.startswith("RAISED MemoryError") or line.startswith(f"RAISED ValueError {fn}: ")), line
    if "copy_of" in case:  # the failed copy names the kernel and the argument
        assert line.startswith(f"RAISED MemoryError {fn}: cannot make a contiguous copy of "), line


# ------------------------------------------------------------------ threads and ISA


def test_set_num_threads_errors():
    with pytest.raises(ValueError, match=r"set_num_threads: n must be in \[1, 4096\]; got 0"):
        K.set_num_threads(0)
    with pytest.raises(ValueError, match=r"got -3"):
        K.set_num_threads(-3)
    with pytest.raises(TypeError, match=r"set_num_threads: n is a <class 'str'>; expected an int"):
        K.set_num_threads("2")
    with pytest.raises(TypeError, match=r"n is a <class 'float'>"):
        K.set_num_threads(2.0)
    with pytest.raises(TypeError, match=r"n is a <class 'bool'>"):
        K.set_num_threads(True)
    K.set_num_threads(3)
    assert K.get_num_threads() == 3


def test_set_isa_errors():
    before = K.isa()
    names = ", ".join(available_isas())
    with pytest.raises(ValueError, match=rf"set_isa: 'bogus' is not available; expected one of "
                                         rf"{names}$"):
        K.set_isa("bogus")
    with pytest.raises(ValueError, match=r"set_isa: 'AVX2' is not available"):
        K.set_isa("AVX2")
    assert K.isa() == before


@pytest.mark.parametrize("name", available_isas())
def test_env_var_forces_isa(name):
    proc = _run_python("import chainrule.kernels as K; print(K.isa())",
                       {"CHAINRULE_ISA": name})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == name
    assert proc.stderr == ""


@pytest.mark.parametrize("value", ["bogus", "avx1024"])
def test_env_var_bogus_warns_and_uses_best(value):
    code = """
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import chainrule.kernels as K
        for w in caught:
            print("WARNING", w.category.__name__, str(w.message))
        print("ISA", K.isa(), K.available_isas()[-1])
    """
    proc = _run_python(code, {"CHAINRULE_ISA": value})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    warnings_seen = [ln for ln in lines if ln.startswith("WARNING")]
    assert len(warnings_seen) == 1, proc.stdout
    assert warnings_seen[0].startswith(f"WARNING RuntimeWarning CHAINRULE_ISA='{value}' is not "
                                       f"available on this CPU")
    _, used, best = [ln for ln in lines if ln.startswith("ISA")][0].split()
    assert used == best


def test_env_var_unavailable_isa_warns_if_cpu_lacks_it():
    missing = [n for n in ("avx2", "avx512") if n not in available_isas()]
    if not missing:
        pytest.skip("this CPU runs every ISA")
    proc = _run_python("import warnings; warnings.simplefilter('error'); "
                       "import chainrule.kernels", {"CHAINRULE_ISA": missing[0]})
    assert proc.returncode != 0 and "RuntimeWarning" in proc.stderr


def test_omp_num_threads_sets_default():
    proc = _run_python("import chainrule.kernels as K; print(K.get_num_threads())",
                       {"OMP_NUM_THREADS": "3"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "3"
