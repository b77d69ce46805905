"""The compiled training step (chainrule._core.MLPPlan) and fit's use of it."""

import numpy as np
import pytest

import chainrule as cr
import chainrule.reference as R
from chainrule import _core, plan as plan_mod
from conftest import available_isas, bits_equal

LOSSES = ["softmax_cross_entropy", "binary_cross_entropy", "squared_error"]


def _split(P, dims):
    out, o = [], 0
    for a, b in zip(dims[:-1], dims[1:]):
        out.append((P[o:o + a * b].reshape(a, b), P[o + a * b:o + a * b + b]))
        o += a * b + b
    return out


def _loss_np(P, dims, acts, X, t, loss, idx, w=None, l2=0.0, slope=0.01):
    h = X[idx]
    layers = _split(P, dims)
    for i, (W, b) in enumerate(layers):
        h = h @ W + b
        if i < len(layers) - 1:
            h = R._act(acts[i], h, slope)
    ws = None if w is None else w[idx]
    if loss == "softmax_cross_entropy":
        value = R.softmax_cross_entropy(h, t[idx], sample_weight=ws)[0]
    elif loss == "binary_cross_entropy":
        value = R.binary_cross_entropy(h, t[idx], sample_weight=ws)[0]
    else:
        wv = np.ones(len(idx)) if ws is None else ws
        value = float((wv[:, None] * (h - t[idx]) ** 2).sum() / (wv.sum() * h.shape[1]))
    return value + 0.5 * l2 * sum(float((W ** 2).sum()) for W, _ in layers)


def _problem(rng, loss, dims, rows=20):
    X = rng.standard_normal((rows, dims[0]))
    if loss == "softmax_cross_entropy":
        t = rng.integers(0, dims[-1], rows)
    elif loss == "binary_cross_entropy":
        t = rng.random((rows, dims[-1]))
    else:
        t = rng.standard_normal((rows, dims[-1]))
    return X, t


@pytest.mark.parametrize("isa", available_isas())
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("acts", [["tanh", "relu"], ["sigmoid", "leaky_relu"]])
def test_train_step_gradient_matches_finite_differences(isa, loss, acts):
    _core.set_isa(isa)
    rng = np.random.default_rng(1)
    dims = [5, 7, 4, 3]
    plan = _core.MLPPlan(dims, acts + ["identity"], "float64", negative_slope=0.1)
    P = rng.standard_normal(plan.n_params) * 0.5
    G = np.full_like(P, np.nan)  # accumulate=False must overwrite, never read
    X, t = _problem(rng, loss, dims)
    w = rng.random(20) + 0.5
    idx = rng.permutation(20)[:8]
    value = plan.train_step(P, G, X, t, loss=loss, indices=idx, sample_weight=w, l2=0.1)
    f = lambda p: _loss_np(p, dims, acts, X, t, loss, idx, w, l2=0.1, slope=0.1)
    assert value == pytest.approx(f(P), rel=1e-12)
    num = np.empty_like(P)
    for i in range(len(P)):
        d = np.zeros_like(P)
        d[i] = 1e-6
        num[i] = (f(P + d) - f(P - d)) / 2e-6
    np.testing.assert_allclose(G, num, rtol=1e-6, atol=1e-8)


def test_accumulate_scale_and_forward(rng):
    dims = [4, 6, 3]
    plan = _core.MLPPlan(dims, ["tanh", "softmax"], "float32")
    P = (rng.standard_normal(plan.n_params) * 0.3).astype(np.float32)
    X = rng.standard_normal((10, 4)).astype(np.float32)
    y = rng.integers(0, 3, 10)
    G1 = np.zeros_like(P)
    mean = plan.train_step(P, G1, X, y, loss="softmax_cross_entropy")
    G2 = np.ones_like(P)
    total = plan.train_step(P, G2, X, y, loss="softmax_cross_entropy", scale=1.0, accumulate=True)
    assert total == pytest.approx(10 * mean, rel=1e-5)
    np.testing.assert_allclose(G2 - 1, 10 * G1, rtol=1e-4, atol=1e-5)
    proba = plan.forward(P, X)
    W1, b1, W2, b2 = (a.astype(np.float64) for pair in _split(P, dims) for a in pair)
    expected = R._act("softmax", np.tanh(X @ W1 + b1) @ W2 + b2)
    np.testing.assert_allclose(proba, expected, rtol=1e-5, atol=1e-6)
    out = np.empty((10, 3), np.float32)
    assert plan.forward(P, X, out=out) is out


@pytest.mark.parametrize("threads", [1, 2])
def test_train_step_is_bit_identical_across_threads(threads, rng):
    dims = [300, 256, 10]
    plan = _core.MLPPlan(dims, ["relu", "identity"], "float32")
    P = (rng.standard_normal(plan.n_params) * 0.05).astype(np.float32)
    X = rng.standard_normal((512, 300)).astype(np.float32)
    y = rng.integers(0, 10, 512)
    cr.set_num_threads(1)
    G1 = np.zeros_like(P)
    l1 = plan.train_step(P, G1, X, y, loss="softmax_cross_entropy")
    cr.set_num_threads(threads)
    G2 = np.zeros_like(P)
    l2 = plan.train_step(P, G2, X, y, loss="softmax_cross_entropy")
    assert l1 == l2 and bits_equal(G1, G2)


@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_train_step_with_update_is_bit_identical_across_threads(kind, accumulate, rng):
    """Three steps with a fused update (or accumulated gradients), L2 and
    gradient norms: 2 threads (the 300-256 layer's products split, the
    smaller layers' not) give 1 thread's bits in every output and state."""
    dims = [300, 256, 64, 10]
    plan = _core.MLPPlan(dims, ["tanh", "relu", "identity"], "float64")
    start = rng.standard_normal(plan.n_params) * 0.05
    X = rng.standard_normal((400, 300))
    y = rng.integers(0, 10, 400)
    results = []
    for threads in (1, 2):
        cr.set_num_threads(threads)  # restored by conftest
        P = start.copy()
        G = np.full_like(P, 0.5) if accumulate else np.zeros_like(P)
        m, v = np.zeros_like(P), np.zeros_like(P)
        norms, losses = np.zeros(3), []
        for step in range(3):
            idx = np.arange(step * 128, (step + 1) * 128)
            update = ({"kind": "sgd", "lr": 0.1, "momentum": 0.9, "momentum_buffer": m,
                       "first_step": step == 0} if kind == "sgd" else
                      {"kind": "adam", "lr": 0.01, "step": step + 1, "exp_avg": m,
                       "exp_avg_sq": v})
            losses.append(plan.train_step(P, G, X, y, loss="softmax_cross_entropy", indices=idx,
                                          l2=1e-3, grad_norms=norms, accumulate=accumulate,
                                          update=None if accumulate else update))
        results.append((P, G, m, v, norms, losses))
    (P1, G1, m1, v1, n1, l1), (P2, G2, m2, v2, n2, l2) = results
    assert l1 == l2 and bits_equal(n1, n2) and bits_equal(G1, G2)
    assert bits_equal(P1, P2) and bits_equal(m1, m2) and bits_equal(v1, v2)
    if not accumulate:
        assert np.mean(P1 != start) > 0.999


def test_bad_input_is_rejected_with_a_message():
    with pytest.raises(ValueError, match="expected at least 2"):
        _core.MLPPlan([3], [], "float32")
    with pytest.raises(ValueError, match="one per layer, 2"):
        _core.MLPPlan([3, 4, 2], ["tanh"], "float32")
    with pytest.raises(ValueError, match="softmax is supported on the output layer only"):
        _core.MLPPlan([3, 4, 2], ["softmax", "identity"], "float32")
    with pytest.raises(TypeError, match="expected 'float32' or 'float64'"):
        _core.MLPPlan([3, 2], ["identity"], "int8")
    with pytest.raises(ValueError, match="64-bit count"):
        _core.MLPPlan([2**40, 2**40], ["identity"], "float32")
    plan = _core.MLPPlan([3, 4, 2], ["tanh", "identity"], "float64")
    P, G = np.zeros(plan.n_params), np.zeros(plan.n_params)
    X, y = np.zeros((5, 3)), np.zeros(5, np.int64)
    step = lambda **kw: plan.train_step(**{"params": P, "grads": G, "x": X, "targets": y,
                                           "loss": "softmax_cross_entropy", **kw})
    with pytest.raises(ValueError, match=r"params.shape is \(3,\); expected \(26,\)"):
        step(params=np.zeros(3))
    with pytest.raises(TypeError, match="params.dtype is float32; expected float64"):
        step(params=np.zeros(plan.n_params, np.float32))
    with pytest.raises(ValueError, match=r"x.shape is \(5, 4\); expected \(n, 3\)"):
        step(x=np.zeros((5, 4)))
    with pytest.raises(ValueError, match=r"indices\[1\] is 9; expected 0 <= index < 5"):
        step(indices=np.array([0, 9]))
    with pytest.raises(ValueError, match="label 2 at row 0; expected 0 <= label < 2"):
        step(targets=np.full(5, 2))
    with pytest.raises(TypeError, match="expected integer class labels"):
        step(targets=np.zeros(5))
    with pytest.raises(ValueError, match="the batch is empty"):
        step(indices=np.array([], np.int64))
    with pytest.raises(ValueError, match="loss is 'hinge'"):
        step(loss="hinge")
    with pytest.raises(ValueError, match="grads shares memory with params"):
        step(grads=P)
    with pytest.raises(ValueError, match=r"targets.shape is \(5,\); expected \(5, 2\)"):
        step(loss="squared_error", targets=np.zeros(5))


def _two_layer(seed, act=cr.Tanh):
    return cr.Sequential(cr.Dense(4, 8), act(), cr.Dense(8, 3), seed=seed)


@pytest.mark.parametrize("loss, make_y", [
    (cr.CrossEntropy(), lambda rng: rng.integers(0, 3, 64)),
    (cr.BinaryCrossEntropy(), lambda rng: (rng.random((64, 3)) < 0.5).astype(np.float32)),
    (cr.MSE(), lambda rng: rng.standard_normal((64, 3)).astype(np.float32)),
    (cr.CrossEntropy(reduction="sum"), lambda rng: rng.integers(0, 3, 64)),
])
def test_fit_through_the_plan_equals_the_per_layer_path(monkeypatch, loss, make_y):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((64, 4)).astype(np.float32)
    y = make_y(rng)

    def train():
        model = _two_layer(3)
        opt = cr.SGD(model.parameters(), lr=0.05, momentum=0.9)
        hist = cr.fit(model, X, y, loss=loss, optimizer=opt, epochs=3, batch_size=16, seed=1,
                      progress=False)
        return model.flat_data.copy(), hist.loss

    fast_params, fast_loss = train()
    monkeypatch.setattr(cr.train, "compile_plan", lambda *a: None)
    slow_params, slow_loss = train()
    assert bits_equal(fast_params, slow_params)
    # MSE's loss value is summed in float64 natively and by a float32 dot in losses.py
    np.testing.assert_allclose(fast_loss, slow_loss, rtol=1e-6)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dims, act", [
    ([20, 1024, 10], cr.ReLU),        # 8 panels of 32 rows, split over 2 threads
    ([30, 600, 7], cr.Tanh),          # 5 panels (54 rows), split over 2 threads
    ([12, 40, 520, 5], cr.Sigmoid),   # a layer below; 5 panels (63 rows), one thread
    ([8, 700, 9], lambda: cr.LeakyReLU(0.2)),  # 6 panels (46 rows), split
    # The separate-buffer path: 300 outputs, a row-wise activation, A_1 of 300 KiB.
    ([16, 600, 300], cr.ReLU),
    ([16, 600, 5], cr.Softmax),
    ([30, 300, 7], cr.Tanh),
])
def test_output_layers_input_gradient_equals_the_per_layer_path(monkeypatch, threads, dims,
                                                                 act):
    """The plan writes the output layer's input gradient over A_{L-1} (of 512
    KiB or more, batches of 256 here) in panels of rows, GEMM + activation VJP
    per panel; fit through the plan must still give the per-layer path's
    bits, and X must stay untouched."""
    rng = np.random.default_rng(5)
    X = rng.standard_normal((512, dims[0])).astype(np.float32)
    X_saved = X.copy()
    y = rng.integers(0, dims[-1], 512)
    cr.set_num_threads(threads)  # restored by conftest

    def train():
        layers = []
        for a, b in zip(dims[:-2], dims[1:-1]):
            layers += [cr.Dense(a, b), act()]
        model = cr.Sequential(*layers, cr.Dense(dims[-2], dims[-1]), seed=4)
        opt = cr.SGD(model.parameters(), lr=0.05)
        cr.fit(model, X, y, loss=cr.CrossEntropy(), optimizer=opt, epochs=1, batch_size=256,
               seed=1, progress=False)
        return model.flat_data.copy()

    fast = train()
    monkeypatch.setattr(cr.train, "compile_plan", lambda *a: None)
    slow = train()
    assert bits_equal(fast, slow)
    assert bits_equal(X, X_saved)


@pytest.mark.parametrize("threads", [1, 2])
def test_output_layers_input_gradient_in_place_with_accumulate(threads, rng):
    """accumulate=True through the in-place panels (A_1 of 1 MiB): two steps on
    the same batch from zero give exactly twice one step's gradient, and the
    buffers the plan writes over are its own (X untouched)."""
    dims = [20, 1024, 10]
    plan = _core.MLPPlan(dims, ["relu", "identity"], "float32")
    P = (rng.standard_normal(plan.n_params) * 0.05).astype(np.float32)
    X = rng.standard_normal((300, 20)).astype(np.float32)
    X_saved = X.copy()
    y = rng.integers(0, 10, 300)
    idx = np.arange(256)
    cr.set_num_threads(threads)  # restored by conftest
    G1 = np.zeros_like(P)
    l1 = plan.train_step(P, G1, X, y, loss="softmax_cross_entropy", indices=idx)
    G2 = np.zeros_like(P)
    for _ in range(2):
        l2 = plan.train_step(P, G2, X, y, loss="softmax_cross_entropy", indices=idx,
                             accumulate=True)
    assert l1 == l2 and bits_equal(G2, 2 * G1) and np.abs(G1).max() > 0
    # No indices: the batch is X itself, read in place, never written.
    Xb = X[:256].copy()
    G3 = np.zeros_like(P)
    l3 = plan.train_step(P, G3, Xb, y[:256], loss="softmax_cross_entropy")
    assert l3 == l1 and bits_equal(G3, G1)
    assert bits_equal(X, X_saved) and bits_equal(Xb, X_saved[:256])


def test_compile_plan_declines_what_it_cannot_run():
    ce = cr.CrossEntropy()
    labels = np.zeros(3, np.int64)
    assert plan_mod.compile_plan(_two_layer(0), ce, labels) is not None
    assert plan_mod.compile_plan(_two_layer(0), ce, np.zeros((3, 3))) is None  # soft targets
    no_bias = cr.Sequential(cr.Dense(4, 3, bias=False), seed=0)
    assert plan_mod.compile_plan(no_bias, ce, labels) is None
    ends_in_act = cr.Sequential(cr.Dense(4, 3), cr.Tanh(), seed=0)
    assert plan_mod.compile_plan(ends_in_act, cr.MSE(), np.zeros((3, 3))) is None
    probs = cr.Sequential(cr.Dense(4, 1), cr.Sigmoid(), seed=0)
    assert plan_mod.compile_plan(probs, cr.BinaryCrossEntropy(from_logits=False), np.zeros(3)) is None
    two_slopes = cr.Sequential(cr.Dense(4, 4), cr.LeakyReLU(0.1), cr.Dense(4, 4),
                               cr.LeakyReLU(0.2), cr.Dense(4, 1), seed=0)
    assert plan_mod.compile_plan(two_slopes, cr.MSE(), np.zeros(3)) is None


# ------------------------------------------------------------ fused update
def _rules(state):
    """(update dict for the plan, the same step through the kernels) pairs."""
    m, v = state

    def sgd_k(P, G, step):
        cr.kernels.sgd_step(P, G, None, lr=0.1, weight_decay=1e-3)

    def sgdm_k(P, G, step):
        cr.kernels.sgd_step(P, G, m[1], lr=0.1, momentum=0.9, dampening=0.1, weight_decay=1e-3,
                            first_step=step == 0)

    def nesterov_k(P, G, step):
        cr.kernels.sgd_step(P, G, m[1], lr=0.1, momentum=0.8, nesterov=True,
                            first_step=step == 0)

    def adam_k(P, G, step):
        cr.kernels.adam_step(P, G, m[1], v[1], step=step + 1, lr=0.01, beta1=0.8, beta2=0.99,
                             eps=1e-6, weight_decay=0.01)

    def adamw_k(P, G, step):
        cr.kernels.adam_step(P, G, m[1], v[1], step=step + 1, lr=0.01, weight_decay=0.1,
                             decoupled=True)

    return {
        "sgd": (lambda s: {"kind": "sgd", "lr": 0.1, "weight_decay": 1e-3}, sgd_k),
        "sgd-momentum": (lambda s: {"kind": "sgd", "lr": 0.1, "momentum": 0.9, "dampening": 0.1,
                                    "weight_decay": 1e-3, "first_step": s == 0,
                                    "momentum_buffer": m[0]}, sgdm_k),
        "nesterov": (lambda s: {"kind": "sgd", "lr": 0.1, "momentum": 0.8, "nesterov": True,
                                "first_step": s == 0, "momentum_buffer": m[0]}, nesterov_k),
        "adam": (lambda s: {"kind": "adam", "lr": 0.01, "beta1": 0.8, "beta2": 0.99, "eps": 1e-6,
                            "weight_decay": 0.01, "step": s + 1, "exp_avg": m[0],
                            "exp_avg_sq": v[0]}, adam_k),
        "adamw": (lambda s: {"kind": "adam", "lr": 0.01, "weight_decay": 0.1, "decoupled": True,
                             "step": s + 1, "exp_avg": m[0], "exp_avg_sq": v[0]}, adamw_k),
    }


@pytest.mark.parametrize("rule", ["sgd", "sgd-momentum", "nesterov", "adam", "adamw"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("threads", [1, 2])
def test_fused_update_is_bit_identical_to_the_kernels_afterwards(rule, dtype, threads):
    """train_step(update=...) == train_step, then sgd_step/adam_step on the flat buffers."""
    rng = np.random.default_rng(2)
    # 300 x 256 takes the packed GEMM and two threads; the 33 and 17 wide layers do not.
    dims = [300, 256, 33, 17]
    plan = _core.MLPPlan(dims, ["relu", "tanh", "identity"], np.dtype(dtype).name)
    P1 = (rng.standard_normal(plan.n_params) * 0.05).astype(dtype)
    P2 = P1.copy()
    G1, G2 = np.zeros_like(P1), np.zeros_like(P1)
    m = [np.zeros_like(P1), np.zeros_like(P1)]
    v = [np.zeros_like(P1), np.zeros_like(P1)]
    make, kernel_step = _rules((m, v))[rule]
    X = rng.standard_normal((200, 300)).astype(dtype)
    y = rng.integers(0, 17, 200)
    start = P1.copy()
    cr.set_num_threads(threads)  # restored by conftest
    for step in range(3):
        idx = rng.permutation(200)[:64]
        n1, n2 = np.zeros(3), np.zeros(3)
        l1 = plan.train_step(P1, G1, X, y, loss="softmax_cross_entropy", indices=idx, l2=1e-3,
                             grad_norms=n1, update=make(step))
        l2 = plan.train_step(P2, G2, X, y, loss="softmax_cross_entropy", indices=idx, l2=1e-3,
                             grad_norms=n2)
        kernel_step(P2, G2, step)
        assert l1 == l2 and bits_equal(n1, n2) and bits_equal(G1, G2)
        assert bits_equal(P1, P2) and bits_equal(m[0], m[1]) and bits_equal(v[0], v[1])
    assert np.mean(P1 != start) > 0.999  # the steps were taken (one value may come back)


def test_fused_update_is_skipped_when_the_loss_is_not_finite():
    dims = [3, 4, 2]
    plan = _core.MLPPlan(dims, ["tanh", "identity"], "float64")
    P = np.full(plan.n_params, 0.1)
    P[-2:] = np.inf  # b2: the logits and the loss are not finite
    before = P.copy()
    G = np.zeros_like(P)
    X = np.ones((5, 3))
    y = np.zeros(5, np.int64)
    value = plan.train_step(P, G, X, y, loss="softmax_cross_entropy",
                            update={"kind": "sgd", "lr": 0.1})
    assert not np.isfinite(value)
    assert bits_equal(P, before)


def test_fused_update_bad_input_is_rejected_with_a_message():
    plan = _core.MLPPlan([3, 4, 2], ["tanh", "identity"], "float64")
    P, G = np.zeros(plan.n_params), np.zeros(plan.n_params)
    buf = np.zeros(plan.n_params)
    X, y = np.zeros((5, 3)), np.zeros(5, np.int64)

    def step(update, **kw):
        args = {"params": P, "grads": G, "x": X, "targets": y, "loss": "softmax_cross_entropy",
                "update": update, **kw}
        return plan.train_step(**args)

    with pytest.raises(TypeError, match="update is a list; expected a dict"):
        step([("kind", "sgd")])
    with pytest.raises(ValueError, match="needs 'kind'"):
        step({"lr": 0.1})
    with pytest.raises(ValueError, match="update\\['kind'\\] is 'rmsprop'; expected 'sgd' or 'adam'"):
        step({"kind": "rmsprop", "lr": 0.1})
    with pytest.raises(ValueError, match="unknown key 'momentun'"):
        step({"kind": "sgd", "lr": 0.1, "momentun": 0.9})
    with pytest.raises(ValueError, match="unknown key 'beta1' for kind 'sgd'"):
        step({"kind": "sgd", "lr": 0.1, "beta1": 0.9})
    with pytest.raises(ValueError, match="update\\['lr'\\] must be finite; got nan"):
        step({"kind": "sgd", "lr": float("nan")})
    with pytest.raises(TypeError, match="update\\['lr'\\] must be a number; got str"):
        step({"kind": "sgd", "lr": "0.1"})
    with pytest.raises(TypeError, match="update\\['nesterov'\\] must be a bool; got int"):
        step({"kind": "sgd", "lr": 0.1, "nesterov": 1})
    with pytest.raises(ValueError, match="needs 'momentum_buffer', a flat float64 array of 26"):
        step({"kind": "sgd", "lr": 0.1, "momentum": 0.9})
    with pytest.raises(ValueError, match=r"update\['momentum_buffer'\].shape is \(3,\); expected \(26,\)"):
        step({"kind": "sgd", "lr": 0.1, "momentum": 0.9, "momentum_buffer": np.zeros(3)})
    with pytest.raises(TypeError, match=r"update\['exp_avg'\].dtype is float32; expected float64"):
        step({"kind": "adam", "lr": 0.1, "exp_avg": buf.astype(np.float32), "exp_avg_sq": buf})
    with pytest.raises(ValueError, match="update\\['momentum_buffer'\\] shares memory with params"):
        step({"kind": "sgd", "lr": 0.1, "momentum": 0.9, "momentum_buffer": P})
    with pytest.raises(ValueError, match="update\\['exp_avg'\\] shares memory with update\\['exp_avg_sq'\\]"):
        step({"kind": "adam", "lr": 0.1, "exp_avg": buf, "exp_avg_sq": buf})
    with pytest.raises(ValueError, match="update\\['step'\\] must be >= 1; got 0"):
        step({"kind": "adam", "lr": 0.1, "step": 0, "exp_avg": buf, "exp_avg_sq": buf.copy()})
    with pytest.raises(TypeError, match="update\\['step'\\] must be an int; got float"):
        step({"kind": "adam", "lr": 0.1, "step": 1.0, "exp_avg": buf, "exp_avg_sq": buf.copy()})
    with pytest.raises(ValueError, match="accumulate=True with an update"):
        step({"kind": "sgd", "lr": 0.1}, accumulate=True)
    frozen = P.copy()
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="params is read-only"):
        step({"kind": "sgd", "lr": 0.1}, params=frozen)
    # Nothing was written by any of the rejected calls.
    assert not P.any() and not buf.any()


def test_fit_fuses_sgd_and_adam_but_not_a_custom_rule(monkeypatch):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((64, 4)).astype(np.float32)
    y = rng.integers(0, 3, 64)
    seen = []
    real = plan_mod.TrainPlan.step

    def spy(self, *args):
        seen.append(args[-1] is not None)
        return real(self, *args)

    monkeypatch.setattr(plan_mod.TrainPlan, "step", spy)

    class HalfSGD(cr.SGD):
        def _update(self, p, g, state):
            cr.kernels.sgd_step(p, g, None, lr=self.lr / 2)

    results = {}
    for name, make in [("adam", lambda m: cr.Adam(m.parameters(), lr=0.01)),
                       ("half", lambda m: HalfSGD(m.parameters(), lr=0.1))]:
        seen.clear()
        model = _two_layer(3)
        opt = make(model)
        cr.fit(model, X, y, loss=cr.CrossEntropy(), optimizer=opt, epochs=2, batch_size=16,
               seed=1, progress=False)
        results[name] = (set(seen), opt.steps)
    assert results["adam"] == ({True}, 8)
    assert results["half"] == ({False}, 8)
