"""Shared fixtures and the one definition of the test tolerances.

Tolerances
----------
A kernel is compared with its float64 NumPy twin in :mod:`chainrule.reference`.
Rounding error grows with the length ``k`` of the reduction behind each output
(a GEMM's inner dimension, a softmax row, a loss's element count), so the
relative tolerance is ``C * eps(dtype) * sqrt(k)`` (blocked sums of random
data grow like sqrt(k); the worst case, k, is never reached in practice). It
is applied against a *scale*: for products the elementwise bound
``|alpha| |op(a)| @ |op(b)| + |beta| |c|``, which is what a backward-stable
GEMM promises; elsewhere ``max(|expected|)`` of the array, so that values
near zero produced by cancellation do not demand a relative accuracy no
implementation has. ``C`` leaves room for SIMD exp/tanh approximations of a
few ulp.

Helpers here are imported by the tests (``from conftest import ...``).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

# Hypothesis imports libcst to write a patch when a property test fails, and
# libcst (where installed) touches the deprecated mypy_extensions.TypedDict:
# under filterwarnings=error that DeprecationWarning would turn a clean test
# failure into an INTERNALERROR. Import it once here, quietly.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    try:
        import libcst.metadata  # noqa: F401
    except ImportError:
        pass

import chainrule.kernels as K
import chainrule.reference as R

DTYPES = (np.float32, np.float64)

# The constant C above. Elementwise transcendentals of a good SIMD library are
# within ~4 ulp; sums add at most ~sqrt(k) ulp more on random data.
TOL_C = 16.0


def tolerance(dtype, k: int = 1, c: float = TOL_C) -> float:
    """Relative tolerance for a result of dtype built from a k-term reduction."""
    eps = float(np.finfo(dtype).eps)
    return c * eps * float(np.sqrt(max(int(k), 1)))


def assert_close(actual, expected, dtype, *, k: int = 1, scale=None, c: float = TOL_C,
                 err_msg: str = ""):
    """Assert |actual - expected| <= tol * (|expected| + scale), tol = tolerance(dtype, k).

    ``scale`` defaults to max(|expected|) over the array (1 for an empty or
    all-zero array); pass an array for elementwise bounds (GEMM). NaN must
    match NaN and +-inf must match exactly.
    """
    actual = np.asarray(actual)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"shape {actual.shape} != {expected.shape}"
    tol = tolerance(dtype, k, c)
    if scale is None:
        finite = expected[np.isfinite(expected)]
        scale = float(np.max(np.abs(finite))) if finite.size else 1.0
        scale = scale if scale > 0 else 1.0
    scale = np.asarray(scale, dtype=np.float64)
    a64 = actual.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        _compare(a64, expected, tol, scale, k, err_msg)


def _compare(a64, expected, tol, scale, k, err_msg):
    # NaN and inf positions must agree exactly.
    np.testing.assert_array_equal(np.isnan(a64), np.isnan(expected),
                                  err_msg=f"NaN positions differ. {err_msg}")
    inf = np.isinf(expected)
    np.testing.assert_array_equal(a64[inf], expected[inf], err_msg=f"inf differs. {err_msg}")
    ok = np.isfinite(expected)
    bound = tol * (np.abs(expected) + scale)
    bound = np.broadcast_to(bound, expected.shape)
    err = np.abs(a64 - expected)
    bad = ok & ~(err <= bound)
    if bad.any():
        i = np.argmax(np.where(bad, err / np.where(bound > 0, bound, 1.0), 0.0))
        idx = np.unravel_index(i, expected.shape) if expected.ndim else ()
        raise AssertionError(
            f"{int(bad.sum())} of {expected.size} elements out of tolerance "
            f"(rtol {tol:.3g}, k={k}); worst at {idx}: got {a64[idx]!r}, expected "
            f"{expected[idx]!r}, |err| {err[idx]:.3g} > bound {bound[idx]:.3g}. {err_msg}")


def gemm_scale(a, b, *, trans_a=False, trans_b=False, alpha=1.0, beta=0.0, c=None):
    """Elementwise error scale of a GEMM: |alpha| |op(a)| @ |op(b)| + |beta| |c|."""
    a = np.abs(np.asarray(a, dtype=np.float64))
    b = np.abs(np.asarray(b, dtype=np.float64))
    s = abs(alpha) * ((a.T if trans_a else a) @ (b.T if trans_b else b))
    if beta != 0.0 and c is not None:
        s = s + abs(beta) * np.abs(np.asarray(c, dtype=np.float64))
    return s


def bits_equal(x, y) -> bool:
    """The raw bytes agree (so +0/-0 and NaN payloads count too)."""
    x, y = np.ascontiguousarray(x), np.ascontiguousarray(y)
    return x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()


def available_isas() -> list[str]:
    """The instruction sets this CPU can run, lowest first ("scalar" always)."""
    return list(K.available_isas())


def random(rng, shape, dtype, low=-1.0, high=1.0):
    """Uniform random array of the given dtype."""
    return rng.uniform(low, high, size=shape).astype(dtype)


@pytest.fixture
def rng():
    return np.random.default_rng(20261126)


@pytest.fixture(params=DTYPES, ids=["f32", "f64"])
def dtype(request):
    return request.param


@pytest.fixture(params=available_isas())
def isa(request):
    """Run the test on every ISA this machine can run (restored afterwards)."""
    K.set_isa(request.param)
    return request.param


@pytest.fixture(autouse=True)
def _restore_isa_and_threads():
    isa_before, threads_before = K.isa(), K.get_num_threads()
    yield
    K.set_isa(isa_before)
    K.set_num_threads(threads_before)


__all__ = ["DTYPES", "K", "R", "TOL_C", "assert_close", "available_isas", "bits_equal",
           "gemm_scale", "random", "tolerance"]
