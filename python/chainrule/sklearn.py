"""scikit-learn's MLPClassifier and MLPRegressor, trained by chainrule.

Change one import line and the same code runs several times faster::

    from sklearn.neural_network import MLPClassifier      # before
    from chainrule.sklearn import MLPClassifier           # after

Same constructor parameters, defaults, fitted attributes, methods, errors and
warnings as ``sklearn.neural_network.MLPClassifier`` / ``MLPRegressor``
(this module needs scikit-learn >= 1.6: ``pip install "chainrule[sklearn]"``;
``import chainrule`` alone never imports scikit-learn). The parameters are
validated with scikit-learn's own ``_parameter_constraints`` and the data
with its ``validate_data``, so bad input gets the messages users know.

What runs where
---------------
* One mini-batch is one call of the compiled plan
  (:class:`chainrule._core.MLPPlan`): gather the rows by index, forward,
  loss, backward and the L2 term, then one native optimizer call
  (``sgd_step`` / ``adam_step``) over the flat parameter buffer. Python only
  picks the indices and keeps the books (~10 us a batch).
* Parameters live in ONE flat buffer laid out ``W1, b1, W2, b2, ...``, each
  ``W`` row-major ``(d_in, d_out)``, scikit-learn's ``coefs_`` layout.
  ``coefs_`` and ``intercepts_`` are lists of views into that buffer, so
  in-place edits are seen by ``predict``; assigning new arrays works too
  (they are copied back into the buffer before the next use).
* dtype: float32 input trains and predicts in float32, anything else in
  float64 (as scikit-learn). Sparse input is accepted and densified.

The maths (scikit-learn's definitions, reproduced exactly)
----------------------------------------------------------
For a batch B with weights w_i (1 without ``sample_weight``) and
s = sum_B w_i, the loss of one batch is

    L = (1/s) sum_i w_i l_i + alpha / (2 s) * sum_l ||W_l||^2

with l_i the cross-entropy of the softmax (multi-class), the sum over outputs
of the binary cross-entropy of the sigmoid (binary and multi-label), half the
squared error averaged over outputs (regression; its gradient is
``(p - y) / s`` per output, *not* divided by the number of outputs, as in
scikit-learn) or half the Poisson deviance with a log link. The L2 term is
fused in the plan with ``l2 = alpha / s``.

Optimizers map onto the PyTorch-form native kernels with no approximation:

* SGD: scikit-learn's velocity ``v <- mu v - lr g`` equals ``-lr * b`` for
  PyTorch's buffer ``b <- mu b + g`` while ``lr`` is constant, and Nesterov's
  ``mu v - lr g`` equals ``-lr (g + mu b)``. When the schedule changes
  ``lr`` (invscaling, adaptive), the buffer is rescaled by
  ``lr_old / lr_new`` so that the identity keeps holding.
* Adam: scikit-learn steps ``lr_t m / (sqrt(v) + eps)`` with
  ``lr_t = lr sqrt(1 - b2^t) / (1 - b1^t)``; PyTorch's
  ``lr/(1 - b1^t) m / (sqrt(v)/sqrt(1 - b2^t) + eps')`` is the same update
  with ``eps' = eps / sqrt(1 - b2^t)``.

With the same ``random_state`` the initial weights, shuffles and validation
split are drawn exactly as scikit-learn draws them, so both libraries follow
the same trajectory up to rounding.

``solver="lbfgs"`` runs ``scipy.optimize.minimize(method="L-BFGS-B")`` on the
full-batch loss and gradient computed by the plan (one native call per
function evaluation), with scikit-learn's options (maxiter, maxfun, gtol).

Extras over scikit-learn
------------------------
``validation_loss_curve_``
    With ``early_stopping=True``: the loss on the validation split after each
    epoch (the data term of the training loss, without the L2 term), next to
    ``validation_scores_``. None otherwise.
``grad_norms_curve_``
    Stochastic solvers: one ndarray of shape ``(n_layers_ - 1,)`` per epoch, for
    each layer the norm ``sqrt(||gW_l||^2 + ||gb_l||^2)`` of the epoch's mean
    mini-batch gradient (L2 term included). It estimates the full-batch
    gradient norm and tends to 0 as training converges, where the norms of
    single mini-batch gradients would level off at the noise.
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any, Callable, Literal, Sequence

import numpy as np
from numpy.typing import ArrayLike
import scipy.optimize
import scipy.sparse as sp
from scipy.special import xlogy
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin, _fit_context, is_classifier
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import accuracy_score, r2_score
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier as _SkMLPClassifier
from sklearn.neural_network import MLPRegressor as _SkMLPRegressor
from sklearn.preprocessing import LabelBinarizer
from sklearn.utils import check_random_state
from sklearn.utils.metaestimators import available_if
from sklearn.utils.multiclass import _check_partial_fit_first_call, type_of_target, unique_labels
from sklearn.utils.optimize import _check_optimize_result
from sklearn.utils.validation import (
    _check_sample_weight,
    check_is_fitted,
    column_or_1d,
    validate_data,
)

from ._core import MLPPlan, adam_step, sgd_step

if TYPE_CHECKING:
    from typing_extensions import Self

# X as scikit-learn takes it: array-like or a scipy.sparse matrix (untyped).
_Data = Any

try:  # scipy < 1.15 still takes iprint; scikit-learn knows which
    from sklearn.utils.fixes import _get_additional_lbfgs_options_dict
except ImportError:  # pragma: no cover
    def _get_additional_lbfgs_options_dict(key: str, value: Any) -> dict[str, Any]:
        return {}

__all__ = ["MLPClassifier", "MLPRegressor"]

_STOCHASTIC_SOLVERS = ("sgd", "adam")
# scikit-learn's activation names -> the plan's.
_PLAN_ACT = {"identity": "identity", "logistic": "sigmoid", "tanh": "tanh", "relu": "relu",
             "softmax": "softmax", "exp": "identity"}


# --------------------------------------------------------------------------
# Optimizers: scikit-learn's SGDOptimizer / AdamOptimizer over a flat buffer
# --------------------------------------------------------------------------

class _SGD:
    """scikit-learn's SGDOptimizer on the native PyTorch-form ``sgd_step``.

    Keeps ``velocity = -learning_rate * buffer`` (see the module docstring).
    """

    def __init__(self, n_params: int, dtype: np.dtype, learning_rate_init: float, lr_schedule: str,
                 momentum: float, nesterov: bool, power_t: float) -> None:
        self.learning_rate_init = learning_rate_init
        self.learning_rate = float(learning_rate_init)
        self.lr_schedule = lr_schedule
        self.momentum = float(momentum)
        self.nesterov = bool(nesterov) and self.momentum > 0
        self.power_t = power_t
        self.buffer = np.zeros(n_params, dtype=dtype)

    def step(self, params: np.ndarray, grads: np.ndarray) -> None:
        sgd_step(params, grads, self.buffer, lr=self.learning_rate, momentum=self.momentum,
                 nesterov=self.nesterov)

    def _set_learning_rate(self, lr: float) -> None:
        if self.momentum > 0 and lr != self.learning_rate:
            self.buffer *= self.buffer.dtype.type(self.learning_rate / lr)
        self.learning_rate = lr

    def iteration_ends(self, time_step: int) -> None:
        if self.lr_schedule == "invscaling":
            lr = float(self.learning_rate_init) / (time_step + 1) ** self.power_t
            self._set_learning_rate(lr)

    def trigger_stopping(self, msg: str, verbose: bool) -> bool:
        if self.lr_schedule != "adaptive":
            if verbose:
                print(msg + " Stopping.")
            return True
        if self.learning_rate <= 1e-6:
            if verbose:
                print(msg + " Learning rate too small. Stopping.")
            return True
        self._set_learning_rate(self.learning_rate / 5.0)
        if verbose:
            print(msg + " Setting learning rate to %f" % self.learning_rate)
        return False


class _Adam:
    """scikit-learn's AdamOptimizer on the native PyTorch-form ``adam_step``."""

    def __init__(self, n_params: int, dtype: np.dtype, learning_rate_init: float, beta_1: float,
                 beta_2: float, epsilon: float) -> None:
        self.learning_rate_init = learning_rate_init
        self.learning_rate = float(learning_rate_init)
        self.beta_1, self.beta_2, self.epsilon = float(beta_1), float(beta_2), float(epsilon)
        self.t = 0
        self.ms = np.zeros(n_params, dtype=dtype)
        self.vs = np.zeros(n_params, dtype=dtype)

    def step(self, params: np.ndarray, grads: np.ndarray) -> None:
        self.t = t = self.t + 1
        bc2_sqrt = math.sqrt(1.0 - self.beta_2 ** t)
        # scikit-learn's step size, kept for inspection like its optimizer's.
        self.learning_rate = self.learning_rate_init * bc2_sqrt / (1.0 - self.beta_1 ** t)
        adam_step(params, grads, self.ms, self.vs, step=t, lr=self.learning_rate_init,
                  beta1=self.beta_1, beta2=self.beta_2, eps=self.epsilon / bc2_sqrt)

    def iteration_ends(self, time_step: int) -> None:
        pass

    def trigger_stopping(self, msg: str, verbose: bool) -> bool:
        if verbose:
            print(msg + " Stopping.")
        return True


# --------------------------------------------------------------------------
# Losses on predictions (validation curve, Poisson); scikit-learn's formulas
# --------------------------------------------------------------------------

def _squared_loss(y: np.ndarray, p: np.ndarray, w: np.ndarray | None) -> float:
    return 0.5 * np.average((y - p) ** 2, weights=w, axis=0).mean()


def _poisson_loss(y: np.ndarray, p: np.ndarray, w: np.ndarray | None) -> float:
    return np.average(xlogy(y, y / p) - y + p, weights=w, axis=0).sum()


def _log_loss(y: np.ndarray, p: np.ndarray, w: np.ndarray | None) -> float:
    eps = np.finfo(p.dtype).eps
    p = np.clip(p, eps, 1 - eps)
    if p.shape[1] == 1:
        p = np.append(1 - p, p, axis=1)
        y = np.append(1 - y, y, axis=1)
    return -np.average(xlogy(y, p), weights=w, axis=0).sum()


def _binary_log_loss(y: np.ndarray, p: np.ndarray, w: np.ndarray | None) -> float:
    eps = np.finfo(p.dtype).eps
    p = np.clip(p, eps, 1 - eps)
    return -np.average(xlogy(y, p) + xlogy(1 - y, 1 - p), weights=w, axis=0).sum()


# --------------------------------------------------------------------------
# The estimators
# --------------------------------------------------------------------------

class _BaseMLP(BaseEstimator):
    """Shared machinery; use :class:`MLPClassifier` or :class:`MLPRegressor`."""

    # ---- parameters <-> the flat buffer ---------------------------------

    def _bind_views(self) -> None:
        """Point coefs_ / intercepts_ at the flat buffer (and remember them)."""
        units, P = self._layer_units, self._params
        self.coefs_, self.intercepts_ = [], []
        start = 0
        for d_in, d_out in zip(units[:-1], units[1:]):
            mid = start + d_in * d_out
            end = mid + d_out
            self.coefs_.append(P[start:mid].reshape(d_in, d_out))
            self.intercepts_.append(P[mid:end])
            start = end
        self._views = (tuple(self.coefs_), tuple(self.intercepts_))

    def _split_layers(self, flat: np.ndarray) -> list[np.ndarray]:
        """Per-layer segments of a flat buffer: W_l and b_l are adjacent."""
        units, start = self._layer_units, 0
        out: list[np.ndarray] = []
        for d_in, d_out in zip(units[:-1], units[1:]):
            out.append(flat[start:start + d_in * d_out + d_out])
            start += d_in * d_out + d_out
        return out

    def _sync_params(self) -> None:
        """Copy coefs_ / intercepts_ back into the buffer if they were replaced."""
        coefs, intercepts = self.coefs_, self.intercepts_
        if (len(coefs) == len(self._views[0]) and len(intercepts) == len(self._views[1])
                and all(a is b for a, b in zip(coefs, self._views[0]))
                and all(a is b for a, b in zip(intercepts, self._views[1]))):
            return
        name = type(self).__name__
        new: list[tuple[np.ndarray, np.ndarray]] = []
        for what, arrays, views in (("coefs_", coefs, self._views[0]),
                                    ("intercepts_", intercepts, self._views[1])):
            if len(arrays) != len(views):
                raise ValueError(f"{name}: {what} has {len(arrays)} arrays; expected "
                                 f"{len(views)}, one per layer")
            for i, (a, v) in enumerate(zip(arrays, views)):
                a = np.asarray(a)
                if a.shape != v.shape:
                    raise ValueError(f"{name}: {what}[{i}].shape is {a.shape}; expected {v.shape}")
                new.append((v, a))
        for v, a in new:
            if v is not a:
                v[...] = a
        self._bind_views()

    def _make_plan(self) -> None:
        acts = [_PLAN_ACT[self.activation]] * (len(self._layer_units) - 2)
        acts.append(_PLAN_ACT[self.out_activation_])
        self._plan = MLPPlan(list(self._layer_units), acts, dtype=self._params.dtype.name)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(super().__getstate__())
        # The plan is native (rebuilt on load) and the views would unpickle as
        # copies, so only the flat parameter buffer travels.
        for key in ("_plan", "coefs_", "intercepts_", "_grads", "_views"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if "_params" in state:
            self._grads = np.zeros_like(self._params)
            self._bind_views()
            self._make_plan()

    # ---- fitting ---------------------------------------------------------

    def _initialize(self, y: np.ndarray, layer_units: list[int], dtype: np.dtype) -> None:
        self.n_iter_ = 0
        self.t_ = 0
        self.n_outputs_ = y.shape[1]
        self.n_layers_ = len(layer_units)
        if not is_classifier(self):
            self.out_activation_ = "exp" if self.loss == "poisson" else "identity"
        elif self._label_binarizer.y_type_ == "multiclass":
            self.out_activation_ = "softmax"
        else:
            self.out_activation_ = "logistic"

        self._layer_units = tuple(int(u) for u in layer_units)
        n_params = sum(a * b + b for a, b in zip(layer_units[:-1], layer_units[1:]))
        self._params = np.empty(n_params, dtype=dtype)
        self._grads = np.zeros(n_params, dtype=dtype)
        self._bind_views()
        # Glorot initialisation, drawn in scikit-learn's order (W1, b1, W2, ...).
        factor = 2.0 if self.activation == "logistic" else 6.0
        for coef, intercept in zip(self.coefs_, self.intercepts_):
            fan_in, fan_out = coef.shape
            bound = np.sqrt(factor / (fan_in + fan_out))
            coef[...] = self._random_state.uniform(-bound, bound, (fan_in, fan_out))
            intercept[...] = self._random_state.uniform(-bound, bound, fan_out)
        self._best_params = self._params.copy()
        self._make_plan()

        if self.solver in _STOCHASTIC_SOLVERS:
            self.loss_curve_: list[float] = []
            self.grad_norms_curve_: list[np.ndarray] = []
            self._no_improvement_count = 0
            if self.early_stopping:
                # lists (floats) with early stopping, None without: scikit-learn's attributes
                self.validation_scores_: Any = []
                self.validation_loss_curve_: Any = []
                self.best_validation_score_: Any = -np.inf
                self.best_loss_: Any = None
            else:
                self.best_loss_ = np.inf
                self.validation_scores_ = None
                self.validation_loss_curve_ = None
                self.best_validation_score_ = None

    def _fit(self, X: _Data, y: _Data, sample_weight: _Data = None, incremental: bool = False) -> Self:
        hidden_layer_sizes = self.hidden_layer_sizes
        if not hasattr(hidden_layer_sizes, "__iter__"):
            hidden_layer_sizes = [hidden_layer_sizes]
        hidden_layer_sizes = list(hidden_layer_sizes)
        if np.any(np.array(hidden_layer_sizes) <= 0):
            raise ValueError("hidden_layer_sizes must be > 0, got %s." % hidden_layer_sizes)
        first_pass = not hasattr(self, "coefs_") or (not self.warm_start and not incremental)

        X, y = self._validate_input(X, y, incremental, reset=first_pass)
        if sp.issparse(X):
            X = X.toarray()
        if not first_pass:
            X = np.asarray(X, dtype=self._params.dtype)
        X = np.ascontiguousarray(X)
        if sample_weight is not None:
            sample_weight = np.ascontiguousarray(_check_sample_weight(sample_weight, X))
        y_labels = y  # classifier: labels as given (for scores); regressor: values
        y = self._encode_targets(y)
        if y.ndim == 1:
            y = y.reshape((-1, 1))
        n_features = X.shape[1]
        layer_units = [n_features] + hidden_layer_sizes + [y.shape[1]]

        self._random_state = check_random_state(self.random_state)
        if first_pass:
            self._initialize(y, layer_units, X.dtype)
        else:
            self._sync_params()
            if tuple(layer_units) != self._layer_units:
                raise ValueError(
                    f"{type(self).__name__}: layer sizes are {layer_units} but the fitted "
                    f"model has {list(self._layer_units)}; warm_start and partial_fit need "
                    "the same hidden_layer_sizes and outputs as the previous fit")
        self.n_outputs_ = y.shape[1]

        if self.solver in _STOCHASTIC_SOLVERS:
            self._fit_stochastic(X, y, y_labels, sample_weight, incremental)
        else:
            self._fit_lbfgs(X, y, sample_weight)

        if not np.isfinite(self._params).all():
            raise ValueError(
                "Solver produced non-finite parameter weights. The input data may"
                " contain large values and need to be preprocessed."
            )
        return self

    def _plan_targets(self, y: np.ndarray) -> np.ndarray:
        """Targets in the form the plan's loss takes: int64 labels or float rows."""
        if self.out_activation_ == "softmax":
            return np.ascontiguousarray(y.argmax(axis=1), dtype=np.int64)
        return np.ascontiguousarray(y, dtype=self._params.dtype)

    def _make_step(self, X: np.ndarray, T: np.ndarray, sample_weight: np.ndarray | None
                   ) -> Callable[[np.ndarray | None, float], float]:
        """Return ``step(idx, s) -> loss``: one batch's loss and gradient.

        ``idx`` (int64 rows of X, or None for all rows) is the batch and ``s``
        its total weight. The gradient lands in ``self._grads``; the loss is
        scikit-learn's (see the module docstring).
        """
        P, G, alpha = self._params, self._grads, float(self.alpha)
        train = self._plan.train_step
        sw = sample_weight
        if self.out_activation_ in ("softmax", "logistic"):
            loss: Literal["softmax_cross_entropy", "binary_cross_entropy"] = (
                "softmax_cross_entropy" if self.out_activation_ == "softmax"
                else "binary_cross_entropy")

            def step(idx: np.ndarray | None, s: float) -> float:
                return train(P, G, X, T, loss=loss, indices=idx, sample_weight=sw,
                             scale=1.0 / s, l2=alpha / s)
            return step

        coefs = self.coefs_
        k = T.shape[1]

        def penalty(s: float) -> float:
            return 0.5 * alpha / s * sum(float(np.dot(c.ravel(), c.ravel())) for c in coefs)

        if self.out_activation_ == "identity":
            # Half the squared error: scale 1/(2s) gives scikit-learn's gradient
            # (p - y)/s per output; its reported loss also averages over the k
            # outputs, which the plan's sum does not.
            if k == 1:
                def step(idx: np.ndarray | None, s: float) -> float:
                    return train(P, G, X, T, loss="squared_error", indices=idx,
                                 sample_weight=sw, scale=0.5 / s, l2=alpha / s)
                return step

            def step(idx: np.ndarray | None, s: float) -> float:
                pen = penalty(s)
                value = train(P, G, X, T, loss="squared_error", indices=idx, sample_weight=sw,
                              scale=0.5 / s, l2=alpha / s)
                return (value - pen) / k + pen
            return step

        # Poisson with log link, gradient exp(z) - y at the logits z. The plan
        # has no such loss, so it is linearised: with targets t = z - (exp(z) - y)
        # the squared error's gradient 2 * scale * (z - t) is exactly that.
        forward = self._plan.forward

        def step(idx: np.ndarray | None, s: float) -> float:  # type: ignore[no-redef]
            if idx is None:
                xb, yb, wb = X, T, sw
            else:
                xb, yb, wb = X[idx], T[idx], None if sw is None else sw[idx]
            z = forward(P, xb)
            p = np.exp(z)
            pen = penalty(s)
            train(P, G, xb, z - (p - yb), loss="squared_error", sample_weight=wb,
                  scale=0.5 / s, l2=alpha / s)
            return float(_poisson_loss(yb, p, wb)) + pen
        return step

    def _fit_lbfgs(self, X: np.ndarray, y: np.ndarray, sample_weight: np.ndarray | None) -> None:
        P, G = self._params, self._grads
        step = self._make_step(X, self._plan_targets(y), sample_weight)
        total = float(X.shape[0]) if sample_weight is None else float(sample_weight.sum())

        def loss_grad(theta: np.ndarray) -> tuple[float, np.ndarray]:
            P[...] = theta
            value = step(None, total)
            return value, G.astype(np.float64)

        iprint = 1 if (self.verbose is True or self.verbose >= 1) else -1
        opt_res = scipy.optimize.minimize(
            loss_grad, P.astype(np.float64), method="L-BFGS-B", jac=True,
            options={"maxfun": self.max_fun, "maxiter": self.max_iter, "gtol": self.tol,
                     **_get_additional_lbfgs_options_dict("iprint", iprint)},
        )
        self.n_iter_ = _check_optimize_result("lbfgs", opt_res, self.max_iter)
        self.loss_ = opt_res.fun
        P[...] = opt_res.x

    def _fit_stochastic(self, X: np.ndarray, y: np.ndarray, y_labels: np.ndarray,
                        sample_weight: np.ndarray | None, incremental: bool) -> None:
        P, G = self._params, self._grads
        if not incremental or not hasattr(self, "_optimizer"):
            self._optimizer: _SGD | _Adam
            if self.solver == "sgd":
                self._optimizer = _SGD(P.size, P.dtype, self.learning_rate_init,
                                       self.learning_rate, self.momentum,
                                       self.nesterovs_momentum, self.power_t)
            else:
                self._optimizer = _Adam(P.size, P.dtype, self.learning_rate_init, self.beta_1,
                                        self.beta_2, self.epsilon)
        optimizer = self._optimizer

        if self.early_stopping and incremental:
            raise ValueError("partial_fit does not support early_stopping=True")
        early_stopping = self.early_stopping
        T = self._plan_targets(y)
        n_all = X.shape[0]
        if early_stopping:
            # Split row indices, not data, with scikit-learn's exact draw.
            stratify = y if (is_classifier(self) and self.n_outputs_ == 1) else None
            train_idx, val_idx = train_test_split(
                np.arange(n_all), random_state=self._random_state,
                test_size=self.validation_fraction, stratify=stratify)
            if val_idx.shape[0] < 2:
                raise ValueError(
                    "The validation set is too small. Increase 'validation_fraction' "
                    "or the size of your dataset."
                )
            train_idx = train_idx.astype(np.int64)
            val = (X[val_idx], y_labels[val_idx], y[val_idx].astype(P.dtype),
                   None if sample_weight is None else sample_weight[val_idx])
        else:
            train_idx, val = None, None

        n_samples = n_all if train_idx is None else train_idx.shape[0]
        sample_idx = np.arange(n_samples, dtype=np.int64)
        if self.batch_size == "auto":
            batch_size = min(200, n_samples)
        else:
            if self.batch_size > n_samples:
                warnings.warn(
                    "Got `batch_size` less than 1 or larger than "
                    "sample size. It is going to be clipped"
                )
            batch_size = int(np.clip(self.batch_size, 1, n_samples))
        starts = np.arange(0, n_samples, batch_size)
        sizes = np.minimum(starts + batch_size, n_samples) - starts
        size_list = [int(b) for b in sizes]

        step = self._make_step(X, T, sample_weight)
        update = optimizer.step
        grad_sum = np.zeros_like(G)  # the epoch's mini-batch gradients, for grad_norms_curve_
        add = np.add
        rs = self._random_state
        try:
            self.n_iter_ = 0
            for it in range(self.max_iter):
                if self.shuffle:
                    # sklearn.utils.shuffle(sample_idx, random_state=rs), inlined.
                    perm = np.arange(n_samples)
                    rs.shuffle(perm)
                    sample_idx = sample_idx[perm]
                rows = sample_idx if train_idx is None else train_idx[sample_idx]
                totals: Sequence[float]
                if sample_weight is None:
                    totals = size_list
                else:
                    totals = [float(t) for t in np.add.reduceat(sample_weight[rows], starts)]
                grad_sum.fill(0)
                accumulated_loss = 0.0
                for start, n_batch, total in zip(starts.tolist(), size_list, totals):
                    accumulated_loss += step(rows[start:start + n_batch], total) * n_batch
                    add(grad_sum, G, out=grad_sum)
                    update(P, G)

                self.n_iter_ += 1
                self.loss_ = accumulated_loss / n_samples
                self.t_ += n_samples
                self.loss_curve_.append(self.loss_)
                self.grad_norms_curve_.append(
                    np.array([math.sqrt(float(np.dot(g, g))) for g in self._split_layers(grad_sum)])
                    / len(size_list))
                if self.verbose:
                    print("Iteration %d, loss = %.8f" % (self.n_iter_, self.loss_))

                self._update_no_improvement_count(early_stopping, val)
                optimizer.iteration_ends(self.t_)

                if self._no_improvement_count > self.n_iter_no_change:
                    if early_stopping:
                        msg = (
                            "Validation score did not improve more than "
                            "tol=%f for %d consecutive epochs."
                            % (self.tol, self.n_iter_no_change)
                        )
                    else:
                        msg = (
                            "Training loss did not improve more than tol=%f"
                            " for %d consecutive epochs." % (self.tol, self.n_iter_no_change)
                        )
                    if optimizer.trigger_stopping(msg, self.verbose):
                        break
                    self._no_improvement_count = 0

                if incremental:
                    break

                if self.n_iter_ == self.max_iter:
                    warnings.warn(
                        "Stochastic Optimizer: Maximum iterations (%d) "
                        "reached and the optimization hasn't converged yet." % self.max_iter,
                        ConvergenceWarning,
                    )
        except KeyboardInterrupt:
            warnings.warn("Training interrupted by user.")

        if early_stopping:
            P[...] = self._best_params

    def _update_no_improvement_count(self, early_stopping: bool, val: Any) -> None:
        if early_stopping:
            X_val, y_val, t_val, sw_val = val
            out = self._forward(X_val)
            score, loss = self._score_and_loss(out, y_val, t_val, sw_val)
            self.validation_scores_.append(score)
            self.validation_loss_curve_.append(loss)
            if self.verbose:
                print("Validation score: %f" % self.validation_scores_[-1])
            last_valid_score = self.validation_scores_[-1]
            if last_valid_score < (self.best_validation_score_ + self.tol):
                self._no_improvement_count += 1
            else:
                self._no_improvement_count = 0
            if last_valid_score > self.best_validation_score_:
                self.best_validation_score_ = last_valid_score
                self._best_params[...] = self._params
        else:
            if self.loss_curve_[-1] > self.best_loss_ - self.tol:
                self._no_improvement_count += 1
            else:
                self._no_improvement_count = 0
            if self.loss_curve_[-1] < self.best_loss_:
                self.best_loss_ = self.loss_curve_[-1]

    def _score_and_loss(self, out: np.ndarray, y: np.ndarray, t: np.ndarray,
                        sw: np.ndarray | None) -> tuple[float, float]:
        """Validation score (accuracy or R^2) and loss from the network's output."""
        y_pred = self._decode(out)
        if np.issubdtype(y_pred.dtype, np.floating) and not np.isfinite(y_pred).all():
            score = np.nan
        else:
            score = self._score_function(y, y_pred, sample_weight=sw)
        if not np.isfinite(out).all():
            return score, np.nan
        losses: dict[str, Callable[[np.ndarray, np.ndarray, np.ndarray | None], float]] = {
            "softmax": _log_loss, "logistic": _binary_log_loss,
                  "identity": _squared_loss, "exp": _poisson_loss}
        return score, float(losses[self.out_activation_](t, out, sw))

    # ---- inference -------------------------------------------------------

    def _forward(self, X: _Data) -> np.ndarray:
        """Network output (n, n_outputs_) for validated X, in the model's dtype."""
        self._sync_params()
        if sp.issparse(X):
            X = X.toarray()
        X = np.ascontiguousarray(X, dtype=self._params.dtype)
        out = self._plan.forward(self._params, X)
        if self.out_activation_ == "exp":
            np.exp(out, out=out)
        return out

    def _forward_pass_fast(self, X: _Data, check_input: bool = True) -> np.ndarray:
        if check_input:
            X = validate_data(self, X, accept_sparse=["csr", "csc"], reset=False)
        return self._forward(X)

    def _check_solver(self) -> bool:
        if self.solver not in _STOCHASTIC_SOLVERS:
            raise AttributeError(
                "partial_fit is only available for stochastic"
                " optimizers. %s is not stochastic." % self.solver
            )
        return True

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X: _Data, y: ArrayLike, sample_weight: ArrayLike | None = None) -> Self:
        """Fit the model to data matrix X and target(s) y.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_samples, n_features)
            float32 stays float32; anything else becomes float64.
        y : array-like of shape (n_samples,) or (n_samples, n_outputs)
        sample_weight : array-like of shape (n_samples,), default=None

        Returns
        -------
        self : object
        """
        return self._fit(X, y, sample_weight=sample_weight, incremental=False)

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = True
        return tags


_DOC_PARAMS = """
    Parameters, defaults and fitted attributes are scikit-learn's (see its
    documentation); this class adds ``validation_loss_curve_`` and
    ``grad_norms_curve_`` (see :mod:`chainrule.sklearn`). ``partial_fit``
    raises AttributeError for ``solver="lbfgs"`` (scikit-learn's regressor
    exposes it and runs a full L-BFGS fit; its classifier raises, as here).
"""


class MLPClassifier(ClassifierMixin, _BaseMLP):
    __doc__ = """Multi-layer perceptron classifier on chainrule's native kernels.

    A drop-in for ``sklearn.neural_network.MLPClassifier``: log-loss with a
    softmax output (multi-class) or sigmoid outputs (binary, multi-label).
    """ + _DOC_PARAMS

    _parameter_constraints: dict[str, list[Any]] = dict(_SkMLPClassifier._parameter_constraints)

    def __init__(
        self,
        hidden_layer_sizes: int | Sequence[int] = (100,),
        activation: str = "relu",
        *,
        solver: str = "adam",
        alpha: float = 0.0001,
        batch_size: int | str = "auto",
        learning_rate: str = "constant",
        learning_rate_init: float = 0.001,
        power_t: float = 0.5,
        max_iter: int = 200,
        shuffle: bool = True,
        random_state: int | np.random.RandomState | None = None,
        tol: float = 1e-4,
        verbose: bool = False,
        warm_start: bool = False,
        momentum: float = 0.9,
        nesterovs_momentum: bool = True,
        early_stopping: bool = False,
        validation_fraction: float = 0.1,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-8,
        n_iter_no_change: int = 10,
        max_fun: int = 15000,
    ) -> None:
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.solver = solver
        self.alpha = alpha
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.learning_rate_init = learning_rate_init
        self.power_t = power_t
        self.max_iter = max_iter
        self.shuffle = shuffle
        self.random_state = random_state
        self.tol = tol
        self.verbose = verbose
        self.warm_start = warm_start
        self.momentum = momentum
        self.nesterovs_momentum = nesterovs_momentum
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.n_iter_no_change = n_iter_no_change
        self.max_fun = max_fun

    def _validate_input(self, X: _Data, y: _Data, incremental: bool, reset: bool
                        ) -> tuple[_Data, np.ndarray]:
        X, y = validate_data(self, X, y, accept_sparse=["csr", "csc"], multi_output=True,
                             dtype=(np.float64, np.float32), reset=reset)
        if y.ndim == 2 and y.shape[1] == 1:
            y = column_or_1d(y, warn=True)
        if (not hasattr(self, "classes_")) or (not self.warm_start and not incremental):
            self._label_binarizer = LabelBinarizer()
            self._label_binarizer.fit(y)
            self.classes_ = self._label_binarizer.classes_
        else:
            classes = unique_labels(y)
            if self.warm_start:
                if set(classes) != set(self.classes_):
                    raise ValueError(
                        "warm_start can only be used where `y` has the same "
                        "classes as in the previous call to fit. Previously "
                        f"got {self.classes_}, `y` has {classes}"
                    )
            elif len(np.setdiff1d(classes, self.classes_, assume_unique=True)):
                raise ValueError(
                    "`y` has classes not in `self.classes_`. "
                    f"`self.classes_` has {self.classes_}. 'y' has {classes}."
                )
        return X, y

    def _encode_targets(self, y: np.ndarray) -> np.ndarray:
        return self._label_binarizer.transform(y).astype(bool)

    def _decode(self, out: np.ndarray) -> np.ndarray:
        if self.n_outputs_ == 1:
            out = out.ravel()
        return self._label_binarizer.inverse_transform(out)

    @staticmethod
    def _score_function(y: ArrayLike, y_pred: ArrayLike,
                        sample_weight: ArrayLike | None = None) -> float:
        return accuracy_score(y, y_pred, sample_weight=sample_weight)

    def predict(self, X: _Data) -> np.ndarray:
        """Predict class labels (or a label indicator matrix for multi-label).

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_samples, n_features)

        Returns
        -------
        y : ndarray of shape (n_samples,) or (n_samples, n_classes)
        """
        check_is_fitted(self)
        return self._decode(self._forward_pass_fast(X))

    @available_if(lambda est: est._check_solver())
    @_fit_context(prefer_skip_nested_validation=True)
    def partial_fit(self, X: _Data, y: ArrayLike, sample_weight: ArrayLike | None = None,
                    classes: ArrayLike | None = None) -> Self:
        """One epoch over (X, y); ``classes`` is required on the first call.

        Returns
        -------
        self : object
        """
        if _check_partial_fit_first_call(self, classes):
            self._label_binarizer = LabelBinarizer()
            if type_of_target(y).startswith("multilabel"):
                self._label_binarizer.fit(y)
            else:
                self._label_binarizer.fit(classes)
        return self._fit(X, y, sample_weight=sample_weight, incremental=True)

    def predict_proba(self, X: _Data) -> np.ndarray:
        """Class probabilities, columns ordered as ``classes_``.

        Returns
        -------
        y_prob : ndarray of shape (n_samples, n_classes), the model's dtype
        """
        check_is_fitted(self)
        y_pred = self._forward_pass_fast(X)
        if self.n_outputs_ == 1:
            y_pred = y_pred.ravel()
        if y_pred.ndim == 1:
            return np.vstack([1 - y_pred, y_pred]).T
        return y_pred

    def predict_log_proba(self, X: _Data) -> np.ndarray:
        """``log(predict_proba(X))``."""
        y_prob = self.predict_proba(X)
        return np.log(y_prob, out=y_prob)

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_label = True
        return tags


class MLPRegressor(RegressorMixin, _BaseMLP):
    __doc__ = """Multi-layer perceptron regressor on chainrule's native kernels.

    A drop-in for ``sklearn.neural_network.MLPRegressor``: half squared error
    with identity outputs, or half Poisson deviance with exp outputs
    (``loss="poisson"``, where the installed scikit-learn has it).
    """ + _DOC_PARAMS

    _parameter_constraints: dict[str, list[Any]] = dict(_SkMLPRegressor._parameter_constraints)

    def __init__(
        self,
        loss: str = "squared_error",
        hidden_layer_sizes: int | Sequence[int] = (100,),
        activation: str = "relu",
        *,
        solver: str = "adam",
        alpha: float = 0.0001,
        batch_size: int | str = "auto",
        learning_rate: str = "constant",
        learning_rate_init: float = 0.001,
        power_t: float = 0.5,
        max_iter: int = 200,
        shuffle: bool = True,
        random_state: int | np.random.RandomState | None = None,
        tol: float = 1e-4,
        verbose: bool = False,
        warm_start: bool = False,
        momentum: float = 0.9,
        nesterovs_momentum: bool = True,
        early_stopping: bool = False,
        validation_fraction: float = 0.1,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-8,
        n_iter_no_change: int = 10,
        max_fun: int = 15000,
    ) -> None:
        self.loss = loss
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.solver = solver
        self.alpha = alpha
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.learning_rate_init = learning_rate_init
        self.power_t = power_t
        self.max_iter = max_iter
        self.shuffle = shuffle
        self.random_state = random_state
        self.tol = tol
        self.verbose = verbose
        self.warm_start = warm_start
        self.momentum = momentum
        self.nesterovs_momentum = nesterovs_momentum
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.n_iter_no_change = n_iter_no_change
        self.max_fun = max_fun

    def _validate_input(self, X: _Data, y: _Data, incremental: bool, reset: bool
                        ) -> tuple[_Data, np.ndarray]:
        X, y = validate_data(self, X, y, accept_sparse=["csr", "csc"], multi_output=True,
                             y_numeric=True, dtype=(np.float64, np.float32), reset=reset)
        if y.ndim == 2 and y.shape[1] == 1:
            y = column_or_1d(y, warn=True)
        return X, y

    def _encode_targets(self, y: np.ndarray) -> np.ndarray:
        return y

    def _decode(self, out: np.ndarray) -> np.ndarray:
        return out.ravel() if out.shape[1] == 1 else out

    @staticmethod
    def _score_function(y: ArrayLike, y_pred: ArrayLike,
                        sample_weight: ArrayLike | None = None) -> float:
        return r2_score(y, y_pred, sample_weight=sample_weight)

    def predict(self, X: _Data) -> np.ndarray:
        """Predict values.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_samples, n_features)

        Returns
        -------
        y : ndarray of shape (n_samples,) or (n_samples, n_outputs)
        """
        check_is_fitted(self)
        return self._decode(self._forward_pass_fast(X))

    @available_if(lambda est: est._check_solver())
    @_fit_context(prefer_skip_nested_validation=True)
    def partial_fit(self, X: _Data, y: ArrayLike, sample_weight: ArrayLike | None = None) -> Self:
        """One epoch over (X, y).

        Returns
        -------
        self : object
        """
        return self._fit(X, y, sample_weight=sample_weight, incremental=True)
