"""Hand-built basis functions: the lecture's ``phi(x)``.

Logistic regression on ``phi(x)`` (basis-function logistic regression) is
``f_B(x, w) = sigma(w^T phi(x))``; with two inputs and the defaults,
:class:`PolynomialBasis` gives the lecture's

    phi(x) = (1, x1, x2, x1^2, x2^2)^T

A neural network's hidden layers learn such a basis instead of having it
programmed.
"""

from __future__ import annotations

from itertools import combinations_with_replacement
import numbers
from typing import Any, Iterable, cast

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["PolynomialBasis"]


class PolynomialBasis:
    """Polynomial features of each sample, as a scikit-learn transformer.

    Parameters
    ----------
    degree : int >= 0, default 2
    cross_terms : bool, default False
        False: only powers of single inputs, ordered by degree then input:
        ``1, x1, ..., xd, x1^2, ..., xd^2, ..., xd^degree``.
        True: every monomial of total degree <= ``degree``, in
        scikit-learn's ``PolynomialFeatures`` order (``1, x1, x2, x1^2,
        x1 x2, x2^2`` for two inputs and degree 2).
    include_bias : bool, default True
        Start with the constant column 1.

    Attributes
    ----------
    n_features_in_ : int
        Set by :meth:`fit`.
    powers_ : ndarray of shape (n_output_features, n_features_in), int
        ``powers_[j, i]`` is the exponent of input ``i`` in output ``j``.
    n_output_features_ : int

    Notes
    -----
    Stores its constructor arguments untouched and validates them in
    :meth:`fit` (or :meth:`transform`), as scikit-learn estimators do, so it
    works in a ``Pipeline``, with ``clone`` and in grid searches.
    :meth:`transform` also works without :meth:`fit`.

    Examples
    --------
    >>> PolynomialBasis().fit_transform([[2.0, 3.0]])
    array([[1., 2., 3., 4., 9.]])
    """

    def __init__(self, degree: int = 2, cross_terms: bool = False, include_bias: bool = True) -> None:
        self.degree = degree
        self.cross_terms = cross_terms
        self.include_bias = include_bias

    # scikit-learn's parameter protocol, without importing scikit-learn
    def get_params(self, deep: bool = True) -> dict[str, Any]:
        return {"degree": self.degree, "cross_terms": self.cross_terms, "include_bias": self.include_bias}

    def set_params(self, **params: Any) -> "PolynomialBasis":
        for key, value in params.items():
            if key not in self.get_params():
                raise ValueError(f"PolynomialBasis.set_params: unknown parameter {key!r}; "
                                 f"expected one of {', '.join(self.get_params())}")
            setattr(self, key, value)
        return self

    def __repr__(self) -> str:
        return (f"PolynomialBasis(degree={self.degree!r}, cross_terms={self.cross_terms!r}, "
                f"include_bias={self.include_bias!r})")

    def _validate_params(self, where: str) -> None:
        d = self.degree
        # cast: mypy deems int and numbers.Integral disjoint and the rest unreachable
        if not isinstance(cast(object, d), numbers.Integral) or isinstance(d, bool) or d < 0:
            raise ValueError(f"{where}: degree must be an integer >= 0; got {d!r}")
        for name in ("cross_terms", "include_bias"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise TypeError(f"{where}: {name} must be a bool; got {getattr(self, name)!r}")
        if d == 0 and not self.include_bias:
            raise ValueError(f"{where}: degree=0 with include_bias=False gives no features")

    def _check_X(self, X: ArrayLike, where: str) -> np.ndarray:
        X = np.asarray(X)
        if X.dtype.kind not in "fiub":
            raise TypeError(f"{where}: X must hold numbers; got dtype {X.dtype}")
        if X.ndim != 2:
            raise ValueError(f"{where}: X must be 2-D of shape (n, d); got shape {X.shape}")
        if X.shape[1] == 0:
            raise ValueError(f"{where}: X has no features (shape {X.shape})")
        if X.dtype not in (np.float32, np.float64):
            X = X.astype(np.float64)
        if not np.isfinite(X).all():
            raise ValueError(f"{where}: X contains NaN or inf")
        return X

    def _powers(self, d: int) -> np.ndarray:
        rows = []
        for deg in range(0 if self.include_bias else 1, int(self.degree) + 1):
            if deg == 0:
                rows.append([0] * d)
            elif self.cross_terms:
                for combo in combinations_with_replacement(range(d), deg):
                    row = [0] * d
                    for i in combo:
                        row[i] += 1
                    rows.append(row)
            else:
                for i in range(d):
                    row = [0] * d
                    row[i] = deg
                    rows.append(row)
        return np.array(rows, dtype=np.int64).reshape(len(rows), d)

    def fit(self, X: ArrayLike, y: object = None) -> "PolynomialBasis":
        """Record the number of inputs and the exponents; returns self."""
        self._validate_params("PolynomialBasis.fit")
        X = self._check_X(X, "PolynomialBasis.fit")
        self.n_features_in_ = X.shape[1]
        self.powers_ = self._powers(X.shape[1])
        self.n_output_features_ = len(self.powers_)
        return self

    def transform(self, X: ArrayLike) -> np.ndarray:
        """``phi(X)``.

        Parameters
        ----------
        X : array_like of shape (n, d)

        Returns
        -------
        ndarray of shape (n, n_output_features_)
            float32 for float32 input, float64 otherwise.
        """
        where = "PolynomialBasis.transform"
        self._validate_params(where)
        X = self._check_X(X, where)
        fitted = getattr(self, "n_features_in_", None)
        if fitted is not None and X.shape[1] != fitted:
            raise ValueError(f"{where}: X has {X.shape[1]} features; fit saw {fitted}")
        powers = self.powers_ if fitted is not None else self._powers(X.shape[1])
        out = np.ones((X.shape[0], len(powers)), dtype=X.dtype)
        for j, row in enumerate(powers):
            for i in np.flatnonzero(row):
                out[:, j] *= X[:, i] ** row[i] if row[i] > 1 else X[:, i]
        return out

    def fit_transform(self, X: ArrayLike, y: object = None) -> np.ndarray:
        """``fit(X).transform(X)``."""
        return self.fit(X, y).transform(X)

    def get_feature_names_out(self, input_features: Iterable[str] | None = None) -> np.ndarray:
        """Names like ``"1"``, ``"x0"``, ``"x0^2"``, ``"x0 x1"`` (scikit-learn's style)."""
        d = getattr(self, "n_features_in_", None)
        if d is None:
            raise ValueError("PolynomialBasis.get_feature_names_out: call fit first")
        names = list(input_features) if input_features is not None else [f"x{i}" for i in range(d)]
        if len(names) != d:
            raise ValueError(f"PolynomialBasis.get_feature_names_out: input_features has {len(names)} "
                             f"names; fit saw {d} features")
        out = []
        for row in self.powers_:
            parts = [names[i] if p == 1 else f"{names[i]}^{p}" for i, p in enumerate(row) if p]
            out.append(" ".join(parts) or "1")
        return np.array(out, dtype=object)
