"""The training loop: batches, fit on the lecture's data, stopping, callbacks, errors, allocations."""

from __future__ import annotations

import os
import signal
import sys
import tracemalloc

import numpy as np
import pytest

import chainrule as cr
from chainrule import layers as L
from chainrule import train as T
from chainrule.data import make_circles
from chainrule.features import PolynomialBasis


@pytest.fixture(scope="module")
def circles():
    return make_circles(400, noise=0.1, factor=0.5, seed=0)


def _tanh_net(seed=0, hidden=8):
    return cr.Sequential(cr.Dense(2, hidden), cr.Tanh(), cr.Dense(hidden, 1), seed=seed)


# -- batches ----------------------------------------------------------------------------------


def test_batches_cover_every_sample_once_in_a_seeded_order():
    X, y = np.arange(20).reshape(10, 2), np.arange(10)
    got = list(cr.batches(X, y, batch_size=4, seed=0))
    assert [len(b[0]) for b in got] == [4, 4, 2]
    seen = np.concatenate([b[1] for b in got])
    assert sorted(seen) == list(range(10)) and list(seen) != list(range(10))
    again = np.concatenate([b[1] for b in cr.batches(X, y, batch_size=4, seed=0)])
    np.testing.assert_array_equal(seen, again)
    for xb, yb in got:
        np.testing.assert_array_equal(xb[:, 0] // 2, yb)
    assert [len(b) for b in cr.batches(X, batch_size=4, shuffle=False, drop_last=True)] == [4, 4]
    with pytest.raises(ValueError, match=r"batches: batch_size must be a positive integer; got 0"):
        cr.batches(X, y, batch_size=0)
    with pytest.raises(ValueError, match=r"batches: X has 10 samples but y has 9"):
        cr.batches(X, y[:9])


def test_hand_written_lecture_loop_learns(circles):
    X, y = circles
    model, loss = _tanh_net(), cr.BinaryCrossEntropy()
    opt = cr.SGD(model.parameters(), lr=0.5)
    rng = np.random.default_rng(0)
    for epoch in range(60):
        for xb, yb in cr.batches(X, y, 32, seed=rng):
            model.zero_grad()
            loss.forward(model(xb), yb)
            model.backward(loss.backward())
            opt.step()
    assert cr.metrics.accuracy(y, cr.predict(model, X)) > 0.95


# -- the lecture's results on two circles ------------------------------------------------------


def test_logistic_regression_is_near_chance_on_circles(circles):
    X, y = circles
    model = cr.Sequential(cr.Dense(2, 1), seed=0)
    h = cr.fit(model, X, y, loss=cr.BinaryCrossEntropy(), optimizer=cr.SGD(model.parameters(), lr=0.5),
               epochs=30, seed=0, progress=False, metrics=["accuracy"])
    assert h.metrics["accuracy"][-1] < 0.65


def test_basis_function_logistic_regression_is_near_perfect(circles):
    X, y = circles
    phi = PolynomialBasis().fit_transform(X)
    model = cr.Sequential(cr.Dense(5, 1), seed=0)
    h = cr.fit(model, phi, y, optimizer=cr.SGD(model.parameters(), lr=1.0), epochs=60, seed=0,
               progress=False, metrics=["accuracy"])
    assert h.metrics["accuracy"][-1] >= 0.98


def test_tanh_hidden_layer_learns_its_own_basis(circles):
    X, y = circles
    model = _tanh_net()
    h = cr.fit(model, X, y, optimizer=cr.SGD(model.parameters(), lr=0.5), epochs=100, seed=0,
               progress=False, metrics=["accuracy"], validation_split=0.25)
    assert h.metrics["accuracy"][-1] >= 0.97 and h.metrics["val_accuracy"][-1] >= 0.95
    assert h.loss[-1] < h.loss[0] / 5


def test_same_seeds_give_a_bit_identical_trained_model(circles):
    X, y = circles

    def run():
        model = cr.Sequential(cr.Dense(2, 16), cr.ReLU(), cr.Dense(16, 1), seed=3)
        h = cr.fit(model, X, y, optimizer=cr.Adam(model.parameters(), lr=1e-2), epochs=5, batch_size=16,
                   seed=11, progress=False)
        return model.flat_data.tobytes(), h.loss

    (w1, l1), (w2, l2) = run(), run()
    assert w1 == w2 and l1 == l2


def test_multiclass_with_cross_entropy_and_history_fields(rng):
    X = rng.normal(size=(300, 4))
    y = np.argmax(X[:, :3], axis=1)
    model = cr.Sequential(cr.Dense(4, 16), cr.ReLU(), cr.Dense(16, 3), seed=0)
    h = cr.fit(model, X, y, optimizer=cr.Adam(model.parameters(), lr=1e-2), epochs=20, seed=0,
               validation_data=(X[:50], y[:50]), metrics=["accuracy", "log_loss"], progress=False)
    assert len(h.loss) == len(h.val_loss) == len(h.time) == len(h.lr) == len(h.grad_norms) == 20
    assert h.layer_names == ["0: Dense(4, 16)", "2: Dense(16, 3)"] and all(len(g) == 2 for g in h.grad_norms)
    assert h["val_accuracy"][-1] > 0.9 and h["log_loss"][-1] == pytest.approx(h.loss[-1], rel=0.2)
    proba = cr.predict_proba(model, X[:5])
    assert proba.shape == (5, 3) and np.allclose(proba.sum(1), 1, atol=1e-6)
    assert cr.predict(model, X[:5]).dtype == np.int64
    assert cr.evaluate(model, X, y, cr.CrossEntropy()) == pytest.approx(h["log_loss"][-1], rel=1e-5)


def test_regression_with_mse():
    X = np.linspace(-1, 1, 64)[:, None]
    model = cr.Sequential(cr.Dense(1, 16), cr.Tanh(), cr.Dense(16, 1), seed=0)
    h = cr.fit(model, X, X ** 2, loss=cr.MSE(), optimizer=cr.Adam(model.parameters(), lr=1e-2),
               epochs=200, batch_size=16, seed=0, progress=False, metrics=["mse"])
    assert h.metrics["mse"][-1] < 5e-3
    assert cr.predict(model, X, loss=cr.MSE()).shape == (64, 1)


def test_binary_predict_proba_has_two_columns(circles):
    X, y = circles
    model = _tanh_net()
    p = cr.predict_proba(model, X)
    assert p.shape == (400, 2) and np.allclose(p.sum(1), 1)
    sig = cr.Sequential(cr.Dense(2, 1), cr.Sigmoid(), seed=0)
    np.testing.assert_allclose(cr.predict_proba(sig, X)[:, 1], sig(X)[:, 0])
    with pytest.raises(ValueError, match=r"predict_proba: X has 3 features per sample; the model expects d_in = 2"):
        cr.predict_proba(model, np.ones((2, 3)))


# -- gradient norms: the vanishing gradient ------------------------------------------------------


def test_deep_sigmoid_gradients_vanish_and_relu_gradients_do_not(circles):
    X, y = circles

    def deep(act):
        layers = [cr.Dense(2, 32), act()]
        for _ in range(5):
            layers += [cr.Dense(32, 32), act()]
        return cr.Sequential(*layers, cr.Dense(32, 1), seed=0)

    sig = cr.gradient_norms(deep(cr.Sigmoid), cr.BinaryCrossEntropy(), X, y)
    relu = cr.gradient_norms(deep(cr.ReLU), cr.BinaryCrossEntropy(), X, y)
    assert len(sig) == len(relu) == 7
    assert sig[0] < sig[-1] / 100
    assert relu[0] > relu[-1] / 10


# -- stopping criteria ----------------------------------------------------------------------------


def test_tol_and_n_iter_no_change_stop_training(circles):
    X, y = circles
    model = _tanh_net()
    h = cr.fit(model, X, y, optimizer=cr.SGD(model.parameters(), lr=0.5), epochs=500, tol=1e-2,
               n_iter_no_change=3, seed=0, progress=False)
    assert h.stop_reason == "tol" and len(h.loss) < 500


def test_not_converging_within_epochs_is_a_warning(circles):
    X, y = circles
    model = _tanh_net()
    with pytest.warns(T.ConvergenceWarning, match=r"fit: reached epochs=2 before the loss stopped improving"):
        cr.fit(model, X, y, epochs=2, tol=1e-9, seed=0, progress=False)


def test_early_stopping_restores_the_best_weights(circles):
    X, y = circles
    model = _tanh_net()
    fake = [5.0, 3.0, 1.0, 2.0, 4.0, 6.0, 7.0, 8.0]
    snapshots = {}

    class Score(cr.Callback):
        def on_epoch_end(self, epoch, logs):
            logs["score"] = fake[epoch]
            snapshots[epoch] = model.flat_data.copy()

    stopper = cr.EarlyStopping(monitor="score", patience=3)
    h = cr.fit(model, X, y, epochs=8, seed=0, progress=False, callbacks=[Score(), stopper])
    assert h.stop_reason == "early_stopping" and stopper.stopped_epoch == 5 and len(h.loss) == 6
    assert h.best_epoch == 2
    np.testing.assert_array_equal(model.flat_data, snapshots[2])


def test_early_stopping_on_an_unlogged_value_says_what_is_logged(circles):
    X, y = circles
    with pytest.raises(ValueError, match=r"EarlyStopping: monitor 'val_loss' is not logged; the epoch logs have loss"):
        cr.fit(_tanh_net(), X, y, epochs=2, progress=False, callbacks=[cr.EarlyStopping()])


def test_nan_loss_names_epoch_and_batch(circles):
    X, y = circles
    model = _tanh_net()

    class Poison(cr.Callback):
        def on_batch_end(self, batch, logs):
            if logs["epoch"] == 1 and batch == 2:
                model[0].weight.data[0, 0] = np.nan

    with pytest.raises(FloatingPointError, match=r"fit: the loss is nan at epoch 2/3, batch 4/13") as info:
        cr.fit(model, X, y, epochs=3, seed=0, progress=False, callbacks=[Poison()])
    assert (info.value.epoch, info.value.batch) == (1, 3) and len(info.value.history.loss) == 1


# -- callbacks, progress, interrupts ---------------------------------------------------------------


def test_callback_protocol_order_and_counts(circles):
    X, y = circles
    events = []

    class Recorder:  # duck-typed: no base class needed
        def on_train_begin(self, history):
            events.append(("train_begin", history.model is model))

        def on_epoch_begin(self, epoch, logs):
            events.append(("epoch_begin", epoch))

        def on_batch_end(self, batch, logs):
            events.append(("batch", logs["epoch"], batch, logs["size"]))

        def on_epoch_end(self, epoch, logs):
            events.append(("epoch_end", epoch, sorted(logs)))

        def on_train_end(self, history):
            events.append(("train_end", len(history.loss)))

    model = _tanh_net()
    cr.fit(model, X, y, epochs=2, batch_size=150, seed=0, progress=False, callbacks=[Recorder()],
           validation_split=0.25)
    assert events[0] == ("train_begin", True) and events[-1] == ("train_end", 2)
    assert events[1] == ("epoch_begin", 0)
    assert [e for e in events if e[0] == "batch"][:2] == [("batch", 0, 0, 150), ("batch", 0, 1, 150)]
    assert ("epoch_end", 0, ["loss", "lr", "time", "val_loss"]) in events
    assert sum(e[0] == "batch" for e in events) == 2 * 2  # 300 training samples, batches of 150


def test_schedule_is_advanced_every_epoch(circles):
    X, y = circles
    model = _tanh_net()
    opt = cr.SGD(model.parameters(), lr=0.8, schedule=cr.StepLR(2, 0.5))
    h = cr.fit(model, X, y, optimizer=opt, epochs=5, progress=False)
    assert h.lr == [0.8, 0.8, 0.4, 0.4, 0.2]


def test_progress_plain_line_and_silence(circles, capsys, monkeypatch):
    X, y = circles
    cr.fit(_tanh_net(), X, y, epochs=2, progress=False)
    assert capsys.readouterr().err == ""
    monkeypatch.setitem(sys.modules, "tqdm", None)  # as if tqdm were not installed
    monkeypatch.setattr(T._Progress, "delay", 0.0)
    cr.fit(_tanh_net(), X, y, epochs=3, progress=True, validation_split=0.2)
    err = capsys.readouterr().err
    assert "epoch 3/3" in err and "val_loss" in err


def test_progress_uses_tqdm_when_installed(circles, monkeypatch):
    import types

    made = []

    class FakeBar:
        def __init__(self, **kw):
            self.kw, self.n, self.postfix, self.closed = kw, kw.get("initial", 0), "", False
            made.append(self)

        def set_postfix_str(self, text, refresh=True):
            self.postfix = text

        def update(self, k):
            self.n += k

        def close(self):
            self.closed = True

    monkeypatch.setitem(sys.modules, "tqdm", types.SimpleNamespace(tqdm=FakeBar))
    monkeypatch.setattr(T._Progress, "delay", 0.0)
    X, y = circles
    cr.fit(_tanh_net(), X, y, epochs=4, progress=True)
    (bar,) = made
    assert bar.kw["total"] == 4 and bar.n == 4 and bar.closed and bar.postfix.startswith("loss ")


@pytest.mark.skipif(not hasattr(signal, "SIGINT") or os.name != "posix", reason="needs POSIX signals")
def test_ctrl_c_stops_at_the_batch_boundary(circles):
    X, y = circles
    model = _tanh_net()
    before = signal.getsignal(signal.SIGINT)

    class CtrlC(cr.Callback):
        def on_batch_end(self, batch, logs):
            if logs["epoch"] == 1 and batch == 2:
                os.kill(os.getpid(), signal.SIGINT)

    ended = []
    h = cr.fit(model, X, y, epochs=10, seed=0, progress=False,
               callbacks=[CtrlC(), type("E", (), {"on_train_end": lambda self, h: ended.append(1)})()])
    assert h.interrupted and h.stop_reason == "interrupted" and h.interrupted_at == (1, 2)
    assert len(h.loss) == 2 and ended == [1]
    assert signal.getsignal(signal.SIGINT) is before
    assert np.isfinite(model.flat_data).all() and cr.predict(model, X).shape == (400,)


def test_keyboard_interrupt_raised_in_the_loop_also_stops_cleanly(circles):
    X, y = circles

    class Raise(cr.Callback):
        def on_batch_end(self, batch, logs):
            if logs["epoch"] == 0 and batch == 4:
                raise KeyboardInterrupt

    h = cr.fit(_tanh_net(), X, y, epochs=5, progress=False, callbacks=[Raise()])
    assert h.interrupted and h.interrupted_at == (0, 4) and len(h.loss) == 1


# -- the training path ------------------------------------------------------------------------------


def test_training_path_skips_the_first_layer_input_gradient(circles, monkeypatch):
    X, y = circles
    flags = []
    real = L.kernels.dense_vjp

    def spy(x, w, gz, **kw):
        flags.append((w.shape, kw.get("need_gx", True)))
        return real(x, w, gz, **kw)

    monkeypatch.setattr(L.kernels, "dense_vjp", spy)
    model = cr.Sequential(cr.ReLU(), cr.Dense(2, 8), cr.Tanh(), cr.Dense(8, 1), seed=0)
    cr.fit(model, X, y, epochs=1, batch_size=400, progress=False)
    assert flags == [((8, 1), True), ((2, 8), False)]
    flags.clear()
    model(X[:3])
    assert model.backward(np.ones((3, 1))).shape == (3, 2)  # people still get gx
    assert flags == [((8, 1), True), ((2, 8), True)]


def test_steady_training_loop_does_not_allocate(rng):
    X = rng.normal(size=(2048, 16))
    y = (X[:, 0] * X[:, 1] > 0).astype(np.int64)
    model = cr.Sequential(cr.Dense(16, 64), cr.Tanh(), cr.Dense(64, 64), cr.ReLU(), cr.Dense(64, 1), seed=0)
    trace = np.zeros((64, 2), dtype=np.int64)  # preallocated: the probe itself must not allocate
    count = [0]

    class Probe(cr.Callback):
        def on_batch_end(self, batch, logs):
            if logs["epoch"] == 1 and batch == 1:
                tracemalloc.reset_peak()
            if logs["epoch"] >= 1:
                trace[count[0]] = tracemalloc.get_traced_memory()
                count[0] += 1

    tracemalloc.start()
    try:
        cr.fit(model, X, y, optimizer=cr.SGD(model.parameters(), lr=0.1, momentum=0.9), epochs=3,
               batch_size=64, seed=0, progress=False, callbacks=[Probe()])
    finally:
        tracemalloc.stop()
    assert count[0] == 64
    first, last = trace[1, 0], trace[-1, 0]
    peak = trace[1:, 1].max()
    # One batch of activations is 64 * 64 * 4 = 16 KiB: a step that allocated any would show.
    assert last - first < 2048, f"memory grew by {last - first} bytes over {len(trace)} steps"
    assert peak - first < 4096, f"a step allocated {peak - first} bytes"


# -- bad input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, exc, message", [
    (dict(X=np.ones((10, 3))), ValueError, r"fit: X has 3 features per sample; the model expects d_in = 2"),
    (dict(y=np.zeros(9)), ValueError, r"fit: X has 10 samples but y has 9"),
    (dict(X=np.zeros((0, 2)), y=np.zeros(0)), ValueError, r"fit: X is empty \(0 samples\); need at least one"),
    (dict(X=np.where(np.eye(10, 2) > 0, np.nan, 0)), ValueError, r"fit: X contains NaN or inf \(first at row 0, column 0\)"),
    (dict(X=np.ones(10)), ValueError, r"fit: X must be 2-D of shape \(n, 2\); got shape \(10,\)"),
    (dict(batch_size=0), ValueError, r"fit: batch_size must be a positive integer; got 0"),
    (dict(batch_size=-4), ValueError, r"fit: batch_size must be a positive integer; got -4"),
    (dict(epochs=0), ValueError, r"fit: epochs must be a positive integer; got 0"),
    (dict(y=np.full(10, 2)), ValueError, r"fit\(y\): target must be in \[0, 1\]"),
    (dict(validation_split=1.5), ValueError, r"fit: validation_split must be in \(0, 1\); got 1\.5"),
    (dict(validation_split=0.2, validation_data=(np.ones((2, 2)), [0, 1])), ValueError,
     r"fit: pass validation_data or validation_split, not both"),
    (dict(validation_data=(np.ones((2, 3)), [0, 1])), ValueError,
     r"fit: validation_data X has 3 features per sample"),
    (dict(metrics=["f1"]), ValueError, r"fit: metrics must be among accuracy, log_loss, mse; got 'f1'"),
    (dict(metrics=["accuracy"], loss=cr.MSE()), ValueError,
     r"fit: metric 'accuracy' needs a classification loss; got MSE\(reduction='mean'\)"),
    (dict(optimizer="sgd"), TypeError, r"fit: optimizer must be an Optimizer \(SGD, Adam\); got str"),
    (dict(model=np.eye(2)), TypeError, r"fit: model must be a chainrule layer or Sequential; got ndarray"),
])
def test_fit_rejects_bad_input(kwargs, exc, message):
    args = dict(model=_tanh_net(), X=np.ones((10, 2)), y=np.zeros(10), progress=False)
    args.update(kwargs)
    with pytest.raises(exc, match=message):
        cr.fit(args.pop("model"), args.pop("X"), args.pop("y"), **args)


def test_fit_rejects_labels_out_of_range_and_foreign_optimizers():
    model = cr.Sequential(cr.Dense(2, 3), seed=0)
    with pytest.raises(ValueError, match=r"fit\(y\): labels must be in \[0, 3\) for 3 outputs; got 3 at index 1"):
        cr.fit(model, np.ones((3, 2)), [0, 3, 1], progress=False)
    other = cr.Sequential(cr.Dense(2, 3))
    with pytest.raises(ValueError, match=r"fit: the optimizer updates parameters that are not the model's"):
        cr.fit(model, np.ones((3, 2)), [0, 1, 1], optimizer=cr.SGD(other.parameters(), lr=0.1), progress=False)
    with pytest.raises(ValueError, match=r"fit: cannot infer the loss for a model ending in Tanh\(\)"):
        cr.fit(cr.Sequential(cr.Dense(2, 3), cr.Tanh()), np.ones((3, 2)), [0, 1, 1], progress=False)
    with pytest.raises(ValueError, match=r"fit: the model ends in Softmax but CrossEntropy applies softmax"):
        cr.fit(cr.Sequential(cr.Dense(2, 3), cr.Softmax()), np.ones((3, 2)), [0, 1, 1], loss=cr.CrossEntropy(),
               progress=False)
    with pytest.raises(ValueError, match=r"fit: the model ends in Sigmoid but BinaryCrossEntropy\(from_logits=True\)"):
        cr.fit(cr.Sequential(cr.Dense(2, 1), cr.Sigmoid()), np.ones((3, 2)), [0, 1, 1],
               loss=cr.BinaryCrossEntropy(), progress=False)
    sig = cr.Sequential(cr.Dense(2, 1), cr.Sigmoid(), seed=0)  # inferred: BCE on probabilities
    assert len(cr.fit(sig, np.ones((3, 2)), [0, 1, 1], epochs=2, progress=False).loss) == 2
    with pytest.raises(ValueError, match=r"SGD: lr must be > 0; got 0"):
        cr.fit(model, np.ones((3, 2)), [0, 1, 1], optimizer=cr.SGD(model.parameters(), lr=0), progress=False)


def test_metrics_functions():
    assert cr.metrics.accuracy([0, 1, 1, 0], [0, 1, 0, 0]) == 0.75
    assert cr.metrics.log_loss([0, 1], [[0.5, 0.5], [0.2, 0.8]]) == pytest.approx(-(np.log(0.5) + np.log(0.8)) / 2)
    assert cr.metrics.log_loss([0, 1], [0.5, 0.8]) == pytest.approx(-(np.log(0.5) + np.log(0.8)) / 2)
    assert cr.metrics.mean_squared_error([1, 2], [[1], [4]]) == 2.0
    with pytest.raises(ValueError, match=r"accuracy: y_true has 2 samples but y_pred has 3"):
        cr.metrics.accuracy([0, 1], [0, 1, 1])
