"""The lecture's training algorithm: mini-batch SGD with backpropagation.

::

    randomly initialise theta                       (Sequential(..., seed=...))
    until a stopping criterion holds:               (epochs, tol, EarlyStopping)
        pick a mini-batch B of examples             (shuffled indices)
        compute grad_theta l on B by backprop       (forward, loss, backward)
        theta <- theta - eta grad                   (optimizer.step())

:func:`batches` is the "pick a mini-batch" step for people who write that
loop by hand; :func:`fit` runs all of it.

Callback protocol
-----------------
A callback is any object with some of these methods (a missing one is
skipped; :class:`Callback` has them all as no-ops). Epochs and batches are
counted from 0.

``on_train_begin(history)``
    Before the first epoch. ``history.model`` is the model being trained.
``on_epoch_begin(epoch, logs)``
    ``logs = {"epoch": epoch, "lr": lr}``.
``on_batch_end(batch, logs)``
    After the optimizer step: ``logs = {"epoch", "batch", "size", "loss"}``.
``on_epoch_end(epoch, logs)``
    ``logs`` has ``"loss"``, ``"val_loss"`` (with validation data), every
    metric (``"accuracy"``, ``"val_accuracy"``, ...), ``"lr"``, ``"time"``.
``on_train_end(history)``
    After the last epoch, also after an early stop or a Ctrl-C (not after an
    exception).

Setting ``history.stop_training = True`` in a callback ends training after
the current batch (``on_batch_end``) or epoch (``on_epoch_end``).
"""

from __future__ import annotations

import math
import numbers
import signal
import sys
import threading
import time
import warnings
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence, cast

import numpy as np
from numpy.typing import ArrayLike

from . import kernels
from . import losses as _losses
from . import metrics as _metrics
from .layers import Identity, Layer, LogSoftmax, Sequential, Sigmoid, Softmax, _ActivationLayer, _rng
from .optim import SGD, Optimizer
from .plan import compile_plan

if TYPE_CHECKING:
    from .layers import Seed

__all__ = [
    "batches", "fit", "History", "Callback", "EarlyStopping", "ConvergenceWarning",
    "predict", "predict_proba", "evaluate", "gradient_norms",
]


class ConvergenceWarning(UserWarning):
    """``fit`` reached ``epochs`` before ``tol`` / ``n_iter_no_change`` stopped it."""


# -- input checks -------------------------------------------------------------------


def _check_X(X: ArrayLike, model: Layer, where: str, what: str = "X") -> np.ndarray:
    """The layer's checks (numbers, 2-D, feature count, dtype), plus non-empty and finite."""
    X = model._check_x(X, where, what)
    if X.shape[0] == 0:
        raise ValueError(f"{where}: {what} is empty (0 samples); need at least one")
    bad = _first_non_finite(X)
    if bad is not None:
        raise ValueError(f"{where}: {what} contains NaN or inf (first at row {bad[0]}, column {bad[1]})")
    return X


def _first_non_finite(X: np.ndarray, rows_per_chunk: int = 4096) -> tuple[int, int] | None:
    """(row, column) of the first NaN or inf in 2-D X, or None.

    Without allocating an array the size of X: one sum (NaN and inf reach
    it), and only when that is not finite a scan in chunks of rows.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(np.add.reduce(X, axis=None)):
            return None
    for start in range(0, X.shape[0], rows_per_chunk):
        block = X[start:start + rows_per_chunk]
        bad = ~np.isfinite(block)
        if bad.any():
            r, c = np.argwhere(bad)[0]
            return start + int(r), int(c)
    return None  # finite values whose sum overflowed


def _check_positive_int(value: Any, where: str, name: str) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{where}: {name} must be a positive integer; got {value!r}")
    return int(value)


def _check_model(model: object, where: str) -> None:
    if not isinstance(model, Layer):
        raise TypeError(f"{where}: model must be a chainrule layer or Sequential; got {type(model).__name__}")


def _target_spec(model: Layer, n: int) -> np.ndarray:
    """A zero-memory stand-in for the model's output, for ``Loss.prepare_target``."""
    d_out = model.output_dim(model.d_in)
    return np.broadcast_to(np.zeros((), dtype=model.dtype), (n, d_out if d_out is not None else 1))


def _last_layer(model: Layer) -> Layer:
    return model.layers[-1] if isinstance(model, Sequential) else model


def _infer_loss(model: Layer, y: np.ndarray, where: str) -> _losses.Loss:
    last, d_out = _last_layer(model), model.output_dim(model.d_in)
    logits = isinstance(last, Identity) or not isinstance(last, _ActivationLayer)
    if d_out == 1 and isinstance(last, Sigmoid):
        return _losses.BinaryCrossEntropy(from_logits=False)
    if d_out == 1 and logits:
        return _losses.BinaryCrossEntropy(from_logits=True)
    if d_out is not None and d_out > 1 and logits and np.ndim(y) == 1:
        return _losses.CrossEntropy()
    raise ValueError(
        f"{where}: cannot infer the loss for a model ending in {last!r} with {d_out} outputs; "
        f"pass loss=BinaryCrossEntropy(), CrossEntropy() or MSE()"
    )


# -- batches --------------------------------------------------------------------------


def batches(X: ArrayLike, y: ArrayLike | None = None, batch_size: int = 32, shuffle: bool = True,
            seed: Seed = None, drop_last: bool = False) -> Iterator[Any]:
    """Mini-batches ``(X_B, y_B)`` covering the data once (one epoch).

    The lecture's "pick a mini-batch B of examples": the indices are
    shuffled, not the data, and each batch is gathered by index.

    Parameters
    ----------
    X : array_like of shape (n, d)
    y : array_like of shape (n, ...), optional
    batch_size : int > 0
        The last batch is smaller when ``batch_size`` does not divide ``n``.
    shuffle : bool, default True
    seed : None, int or numpy.random.Generator
        Pass one Generator and call ``batches`` once per epoch for a new
        order each epoch.
    drop_last : bool, default False
        Drop the last, smaller batch.

    Returns
    -------
    iterator of (X_B, y_B), or of X_B when ``y`` is None
        Copies (NumPy fancy indexing), so they may be kept.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> for epoch in range(3):                                  # doctest: +SKIP
    ...     for xb, yb in batches(X, y, 32, seed=rng):
    ...         model.zero_grad()
    ...         l = loss(model(xb), yb)
    ...         model.backward(loss.backward())
    ...         opt.step()
    """
    X = np.asarray(X)
    if X.ndim == 0 or len(X) == 0:
        raise ValueError(f"batches: X is empty (shape {X.shape}); need at least one sample")
    if y is not None:
        y = np.asarray(y)
        if y.ndim == 0 or len(y) != len(X):
            raise ValueError(f"batches: X has {len(X)} samples but y has {len(y) if y.ndim else 'none'}")
    bs = _check_positive_int(batch_size, "batches", "batch_size")
    n = len(X)
    order = _rng(seed, "batches").permutation(n) if shuffle else np.arange(n)
    stop = n - n % bs if drop_last else n

    def gen() -> Iterator[Any]:
        for start in range(0, stop, bs):
            sel = order[start:start + bs]
            yield X[sel] if y is None else (X[sel], y[sel])

    return gen()


# -- history and callbacks ---------------------------------------------------------------


class History:
    """What :func:`fit` records, one entry per epoch.

    Attributes
    ----------
    epoch : list of int
        0-based epoch numbers.
    loss : list of float
        Training loss of the epoch: the mean over its batches weighted by
        batch size (``reduction="sum"``: the sum), measured while training.
    val_loss : list of float
        Loss on the validation data after the epoch (empty without it).
    metrics : dict of str to list of float
        ``"accuracy"``, ``"val_accuracy"``, ...: computed on the whole
        training (and validation) set after each epoch.
    time : list of float
        Wall seconds per epoch.
    lr : list of float
        The learning rate used during the epoch.
    grad_norms : list of list of float
        Per epoch, one number per trainable layer (see ``layer_names``): the
        mean over the epoch's batches of the L2 norm of that layer's gradient
        (weight and bias together). Vanishing gradients show up as small
        numbers for the first layers.
    layer_names : list of str
        The trainable layers, e.g. ``"0: Dense(2, 8)"``.
    interrupted : bool
        True when Ctrl-C ended training (see :func:`fit`).
    interrupted_at : (epoch, batch) or None
        The batch after which training stopped.
    stop_reason : str
        ``"epochs"``, ``"tol"``, ``"early_stopping"``, ``"callback"`` or
        ``"interrupted"``.
    best_epoch : int or None
        Set by :class:`EarlyStopping`.
    stop_training : bool
        Set it from a callback to stop.
    model : Layer
        The model trained.
    """

    def __init__(self, model: Layer | None = None) -> None:
        self.model = model
        self.epoch: list[int] = []
        self.loss: list[float] = []
        self.val_loss: list[float] = []
        self.metrics: dict[str, list[float]] = {}
        self.time: list[float] = []
        self.lr: list[float] = []
        self.grad_norms: list[list[float]] = []
        self.layer_names: list[str] = []
        self.interrupted = False
        self.interrupted_at: tuple[int, int | None] | None = None
        self.stop_reason: str | None = None
        self.best_epoch: int | None = None
        self.stop_training = False

    def __getitem__(self, key: str) -> list[Any]:
        """``history["loss"]``, ``history["val_accuracy"]``, ..."""
        if key in ("loss", "val_loss", "time", "lr", "grad_norms", "epoch"):
            series: list[Any] = getattr(self, key)
            return series
        if key in self.metrics:
            return self.metrics[key]
        raise KeyError(f"History: no series {key!r}; have loss, val_loss, time, lr, grad_norms, "
                       f"{', '.join(self.metrics) or '(no metrics)'}")

    def as_dict(self) -> dict[str, list[Any]]:
        """All per-epoch series as one dict of lists."""
        d: dict[str, list[Any]] = {"epoch": self.epoch, "loss": self.loss, "time": self.time, "lr": self.lr,
             "grad_norms": self.grad_norms}
        if self.val_loss:
            d["val_loss"] = self.val_loss
        d.update(self.metrics)
        return d

    def __repr__(self) -> str:
        last = f", loss={self.loss[-1]:.4g}" if self.loss else ""
        return f"History(epochs={len(self.epoch)}{last}, stop_reason={self.stop_reason!r})"


class Callback:
    """Base class with every hook of the protocol as a no-op (see the module docstring)."""

    def on_train_begin(self, history: History) -> None:
        pass

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any]) -> None:
        pass

    def on_batch_end(self, batch: int, logs: dict[str, Any]) -> None:
        pass

    def on_epoch_end(self, epoch: int, logs: dict[str, Any]) -> None:
        pass

    def on_train_end(self, history: History) -> None:
        pass


class EarlyStopping(Callback):
    """Stop when a logged value stops improving; restore the best weights.

    Parameters
    ----------
    monitor : str, default "val_loss"
        A key of the epoch logs: ``"loss"``, ``"val_loss"``,
        ``"val_accuracy"``, ...
    patience : int >= 1, default 5
        Epochs without improvement before stopping.
    min_delta : float >= 0, default 0
        The least change that counts as an improvement.
    mode : {"auto", "min", "max"}
        ``"auto"``: ``"max"`` for accuracy, ``"min"`` otherwise.
    restore_best_weights : bool, default True
        At the end of training (stopped early or not), copy back the weights
        of the best epoch.

    Attributes
    ----------
    best : float
    best_epoch : int or None
    stopped_epoch : int or None
    """

    def __init__(self, monitor: str = "val_loss", patience: int = 5, min_delta: float = 0.0,
                 mode: str = "auto", restore_best_weights: bool = True) -> None:
        self.monitor = monitor
        self.patience = _check_positive_int(patience, "EarlyStopping", "patience")
        # cast: mypy deems float and numbers.Real disjoint and the rest unreachable
        if not isinstance(cast(object, min_delta), numbers.Real) or not math.isfinite(min_delta) or min_delta < 0:
            raise ValueError(f"EarlyStopping: min_delta must be a finite number >= 0; got {min_delta!r}")
        self.min_delta: float = float(min_delta)
        if mode not in ("auto", "min", "max"):
            raise ValueError(f"EarlyStopping: mode must be 'auto', 'min' or 'max'; got {mode!r}")
        self.mode: str = ("max" if "acc" in monitor else "min") if mode == "auto" else mode
        self.restore_best_weights: bool = restore_best_weights
        self.best: float = math.inf if self.mode == "min" else -math.inf
        self.best_epoch: int | None = None
        self.stopped_epoch: int | None = None

    def on_train_begin(self, history: History) -> None:
        self._history = history
        self._params = cast(Layer, history.model).parameters()
        self._best_weights = [p.data.copy() for p in self._params]
        self.best = math.inf if self.mode == "min" else -math.inf
        self.best_epoch = self.stopped_epoch = None
        self._wait = 0

    def on_epoch_end(self, epoch: int, logs: dict[str, Any]) -> None:
        if self.monitor not in logs:
            raise ValueError(
                f"EarlyStopping: monitor {self.monitor!r} is not logged; the epoch logs have "
                f"{', '.join(k for k in logs if k not in ('lr', 'time'))} (val_* needs validation data)"
            )
        value = logs[self.monitor]
        better = value < self.best - self.min_delta if self.mode == "min" else value > self.best + self.min_delta
        if better:
            self.best, self.best_epoch, self._wait = value, epoch, 0
            for kept, p in zip(self._best_weights, self._params):
                np.copyto(kept, p.data)
        else:
            self._wait += 1
            if self._wait >= self.patience:
                self.stopped_epoch = epoch
                self._history.stop_training = True
                self._history.stop_reason = "early_stopping"

    def on_train_end(self, history: History) -> None:
        history.best_epoch = self.best_epoch
        if self.restore_best_weights and self.best_epoch is not None:
            for kept, p in zip(self._best_weights, self._params):
                np.copyto(p.data, kept)


# -- predictions -----------------------------------------------------------------------------


def _outputs(model: Layer, X: np.ndarray, chunk: int) -> np.ndarray:
    """Model outputs for trusted X, chunk by chunk, into one new array."""
    out: Any = None
    for start in range(0, len(X), chunk):
        y = model._forward(X[start:start + chunk])
        if out is None:
            out = np.empty((len(X),) + y.shape[1:], dtype=y.dtype)
        out[start:start + len(y)] = y
    result: np.ndarray = out
    return result


def _proba_from_outputs(model: Layer, out: np.ndarray, loss: _losses.Loss | None) -> np.ndarray:
    if loss is not None:
        return cast(np.ndarray, loss.proba(out))
    last = _last_layer(model)
    out = out.reshape(len(out), -1)
    if isinstance(last, (Softmax,)):
        return out
    if isinstance(last, LogSoftmax):
        return cast(np.ndarray, np.exp(out))
    if out.shape[1] == 1:
        p = out if isinstance(last, Sigmoid) else kernels.sigmoid_forward(np.ascontiguousarray(out))
        return np.hstack([1 - p, p])
    return kernels.softmax_forward(np.ascontiguousarray(out))


def predict_proba(model: Layer, X: ArrayLike, *, loss: _losses.Loss | None = None,
                  batch_size: int = 4096) -> np.ndarray:
    """Class probabilities.

    Parameters
    ----------
    model : Layer
    X : array_like of shape (n, d_in)
    loss : Loss, optional
        How outputs become probabilities. Without it, from the last layer:
        Sigmoid/Softmax outputs are probabilities, LogSoftmax is
        exponentiated, a single logit goes through sigma and several through
        softmax.

    Returns
    -------
    proba : ndarray of shape (n, k), the model's dtype
        For one output (binary), ``k = 2`` with columns ``(1 - p, p)``, as
        scikit-learn; ``proba[:, 1]`` is the lecture's ``P(y = 1 | x)``.
    """
    _check_model(model, "predict_proba")
    X = _check_X(X, model, "predict_proba")
    bs = _check_positive_int(batch_size, "predict_proba", "batch_size")
    return _proba_from_outputs(model, _outputs(model, X, bs), loss)


def predict(model: Layer, X: ArrayLike, *, loss: _losses.Loss | None = None,
            batch_size: int = 4096) -> np.ndarray:
    """Class labels (``argmax`` of :func:`predict_proba`), or raw outputs for MSE.

    Returns
    -------
    ndarray of shape (n,), int64 labels; for ``loss=MSE()`` the model output
    of shape (n, d_out).
    """
    if isinstance(loss, _losses.MSE):
        _check_model(model, "predict")
        X = _check_X(X, model, "predict")
        return _outputs(model, X, _check_positive_int(batch_size, "predict", "batch_size"))
    labels: np.ndarray = np.argmax(predict_proba(model, X, loss=loss, batch_size=batch_size), axis=1)
    return labels.astype(np.int64)


def _evaluate_prepared(model: Layer, X: np.ndarray, t: np.ndarray, loss: _losses.Loss,
                       chunk: int) -> float:
    total = 0.0
    for start in range(0, len(X), chunk):
        xb, tb = X[start:start + chunk], t[start:start + chunk]
        value = loss._forward(model._forward(xb), tb, False)
        total += value * len(xb) if loss.reduction == "mean" else value
    return total / len(X) if loss.reduction == "mean" else total


def evaluate(model: Layer, X: ArrayLike, y: ArrayLike, loss: _losses.Loss | str, *,
             batch_size: int = 4096) -> float:
    """The loss of ``model`` on ``(X, y)``, with the loss's reduction (no gradients)."""
    _check_model(model, "evaluate")
    loss = _losses.get(loss)
    X = _check_X(X, model, "evaluate")
    t = loss.prepare_target(y, _target_spec(model, len(X)), "evaluate(y)")
    return _evaluate_prepared(model, X, t, loss, _check_positive_int(batch_size, "evaluate", "batch_size"))


def _metric(name: str, model: Layer, loss: _losses.Loss, out: np.ndarray, t: np.ndarray) -> float:
    """One metric from model outputs ``out`` and prepared targets ``t``."""
    fn = _metrics.METRICS[name]
    if isinstance(loss, _losses.MSE):
        return fn(t, out)
    proba = _proba_from_outputs(model, out, loss)
    if t.ndim == 2 and isinstance(loss, _losses.CrossEntropy):
        labels = np.argmax(t, axis=1)  # probability targets: their most likely class
    elif isinstance(loss, _losses.BinaryCrossEntropy):
        labels = (t.reshape(len(t), -1)[:, 0] > 0.5).astype(np.int64)
    else:
        labels = t
    if name == "accuracy":
        return fn(labels, np.argmax(proba, axis=1))
    if name == "log_loss":
        return fn(labels, proba)
    return fn(t.reshape(len(t), -1), proba[:, 1:] if proba.shape[1] == 2 else proba)


def _layer_groups(model: Layer) -> list[tuple[str, list[np.ndarray]]]:
    """(name, [grad arrays]) per trainable layer."""
    layers = model.layers if isinstance(model, Sequential) else [model]
    return [(f"{i}: {l!r}", [p.grad for p in l.parameters()]) for i, l in enumerate(layers) if l.parameters()]


class _GradNorms:
    """Per-layer L2 norms of the gradient over views of the parameters' grads.

    Each squared norm is one ``np.dot`` of a flat view with itself: a BLAS
    reduction that allocates nothing (the GEMM kernel is built for matrices
    and is far slower on a 1 x N by N x 1 product).
    """

    def __init__(self, model: Layer) -> None:
        groups = _layer_groups(model)
        self.names = [name for name, _ in groups]
        self._views = [[g.reshape(-1) for g in grads] for _, grads in groups]
        # Running sums of the norms, one per layer (float64: compiled plans add into it).
        self.sums = np.zeros(len(groups))

    def current(self) -> list[float]:
        with np.errstate(over="ignore", invalid="ignore"):  # a huge gradient norm is inf, not an error
            return [math.sqrt(sum(float(np.dot(v, v)) for v in views)) for views in self._views]

    def add(self) -> None:
        sums = self.sums
        with np.errstate(over="ignore", invalid="ignore"):
            for j, views in enumerate(self._views):
                total = 0.0
                for v in views:
                    total += float(np.dot(v, v))
                sums[j] += math.sqrt(total)


def gradient_norms(model: Layer, loss: _losses.Loss | str, X: ArrayLike, y: ArrayLike) -> list[float]:
    """Per-layer gradient norms for one batch, without updating anything.

    Runs ``zero_grad``, forward, loss and backward on ``(X, y)`` and returns,
    for each trainable layer, ``||dL/dW||`` with W and b together (the same
    numbers ``History.grad_norms`` averages). Overwrites the parameters'
    ``grad``.

    Returns
    -------
    list of float, one per trainable layer, input side first.
    """
    _check_model(model, "gradient_norms")
    loss = _losses.get(loss)
    X = _check_X(X, model, "gradient_norms")
    t = loss.prepare_target(y, _target_spec(model, len(X)), "gradient_norms(y)")
    model.zero_grad()
    loss._forward(model._forward(X), t, True)
    model._backward(cast(np.ndarray, loss._grad), False, True)
    return _GradNorms(model).current()


# -- progress ----------------------------------------------------------------------------------


class _Progress:
    """tqdm when installed, else one line on stderr; shown once a run passes ``delay`` s."""

    delay = 0.5

    def __init__(self, enabled: bool, epochs: int):
        self.enabled, self.epochs = enabled, epochs
        self.start = time.perf_counter()
        self.bar: Any = None  # a tqdm bar, True for plain lines, None before the first
        self._last_plain = 0.0
        self._tty = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
        self._tqdm: Any = False  # resolved on first display: the tqdm class, or None

    def update(self, epoch: int, logs: dict[str, Any], final: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if now - self.start < self.delay and not (final and self.bar is not None):
            return
        text = "  ".join(f"{k} {v:.4g}" for k, v in logs.items() if k not in ("lr", "time", "epoch"))
        if self._tqdm is False:
            try:
                from tqdm import tqdm as bar_class
            except ImportError:
                bar_class = None
            self._tqdm = bar_class
        tqdm = self._tqdm
        if tqdm is not None:
            if self.bar is None:
                self.bar = tqdm(total=self.epochs, initial=epoch, unit="epoch", file=sys.stderr)
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(1)
            return
        if self._tty or final or now - self._last_plain >= 1.0:
            self.bar = True
            self._last_plain = now
            line = f"epoch {epoch + 1}/{self.epochs}  {text}  [{now - self.start:.1f} s]"
            sys.stderr.write(("\r" + line) if self._tty else line + "\n")
            sys.stderr.flush()

    def close(self) -> None:
        if self.bar is None:
            return
        if self.bar is True:
            if self._tty:
                sys.stderr.write("\n")
        else:
            self.bar.close()
        self.bar = None


# -- fit ---------------------------------------------------------------------------------------


def fit(model: Layer, X: ArrayLike, y: ArrayLike, *, loss: _losses.Loss | str | None = None,
        optimizer: Optimizer | None = None, epochs: int = 10, batch_size: int = 32,
        shuffle: bool = True, seed: Seed = None,
        validation_data: tuple[ArrayLike, ArrayLike] | None = None,
        validation_split: float | None = None, metrics: Iterable[str] = (),
        callbacks: Sequence[Callback] = (), tol: float | None = None, n_iter_no_change: int = 10,
        progress: bool = True) -> History:
    """Train ``model`` on ``(X, y)`` with mini-batch gradient descent.

    Each step: gather a batch by shuffled index, ``zero_grad``, forward,
    loss, backward (skipping the input gradient of the first layer), one
    optimizer step. After the first epoch a step allocates nothing.

    Parameters
    ----------
    model : Sequential (or a single Layer)
        Trained in place.
    X : array_like of shape (n, d_in)
        Converted once to the model's dtype; must be finite and non-empty.
    y : array_like
        Targets for ``loss``: (n,) integer labels for CrossEntropy, (n,) or
        (n, 1) in [0, 1] for BinaryCrossEntropy, like the output for MSE.
    loss : Loss or str, optional
        Default: BinaryCrossEntropy on a single output (from logits unless
        the model ends in Sigmoid), CrossEntropy on several logits with
        labels; otherwise pass one.
    optimizer : Optimizer, optional
        Over (a subset of) ``model.parameters()``; default
        ``SGD(model.parameters(), lr=0.1)``. Its schedule is advanced every
        epoch with ``optimizer.set_epoch(epoch)``.
    epochs : int > 0
        The most epochs to run.
    batch_size : int > 0
        Clipped to n. The last batch of an epoch holds the remainder.
    shuffle : bool, default True
        A new order of the indices each epoch.
    seed : None, int or numpy.random.Generator
        For shuffling and ``validation_split``. With a seeded model, the same
        seed gives a bit-identical trained model.
    validation_data : (X_val, y_val), optional
    validation_split : float in (0, 1), optional
        Hold out this fraction of (X, y), chosen at random with ``seed``
        (not the last rows: data sets are often sorted by class).
    metrics : sequence of str
        Among ``"accuracy"``, ``"log_loss"``, ``"mse"``; evaluated on the
        whole training set (and validation set, as ``"val_<name>"``) after
        each epoch.
    callbacks : sequence
        See the callback protocol in the module docstring;
        :class:`EarlyStopping` is one.
    tol : float, optional
        Stop when the training loss has not dropped below
        ``best_loss - tol`` for ``n_iter_no_change`` epochs in a row
        (scikit-learn's rule). If ``epochs`` runs out first, a
        :class:`ConvergenceWarning` is issued.
    n_iter_no_change : int > 0, default 10
    progress : bool, default True
        A progress bar on stderr (tqdm if installed, a plain line otherwise)
        once the run has lasted 0.5 s. False: silent.

    Returns
    -------
    History

    Raises
    ------
    FloatingPointError
        When a batch loss is NaN or inf; the message names the epoch and
        batch (1-based), and the exception carries ``.epoch``, ``.batch``
        (0-based) and ``.history``. The parameters are those before that
        batch's step.
    ValueError, TypeError
        For bad arguments, before anything is trained.

    Notes
    -----
    Ctrl-C (KeyboardInterrupt): in the main thread, ``fit`` catches SIGINT,
    finishes the current batch and its optimizer step, records the partial
    epoch in the History, runs ``on_train_end`` and returns the History with
    ``interrupted = True``; the model is consistent and usable. A second
    Ctrl-C interrupts at once (the previous handler is back). Outside the
    main thread, a KeyboardInterrupt raised between batches is handled the
    same way.
    """
    where = "fit"
    _check_model(model, where)
    params = model.parameters()
    if not params:
        raise ValueError(f"{where}: the model has no trainable parameters")
    epochs = _check_positive_int(epochs, where, "epochs")
    batch_size = _check_positive_int(batch_size, where, "batch_size")
    n_iter_no_change = _check_positive_int(n_iter_no_change, where, "n_iter_no_change")
    if tol is not None and (not isinstance(cast(object, tol), numbers.Real) or not math.isfinite(tol) or tol < 0):
        raise ValueError(f"{where}: tol must be None or a finite number >= 0; got {tol!r}")
    X = _check_X(X, model, where)
    y_arr = np.asarray(y)
    if y_arr.ndim == 0 or len(y_arr) != len(X):
        raise ValueError(f"{where}: X has {len(X)} samples but y has {len(y_arr) if y_arr.ndim else 'none'}")
    loss = _infer_loss(model, y_arr, where) if loss is None else _losses.get(loss)
    last = _last_layer(model)
    if isinstance(loss, _losses.CrossEntropy) and isinstance(last, Softmax):
        raise ValueError(f"{where}: the model ends in Softmax but CrossEntropy applies softmax to logits itself; "
                         f"remove the final Softmax layer")
    if isinstance(loss, _losses.BinaryCrossEntropy) and loss.from_logits and isinstance(last, Sigmoid):
        raise ValueError(f"{where}: the model ends in Sigmoid but BinaryCrossEntropy(from_logits=True) expects "
                         f"logits; remove the Sigmoid layer or pass from_logits=False")
    t = loss.prepare_target(y_arr, _target_spec(model, len(X)), f"{where}(y)")
    if not isinstance(t, np.ndarray) or not t.flags.c_contiguous:
        t = np.ascontiguousarray(t)
    metrics = list(metrics)
    for m in metrics:
        if m not in _metrics.METRICS:
            raise ValueError(f"{where}: metrics must be among {', '.join(_metrics.METRICS)}; got {m!r}")
        if isinstance(loss, _losses.MSE) and m != "mse":
            raise ValueError(f"{where}: metric {m!r} needs a classification loss; got {loss!r}")
    if optimizer is None:
        optimizer = SGD(params, lr=0.1)
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"{where}: optimizer must be an Optimizer (SGD, Adam); got {type(optimizer).__name__}")
    model_ids = {id(p) for p in params}
    if any(id(p) not in model_ids for p in optimizer.params):
        raise ValueError(f"{where}: the optimizer updates parameters that are not the model's; "
                         f"build it from model.parameters()")
    rng = _rng(seed, where)

    # validation
    if validation_data is not None and validation_split is not None:
        raise ValueError(f"{where}: pass validation_data or validation_split, not both")
    Xv = tv = None
    if validation_split is not None:
        if not isinstance(cast(object, validation_split), numbers.Real) or not 0 < validation_split < 1:
            raise ValueError(f"{where}: validation_split must be in (0, 1); got {validation_split!r}")
        n_val = int(round(len(X) * validation_split))
        if n_val < 1 or n_val >= len(X):
            raise ValueError(f"{where}: validation_split={validation_split} leaves {n_val} of {len(X)} "
                             f"samples for validation; need at least one on each side")
        perm = rng.permutation(len(X))
        val_idx, train_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
        Xv, tv, X, t = X[val_idx], t[val_idx], X[train_idx], t[train_idx]
    elif validation_data is not None:
        try:
            Xv_raw, yv_raw = validation_data
        except (TypeError, ValueError):
            raise ValueError(f"{where}: validation_data must be a pair (X_val, y_val)") from None
        Xv = _check_X(Xv_raw, model, where, "validation_data X")
        yv_arr = np.asarray(yv_raw)
        if yv_arr.ndim == 0 or len(yv_arr) != len(Xv):
            raise ValueError(f"{where}: validation_data X has {len(Xv)} samples but y has "
                             f"{len(yv_arr) if yv_arr.ndim else 'none'}")
        tv = loss.prepare_target(yv_arr, _target_spec(model, len(Xv)), f"{where}(validation_data y)")

    n = len(X)
    bs = min(batch_size, n)
    n_batches = -(-n // bs)
    eval_chunk = max(bs, 1024)
    idx = np.arange(n)
    gathered: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # batch size -> (x buffer, target buffer)
    norms = _GradNorms(model)
    fast = compile_plan(model, loss, t)

    history = History(model)
    history.layer_names = list(norms.names)
    for m in metrics:
        history.metrics[m] = []
        if Xv is not None:
            history.metrics["val_" + m] = []
    hooks: dict[str, list[Callable[..., None]]] = {name: [getattr(cb, name) for cb in callbacks if callable(getattr(cb, name, None))]
             for name in ("on_train_begin", "on_epoch_begin", "on_batch_end", "on_epoch_end", "on_train_end")}
    batch_hooks = hooks["on_batch_end"]
    bar = _Progress(bool(progress), epochs)

    # Ctrl-C: finish the batch, then stop (main thread only; signals live there).
    sigint = [False]
    previous = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None

    def _on_sigint(signum: int, frame: object) -> None:
        sigint[0] = True
        signal.signal(signal.SIGINT, previous)

    if previous is not None:
        signal.signal(signal.SIGINT, _on_sigint)

    best_loss, no_improve = math.inf, 0
    history.stop_reason = "epochs"
    try:
        for hook in hooks["on_train_begin"]:
            hook(history)
        for epoch in range(epochs):
            t0 = time.perf_counter()
            optimizer.set_epoch(epoch)
            if hooks["on_epoch_begin"]:
                logs = {"epoch": epoch, "lr": optimizer.lr}
                for hook in hooks["on_epoch_begin"]:
                    hook(epoch, logs)
            if shuffle:
                rng.shuffle(idx)
            sums = norms.sums
            sums.fill(0.0)
            epoch_total, seen, done = 0.0, 0, 0
            stop_now = False
            for b in range(n_batches):
                try:
                    start = b * bs
                    size = min(bs, n - start)
                    fused = None
                    if fast is not None:
                        # One native call: gather, forward, loss, backward and, for SGD
                        # and Adam, the optimizer step (see plan.py).
                        fused = optimizer._fused_update(fast._params)
                        value = fast.step(X, t, idx[start:start + size], norms.sums, fused)
                    elif shuffle:
                        bufs = gathered.get(size)
                        if bufs is None:
                            bufs = gathered[size] = (np.empty((size,) + X.shape[1:], X.dtype),
                                                     np.empty((size,) + t.shape[1:], t.dtype))
                        sel = idx[start:start + size]
                        xb, tb = bufs
                        np.take(X, sel, axis=0, out=xb, mode="clip")  # "clip" writes straight into out
                        np.take(t, sel, axis=0, out=tb, mode="clip")
                    else:
                        xb, tb = X[start:start + size], t[start:start + size]
                    if fast is None:
                        model.zero_grad()
                        value = loss._forward(model._forward(xb), tb, True)
                    if not math.isfinite(value):
                        err = FloatingPointError(
                            f"{where}: the loss is {value} at epoch {epoch + 1}/{epochs}, batch "
                            f"{b + 1}/{n_batches}; the weights are those before this batch. "
                            f"Try a smaller lr or scaled inputs")
                        err.epoch, err.batch, err.history = epoch, b, history  # type: ignore[attr-defined]
                        raise err
                    if fast is None:
                        model._backward(cast(np.ndarray, loss._grad), False, True)
                        norms.add()
                    if fused is None:
                        optimizer.step()
                    else:
                        optimizer.steps += 1  # the plan took the step
                    epoch_total += value * size if loss.reduction == "mean" else value
                    seen += size
                    done += 1
                    if batch_hooks:
                        logs = {"epoch": epoch, "batch": b, "size": size, "loss": value}
                        for hook in batch_hooks:
                            hook(b, logs)
                except KeyboardInterrupt:
                    sigint[0] = True
                if sigint[0] or history.stop_training:
                    stop_now = True
                    break
            if done == 0:  # interrupted before the first batch of this epoch
                break
            # -- end of epoch (also a partial one) --
            epoch_loss = epoch_total / seen if loss.reduction == "mean" else epoch_total
            logs = {"loss": epoch_loss}
            if Xv is not None:
                logs["val_loss"] = _evaluate_prepared(model, Xv, cast(np.ndarray, tv), loss, eval_chunk)
            if metrics:
                out = _outputs(model, X, eval_chunk)
                for m in metrics:
                    logs[m] = _metric(m, model, loss, out, t)
                if Xv is not None:
                    out_v = _outputs(model, Xv, eval_chunk)
                    for m in metrics:
                        logs["val_" + m] = _metric(m, model, loss, out_v, cast(np.ndarray, tv))
            elapsed = time.perf_counter() - t0
            history.epoch.append(epoch)
            history.loss.append(epoch_loss)
            if Xv is not None:
                history.val_loss.append(logs["val_loss"])
            for key in history.metrics:
                history.metrics[key].append(logs[key])
            history.time.append(elapsed)
            history.lr.append(optimizer.lr)
            history.grad_norms.append((sums / done).tolist())
            logs["lr"], logs["time"] = optimizer.lr, elapsed
            if sigint[0]:
                history.interrupted = True
                history.interrupted_at = (epoch, done - 1)
                history.stop_reason = "interrupted"
                break
            for hook in hooks["on_epoch_end"]:
                hook(epoch, logs)
            bar.update(epoch, logs, final=epoch == epochs - 1)
            if tol is not None:
                if epoch_loss > best_loss - tol:
                    no_improve += 1
                else:
                    no_improve = 0
                best_loss = min(best_loss, epoch_loss)
                if no_improve >= n_iter_no_change:
                    history.stop_reason = "tol"
                    break
            if history.stop_training or stop_now:
                if history.stop_reason == "epochs":
                    history.stop_reason = "callback"
                break
        if sigint[0] and not history.interrupted:
            history.interrupted = True
            history.interrupted_at = (history.epoch[-1], None) if history.epoch else None
            history.stop_reason = "interrupted"
        for hook in hooks["on_train_end"]:
            hook(history)
    finally:
        bar.close()
        if previous is not None and signal.getsignal(signal.SIGINT) is _on_sigint:
            signal.signal(signal.SIGINT, previous)
    if tol is not None and history.stop_reason == "epochs":
        warnings.warn(
            f"fit: reached epochs={epochs} before the loss stopped improving by tol={tol} for "
            f"{n_iter_no_change} epochs; the model may not have converged",
            ConvergenceWarning, stacklevel=2)
    return history
