"""Backprop made visible: Jacobians, the chain of local Jacobians, gradcheck.

Layouts
-------
chainrule's default ("numerator") layout puts outputs on rows:
``J[i, j] = dy_i / dx_j``, shape (n_out, n_in), as JAX and PyTorch do. The
lecture writes ``du/dx`` with rows indexed by ``x`` (shape (n_in, n_out)),
the transpose; ``layout="lecture"`` returns that. In the lecture's layout the
chain rule reads left to right from the input,

    dg/dx = (du/dx) . (dg/du),

and in the numerator layout right to left, ``J_g∘u = J_g . J_u``. For a
Dense layer ``u = x W + b`` the lecture's ``du/dx`` is exactly ``W`` (shape
(d_in, d_out), chainrule's weight layout).

:func:`jacobian` is assembled from vector-Jacobian products, the operation
backpropagation is made of: one backward pass per output ``i`` with
``gy = e_i`` gives row ``i`` for every sample at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, cast

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

from . import losses as _losses
from .layers import Layer, Sequential

__all__ = ["jacobian", "jacobian_chain", "chain_product", "gradcheck", "Factor", "GradcheckResult"]

_LAYOUTS = ("numerator", "lecture")


def _check_layout(layout: str, where: str) -> None:
    if layout not in _LAYOUTS:
        raise ValueError(f"{where}: layout must be 'numerator' or 'lecture'; got {layout!r}")


def jacobian(model: Layer, x: ArrayLike, *, layout: str = "numerator") -> np.ndarray:
    """The Jacobian of the outputs with respect to the inputs.

    Parameters
    ----------
    model : Layer or Sequential
    x : array_like of shape (n_in,) for one sample, or (n, n_in) for a batch
    layout : {"numerator", "lecture"}
        ``"numerator"``: ``J[..., i, j] = dy_i / dx_j``; ``"lecture"``: the
        transpose, the lecture's ``du/dx`` with rows indexed by ``x``.

    Returns
    -------
    J : ndarray, the model's dtype
        (n_out, n_in) for one sample, (n, n_out, n_in) for a batch (the last
        two axes swapped for ``"lecture"``).

    Notes
    -----
    Built from ``n_out`` backward passes through the native VJP kernels; the
    parameter gradients are not touched. Samples do not interact, so each
    sample's Jacobian is independent of the rest of the batch.
    """
    if not isinstance(model, Layer):
        raise TypeError(f"jacobian: model must be a chainrule layer or Sequential; got {type(model).__name__}")
    _check_layout(layout, "jacobian")
    x = np.asarray(x)
    single = x.ndim == 1
    X = model._check_x(x[None, :] if single else x, "jacobian")
    if X.shape[0] == 0:
        raise ValueError("jacobian: x is empty (0 samples)")
    n, n_in = X.shape
    n_out = model._forward(X).shape[1]
    J = np.empty((n, n_out, n_in), dtype=model.dtype)
    gy = np.zeros((n, n_out), dtype=model.dtype)
    for i in range(n_out):
        gy.fill(0)
        gy[:, i] = 1
        J[:, i, :] = model._backward(gy, True, False)
    if layout == "lecture":
        J = np.ascontiguousarray(J.transpose(0, 2, 1))
    return J[0] if single else J


@dataclass
class Factor:
    """One factor of the chain: a layer, its input and its local Jacobian.

    Attributes
    ----------
    index : int
        Position in the Sequential.
    layer : Layer
    x : ndarray of shape (d_in,)
        The layer's input at this sample.
    jacobian : ndarray
        (d_out, d_in) in the numerator layout, (d_in, d_out) in the lecture's.
    """

    index: int
    layer: Layer
    x: np.ndarray
    jacobian: np.ndarray

    def __repr__(self) -> str:
        return f"Factor({self.index}: {self.layer!r}, jacobian shape {self.jacobian.shape})"


def jacobian_chain(model: Layer, x: ArrayLike, *, layout: str = "numerator") -> list[Factor]:
    """The local Jacobians whose product is the network's Jacobian at ``x``.

    Parameters
    ----------
    model : Sequential (a single Layer gives a chain of one)
    x : array_like of shape (n_in,)
        One sample.
    layout : {"numerator", "lecture"}

    Returns
    -------
    list of Factor, input side first
        Local Jacobians: Dense ``W^T`` (numerator) / ``W`` (lecture);
        elementwise activations ``diag(f'(u))``; softmax
        ``diag(s) - s s^T``. :func:`chain_product` multiplies them in the
        right order, giving :func:`jacobian` ``(model, x, layout=layout)``.

    Examples
    --------
    >>> chain = jacobian_chain(model, x, layout="lecture")          # doctest: +SKIP
    >>> # the lecture: dg/dx = du1/dx . du2/du1 . ... . dg/du_L
    >>> J = chain[0].jacobian @ chain[1].jacobian @ chain[2].jacobian  # doctest: +SKIP
    """
    _check_layout(layout, "jacobian_chain")
    x = np.asarray(x)
    if x.ndim != 1:
        raise ValueError(f"jacobian_chain: x must be one sample of shape (n_in,); got shape {x.shape}")
    layers = model.layers if isinstance(model, Sequential) else [model]
    h = model._check_x(x[None, :], "jacobian_chain")
    chain: list[Factor] = []
    for i, layer in enumerate(layers):
        chain.append(Factor(i, layer, h[0].copy(), jacobian(layer, h[0], layout=layout)))
        h = layer._forward(h).copy()
    return chain


def chain_product(chain: Sequence[Factor], *, layout: str = "numerator") -> np.ndarray:
    """Multiply a chain from :func:`jacobian_chain` (made with the same ``layout``).

    ``"numerator"``: ``J_L @ ... @ J_2 @ J_1``; ``"lecture"``:
    ``J_1 @ J_2 @ ... @ J_L`` (the lecture's left-to-right order).
    """
    _check_layout(layout, "chain_product")
    mats = [f.jacobian.astype(np.float64) for f in chain]
    if not mats:
        raise ValueError("chain_product: the chain is empty")
    order = mats if layout == "lecture" else mats[::-1]
    out = order[0]
    for m in order[1:]:
        out = out @ m
    return out


@dataclass
class GradcheckResult:
    """The outcome of :func:`gradcheck`.

    Attributes
    ----------
    max_rel_error : float
        ``max |a - f| / max(|a|, |f|, atol)`` over the checked entries, with
        ``a`` the backprop gradient and ``f`` the central difference.
    parameter : str
        Where the maximum occurred, e.g. ``"2.weight"``.
    index : tuple of int
        The entry within that parameter.
    analytic, numeric : float
        The two values there.
    n_checked : int
    """

    max_rel_error: float
    parameter: str
    index: tuple[int, ...]
    analytic: float
    numeric: float
    n_checked: int

    def __float__(self) -> float:
        return self.max_rel_error


def gradcheck(model: Layer, loss: _losses.Loss | str, X: ArrayLike, y: ArrayLike, *,
              eps: float = 1e-5, atol: float = 1e-6, dtype: DTypeLike | None = "float64",
              max_checks: int | None = None, seed: int | np.random.Generator | None = 0
              ) -> GradcheckResult:
    """Compare every parameter gradient with central finite differences.

    ``f = (L(theta + eps e_k) - L(theta - eps e_k)) / (2 eps)`` for each entry
    ``k`` of each parameter, against the gradient from one backward pass.

    Parameters
    ----------
    model : Layer or Sequential
        Not modified: the check runs on a copy cast to ``dtype``.
    loss : Loss or str
    X, y : the batch to differentiate on.
    eps : float, default 1e-5
        About the cube root of float64 epsilon, balancing truncation and rounding.
    atol : float, default 1e-6
        Floor of the relative error's denominator, so entries that are both
        ~0 do not count as large errors.
    dtype : {"float64", "float32"} or None
        The copy's dtype; None keeps the model's. float32 needs a larger
        ``eps`` (about 1e-3) and gives errors near 1e-3.
    max_checks : int, optional
        Check a random subset of this many entries (seeded by ``seed``).

    Returns
    -------
    GradcheckResult
        ``float(result)`` is the largest relative error.
    """
    from .train import _check_X, _target_spec

    if not isinstance(model, Layer):
        raise TypeError(f"gradcheck: model must be a chainrule layer or Sequential; got {type(model).__name__}")
    if not (isinstance(eps, float) and eps > 0):
        raise ValueError(f"gradcheck: eps must be a float > 0; got {eps!r}")
    m = model.copy(dtype=dtype or model.dtype)
    loss = _losses.get(loss)
    X = _check_X(X, m, "gradcheck")
    t = loss.prepare_target(y, _target_spec(m, len(X)), "gradcheck(y)")
    params = m.named_parameters()
    if not params:
        raise ValueError("gradcheck: the model has no parameters")
    m.zero_grad()
    loss._forward(m._forward(X), t, True)
    m._backward(cast(np.ndarray, loss._grad), False, True)
    entries = [(name, p, k) for name, p in params for k in range(p.size)]
    if max_checks is not None and max_checks < len(entries):
        pick = np.random.default_rng(seed).choice(len(entries), size=max_checks, replace=False)
        entries = [entries[i] for i in np.sort(pick)]
    worst = GradcheckResult(0.0, "", (), 0.0, 0.0, len(entries))
    for name, p, k in entries:
        flat = p.data.reshape(-1)
        orig = flat[k]
        flat[k] = orig + eps
        up = loss._forward(m._forward(X), t, False)
        flat[k] = orig - eps
        down = loss._forward(m._forward(X), t, False)
        flat[k] = orig
        numeric = (up - down) / (2 * eps)
        analytic = float(p.grad.reshape(-1)[k])
        err = abs(analytic - numeric) / max(abs(analytic), abs(numeric), atol)
        if err > worst.max_rel_error or not worst.parameter:
            worst = GradcheckResult(err, name, cast(tuple[int, ...], np.unravel_index(k, p.shape)),
                                    analytic, numeric, len(entries))
    worst.index = tuple(int(i) for i in worst.index)
    return worst
