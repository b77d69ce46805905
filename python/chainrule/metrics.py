"""Metrics on predictions: accuracy, log loss, mean squared error.

Plain NumPy on small arrays (one number per sample); they are for reporting,
not for the training step.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["accuracy", "log_loss", "mean_squared_error", "mse", "METRICS"]


def _pair(y_true: ArrayLike, y_pred: ArrayLike, where: str) -> tuple[np.ndarray, np.ndarray]:
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if len(y_true) != len(y_pred):
        raise ValueError(f"{where}: y_true has {len(y_true)} samples but y_pred has {len(y_pred)}")
    if len(y_true) == 0:
        raise ValueError(f"{where}: empty input (0 samples)")
    return y_true, y_pred


def accuracy(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Fraction of samples with ``y_pred == y_true``.

    Parameters
    ----------
    y_true, y_pred : array_like of shape (n,)
        Class labels (a trailing axis of size 1 is dropped).
    """
    y_true, y_pred = _pair(y_true, y_pred, "accuracy")
    return float(np.mean(y_true.reshape(len(y_true), -1)[:, 0] == y_pred.reshape(len(y_pred), -1)[:, 0]))


def log_loss(y_true: ArrayLike, proba: ArrayLike, eps: float = 1e-15) -> float:
    """Mean negative log-likelihood ``-mean_i log p_i[y_i]``.

    Parameters
    ----------
    y_true : array_like of shape (n,)
        Integer labels in ``[0, k)``.
    proba : array_like of shape (n, k), or (n,) for P(y = 1) of a binary problem
        Probabilities, clipped to ``[eps, 1 - eps]``.
    """
    y_true, proba = _pair(y_true, proba, "log_loss")
    p = np.asarray(proba, dtype=np.float64)
    if p.ndim == 1 or p.shape[1] == 1:
        p = p.reshape(-1)
        p = np.stack([1 - p, p], axis=1)
    y = y_true.reshape(-1).astype(np.int64)
    if y.min() < 0 or y.max() >= p.shape[1]:
        raise ValueError(f"log_loss: labels must be in [0, {p.shape[1]}); got values in [{y.min()}, {y.max()}]")
    picked = np.clip(p[np.arange(len(y)), y], eps, 1 - eps)
    return float(-np.mean(np.log(picked)))


def mean_squared_error(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """``mean((y_pred - y_true)**2)`` over all elements ((n,) and (n, 1) match)."""
    y_true, y_pred = _pair(y_true, y_pred, "mean_squared_error")
    a = y_true.astype(np.float64).reshape(len(y_true), -1)
    b = y_pred.astype(np.float64).reshape(len(y_pred), -1)
    if a.shape != b.shape:
        raise ValueError(f"mean_squared_error: shapes {y_true.shape} and {y_pred.shape} do not match")
    return float(np.mean((a - b) ** 2))


mse = mean_squared_error

#: Names accepted by ``fit(..., metrics=[...])``.
METRICS: dict[str, Callable[[ArrayLike, ArrayLike], float]] = {"accuracy": accuracy, "log_loss": log_loss, "mse": mean_squared_error}
