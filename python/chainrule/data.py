"""Small seeded data sets for the lecture (no scikit-learn needed)."""

from __future__ import annotations

import numbers
from typing import cast

import numpy as np
from numpy.typing import ArrayLike

from .layers import _rng

__all__ = ["make_circles", "train_test_split"]


def make_circles(n_samples: int = 100, *, noise: float | None = None, factor: float = 0.8,
                 seed: int | np.random.Generator | None = None,
                 shuffle: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Two concentric circles: the lecture's data that no line separates.

    Same construction as scikit-learn's ``make_circles``: ``n_samples // 2``
    points evenly spaced on the unit circle (label 0) and the rest on a
    circle of radius ``factor`` (label 1), plus Gaussian noise of standard
    deviation ``noise``. Logistic regression on ``x`` is near chance here;
    on ``phi(x) = (1, x1, x2, x1^2, x2^2)`` it is near perfect.

    Parameters
    ----------
    n_samples : int >= 2
    noise : float >= 0 or None
    factor : float in (0, 1)
        Inner radius over outer radius.
    seed : None, int or numpy.random.Generator
    shuffle : bool, default True

    Returns
    -------
    X : ndarray of shape (n_samples, 2), float64
    y : ndarray of shape (n_samples,), int64, in {0, 1}
    """
    # cast: mypy deems int and numbers.Integral disjoint and the rest unreachable
    if not isinstance(cast(object, n_samples), numbers.Integral) or isinstance(n_samples, bool) or n_samples < 2:
        raise ValueError(f"make_circles: n_samples must be an integer >= 2; got {n_samples!r}")
    if not isinstance(cast(object, factor), numbers.Real) or not 0 < factor < 1:
        raise ValueError(f"make_circles: factor must be in (0, 1); got {factor!r}")
    if noise is not None and (not isinstance(cast(object, noise), numbers.Real) or not np.isfinite(noise) or noise < 0):
        raise ValueError(f"make_circles: noise must be None or a finite number >= 0; got {noise!r}")
    rng = _rng(seed, "make_circles")
    n_out = n_samples // 2
    n_in = n_samples - n_out
    t_out = np.linspace(0, 2 * np.pi, n_out, endpoint=False)
    t_in = np.linspace(0, 2 * np.pi, n_in, endpoint=False)
    X = np.vstack([
        np.column_stack([np.cos(t_out), np.sin(t_out)]),
        factor * np.column_stack([np.cos(t_in), np.sin(t_in)]),
    ])
    y = np.concatenate([np.zeros(n_out, dtype=np.int64), np.ones(n_in, dtype=np.int64)])
    if shuffle:
        order = rng.permutation(n_samples)
        X, y = X[order], y[order]
    if noise:
        X = X + rng.normal(scale=noise, size=X.shape)
    return X, y


def train_test_split(X: ArrayLike, y: ArrayLike, *, test_size: float = 0.25,
                     seed: int | np.random.Generator | None = None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Split ``(X, y)`` at random into train and test parts.

    Parameters
    ----------
    X : array_like of shape (n, ...)
    y : array_like of shape (n, ...)
    test_size : float in (0, 1)
        Fraction held out (rounded up, at least one sample each side).
    seed : None, int or numpy.random.Generator

    Returns
    -------
    X_train, X_test, y_train, y_test
    """
    X, y = np.asarray(X), np.asarray(y)
    if X.ndim == 0 or y.ndim == 0 or len(X) != len(y):
        raise ValueError(f"train_test_split: X has {len(X) if X.ndim else 'no'} samples but y has "
                         f"{len(y) if y.ndim else 'none'}")
    if not isinstance(cast(object, test_size), numbers.Real) or not 0 < test_size < 1:
        raise ValueError(f"train_test_split: test_size must be in (0, 1); got {test_size!r}")
    n = len(X)
    n_test = int(np.ceil(n * test_size))
    if n_test < 1 or n_test >= n:
        raise ValueError(f"train_test_split: {n} samples cannot give {n_test} test samples and a training set")
    order = _rng(seed, "train_test_split").permutation(n)
    test, train = order[:n_test], order[n_test:]
    return X[train], X[test], y[train], y[test]
