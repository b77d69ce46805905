"""Run-time ISA dispatch, and property tests over random small problems.

The kernel table is chosen once at import (best ISA, or CHAINRULE_ISA) and can
be switched with set_isa; every ISA must agree with the reference. Hypothesis
then draws shapes (0 and 1 included), transposes, dtypes, alpha/beta, thread
counts and ISAs for gemm and dense_forward.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import DTYPES, K, R, assert_close, available_isas, bits_equal, gemm_scale, random

# The autouse fixture restores the ISA and thread count once per test, not per
# example; every example sets both itself, so sharing it is safe. For a long
# search: CHAINRULE_HYPOTHESIS_EXAMPLES=5000 pytest tests/test_dispatch.py
PROPERTY = settings(max_examples=int(os.environ.get("CHAINRULE_HYPOTHESIS_EXAMPLES", "60")),
                    deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def test_isa_is_available():
    assert K.isa() in K.available_isas()
    forced = os.environ.get("CHAINRULE_ISA", "")
    if forced in K.available_isas():
        assert K.isa() == forced
    else:
        assert K.isa() == K.available_isas()[-1]  # the best this CPU runs


def test_scalar_always_available_and_order():
    isas = K.available_isas()
    assert isas[0] == "scalar"
    assert set(isas) <= {"scalar", "avx2", "avx512"}
    order = ["scalar", "avx2", "avx512"]
    assert isas == [n for n in order if n in isas], "lowest first"
    if "avx512" in isas:
        assert "avx2" in isas


def test_set_isa_switches_every_kernel_set():
    for name in available_isas():
        K.set_isa(name)
        assert K.isa() == name
    for name in reversed(available_isas()):
        K.set_isa(name)
        assert K.isa() == name


def test_available_isas_is_stable():
    assert K.available_isas() == K.available_isas()
    K.set_isa("scalar")
    assert K.available_isas()[0] == "scalar" and len(K.available_isas()) == len(available_isas())


def _small_suite(rng, dtype):
    """One call to every kernel, returning what it produced."""
    a = random(rng, (17, 33), dtype)
    b = random(rng, (33, 15), dtype)
    bias = random(rng, (15,), dtype)
    gz = random(rng, (17, 15), dtype)
    labels = rng.integers(0, 15, size=17)
    p, g = random(rng, (65,), dtype), random(rng, (65,), dtype)
    out = {
        "gemm": K.gemm(a, b),
        "gemm_tt": K.gemm(b, a, trans_a=True, trans_b=True),
        "dense_forward": K.dense_forward(a, b, bias, activation="sigmoid"),
        "dense_vjp": K.dense_vjp(a, b, gz),
        "tanh": K.tanh_forward(a),
        "log_softmax": K.log_softmax_forward(a),
        "softmax_vjp": K.softmax_vjp(K.softmax_forward(a), a),
        "sce": K.softmax_cross_entropy(gz, labels),
        "bce": K.binary_cross_entropy(gz, np.abs(gz)),
        "column_sums": K.column_sums(a),
    }
    p1 = p.copy()
    K.sgd_step(p1, g, lr=0.1)
    p2, m, v = p.copy(), np.zeros_like(p), np.zeros_like(p)
    K.adam_step(p2, g, m, v, step=1, lr=0.01)
    out["sgd"], out["adam"] = p1, p2
    return out, (a, b, bias, gz, labels, p, g)


@pytest.mark.parametrize("isa_name", available_isas())
def test_every_isa_matches_reference(isa_name, dtype, rng):
    K.set_isa(isa_name)
    got, (a, b, bias, gz, labels, p, g) = _small_suite(rng, dtype)
    assert K.isa() == isa_name
    assert_close(got["gemm"], R.gemm(a, b), dtype, k=33, scale=gemm_scale(a, b))
    assert_close(got["gemm_tt"], R.gemm(b, a, trans_a=True, trans_b=True), dtype, k=17,
                 scale=gemm_scale(b, a, trans_a=True, trans_b=True))
    assert_close(got["dense_forward"], R.dense_forward(a, b, bias, activation="sigmoid"),
                 dtype, k=33, scale=gemm_scale(a, b) + 1)
    for x, y, kk in zip(got["dense_vjp"], R.dense_vjp(a, b, gz), (15, 17, 17)):
        assert_close(x, y, dtype, k=kk)
    assert_close(got["tanh"], R.tanh_forward(a), dtype)
    assert_close(got["log_softmax"], R.log_softmax_forward(a), dtype, k=33)
    assert_close(got["softmax_vjp"], R.softmax_vjp(R.softmax_forward(a), a), dtype, k=33)
    for x, y in zip(got["sce"], R.softmax_cross_entropy(gz, labels)):
        assert_close(np.asarray(x), y, dtype, k=gz.size)
    for x, y in zip(got["bce"], R.binary_cross_entropy(gz, np.abs(gz))):
        assert_close(np.asarray(x), y, dtype, k=gz.size)
    assert_close(got["column_sums"], R.column_sums(a), dtype, k=17)
    pr = p.astype(np.float64)
    R.sgd_step(pr, g, lr=0.1)
    assert_close(got["sgd"], pr, dtype)
    pr, m, v = p.astype(np.float64), np.zeros(p.shape), np.zeros(p.shape)
    R.adam_step(pr, g, m, v, step=1, lr=0.01)
    assert_close(got["adam"], pr, dtype)


def test_isas_agree_with_each_other(dtype):
    """Each ISA's answers are within tolerance of the scalar path's."""
    results = {}
    for name in available_isas():
        K.set_isa(name)
        results[name], _ = _small_suite(np.random.default_rng(7), dtype)
    base = results["scalar"]
    for name, res in results.items():
        for key, val in res.items():
            vals = val if isinstance(val, tuple) else (val,)
            refs = base[key] if isinstance(base[key], tuple) else (base[key],)
            for x, y in zip(vals, refs):
                assert_close(np.asarray(x), np.asarray(y, np.float64), dtype, k=64,
                             err_msg=f"{name} vs scalar: {key}")


def test_switching_isa_is_deterministic(dtype, rng):
    """Going scalar -> best -> scalar gives the same bits each time on each ISA."""
    a, b = random(rng, (65, 63), dtype), random(rng, (63, 33), dtype)
    first = {}
    for name in available_isas():
        K.set_isa(name)
        first[name] = K.gemm(a, b)
    for name in reversed(available_isas()):
        K.set_isa(name)
        assert bits_equal(K.gemm(a, b), first[name]), name


# ------------------------------------------------------------------ properties

dims = st.integers(min_value=0, max_value=40) | st.sampled_from([0, 1, 15, 16, 17, 31, 33])
scalars = st.sampled_from([0.0, 1.0, -1.0, 0.5, 2.0]) | st.floats(-3, 3, allow_nan=False,
                                                                   width=32)


@PROPERTY
@given(m=dims, n=dims, k=dims, trans_a=st.booleans(), trans_b=st.booleans(),
       dtype=st.sampled_from(DTYPES), alpha=scalars, beta=scalars,
       threads=st.sampled_from([1, 2]), isa_name=st.sampled_from(available_isas()),
       seed=st.integers(0, 2**32 - 1))
def test_gemm_property(m, n, k, trans_a, trans_b, dtype, alpha, beta, threads, isa_name, seed):
    K.set_isa(isa_name)
    K.set_num_threads(threads)
    rng = np.random.default_rng(seed)
    a = random(rng, (k, m) if trans_a else (m, k), dtype)
    b = random(rng, (n, k) if trans_b else (k, n), dtype)
    c0 = random(rng, (m, n), dtype)
    out = c0.copy() if beta != 0.0 else np.full((m, n), np.nan, dtype)
    res = K.gemm(a, b, trans_a=trans_a, trans_b=trans_b, alpha=alpha, beta=beta, out=out)
    assert res is out and out.shape == (m, n) and out.dtype == dtype
    ref = R.gemm(a, b, trans_a=trans_a, trans_b=trans_b, alpha=alpha, beta=beta,
                 out=c0.astype(np.float64))
    scale = gemm_scale(a, b, trans_a=trans_a, trans_b=trans_b, alpha=alpha, beta=beta, c=c0)
    assert_close(out, ref, dtype, k=k, scale=scale + np.finfo(dtype).tiny)
    # Bit-identical at the other thread count.
    K.set_num_threads(3 - threads)
    out2 = c0.copy() if beta != 0.0 else None
    res2 = K.gemm(a, b, trans_a=trans_a, trans_b=trans_b, alpha=alpha, beta=beta, out=out2)
    assert bits_equal(res2, out)


@PROPERTY
@given(n=dims, d_in=dims, d_out=dims, bias=st.booleans(),
       activation=st.sampled_from(["identity", "sigmoid", "tanh", "relu", "leaky_relu",
                                   "softmax", "log_softmax"]),
       slope=st.sampled_from([0.0, 0.01, 0.3, 1.0]),
       dtype=st.sampled_from(DTYPES), threads=st.sampled_from([1, 2]),
       isa_name=st.sampled_from(available_isas()), seed=st.integers(0, 2**32 - 1))
def test_dense_forward_property(n, d_in, d_out, bias, activation, slope, dtype, threads,
                                isa_name, seed):
    K.set_isa(isa_name)
    K.set_num_threads(threads)
    rng = np.random.default_rng(seed)
    x = random(rng, (n, d_in), dtype)
    w = random(rng, (d_in, d_out), dtype)
    b = random(rng, (d_out,), dtype) if bias else None
    y = K.dense_forward(x, w, b, activation=activation, negative_slope=slope)
    assert y.shape == (n, d_out) and y.dtype == dtype
    if y.size == 0:
        return  # (the reference's softmax cannot reduce over an empty row)
    ref = R.dense_forward(x, w, b, activation=activation, negative_slope=slope)
    scale = gemm_scale(x, w) + (np.abs(b.astype(np.float64)) if bias else 0.0)
    if activation in ("softmax", "log_softmax"):
        scale = np.broadcast_to(scale.max(axis=1, keepdims=True), scale.shape)
    assert_close(y, ref, dtype, k=d_in + d_out, scale=scale + np.finfo(dtype).tiny)
    # The unfused path (gemm, then bias, then the activation kernel) agrees.
    z = K.gemm(x, w) + (b if bias else 0)
    assert_close(K.activation_forward(activation, z, negative_slope=slope), ref, dtype,
                 k=d_in + d_out, scale=scale + np.finfo(dtype).tiny)
    K.set_num_threads(3 - threads)
    assert bits_equal(K.dense_forward(x, w, b, activation=activation, negative_slope=slope), y)


@PROPERTY
@given(n=dims, d_in=dims, d_out=dims, dtype=st.sampled_from(DTYPES),
       need=st.tuples(st.booleans(), st.booleans(), st.booleans()),
       accumulate=st.booleans(), isa_name=st.sampled_from(available_isas()),
       seed=st.integers(0, 2**32 - 1))
def test_dense_vjp_property(n, d_in, d_out, dtype, need, accumulate, isa_name, seed):
    K.set_isa(isa_name)
    rng = np.random.default_rng(seed)
    x, w, gz = (random(rng, s, dtype) for s in ((n, d_in), (d_in, d_out), (n, d_out)))
    bufs0 = [random(rng, s, dtype) for s in ((n, d_in), (d_in, d_out), (d_out,))]
    bufs = [bb.copy() if accumulate else None for bb in bufs0]
    got = K.dense_vjp(x, w, gz, gx=bufs[0], gw=bufs[1], gb=bufs[2], need_gx=need[0],
                      need_gw=need[1], need_gb=need[2], accumulate=accumulate)
    ref = R.dense_vjp(x, w, gz, gx=[bb.astype(np.float64) for bb in bufs0][0],
                      gw=bufs0[1].astype(np.float64), gb=bufs0[2].astype(np.float64),
                      need_gx=need[0], need_gw=need[1], need_gb=need[2], accumulate=accumulate)
    scales = (gemm_scale(gz, w, trans_b=True), gemm_scale(x, gz, trans_a=True),
              np.abs(gz.astype(np.float64)).sum(axis=0))
    for g, r, s, b0, kk in zip(got, ref, scales, bufs0, (d_out, n, n)):
        if r is None:
            assert g is None
            continue
        extra = np.abs(b0.astype(np.float64)) if accumulate else 0.0
        assert_close(g, r, dtype, k=kk, scale=s + extra + np.finfo(dtype).tiny)
