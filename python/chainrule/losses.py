"""Loss functions: a float from ``forward(pred, target)``, ``dL/dpred`` from ``backward()``.

The lecture trains by minimising ``J(theta) = sum_i l(NN(x_i, theta), y_i)``.
``reduction="sum"`` is that sum; ``reduction="mean"`` (the default, as in
PyTorch and scikit-learn) divides it by the number of samples (or of
elements, see each class), which keeps the learning rate independent of the
batch size.

=======================  ========================================  =====================
class                    per-sample loss ``l``                     ``pred`` is
=======================  ========================================  =====================
BinaryCrossEntropy       ``-[y log f + (1 - y) log(1 - f)]``       logits ``z`` (f = sigma(z)),
                         (the lecture's NLL)                       or probabilities ``f``
CrossEntropy             ``-log softmax(z)_y``                     logits ``z`` (n, k)
MSE                      ``(pred - target)**2``                    anything
=======================  ========================================  =====================

Each loss keeps its gradient in a buffer reused between calls with the same
shape; :meth:`Loss.backward` returns a copy the caller owns.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

from . import kernels
from .layers import _Buffers

__all__ = ["Loss", "BinaryCrossEntropy", "CrossEntropy", "MSE", "get"]


def _as_float_array(a: ArrayLike, dtype: DTypeLike, where: str, what: str) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype.kind not in "fiub":
        raise TypeError(f"{where}: {what} must hold numbers; got dtype {a.dtype}")
    return np.ascontiguousarray(a, dtype=dtype)


class Loss:
    """Base class.

    Parameters
    ----------
    reduction : {"mean", "sum"}
        ``"sum"`` is the lecture's ``J(theta) = sum_i l_i``; ``"mean"`` divides
        it as each subclass states.
    """

    def __init__(self, reduction: Literal["mean", "sum"] = "mean") -> None:
        if reduction not in ("mean", "sum"):
            raise ValueError(f"{type(self).__name__}: reduction must be 'mean' or 'sum'; got {reduction!r}")
        self.reduction = reduction
        self._buffers = _Buffers(capacity=16)
        self._grad: np.ndarray | None = None

    # -- public ---------------------------------------------------------------
    def forward(self, pred: ArrayLike, target: ArrayLike,
                sample_weight: ArrayLike | None = None) -> float:
        """The loss of a batch; keeps ``dL/dpred`` for :meth:`backward`.

        Parameters
        ----------
        pred : array_like, float32 or float64
            The model's output; see the subclass for its shape.
        target : array_like
            See the subclass.
        sample_weight : array_like of shape (n,), optional
            Non-negative weights ``w_i``; ``"mean"`` then divides by
            ``sum(w)`` instead of ``n``.

        Returns
        -------
        float
        """
        where = f"{type(self).__name__}.forward"
        pred = np.asarray(pred)
        if pred.dtype.name not in ("float32", "float64"):
            pred = _as_float_array(pred, np.float64, where, "pred")
        pred = np.ascontiguousarray(pred)
        target = self.prepare_target(target, pred, where)
        if sample_weight is not None:
            sample_weight = _as_float_array(sample_weight, pred.dtype, where, "sample_weight")
            if sample_weight.shape != (pred.shape[0],):
                raise ValueError(f"{where}: sample_weight.shape is {sample_weight.shape}; expected ({pred.shape[0]},)")
            if not np.all(np.isfinite(sample_weight)) or np.any(sample_weight < 0):
                raise ValueError(f"{where}: sample_weight must be finite and >= 0")
        return self._forward(pred, target, True, sample_weight)

    __call__ = forward

    def backward(self) -> np.ndarray:
        """``dL/dpred`` of the last :meth:`forward`, same shape as ``pred`` (a copy)."""
        if self._grad is None:
            raise RuntimeError(f"{type(self).__name__}.backward: call forward(pred, target) first")
        return self._grad.copy()

    def prepare_target(self, target: ArrayLike, pred: np.ndarray, where: str) -> np.ndarray:
        """Validate ``target`` against ``pred`` and convert it once.

        :func:`chainrule.fit` calls this on the whole data set before training,
        so the loop itself converts nothing. Returns an array the kernels take
        as is.
        """
        raise NotImplementedError

    def proba(self, out: np.ndarray) -> np.ndarray | None:
        """Class probabilities from the model output, or None for regression."""
        return None

    def config(self) -> dict[str, Any]:
        return {"type": type(self).__name__, "reduction": self.reduction}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(reduction={self.reduction!r})"

    # -- internal (trusted inputs) ---------------------------------------------
    def _grad_buffer(self, pred: np.ndarray) -> np.ndarray:
        return self._buffers.get("grad", pred.shape, pred.dtype)

    def _forward(self, pred: np.ndarray, target: np.ndarray, need_grad: bool = True,
                 sample_weight: np.ndarray | None = None) -> float:
        raise NotImplementedError

    def _check_rows(self, target: np.ndarray, pred: np.ndarray, where: str) -> None:
        if target.ndim == 0 or target.shape[0] != pred.shape[0]:
            raise ValueError(
                f"{where}: target has {target.shape[0] if target.ndim else 'no'} samples but pred has "
                f"{pred.shape[0]} (target.shape {target.shape}, pred.shape {pred.shape})"
            )


class BinaryCrossEntropy(Loss):
    """The lecture's negative log-likelihood for binary labels.

    ``l_i = -[y_i log f_i + (1 - y_i) log(1 - f_i)]`` with ``f_i = sigma(z_i)``.

    Parameters
    ----------
    from_logits : bool, default True
        True: ``pred`` holds logits ``z`` (a final :class:`~chainrule.Dense`
        with no activation) and the loss is computed as
        ``softplus(z) - y z``, exact and finite for any finite ``z``;
        ``dL/dz = sigma(z) - y``. False: ``pred`` holds probabilities ``f``
        (after a :class:`~chainrule.Sigmoid`), clipped to
        ``[eps, 1 - eps]`` (machine epsilon of the dtype) before the log;
        ``dL/df = (f - y) / (f (1 - f))``. Prefer logits.
    reduction : {"mean", "sum"}
        ``"mean"`` divides by the number of elements of ``pred``.

    Shapes
    ------
    pred of shape (n,) or (n, 1) (or (n, k) for k independent labels), float;
    target with the same number of elements, values in [0, 1]: (n,) and
    (n, 1) are interchangeable.
    """

    def __init__(self, from_logits: bool = True,
                 reduction: Literal["mean", "sum"] = "mean") -> None:
        super().__init__(reduction)
        if not isinstance(from_logits, bool):
            raise TypeError(f"BinaryCrossEntropy: from_logits must be a bool; got {from_logits!r}")
        self.from_logits = from_logits

    def prepare_target(self, target: ArrayLike, pred: np.ndarray, where: str) -> np.ndarray:
        t = _as_float_array(target, pred.dtype, where, "target")
        self._check_rows(t, pred, where)
        if t.shape != pred.shape:
            if t.size != pred.size:
                raise ValueError(f"{where}: target.shape is {t.shape}; expected {pred.shape} like pred")
            t = t.reshape(pred.shape)
        if t.size and not (np.all(np.isfinite(t)) and t.min() >= 0 and t.max() <= 1):
            raise ValueError(
                f"{where}: target must be in [0, 1] (binary labels or probabilities); "
                f"got values in [{np.nanmin(t)}, {np.nanmax(t)}]"
            )
        return t

    def _forward(self, pred: np.ndarray, target: np.ndarray, need_grad: bool = True,
                 sample_weight: np.ndarray | None = None) -> float:
        grad = self._grad_buffer(pred) if need_grad else None
        if self.from_logits:
            loss, _ = kernels.binary_cross_entropy(
                pred, target, sample_weight=sample_weight, reduction=self.reduction,
                grad=grad, need_grad=need_grad)
        else:
            loss = self._forward_proba(pred, target, grad, sample_weight)
        self._grad = grad
        return float(loss)

    def _forward_proba(self, f: np.ndarray, y: np.ndarray, grad: np.ndarray | None,
                       w: np.ndarray | None) -> float:
        eps = np.finfo(f.dtype).eps
        fc = self._buffers.get("clip", f.shape, f.dtype)
        np.clip(f, eps, 1 - eps, out=fc)
        f64, y64 = fc.astype(np.float64), y.astype(np.float64)
        terms = -(y64 * np.log(f64) + (1 - y64) * np.log1p(-f64))
        k = 1 if f.ndim == 1 else f.shape[1]
        if w is not None:
            terms = terms * (w if f.ndim == 1 else w[:, None])
            denom = float(np.sum(w)) * k
        else:
            denom = f.size
        scale = 1.0 / denom if self.reduction == "mean" else 1.0
        if grad is not None:
            g = (f64 - y64) / (f64 * (1 - f64)) * scale
            if w is not None:
                g *= w if f.ndim == 1 else w[:, None]
            grad[...] = g
        return float(terms.sum()) * scale

    def proba(self, out: np.ndarray) -> np.ndarray:
        p = kernels.sigmoid_forward(out) if self.from_logits else np.asarray(out)
        p = p.reshape(len(p), -1)
        return np.hstack([1 - p, p]) if p.shape[1] == 1 else p

    def config(self) -> dict[str, Any]:
        return {**super().config(), "from_logits": self.from_logits}

    def __repr__(self) -> str:
        return f"BinaryCrossEntropy(from_logits={self.from_logits}, reduction={self.reduction!r})"


class CrossEntropy(Loss):
    """Softmax followed by the negative log-likelihood, from logits.

    ``l_i = logsumexp(z_i) - z_i[y_i] = -log softmax(z_i)[y_i]`` for integer
    labels, and ``l_i = sum_j t_ij (logsumexp(z_i) - z_ij)`` for probability
    (or one-hot) targets. ``dL/dz_i = softmax(z_i) - onehot(y_i)`` (times
    ``1/n`` for ``"mean"``). The softmax is inside the loss, as in PyTorch's
    ``nn.CrossEntropyLoss``: end the model with a plain Dense.

    Shapes
    ------
    pred : (n, k) logits, float32 or float64.
    target : (n,) integer labels in ``[0, k)``, or (n, k) probabilities.
    ``"mean"`` divides by ``n`` (or by ``sum(sample_weight)``).
    """

    def prepare_target(self, target: ArrayLike, pred: np.ndarray, where: str) -> np.ndarray:
        if pred.ndim != 2:
            raise ValueError(f"{where}: pred must be 2-D logits of shape (n, k); got shape {pred.shape}")
        t = np.asarray(target)
        if t.dtype.kind not in "fiub":
            raise TypeError(f"{where}: target must hold numbers; got dtype {t.dtype}")
        self._check_rows(t, pred, where)
        k = pred.shape[1]
        if t.ndim == 2 and t.shape[1] == 1 and k != 1:
            t = t[:, 0]
        if t.ndim == 1:
            if t.dtype.kind == "f":
                if not np.all(np.isfinite(t)) or np.any(t != np.round(t)):
                    raise ValueError(f"{where}: labels must be integers in [0, {k}); got non-integer values")
            t = np.ascontiguousarray(t, dtype=np.int64)
            if t.size and (t.min() < 0 or t.max() >= k):
                bad = int(np.flatnonzero((t < 0) | (t >= k))[0])
                raise ValueError(
                    f"{where}: labels must be in [0, {k}) for {k} outputs; got {t[bad]} at index {bad}"
                )
            return t
        if t.shape != pred.shape:
            raise ValueError(f"{where}: target.shape is {t.shape}; expected ({pred.shape[0]},) labels or {pred.shape} probabilities")
        t = np.ascontiguousarray(t, dtype=pred.dtype)
        if t.size and not (np.all(np.isfinite(t)) and t.min() >= 0):
            raise ValueError(f"{where}: probability targets must be finite and >= 0")
        return t

    def _forward(self, pred: np.ndarray, target: np.ndarray, need_grad: bool = True,
                 sample_weight: np.ndarray | None = None) -> float:
        grad = self._grad_buffer(pred) if need_grad else None
        fn = kernels.softmax_cross_entropy if target.ndim == 1 else kernels.soft_cross_entropy
        loss, _ = fn(pred, target, sample_weight=sample_weight, reduction=self.reduction,
                     grad=grad, need_grad=need_grad)
        self._grad = grad
        return float(loss)

    def proba(self, out: np.ndarray) -> np.ndarray:
        return kernels.softmax_forward(np.ascontiguousarray(out))


class MSE(Loss):
    """Mean squared error, ``mean((pred - target)**2)`` over all elements.

    No factor 1/2, as PyTorch's ``nn.MSELoss`` (scikit-learn's MLPRegressor
    uses 1/2). ``dL/dpred = 2 (pred - target) / N`` with ``N = pred.size``
    for ``"mean"`` (``sum(w) * k`` with sample weights), ``N = 1`` for
    ``"sum"``.

    Shapes
    ------
    pred (n, k) or (n,), target the same (``(n,)`` and ``(n, 1)`` are
    interchangeable).
    """

    def prepare_target(self, target: ArrayLike, pred: np.ndarray, where: str) -> np.ndarray:
        t = _as_float_array(target, pred.dtype, where, "target")
        self._check_rows(t, pred, where)
        if t.shape != pred.shape:
            if t.size != pred.size:
                raise ValueError(f"{where}: target.shape is {t.shape}; expected {pred.shape} like pred")
            t = t.reshape(pred.shape)
        if not np.all(np.isfinite(t)):
            raise ValueError(f"{where}: target contains NaN or inf")
        return t

    def _forward(self, pred: np.ndarray, target: np.ndarray, need_grad: bool = True,
                 sample_weight: np.ndarray | None = None) -> float:
        diff = self._buffers.get("diff", pred.shape, pred.dtype)
        np.subtract(pred, target, out=diff)
        if sample_weight is None:
            flat = diff.reshape(-1)
            total, denom = float(np.dot(flat, flat)), pred.size  # a BLAS reduction, no allocation
        else:
            w = sample_weight if pred.ndim == 1 else sample_weight[:, None]
            total = float(np.sum(w * diff.astype(np.float64) ** 2))
            denom = float(np.sum(sample_weight)) * (pred.size // max(pred.shape[0], 1))
        scale = 1.0 / denom if self.reduction == "mean" else 1.0
        grad = None
        if need_grad:
            grad = self._grad_buffer(pred)
            np.multiply(diff, 2.0 * scale, out=grad)
            if sample_weight is not None:
                grad *= w
        self._grad = grad
        return total * scale


_BY_NAME: dict[str, type[Loss]] = {
    "binary_cross_entropy": BinaryCrossEntropy, "bce": BinaryCrossEntropy,
    "cross_entropy": CrossEntropy, "mse": MSE,
}


def get(loss: Loss | str) -> Loss:
    """A loss from an instance or a name (``"binary_cross_entropy"``/``"bce"``,
    ``"cross_entropy"``, ``"mse"``)."""
    if isinstance(loss, Loss):
        return loss
    if isinstance(loss, str) and loss in _BY_NAME:
        return _BY_NAME[loss]()
    raise ValueError(f"losses.get: loss must be a Loss or one of {', '.join(_BY_NAME)}; got {loss!r}")
