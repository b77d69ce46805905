"""Every native kernel against its NumPy twin in chainrule.reference.

Each parity test runs on every ISA this machine can run (the ``isa`` fixture),
in float32 and float64, on sizes that make tail loops run: 1, primes, vector
widths +-1, MLP shapes and one GEMM larger than the L2 cache. Also: thread
counts 1 and 2 give bit-identical results, strided inputs give the results of
contiguous ones, ``out=`` buffers are reused, large and non-finite inputs stay
well behaved, and the VJPs agree with central differences in float64.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from conftest import K, R, assert_close, available_isas, bits_equal, gemm_scale, random

TRANSPOSES = list(itertools.product([False, True], repeat=2))
TRANS_IDS = ["NN", "NT", "TN", "TT"]

# (m, n, k): one, primes, vector widths +-1 in every position, MLP shapes.
GEMM_SHAPES = [
    (1, 1, 1),
    (7, 13, 17),
    (13, 17, 7),
    (17, 7, 13),
    (15, 16, 17),
    (16, 17, 15),
    (17, 15, 16),
    (31, 33, 63),
    (33, 63, 31),
    (63, 65, 33),
    (65, 31, 15),
    (1, 10, 784),
    (256, 512, 784),
]

# (n, d_in, d_out)
DENSE_SHAPES = [
    (1, 1, 1),
    (7, 13, 17),
    (17, 7, 13),
    (15, 16, 17),
    (16, 17, 15),
    (31, 33, 63),
    (65, 63, 33),
    (1, 784, 10),
    (256, 784, 512),
    (300, 33, 1),   # one output: the matrix-vector path, with bias and activation
    (9, 257, 1),
]

ACTIVATIONS = ("identity", "sigmoid", "tanh", "relu", "leaky_relu", "softmax", "log_softmax")
ELEMENTWISE = ("identity", "sigmoid", "tanh", "relu", "leaky_relu")
ROWWISE = ("softmax", "log_softmax")

# Shapes for activations: 1-D sizes around vector widths, 2-D rows, and (for
# elementwise activations) a 3-D array.
ACT_SHAPES = [(1,), (7,), (15,), (16,), (17,), (31,), (33,), (63,), (65,), (1, 1), (7, 13),
              (13, 65), (5, 16), (3, 17, 5)]

SIZES_1D = [1, 7, 13, 15, 16, 17, 31, 33, 63, 65, 1000]

# Large enough that every kernel runs on 2 threads (see kParallelFlops /
# kParallelElems in csrc/kernels/common.hpp: 2e6 flops, 65536 elements).
BIG_ELEMS = 1 << 18


def _ab(rng, m, n, k, ta, tb, dtype):
    a = random(rng, (k, m) if ta else (m, k), dtype)
    b = random(rng, (n, k) if tb else (k, n), dtype)
    return a, b


def _two_threads(fn):
    """fn() at 1 and at 2 threads, checking on the way that 3 (more threads
    than this 2-core machine has: uneven splits) gives the bits of 2."""
    K.set_num_threads(1)
    r1 = fn()
    K.set_num_threads(3)
    r3 = fn()
    K.set_num_threads(2)
    r2 = fn()
    _assert_bits_equal_nested(r2, r3)
    return r1, r2


def _assert_bits_equal_nested(r1, r2):
    if isinstance(r1, tuple):
        assert len(r1) == len(r2)
        for x, y in zip(r1, r2):
            _assert_bits_equal_nested(x, y)
    elif r1 is None:
        assert r2 is None
    elif isinstance(r1, float):
        assert float(r1).hex() == float(r2).hex(), (r1, r2)
    else:
        assert bits_equal(r1, r2), (
            f"thread counts disagree: max |diff| "
            f"{np.max(np.abs(np.asarray(r1, np.float64) - np.asarray(r2, np.float64)))}")


def _activation_input(rng, name, shape, dtype):
    x = random(rng, shape, dtype, -6.0, 6.0)
    if name in ("relu", "leaky_relu"):
        x[np.abs(x) < 1e-3] = 0.5  # keep away from the kink
    return x


def _vjp_scale(expected, gy):
    return max(float(np.max(np.abs(expected), initial=0.0)),
               float(np.max(np.abs(gy.astype(np.float64)), initial=0.0)), 1e-300)


def _rowwise_scale(s):
    """Broadcast each row's max to the row (softmax errors mix a whole row)."""
    s = np.asarray(s, np.float64)
    return np.broadcast_to(np.max(s, axis=-1, keepdims=True), s.shape)


# ------------------------------------------------------------------ gemm


@pytest.mark.parametrize("trans_a, trans_b", TRANSPOSES, ids=TRANS_IDS)
@pytest.mark.parametrize("m, n, k", GEMM_SHAPES)
def test_gemm_matches_reference(isa, m, n, k, trans_a, trans_b, dtype, rng):
    a, b = _ab(rng, m, n, k, trans_a, trans_b, dtype)
    c = K.gemm(a, b, trans_a=trans_a, trans_b=trans_b)
    assert c.dtype == dtype and c.shape == (m, n) and c.flags.c_contiguous
    ref = R.gemm(a, b, trans_a=trans_a, trans_b=trans_b)
    assert_close(c, ref, dtype, k=k, scale=gemm_scale(a, b, trans_a=trans_a, trans_b=trans_b))


def _check_gemm_into_out(rng, m, n, k, trans_a, trans_b, dtype, alpha_betas):
    """K.gemm into a filled out= against the float64 reference, per (alpha, beta)."""
    a, b = _ab(rng, m, n, k, trans_a, trans_b, dtype)
    c0 = random(rng, (m, n), dtype)
    for alpha, beta in alpha_betas:
        out = c0.copy()
        K.gemm(a, b, trans_a=trans_a, trans_b=trans_b, alpha=alpha, beta=beta, out=out)
        ref = R.gemm(a, b, trans_a=trans_a, trans_b=trans_b, alpha=alpha, beta=beta,
                     out=c0.astype(np.float64))
        scale = gemm_scale(a, b, trans_a=trans_a, trans_b=trans_b, alpha=alpha, beta=beta, c=c0)
        assert_close(out, ref, dtype, k=k, scale=scale)


# Shapes too big for the direct path, so they go through packing: K blocks
# whose depth is not a multiple of the vector width (1100 -> 4 x 224 + 204
# with A packed; 560 + 540 where AVX-512 reads a row-major A in place),
# a k tail of 1 (257), exactly one and a partial MR-row sliver, a partial
# NR-column sliver.
PACKED_SHAPES = [(29, 70, 1100), (301, 299, 257), (14, 1000, 70), (13, 1000, 70)]

# NN products that AVX-512 runs on the direct path with B read in place
# (use_direct's deep rule, k <= 1024, fewer than 256 rows): the (c) forward
# 128 x 256 x 784 (1 KiB rows of B in float32), partial tiles and strips
# (29 x 70), A in several L2 panels (200 x 60 x 1000: 130 rows per panel in
# float32, 65 in float64), rows past 128 with narrow B; 300 x 100 x 1000 just
# past the rule, on the blocked path with A read in place. The other
# transposes and ISAs take their usual paths on the same shapes.
DEEP_DIRECT_SHAPES = [(128, 256, 784), (29, 70, 1001), (200, 60, 1000), (131, 64, 1024),
                      (300, 100, 1000)]


@pytest.mark.parametrize("trans_a, trans_b", TRANSPOSES, ids=TRANS_IDS)
@pytest.mark.parametrize("m, n, k", PACKED_SHAPES)
def test_gemm_packed_path_edges(isa, m, n, k, trans_a, trans_b, dtype, rng):
    _check_gemm_into_out(rng, m, n, k, trans_a, trans_b, dtype, [(-0.5, 0.25)])


@pytest.mark.parametrize("trans_a, trans_b", TRANSPOSES, ids=TRANS_IDS)
@pytest.mark.parametrize("m, n, k", DEEP_DIRECT_SHAPES)
def test_gemm_deep_direct_shapes(isa, m, n, k, trans_a, trans_b, dtype, rng):
    _check_gemm_into_out(rng, m, n, k, trans_a, trans_b, dtype, [(1.0, 0.0), (-0.5, 0.25)])


# Short and narrow products. Fewer rows of A than one direct tile (13 on
# AVX-512, 6 on AVX2) with a row-major B too big for the small direct path:
# use_direct's short rule reads B in place (10 x 1024 x 256 is gZ^T X for a
# 10-wide output layer; 1 x 4000 x 1000 a single sample with 16000-byte rows;
# 5 x 3000 x 200 for AVX2), but not a full tile (13 x 2000 x 300) nor k past
# 1024 (10 x 1024 x 1100). A C narrower than one vector with A transposed (X^T
# gZ; 1024 x 10 x 256 is the (d) output layer's dW) is computed as its
# transpose (narrow_transposed) on AVX-512 and AVX2 (float64 AVX2 vectors
# are 4 wide: 100 x 3 x 400), unless that transpose is itself unsuited
# (40 x 15 x 3000). The other transposes and ISAs take their usual paths.
NARROW_SHAPES = [(10, 1024, 256), (12, 2000, 300), (1, 4000, 1000), (5, 3000, 200),
                 (13, 2000, 300), (10, 1024, 1100), (1024, 10, 256), (300, 7, 700),
                 (100, 3, 400), (40, 15, 3000)]


@pytest.mark.parametrize("trans_a, trans_b", TRANSPOSES, ids=TRANS_IDS)
@pytest.mark.parametrize("m, n, k", NARROW_SHAPES)
def test_gemm_short_and_narrow_shapes(isa, m, n, k, trans_a, trans_b, dtype, rng):
    _check_gemm_into_out(rng, m, n, k, trans_a, trans_b, dtype, [(1.0, 0.0), (-0.5, 0.25)])


@pytest.mark.parametrize("m, n, k, trans_a", [(10, 4000, 1000, False), (10, 4000, 1000, True),
                                              (4000, 10, 1000, True), (3000, 7, 900, True)])
def test_gemm_short_and_narrow_threads(isa, m, n, k, trans_a, dtype, rng):
    """Column strips of B on 2 threads (of A^T's transpose for the narrow C):
    the bits of 1 thread, and never a read of a beta = 0 output."""
    a, b = _ab(rng, m, n, k, trans_a, False, dtype)

    def run():
        out = np.full((m, n), np.nan, dtype)
        return K.gemm(a, b, trans_a=trans_a, alpha=0.75, out=out)
    c1, c2 = _two_threads(run)
    _assert_bits_equal_nested(c1, c2)
    assert_close(c2, R.gemm(a, b, trans_a=trans_a, alpha=0.75), dtype, k=k,
                 scale=gemm_scale(a, b, trans_a=trans_a, alpha=0.75))


# (n, d_in, d_out): B wider than A is tall, so 2 threads take column strips
# (bias and activation offset per strip); then A taller than B is wide, so
# they take row tiles, each in L2 panels (65 rows in float64).
@pytest.mark.parametrize("n, d_in, d_out", [(128, 784, 256), (200, 1000, 60)])
def test_dense_forward_deep_direct_threads(isa, n, d_in, d_out, dtype, rng):
    x = random(rng, (n, d_in), dtype)
    w = random(rng, (d_in, d_out), dtype, -2.0 / np.sqrt(d_in), 2.0 / np.sqrt(d_in))
    b = random(rng, (d_out,), dtype)
    y1, y2 = _two_threads(lambda: K.dense_forward(x, w, b, activation="leaky_relu",
                                                  negative_slope=0.1))
    _assert_bits_equal_nested(y1, y2)
    ref = R.dense_forward(x, w, b, activation="leaky_relu", negative_slope=0.1)
    assert_close(y2, ref, dtype, k=d_in, scale=gemm_scale(x, w) + np.abs(b.astype(np.float64)))


def test_gemm_tall_row_major_a_blocking_threads(dtype, rng):
    """1100 x 200 x 1000 NN: on AVX-512 float32 reads A in place with one
    1000-deep K block and 256-wide N blocks; float64 (an 8.8 MB K block of A,
    over kAInPlaceMaxABytes, with several N blocks) packs A again. Both match
    the reference and give the same bits on 1 and 2 threads."""
    m, n, k = 1100, 200, 1000
    a, b = _ab(rng, m, n, k, False, False, dtype)
    c1, c2 = _two_threads(lambda: K.gemm(a, b))
    _assert_bits_equal_nested(c1, c2)
    assert_close(c2, R.gemm(a, b), dtype, k=k, scale=gemm_scale(a, b))


# n == 1 (one output column) runs as a matrix-vector product: rows around the
# 8-row groups and the 128/256-row blocks, k around the vector width.
GEMV_SHAPES = [(1, 1, 1), (7, 1, 13), (9, 1, 16), (129, 1, 17), (300, 1, 33), (1000, 1, 257)]


@pytest.mark.parametrize("trans_a, trans_b", TRANSPOSES, ids=TRANS_IDS)
@pytest.mark.parametrize("m, n, k", GEMV_SHAPES)
def test_gemm_one_column_matches_reference(isa, m, n, k, trans_a, trans_b, dtype, rng):
    _check_gemm_into_out(rng, m, n, k, trans_a, trans_b, dtype, [(1.0, 0.0), (-0.5, 0.25)])


@pytest.mark.parametrize("trans_a", [False, True])
def test_gemm_one_column_threads_bit_identical(trans_a, dtype, rng):
    # 2 m k = 2.4e7 flops: above the parallel threshold, rows split by thread
    m, k = 3000, 4000
    a, b = _ab(rng, m, 1, k, trans_a, False, dtype)
    _assert_bits_equal_nested(*_two_threads(lambda: K.gemm(a, b, trans_a=trans_a)))


@pytest.mark.parametrize("alpha", [1.0, -0.5, 2.5, 0.0])
@pytest.mark.parametrize("beta", [0.0, 1.0, -0.7])
@pytest.mark.parametrize("trans_a, trans_b", TRANSPOSES, ids=TRANS_IDS)
def test_gemm_alpha_beta(isa, alpha, beta, trans_a, trans_b, dtype, rng):
    m, n, k = 33, 17, 65
    a, b = _ab(rng, m, n, k, trans_a, trans_b, dtype)
    c0 = random(rng, (m, n), dtype)
    out = c0.copy()
    res = K.gemm(a, b, trans_a=trans_a, trans_b=trans_b, alpha=alpha, beta=beta, out=out)
    assert res is out
    ref = R.gemm(a, b, trans_a=trans_a, trans_b=trans_b, alpha=alpha, beta=beta,
                 out=c0.astype(np.float64))
    scale = gemm_scale(a, b, trans_a=trans_a, trans_b=trans_b, alpha=alpha, beta=beta, c=c0)
    assert_close(out, ref, dtype, k=k, scale=scale + np.finfo(dtype).tiny)


@pytest.mark.parametrize("trans_a, trans_b", TRANSPOSES, ids=TRANS_IDS)
@pytest.mark.parametrize("m, n, k", [(1, 1, 1), (17, 33, 65), (64, 64, 300)])
def test_gemm_beta_zero_never_reads_out(isa, m, n, k, trans_a, trans_b, dtype, rng):
    a, b = _ab(rng, m, n, k, trans_a, trans_b, dtype)
    out = np.full((m, n), np.nan, dtype=dtype)
    res = K.gemm(a, b, trans_a=trans_a, trans_b=trans_b, alpha=1.5, beta=0.0, out=out)
    assert res is out
    assert np.isfinite(out).all(), "NaN in out leaked through beta = 0"
    ref = R.gemm(a, b, trans_a=trans_a, trans_b=trans_b, alpha=1.5)
    assert_close(out, ref, dtype, k=k,
                 scale=gemm_scale(a, b, trans_a=trans_a, trans_b=trans_b, alpha=1.5))


# NN on every ISA; TT (both operands packed from transposed storage) on the
# SIMD paths only, to keep the suite fast.
L2_CASES = [(i, False, False) for i in available_isas()] + \
           [(i, True, True) for i in available_isas() if i != "scalar"]


@pytest.mark.parametrize("isa_name, trans_a, trans_b", L2_CASES,
                         ids=[f"{i}-{'TT' if t else 'NN'}" for i, t, _ in L2_CASES])
def test_gemm_larger_than_l2(isa_name, trans_a, trans_b, rng):
    """1100 x 1100 x 600 float32: A, B and C (2.6 + 2.6 + 4.8 MB) overflow the 2 MiB L2."""
    K.set_isa(isa_name)
    m, n, k = 1100, 1100, 600
    dtype = np.float32
    a, b = _ab(rng, m, n, k, trans_a, trans_b, dtype)
    c = K.gemm(a, b, trans_a=trans_a, trans_b=trans_b)
    ref = R.gemm(a, b, trans_a=trans_a, trans_b=trans_b)
    assert_close(c, ref, dtype, k=k, scale=gemm_scale(a, b, trans_a=trans_a, trans_b=trans_b))


@pytest.mark.parametrize("trans_a, trans_b", TRANSPOSES, ids=TRANS_IDS)
# The last two have K blocks deeper than 256 where AVX-512 reads a row-major
# A in place (2 x 450 for k = 900): rows split across threads (400 x 200),
# then columns (200 x 400); the blocking follows the whole product's shape.
@pytest.mark.parametrize("m, n, k", [(300, 300, 300), (301, 299, 257), (400, 200, 900),
                                     (200, 400, 900)])
def test_gemm_threads_bit_identical(isa, m, n, k, trans_a, trans_b, dtype, rng):
    a, b = _ab(rng, m, n, k, trans_a, trans_b, dtype)
    c0 = random(rng, (m, n), dtype)

    def run():
        return K.gemm(a, b, trans_a=trans_a, trans_b=trans_b, alpha=0.75, beta=0.5,
                      out=c0.copy())

    _assert_bits_equal_nested(*_two_threads(run))


@pytest.mark.parametrize("trans_a, trans_b", TRANSPOSES, ids=TRANS_IDS)
def test_gemm_strided_and_fortran_inputs(trans_a, trans_b, dtype, rng):
    m, n, k = 33, 31, 17
    a, b = _ab(rng, m, n, k, trans_a, trans_b, dtype)
    expected = K.gemm(a, b, trans_a=trans_a, trans_b=trans_b)
    a_f, b_f = np.asfortranarray(a), np.asfortranarray(b)
    assert not a_f.flags.c_contiguous or a.shape[0] == 1
    assert bits_equal(K.gemm(a_f, b_f, trans_a=trans_a, trans_b=trans_b), expected)
    # Every other column / row of a bigger array, and a reversed view.
    a_big = np.zeros((a.shape[0] * 2, a.shape[1] * 3), dtype)
    a_big[::2, ::3] = a
    b_rev = np.ascontiguousarray(b[::-1])[::-1]
    assert not b_rev.flags.c_contiguous
    got = K.gemm(a_big[::2, ::3], b_rev, trans_a=trans_a, trans_b=trans_b)
    assert bits_equal(got, expected)
    # Byte-swapped input is converted.
    got = K.gemm(a.astype(a.dtype.newbyteorder(">")), b, trans_a=trans_a, trans_b=trans_b)
    assert bits_equal(got, expected)


# gemm's fast entry (fast_gemm in csrc/bindings/module.cpp) parses a, b by
# position and keywords with exact bool/float/int values itself; every other
# call goes to the pybind11 binding _core._gemm. Both must give the same bits.
FAST_ENTRY_KWARGS = [
    {},
    {"trans_a": True},
    {"trans_a": False, "trans_b": True},
    {"alpha": 2},              # int
    {"alpha": -0.5, "beta": 0.25, "out": "c"},
    {"beta": 1, "out": "c"},
    {"out": "c", "trans_b": True, "alpha": 1.5},  # any keyword order
    {"out": None},
    # Left to pybind11: other types for the flags and scalars.
    {"trans_a": np.True_},
    {"trans_b": 1},
    {"alpha": np.float32(0.5), "beta": np.float64(-1.0), "out": "c"},
    {"alpha": True},
]


@pytest.mark.parametrize("kwargs", FAST_ENTRY_KWARGS, ids=lambda kw: repr(kw))
def test_gemm_fast_entry_matches_binding(kwargs, dtype, rng):
    from chainrule import _core
    m = n = k = 5
    a, b = random(rng, (m, k), dtype), random(rng, (k, n), dtype)
    c0 = random(rng, (m, n), dtype)

    def call(fn):
        kw = {key: (c0.copy() if v == "c" else v) for key, v in kwargs.items()}
        res = fn(a, b, **kw)
        if isinstance(kw.get("out"), np.ndarray):
            assert res is kw["out"]
        return res

    assert bits_equal(call(K.gemm), call(_core._gemm))


@pytest.mark.parametrize("args, kwargs", [
    ((1,), {}),                                   # b missing
    ((1, 2, 3), {}),                              # a third positional
    ((), {"a": 1, "b": 2}),                       # a and b by keyword: fine in pybind11
    ((1, 2), {"bogus": 1}),
    ((1, 2), {"alpha": "x"}),
    ((1, 2), {"beta": 10 ** 400}),                # int too large for a double
    ((1, 2), {"trans_a": "yes", "out": None}),
])
def test_gemm_fast_entry_errors_match_binding(args, kwargs, rng):
    from chainrule import _core
    a, b = random(rng, (3, 3), np.float64), random(rng, (3, 3), np.float64)
    vals = {1: a, 2: b, 3: True}
    args = tuple(vals[v] for v in args)
    kwargs = {key: (vals[v] if key in ("a", "b") else v) for key, v in kwargs.items()}
    outcomes = []
    for fn in (K.gemm, _core._gemm):
        try:
            outcomes.append(("ok", fn(*args, **kwargs).tobytes()))
        except Exception as e:  # noqa: BLE001 - the two entries must fail alike
            outcomes.append((type(e).__name__, str(e)))
    assert outcomes[0] == outcomes[1]
    if outcomes[0][0] != "ok":
        assert outcomes[0][0] == "TypeError" and outcomes[0][1].startswith("gemm(): ")


def test_gemm_fast_entry_signature():
    import inspect
    sig = inspect.signature(K.gemm)
    assert str(sig) == "(a, b, *, trans_a=False, trans_b=False, alpha=1.0, beta=0.0, out=None)"
    assert K.gemm.__name__ == "gemm" and K.gemm.__doc__.startswith("C = alpha * op(a)")


def test_gemm_transposed_view_equals_trans_flag(dtype, rng):
    a = random(rng, (17, 33), dtype)
    b = random(rng, (17, 9), dtype)
    via_flag = K.gemm(a, b, trans_a=True)
    via_view = K.gemm(a.T, b)  # a Fortran-ordered (33, 17) view, copied by the binding
    assert_close(via_view, via_flag, dtype, k=17, scale=gemm_scale(a, b, trans_a=True))


# ------------------------------------------------------------------ dense


def _big(shape):
    return shape[0] * shape[1] * shape[2] > 1e6


# The big MLP shape runs with a bias only (keeps the suite fast).
DENSE_CASES = [(*s, bias) for s in DENSE_SHAPES for bias in (True, False)
               if bias or not _big(s)]


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("n, d_in, d_out, bias", DENSE_CASES,
                         ids=[f"{n}-{i}-{o}-{'bias' if b else 'nobias'}"
                              for n, i, o, b in DENSE_CASES])
def test_dense_forward_matches_reference(isa, n, d_in, d_out, bias, activation, dtype, rng):
    x = random(rng, (n, d_in), dtype)
    w = random(rng, (d_in, d_out), dtype, -2.0 / np.sqrt(d_in), 2.0 / np.sqrt(d_in))
    b = random(rng, (d_out,), dtype) if bias else None
    y = K.dense_forward(x, w, b, activation=activation, negative_slope=0.1)
    assert y.dtype == dtype and y.shape == (n, d_out)
    ref = R.dense_forward(x, w, b, activation=activation, negative_slope=0.1)
    scale = gemm_scale(x, w) + (np.abs(b.astype(np.float64)) if bias else 0.0)
    if activation in ROWWISE:
        scale = _rowwise_scale(scale)
    k = d_in + (d_out if activation in ROWWISE else 0)
    assert_close(y, ref, dtype, k=k, scale=scale + 1e-30)


# relu and leaky_relu are applied by the GEMM tiles in registers (AVX-512 and
# AVX2), the others to the stored tile: the same bits as the activation kernel
# run afterwards, including NaN and exact zeros, on every path: the small
# direct tiles, the deep direct path (128 x 784 x 256 on AVX-512), the
# blocked path (29 x 70 x 1100) with two K blocks (300 x 1100 x 70, where only
# the last may activate), n = 1 (a matrix-vector product).
@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "tanh"])
@pytest.mark.parametrize("n, d_in, d_out", [(7, 17, 33), (128, 784, 256), (300, 1100, 70),
                                            (64, 300, 1), (29, 70, 1100)])
def test_dense_forward_activation_equals_activation_afterwards(isa, n, d_in, d_out,
                                                               activation, dtype, rng):
    x = random(rng, (n, d_in), dtype)
    x[0, 1] = np.nan
    x[2, :] = 0.0  # row 2 of y is b, with exact zeros
    w = random(rng, (d_in, d_out), dtype, -2.0 / np.sqrt(d_in), 2.0 / np.sqrt(d_in))
    b = random(rng, (d_out,), dtype)
    b[: d_out // 3] = 0.0
    z = K.dense_forward(x, w, b)
    expected = K.activation_forward(activation, z, negative_slope=0.3)
    y1, y2 = _two_threads(lambda: K.dense_forward(x, w, b, activation=activation,
                                                  negative_slope=0.3))
    assert bits_equal(y1, expected) and bits_equal(y2, expected)
    assert np.isnan(y1[0]).all()


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_dense_forward_out_never_read(isa, activation, dtype, rng):
    n, d_in, d_out = 33, 65, 17
    x, w, b = (random(rng, s, dtype) for s in ((n, d_in), (d_in, d_out), (d_out,)))
    out = np.full((n, d_out), np.nan, dtype)
    res = K.dense_forward(x, w, b, activation=activation, out=out)
    assert res is out
    assert np.isfinite(out).all()
    scale = gemm_scale(x, w) + np.abs(b.astype(np.float64))
    if activation in ROWWISE:
        scale = _rowwise_scale(scale)
    assert_close(out, R.dense_forward(x, w, b, activation=activation), dtype,
                 k=d_in + d_out, scale=scale)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_dense_forward_threads_bit_identical(isa, activation, dtype, rng):
    n, d_in, d_out = 300, 300, 300
    x, w, b = (random(rng, s, dtype) for s in ((n, d_in), (d_in, d_out), (d_out,)))
    r = _two_threads(lambda: K.dense_forward(x, w, b, activation=activation))
    _assert_bits_equal_nested(*r)


def test_dense_forward_strided_inputs(dtype, rng):
    n, d_in, d_out = 31, 17, 33
    x, w, b = (random(rng, s, dtype) for s in ((n, d_in), (d_in, d_out), (d_out,)))
    expected = K.dense_forward(x, w, b, activation="tanh")
    b_big = np.zeros(2 * d_out, dtype)
    b_big[1::2] = b
    got = K.dense_forward(np.asfortranarray(x), np.asfortranarray(w), b_big[1::2],
                          activation="tanh")
    assert bits_equal(got, expected)


def _dense_vjp_ref_scales(x, w, gz):
    return (gemm_scale(gz, w, trans_b=True), gemm_scale(x, gz, trans_a=True),
            np.abs(gz.astype(np.float64)).sum(axis=0))


NEEDS = [(True, True, True), (True, False, False), (False, True, False), (False, False, True),
         (False, True, True), (False, False, False)]


# The big MLP shape runs with every gradient only.
VJP_CASES = [(*s, need) for s in DENSE_SHAPES for need in NEEDS
             if need == NEEDS[0] or not _big(s)]


def _need_id(t):
    return "".join("xwb"[i] for i in range(3) if t[i]) or "none"


@pytest.mark.parametrize("n, d_in, d_out, need", VJP_CASES,
                         ids=[f"{n}-{i}-{o}-{_need_id(t)}" for n, i, o, t in VJP_CASES])
def test_dense_vjp_matches_reference(isa, n, d_in, d_out, need, dtype, rng):
    x, w, gz = (random(rng, s, dtype) for s in ((n, d_in), (d_in, d_out), (n, d_out)))
    need_gx, need_gw, need_gb = need
    got = K.dense_vjp(x, w, gz, need_gx=need_gx, need_gw=need_gw, need_gb=need_gb)
    ref = R.dense_vjp(x, w, gz, need_gx=need_gx, need_gw=need_gw, need_gb=need_gb)
    assert isinstance(got, tuple) and len(got) == 3
    for name, g, r, s, kk, shape in zip(("gx", "gw", "gb"), got, ref,
                                        _dense_vjp_ref_scales(x, w, gz), (d_out, n, n),
                                        ((n, d_in), (d_in, d_out), (d_out,))):
        if r is None:
            assert g is None, name
            continue
        assert g.dtype == dtype and g.shape == shape, name
        assert_close(g, r, dtype, k=kk, scale=s + 1e-30, err_msg=name)


@pytest.mark.parametrize("n, d_in, d_out", [(1, 1, 1), (17, 33, 15), (64, 65, 63)])
def test_dense_vjp_accumulate_and_out_buffers(isa, n, d_in, d_out, dtype, rng):
    x, w, gz = (random(rng, s, dtype) for s in ((n, d_in), (d_in, d_out), (n, d_out)))
    gx0, gw0, gb0 = (random(rng, s, dtype) for s in ((n, d_in), (d_in, d_out), (d_out,)))
    gx, gw, gb = gx0.copy(), gw0.copy(), gb0.copy()
    res = K.dense_vjp(x, w, gz, gx=gx, gw=gw, gb=gb, accumulate=True)
    assert res[0] is gx and res[1] is gw and res[2] is gb
    ref = R.dense_vjp(x, w, gz, gx=gx0.astype(np.float64), gw=gw0.astype(np.float64),
                      gb=gb0.astype(np.float64), accumulate=True)
    s = _dense_vjp_ref_scales(x, w, gz)
    extra = (np.abs(gx0), np.abs(gw0), np.abs(gb0))
    for name, g, r, sc, e, kk in zip(("gx", "gw", "gb"), (gx, gw, gb), ref, s, extra,
                                     (d_out, n, n)):
        assert_close(g, r, dtype, k=kk, scale=sc + e, err_msg=name)
    # Without accumulate, buffers holding NaN are overwritten, never read.
    bufs = [np.full_like(a, np.nan) for a in (gx0, gw0, gb0)]
    res = K.dense_vjp(x, w, gz, gx=bufs[0], gw=bufs[1], gb=bufs[2])
    assert all(r is b for r, b in zip(res, bufs))
    assert all(np.isfinite(b).all() for b in bufs)


def test_dense_vjp_accumulate_partial(isa, dtype, rng):
    """accumulate=True with only some gradients: the others stay untouched/None."""
    n, d_in, d_out = 9, 17, 5
    x, w, gz = (random(rng, s, dtype) for s in ((n, d_in), (d_in, d_out), (n, d_out)))
    gw0 = random(rng, (d_in, d_out), dtype)
    gw = gw0.copy()
    gx, gw_res, gb = K.dense_vjp(x, w, gz, gw=gw, need_gx=False, need_gb=False, accumulate=True)
    assert gx is None and gb is None and gw_res is gw
    assert_close(gw, gw0.astype(np.float64) + x.astype(np.float64).T @ gz, dtype, k=n)


def test_dense_vjp_threads_bit_identical(isa, dtype, rng):
    n, d_in, d_out = 300, 300, 300
    x, w, gz = (random(rng, s, dtype) for s in ((n, d_in), (d_in, d_out), (n, d_out)))
    acc = [random(rng, s, dtype) for s in ((n, d_in), (d_in, d_out), (d_out,))]

    def run():
        plain = K.dense_vjp(x, w, gz)
        bufs = [a.copy() for a in acc]
        summed = K.dense_vjp(x, w, gz, gx=bufs[0], gw=bufs[1], gb=bufs[2], accumulate=True)
        return plain + summed

    _assert_bits_equal_nested(*_two_threads(run))


def test_dense_vjp_strided_inputs(dtype, rng):
    n, d_in, d_out = 17, 31, 13
    x, w, gz = (random(rng, s, dtype) for s in ((n, d_in), (d_in, d_out), (n, d_out)))
    expected = K.dense_vjp(x, w, gz)
    got = K.dense_vjp(np.asfortranarray(x), np.asfortranarray(w), np.asfortranarray(gz))
    for g, e in zip(got, expected):
        assert bits_equal(g, e)


# ------------------------------------------------------------------ column sums


@pytest.mark.parametrize("n, d", [(1, 1), (7, 13), (65, 33), (1000, 17)])
def test_column_sums_matches_reference(isa, n, d, dtype, rng):
    a = random(rng, (n, d), dtype)
    s = K.column_sums(a)
    scale = np.abs(a.astype(np.float64)).sum(axis=0)
    assert_close(s, R.column_sums(a), dtype, k=n, scale=scale)
    out0 = random(rng, (d,), dtype)
    out = out0.copy()
    assert K.column_sums(a, out=out, accumulate=True) is out
    assert_close(out, R.column_sums(a, out=out0.astype(np.float64), accumulate=True), dtype,
                 k=n, scale=scale + np.abs(out0))


def test_column_sums_threads_bit_identical(isa, dtype, rng):
    a = random(rng, (4096, 300), dtype)
    _assert_bits_equal_nested(*_two_threads(lambda: K.column_sums(a)))


# ------------------------------------------------------------------ activations


# softmax and log_softmax take 1-D or 2-D arrays only.
ACT_CASES = [(name, shape) for name in ACTIVATIONS for shape in ACT_SHAPES
             if name not in ROWWISE or len(shape) <= 2]
ACT_IDS = [f"{name}-{shape}" for name, shape in ACT_CASES]


@pytest.mark.parametrize("name, shape", ACT_CASES, ids=ACT_IDS)
def test_activation_forward_matches_reference(isa, name, shape, dtype, rng):
    x = _activation_input(rng, name, shape, dtype)
    y = K.activation_forward(name, x, negative_slope=0.2)
    assert y.dtype == dtype and y.shape == shape
    ref = R.activation_forward(name, x, negative_slope=0.2)
    kk = shape[-1] if name in ROWWISE else 1
    assert_close(y, ref, dtype, k=kk)
    # The named twin agrees bit for bit.
    twin = getattr(K, f"{name}_forward")
    y2 = twin(x, negative_slope=0.2) if name == "leaky_relu" else twin(x)
    assert bits_equal(y, y2)


@pytest.mark.parametrize("name, shape", ACT_CASES, ids=ACT_IDS)
def test_activation_vjp_matches_reference(isa, name, shape, dtype, rng):
    x = _activation_input(rng, name, shape, dtype)
    y = R.activation_forward(name, x, negative_slope=0.2).astype(dtype)
    gy = random(rng, shape, dtype)
    gx = K.activation_vjp(name, y, gy, negative_slope=0.2)
    assert gx.dtype == dtype and gx.shape == shape
    ref = R.activation_vjp(name, y, gy, negative_slope=0.2)
    kk = shape[-1] if name in ROWWISE else 1
    # The VJP works from y: 1 - y*y (tanh) or y*(1-y) (sigmoid) cancel near
    # saturation, so the error is relative to |gy|, not to the small result.
    assert_close(gx, ref, dtype, k=kk, scale=_vjp_scale(ref, gy))
    twin = getattr(K, f"{name}_vjp")
    gx2 = twin(y, gy, negative_slope=0.2) if name == "leaky_relu" else twin(y, gy)
    assert bits_equal(gx, gx2)


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_activation_out_and_in_place(isa, name, dtype, rng):
    shape = (13, 33)
    x = _activation_input(rng, name, shape, dtype)
    expected = K.activation_forward(name, x)
    out = np.full(shape, np.nan, dtype)
    assert K.activation_forward(name, x, out=out) is out
    assert bits_equal(out, expected)
    xi = x.copy()
    assert K.activation_forward(name, xi, out=xi) is xi  # in place is allowed
    assert bits_equal(xi, expected)

    gy = random(rng, shape, dtype)
    expected_gx = K.activation_vjp(name, expected, gy)
    out = np.full(shape, np.nan, dtype)
    assert K.activation_vjp(name, expected, gy, out=out) is out
    assert bits_equal(out, expected_gx)
    gyi = gy.copy()
    assert K.activation_vjp(name, expected, gyi, out=gyi) is gyi  # gx may alias gy
    assert bits_equal(gyi, expected_gx)


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_activation_threads_bit_identical(isa, name, dtype, rng):
    shape = (1024, 256) if name in ROWWISE else (BIG_ELEMS,)
    x = _activation_input(rng, name, shape, dtype)
    gy = random(rng, shape, dtype)

    def run():
        y = K.activation_forward(name, x)
        return y, K.activation_vjp(name, y, gy)

    _assert_bits_equal_nested(*_two_threads(run))


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_activation_strided_inputs(name, dtype, rng):
    full = _activation_input(rng, name, (13, 66), dtype)
    view = full[:, ::2]
    expected = K.activation_forward(name, np.ascontiguousarray(view))
    assert bits_equal(K.activation_forward(name, view), expected)
    assert bits_equal(K.activation_forward(name, np.asfortranarray(view)), expected)
    gfull = random(rng, (13, 66), dtype)
    expected_gx = K.activation_vjp(name, expected, np.ascontiguousarray(gfull[:, 1::2]))
    assert bits_equal(K.activation_vjp(name, np.asfortranarray(expected), gfull[:, 1::2]),
                      expected_gx)


# +-1e30 and the edges of exp's range in float32 (88.7) and float64 (709.8).
LARGE = [-1e4, -1e3, -100.0, -30.0, -20.0, -1.0, -0.0, 0.0, 1.0, 20.0, 30.0, 100.0, 1e3, 1e4,
         -1e30, 1e30, -88.8, 88.8, -710.0, 710.0, -745.5]


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_activation_large_inputs_stay_finite(isa, name, dtype):
    # 17 columns so that both the SIMD body and the tail see large values.
    x = np.array(LARGE + [5e3, -5e3, 7.0], dtype=dtype)
    rows = np.stack([x, x[::-1], -x])
    for arr in (x, rows):
        y = K.activation_forward(name, arr)
        assert np.isfinite(y).all(), (name, y)
        ref = R.activation_forward(name, arr)
        assert_close(y, ref, dtype, k=arr.shape[-1])
        gx = K.activation_vjp(name, y, np.ones_like(arr))
        assert np.isfinite(gx).all(), (name, gx)
    if name == "sigmoid":
        y = K.sigmoid_forward(x)
        assert ((y >= 0) & (y <= 1)).all()
        assert y[0] < np.finfo(dtype).tiny * 2  # sigmoid(-1e4) underflows to (almost) 0
        assert y[LARGE.index(1e4)] == 1.0 and y[LARGE.index(1e30)] == 1.0
    if name == "softmax":
        y = K.softmax_forward(rows)
        assert_close(y.sum(axis=1), np.ones(3), dtype, k=rows.shape[1])


@pytest.mark.parametrize("name", ROWWISE)
def test_softmax_masked_with_minus_inf(isa, name, dtype):
    """-inf logits (masked entries) get probability 0, not NaN."""
    rows = np.zeros((3, 17), dtype)
    rows[0, [0, 5, 16]] = -np.inf
    rows[1, :16] = -np.inf  # only the tail entry left
    rows[2, 3::4] = -np.inf
    rows[:, 1] += 2.0
    y = K.activation_forward(name, rows)
    ref = R.activation_forward(name, rows)
    assert_close(y, ref, dtype, k=17)
    if name == "softmax":
        assert (y[np.isneginf(rows)] == 0).all() and not np.isnan(y).any()
        assert y[1, 16] == 1.0
    gx = K.activation_vjp(name, y, np.ones_like(y))
    if name == "softmax":
        assert np.isfinite(gx).all()


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_activation_nan_inf_propagate(isa, name, dtype):
    special = [np.nan, np.inf, -np.inf, 1.0, -2.0, 0.5, np.nan, 3.0]
    x = np.array(special + [0.25] * 9, dtype=dtype)  # 17: body + tail
    x[-1] = np.nan  # a NaN in the tail too
    y = K.activation_forward(name, x)
    if name in ELEMENTWISE:
        # Elementwise: exactly the reference's NaN/inf pattern, finite values close.
        with np.errstate(invalid="ignore", over="ignore"):
            ref = R.activation_forward(name, x)
        assert_close(y, ref, dtype)
        assert np.isnan(y[0]) and np.isnan(y[6]) and np.isnan(y[-1])
    else:
        # A row with NaN is NaN; the other rows are untouched.
        rows = np.stack([x, np.linspace(-1, 1, 17, dtype=dtype)])
        y = K.activation_forward(name, rows)
        assert np.isnan(y[0]).any()
        assert_close(y[1], R.activation_forward(name, rows[1]), dtype, k=17)
    gy = np.ones_like(y)
    gy.reshape(-1)[3] = np.nan
    gx = K.activation_vjp(name, y, gy)  # must not crash
    assert gx.shape == y.shape and np.isnan(gx.reshape(-1)[3])


def _central_diff(f, x, h=1e-5):
    """d f / d x for a scalar f, by central differences, element by element."""
    g = np.zeros_like(x, dtype=np.float64)
    flat, gflat = x.reshape(-1), g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + h
        fp = f()
        flat[i] = old - h
        fm = f()
        flat[i] = old
        gflat[i] = (fp - fm) / (2 * h)
    return g


@pytest.mark.parametrize("shape", [(7,), (3, 5)], ids=str)
@pytest.mark.parametrize("name", ACTIVATIONS)
def test_activation_vjp_finite_differences(isa, name, shape, rng):
    x = _activation_input(rng, name, shape, np.float64) / 2
    gy = random(rng, shape, np.float64)

    def f():
        return float(np.sum(gy * K.activation_forward(name, x, negative_slope=0.2)))

    fd = _central_diff(f, x)
    y = K.activation_forward(name, x, negative_slope=0.2)
    gx = K.activation_vjp(name, y, gy, negative_slope=0.2)
    np.testing.assert_allclose(gx, fd, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------ losses

LOSS_SHAPES = [(1, 1), (1, 2), (7, 13), (17, 10), (15, 16), (64, 65), (256, 10)]


def _loss_inputs(rng, n, k, dtype, scale=3.0):
    z = random(rng, (n, k), dtype, -scale, scale)
    labels = rng.integers(0, k, size=n)
    t = rng.uniform(0, 1, size=(n, k))
    t /= t.sum(axis=1, keepdims=True)
    w = rng.uniform(0.1, 2.0, size=n)
    return z, labels, t.astype(dtype), w


def _loss_scale(z, w=None, reduction="mean", binary=False):
    """Size of the terms a loss sums: logsumexp(z_i) - z_i[y] cancels, so its
    error is relative to max|z_i| (or |z| per element for BCE), not to the loss."""
    z = np.abs(np.asarray(z, np.float64))
    if binary:
        terms = (z + 1.0).reshape(z.shape[0], -1).sum(axis=1)
        count = z.size
    else:
        terms = z.max(axis=1, initial=0.0) + 1.0 + np.log(max(z.shape[1], 1))
        count = z.shape[0]
    w = np.ones(z.shape[0]) if w is None else np.asarray(w, np.float64)
    total = float(np.sum(w * terms))
    if reduction == "mean":
        total /= (float(w.sum()) * (count / z.shape[0]) if count else 1.0)
    return total


def _grad_scale(shape, w=None, reduction="mean", binary=False):
    """dloss/dz = unit_i * (p - t) with p, t in [0, 1]: p - t cancels, so the
    error is relative to the row's unit = w_i / (total weight), not to |grad|."""
    n = shape[0]
    per_row = int(np.prod(shape[1:])) if binary else 1
    w = np.ones(n) if w is None else np.asarray(w, np.float64)
    unit = w / (float(w.sum()) * per_row) if reduction == "mean" else w
    return np.broadcast_to(unit.reshape((n,) + (1,) * (len(shape) - 1)), shape)


def _check_loss(got, ref, dtype, count, grad_shape, loss_scale=None, grad_scale=None):
    loss, g = got
    ref_loss, ref_g = ref
    assert isinstance(loss, float)
    assert_close(np.array(loss), np.array(ref_loss), dtype, k=count, c=32,
                 scale=loss_scale, err_msg="loss")
    if ref_g is None:
        assert g is None
    else:
        assert g.dtype == dtype and g.shape == grad_shape
        assert_close(g, ref_g, dtype, k=grad_shape[-1] if len(grad_shape) > 1 else 1,
                     scale=grad_scale, err_msg="grad")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("n, k", LOSS_SHAPES)
def test_softmax_cross_entropy_matches_reference(isa, n, k, weighted, reduction, dtype, rng):
    z, labels, _, w = _loss_inputs(rng, n, k, dtype)
    w = w if weighted else None
    for lab in (labels, labels.astype(np.int32), labels.astype(np.uint8)):
        got = K.softmax_cross_entropy(z, lab, sample_weight=w, reduction=reduction)
        ref = R.softmax_cross_entropy(z, labels, sample_weight=w, reduction=reduction)
        _check_loss(got, ref, dtype, n * k, (n, k), _loss_scale(z, w, reduction),
                    _grad_scale((n, k), w, reduction))
    loss, g = K.softmax_cross_entropy(z, labels, sample_weight=w, reduction=reduction,
                                      need_grad=False)
    assert g is None and loss == got[0]
    buf = np.full((n, k), np.nan, dtype)
    loss, g = K.softmax_cross_entropy(z, labels, sample_weight=w, reduction=reduction, grad=buf)
    assert g is buf and bits_equal(buf, got[1])


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("n, k", LOSS_SHAPES)
def test_soft_cross_entropy_matches_reference(isa, n, k, weighted, reduction, dtype, rng):
    z, labels, t, w = _loss_inputs(rng, n, k, dtype)
    w = w if weighted else None
    got = K.soft_cross_entropy(z, t, sample_weight=w, reduction=reduction)
    _check_loss(got, R.soft_cross_entropy(z, t, sample_weight=w, reduction=reduction), dtype,
                n * k, (n, k), _loss_scale(z, w, reduction), _grad_scale((n, k), w, reduction))
    # One-hot targets give softmax_cross_entropy.
    onehot = np.eye(k, dtype=dtype)[labels]
    a = K.soft_cross_entropy(z, onehot, sample_weight=w, reduction=reduction)
    b = K.softmax_cross_entropy(z, labels, sample_weight=w, reduction=reduction)
    assert_close(np.array(a[0]), np.array(b[0]), dtype, k=n * k, c=32,
                 scale=_loss_scale(z, w, reduction))
    assert_close(a[1], b[1], dtype, k=k, scale=_grad_scale((n, k), w, reduction))
    buf = np.zeros((n, k), dtype)
    loss, g = K.soft_cross_entropy(z, t, sample_weight=w, reduction=reduction, grad=buf)
    assert g is buf and bits_equal(buf, got[1])


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("shape", [(1,), (17,), (64,), (1, 1), (7, 13), (33, 3), (256, 10)],
                         ids=str)
def test_binary_cross_entropy_matches_reference(isa, shape, weighted, reduction, dtype, rng):
    z = random(rng, shape, dtype, -6, 6)
    t = rng.uniform(0, 1, size=shape).astype(dtype)
    t.reshape(-1)[::3] = np.round(t.reshape(-1)[::3])  # some hard 0/1 targets
    w = rng.uniform(0.1, 2.0, size=shape[0]) if weighted else None
    got = K.binary_cross_entropy(z, t, sample_weight=w, reduction=reduction)
    ref = R.binary_cross_entropy(z, t, sample_weight=w, reduction=reduction)
    ls = _loss_scale(z.reshape(shape[0], -1), w, reduction, binary=True)
    gs = _grad_scale(shape, w, reduction, binary=True)
    _check_loss(got, ref, dtype, int(np.prod(shape)), shape, ls, gs)
    # Integer / boolean targets are converted.
    hard = (t > 0.5)
    a = K.binary_cross_entropy(z, hard, sample_weight=w, reduction=reduction)
    b = R.binary_cross_entropy(z, hard.astype(np.float64), sample_weight=w, reduction=reduction)
    _check_loss(a, b, dtype, int(np.prod(shape)), shape, ls, gs)
    buf = np.zeros(shape, dtype)
    loss, g = K.binary_cross_entropy(z, t, sample_weight=w, reduction=reduction, grad=buf)
    assert g is buf and bits_equal(buf, got[1])
    loss, g = K.binary_cross_entropy(z, t, sample_weight=w, reduction=reduction,
                                     need_grad=False)
    assert g is None


@pytest.mark.parametrize("k", [1, 3, 10, 16, 17])
def test_softmax_cross_entropy_nan_and_masked_logits(isa, k, dtype, rng):
    """A NaN logit makes its row's loss and gradient NaN and no other row's;
    -inf logits (masked classes) get probability 0. Rows side by side (up to
    16 classes) and one at a time (17) alike, with partial blocks of rows."""
    n = 37
    z, labels, _, w = _loss_inputs(rng, n, k, dtype)
    if k > 1:
        z[5, (labels[5] + 1) % k] = -np.inf
        z[20, :] = -np.inf
        z[20, labels[20]] = 0.5
    z_nan = z.copy()
    z_nan[9, k - 1] = np.nan
    loss, g = K.softmax_cross_entropy(z_nan, labels, sample_weight=w, reduction="sum")
    assert np.isnan(loss) and np.isnan(g[9]).all()
    assert np.isfinite(np.delete(g, 9, axis=0)).all()
    keep = np.arange(n) != 9
    loss, g_keep = K.softmax_cross_entropy(z[keep], labels[keep], sample_weight=w[keep],
                                           reduction="sum")
    assert np.isfinite(loss) and bits_equal(g_keep, np.delete(g, 9, axis=0))
    if k > 1:
        # Row 5 lost one class, row 20 (19 once row 9 is out) all but its label.
        assert g_keep[5, (labels[5] + 1) % k] == 0 and (g_keep[19] == 0).all()
    finite = np.isfinite(z).all(axis=1) & keep
    got = K.softmax_cross_entropy(z[finite], labels[finite], sample_weight=w[finite],
                                  reduction="sum")
    ref = R.softmax_cross_entropy(z[finite], labels[finite], sample_weight=w[finite],
                                  reduction="sum")
    m = int(finite.sum())
    _check_loss(got, ref, dtype, m * k, (m, k), _loss_scale(z[finite], w[finite], "sum"),
                _grad_scale((m, k), w[finite], "sum"))


def test_losses_threads_bit_identical(isa, dtype, rng):
    n, k = 4096, 64
    z, labels, t, w = _loss_inputs(rng, n, k, dtype)
    tb = rng.uniform(0, 1, size=(n, k)).astype(dtype)
    # 10 classes: the rows-side-by-side softmax CE, in blocks over 2 threads.
    z10, labels10, _, w10 = _loss_inputs(rng, 30000, 10, dtype)

    def run():
        return (K.softmax_cross_entropy(z, labels, sample_weight=w),
                K.softmax_cross_entropy(z, labels, reduction="sum"),
                K.softmax_cross_entropy(z10, labels10, sample_weight=w10),
                K.soft_cross_entropy(z, t, sample_weight=w),
                K.binary_cross_entropy(z, tb, sample_weight=w),
                K.binary_cross_entropy(z.reshape(-1), tb.reshape(-1), reduction="sum"))

    _assert_bits_equal_nested(*_two_threads(run))


def test_losses_strided_inputs(dtype, rng):
    n, k = 17, 13
    z, labels, t, w = _loss_inputs(rng, n, k, dtype)
    zf = np.asfortranarray(z)
    for fn, tgt in ((K.softmax_cross_entropy, labels), (K.soft_cross_entropy, t),
                    (K.binary_cross_entropy, np.clip(t * 3, 0, 1))):
        a = fn(z, tgt, sample_weight=w)
        b = fn(zf, np.asfortranarray(tgt) if tgt.ndim == 2 else tgt[::-1].copy()[::-1],
               sample_weight=w[::-1].copy()[::-1])
        _assert_bits_equal_nested(a, b)


@pytest.mark.parametrize("big", [1e4, 1e3, 100.0])
def test_losses_large_logits_finite(isa, big, dtype):
    z = np.array([[big, -big, 0.0], [-big, big, 0.0], [big, big, -big], [0.0, 0.0, 0.0]] * 5,
                 dtype=dtype)
    labels = np.array([0, 0, 2, 1] * 5)
    for got, ref in (
        (K.softmax_cross_entropy(z, labels), R.softmax_cross_entropy(z, labels)),
        (K.soft_cross_entropy(z, np.eye(3, dtype=dtype)[labels]),
         R.soft_cross_entropy(z, np.eye(3)[labels])),
        (K.binary_cross_entropy(z, (z > 0).astype(dtype) * 0.5 + 0.25),
         R.binary_cross_entropy(z, (z > 0) * 0.5 + 0.25)),
        (K.binary_cross_entropy(z.reshape(-1), np.ones(z.size, dtype)),
         R.binary_cross_entropy(z.reshape(-1), np.ones(z.size))),
    ):
        loss, g = got
        assert np.isfinite(loss) and np.isfinite(g).all()
        _check_loss(got, ref, dtype, z.size, g.shape)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_loss_grads_finite_differences(isa, reduction, rng):
    n, k = 4, 5
    z, labels, t, w = _loss_inputs(rng, n, k, np.float64)
    tb = rng.uniform(0, 1, size=(n, k))
    z1, tb1 = z[:, 0].copy(), tb[:, 0].copy()
    cases = {
        "softmax_ce weighted": (z, lambda: K.softmax_cross_entropy(
            z, labels, sample_weight=w, reduction=reduction)),
        "softmax_ce": (z, lambda: K.softmax_cross_entropy(z, labels, reduction=reduction)),
        # targets whose rows do not sum to 1: the kernel's general formula
        "soft_ce weighted": (z, lambda: K.soft_cross_entropy(
            z, t * 1.5, sample_weight=w, reduction=reduction)),
        "bce 2-D weighted": (z, lambda: K.binary_cross_entropy(
            z, tb, sample_weight=w, reduction=reduction)),
        "bce 1-D": (z1, lambda: K.binary_cross_entropy(z1, tb1, reduction=reduction)),
    }
    for name, (param, call) in cases.items():
        fd = _central_diff(lambda: call()[0], param)
        np.testing.assert_allclose(call()[1], fd, rtol=1e-5, atol=1e-7, err_msg=name)


def test_dense_vjp_finite_differences(isa, rng):
    n, d_in, d_out = 3, 4, 5
    x, w, b = (random(rng, s, np.float64) for s in ((n, d_in), (d_in, d_out), (d_out,)))
    gy = random(rng, (n, d_out), np.float64)
    # L = sum(gy * tanh(x @ w + b)); chain tanh_vjp into dense_vjp.

    def loss():
        return float(np.sum(gy * K.dense_forward(x, w, b, activation="tanh")))

    y = K.dense_forward(x, w, b, activation="tanh")
    g_z = K.tanh_vjp(y, gy)
    gx, gw, gb = K.dense_vjp(x, w, g_z)
    np.testing.assert_allclose(gx, _central_diff(loss, x), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(gw, _central_diff(loss, w), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(gb, _central_diff(loss, b), rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------ optimizers

SGD_CONFIGS = [
    dict(lr=0.1),
    dict(lr=0.05, weight_decay=0.01),
    dict(lr=0.1, momentum=0.9, first_step=True),
    dict(lr=0.1, momentum=0.9),
    dict(lr=0.1, momentum=0.9, dampening=0.5),
    dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
    dict(lr=0.1, momentum=0.8, nesterov=True, first_step=True),
]

ADAM_CONFIGS = [
    dict(step=1, lr=1e-3),
    dict(step=7, lr=1e-2, beta1=0.8, beta2=0.99),
    dict(step=3, lr=1e-3, weight_decay=0.1),
    dict(step=3, lr=1e-3, weight_decay=0.1, decoupled=True),
    dict(step=1000, lr=3e-4, eps=1e-6),
]


def _cfg_id(cfg):
    return ",".join(f"{k}={v}" for k, v in cfg.items())


@pytest.mark.parametrize("cfg", SGD_CONFIGS, ids=_cfg_id)
@pytest.mark.parametrize("shape", [(s,) for s in SIZES_1D] + [(13, 17)], ids=str)
def test_sgd_step_matches_reference(isa, shape, cfg, dtype, rng):
    p0 = random(rng, shape, dtype)
    g = random(rng, shape, dtype)
    buf0 = random(rng, shape, dtype)
    p, buf = p0.copy(), buf0.copy()
    assert K.sgd_step(p, g.reshape(-1) if len(shape) > 1 else g, buf, **cfg) is None
    p_ref, buf_ref = p0.astype(np.float64), buf0.astype(np.float64)
    R.sgd_step(p_ref, g, buf_ref, **cfg)
    assert_close(p, p_ref, dtype, c=32, err_msg="param")
    if cfg.get("momentum", 0.0) != 0.0:
        assert_close(buf, buf_ref, dtype, c=32, err_msg="momentum_buffer")
    else:
        assert bits_equal(buf, buf0)  # unused without momentum
    # Without momentum the buffer may be None.
    if cfg.get("momentum", 0.0) == 0.0:
        p2 = p0.copy()
        K.sgd_step(p2, g, None, **cfg)
        assert bits_equal(p2, p)


@pytest.mark.parametrize("cfg", ADAM_CONFIGS, ids=_cfg_id)
@pytest.mark.parametrize("shape", [(s,) for s in SIZES_1D] + [(13, 17)], ids=str)
def test_adam_step_matches_reference(isa, shape, cfg, dtype, rng):
    p0 = random(rng, shape, dtype)
    g = random(rng, shape, dtype)
    m0 = random(rng, shape, dtype, -0.1, 0.1)
    v0 = random(rng, shape, dtype, 0.0, 0.01)
    p, m, v = p0.copy(), m0.copy(), v0.copy()
    assert K.adam_step(p, g, m, v, **cfg) is None
    refs = [a.astype(np.float64) for a in (p0, m0, v0)]
    R.adam_step(refs[0], g, refs[1], refs[2], **cfg)
    for name, got, ref in zip(("param", "exp_avg", "exp_avg_sq"), (p, m, v), refs):
        assert_close(got, ref, dtype, c=32, err_msg=name)


def test_optimizer_steps_threads_bit_identical(isa, dtype, rng):
    shape = (BIG_ELEMS,)
    p0, g, b0 = (random(rng, shape, dtype) for _ in range(3))
    m0 = random(rng, shape, dtype, -0.1, 0.1)
    v0 = random(rng, shape, dtype, 0.0, 0.01)

    def run():
        out = []
        for cfg in SGD_CONFIGS:
            p, b = p0.copy(), b0.copy()
            K.sgd_step(p, g, b, **cfg)
            out += [p, b]
        for cfg in ADAM_CONFIGS:
            p, m, v = p0.copy(), m0.copy(), v0.copy()
            K.adam_step(p, g, m, v, **cfg)
            out += [p, m, v]
        return tuple(out)

    _assert_bits_equal_nested(*_two_threads(run))


def test_optimizer_strided_grad(dtype, rng):
    p0 = random(rng, (64,), dtype)
    g_big = random(rng, (128,), dtype)
    p1, p2 = p0.copy(), p0.copy()
    K.sgd_step(p1, np.ascontiguousarray(g_big[::2]), lr=0.1)
    K.sgd_step(p2, g_big[::2], lr=0.1)
    assert bits_equal(p1, p2)
    m, v = np.zeros(64, dtype), np.zeros(64, dtype)
    m2, v2 = m.copy(), v.copy()
    K.adam_step(p1, np.ascontiguousarray(g_big[1::2]), m, v, step=1, lr=1e-3)
    K.adam_step(p2, g_big[1::2], m2, v2, step=1, lr=1e-3)
    assert bits_equal(p1, p2) and bits_equal(m, m2) and bits_equal(v, v2)


def test_adam_matches_reference_over_many_steps(isa, rng):
    """Ten float64 steps, feeding each step's state into the next."""
    shape = (65,)
    p, m, v = random(rng, shape, np.float64), np.zeros(shape), np.zeros(shape)
    pr, mr, vr = p.copy(), m.copy(), v.copy()
    for step in range(1, 11):
        g = random(rng, shape, np.float64)
        K.adam_step(p, g, m, v, step=step, lr=1e-2, weight_decay=0.01, decoupled=True)
        R.adam_step(pr, g, mr, vr, step=step, lr=1e-2, weight_decay=0.01, decoupled=True)
    assert_close(p, pr, np.float64, k=10)
    assert_close(m, mr, np.float64, k=10)
    assert_close(v, vr, np.float64, k=10)


# ------------------------------------------------------------------ GIL released


def test_concurrent_calls_from_python_threads(dtype, rng):
    """The GIL is released around kernels: calls from several Python threads
    at once must not share scratch memory (packing buffers) or state."""
    from concurrent.futures import ThreadPoolExecutor

    shapes = [(257, 129, 300), (64, 300, 257), (300, 257, 64), (129, 64, 129)]
    jobs = []
    for m, n, k in shapes:
        a, b = random(rng, (m, k), dtype), random(rng, (k, n), dtype)
        x, w, bias = random(rng, (m, k), dtype), random(rng, (k, n), dtype), random(rng, (n,), dtype)
        jobs.append((a, b, x, w, bias))

    def work(job):
        a, b, x, w, bias = job
        return (K.gemm(a, b), K.gemm(b, a, trans_a=True, trans_b=True),
                K.dense_forward(x, w, bias, activation="tanh"),
                K.dense_vjp(x, w, K.dense_forward(x, w, bias)))

    K.set_num_threads(1)
    expected = [work(j) for j in jobs]
    K.set_num_threads(2)
    with ThreadPoolExecutor(max_workers=4) as pool:
        for _ in range(3):
            got = list(pool.map(work, jobs * 2))
            for i, g in enumerate(got):
                _assert_bits_equal_nested(g, expected[i % len(jobs)])


def test_degenerate_shapes_threads_bit_identical(isa, dtype, rng):
    """Shapes with one long axis: whatever is split, sums keep their order."""
    x = random(rng, (BIG_ELEMS,), dtype)
    tall = random(rng, (BIG_ELEMS, 3), dtype)
    wide = random(rng, (1, BIG_ELEMS), dtype)
    t_wide = rng.uniform(0, 1, size=wide.shape).astype(dtype)

    def run():
        return (K.softmax_forward(x), K.log_softmax_forward(x),
                K.softmax_vjp(K.softmax_forward(x), x),
                K.column_sums(tall),
                K.gemm(tall, tall, trans_a=True),            # 3 x 3 from k = 2**18
                K.gemm(tall[:3000], tall[:3000], trans_b=True),  # k = 3, big output
                K.dense_vjp(tall, tall[:3].copy(), tall),
                K.softmax_cross_entropy(wide, np.array([7])),
                K.binary_cross_entropy(wide, t_wide),
                K.binary_cross_entropy(x, np.abs(np.tanh(x))))

    _assert_bits_equal_nested(*_two_threads(run))
