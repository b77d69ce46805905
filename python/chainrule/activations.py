"""The activation table: one name, one forward kernel, one VJP kernel.

Every activation is a pair of native kernels from :mod:`chainrule.kernels`:

==============  ===============================  ==========================================
name            forward ``y = f(x)``             VJP ``gx = J^T gy``, written with ``y``
==============  ===============================  ==========================================
identity        ``x``                            ``gy``
sigmoid         ``1 / (1 + exp(-x))``            ``gy * y * (1 - y)``
tanh            ``tanh(x) = 2 sigma(2x) - 1``    ``gy * (1 - y**2)``
relu            ``max(0, x)``                    ``gy * (y > 0)``
leaky_relu      ``x if x > 0 else a x``          ``gy if y > 0 else a gy`` (needs a >= 0)
softmax         ``exp(x_i) / sum_j exp(x_j)``    ``y * (gy - sum_j gy_j y_j)``
log_softmax     ``x_i - logsumexp(x)``           ``gy - exp(y) * sum_j gy_j``
==============  ===============================  ==========================================

Every VJP is computed from the forward *output* ``y``, so a layer only has to
keep its output for the backward pass. softmax and log_softmax act along the
last axis (one row per sample); the others act elementwise on any shape.

The local Jacobians (rows indexed by outputs, ``J[i, j] = dy_i / dx_j``) are
``diag(f'(x))`` for the elementwise ones and ``diag(s) - s s^T`` for softmax;
:func:`local_jacobian` writes them out for one sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
from numpy.typing import ArrayLike, NDArray

from . import kernels

if TYPE_CHECKING:
    from ._core import _Act

__all__ = ["Activation", "ACTIVATIONS", "get", "local_jacobian"]


@dataclass(frozen=True)
class Activation:
    """One row of the table.

    Attributes
    ----------
    name : str
        The kernel name, e.g. ``"tanh"``.
    forward : callable
        ``forward(x, *, negative_slope=0.01, out=None) -> y``.
    vjp : callable
        ``vjp(y, gy, *, negative_slope=0.01, out=None) -> gx``, from the
        forward output ``y``.
    elementwise : bool
        True when ``y_i`` depends on ``x_i`` only (diagonal Jacobian); False
        for softmax and log_softmax, which act along the last axis.
    init : str
        The weight initialisation a preceding ``Dense(init="auto")`` uses:
        ``"he"`` for the ReLU family, ``"glorot_uniform"`` otherwise.
    """

    name: str
    forward: Callable[..., np.ndarray]
    vjp: Callable[..., np.ndarray]
    elementwise: bool
    init: str


def _pair(name: _Act, elementwise: bool, init: str) -> Activation:
    def forward(x: ArrayLike, *, negative_slope: float = 0.01,
                out: np.ndarray | None = None) -> np.ndarray:
        return kernels.activation_forward(name, x, negative_slope=negative_slope, out=out)

    def vjp(y: ArrayLike, gy: ArrayLike, *, negative_slope: float = 0.01,
            out: np.ndarray | None = None) -> np.ndarray:
        return kernels.activation_vjp(name, y, gy, negative_slope=negative_slope, out=out)

    forward.__name__, vjp.__name__ = f"{name}_forward", f"{name}_vjp"
    return Activation(name, forward, vjp, elementwise, init)


#: name -> :class:`Activation`, in the order of the table above.
ACTIVATIONS: dict[str, Activation] = {
    a.name: a
    for a in (
        _pair("identity", True, "glorot_uniform"),
        _pair("sigmoid", True, "glorot_uniform"),
        _pair("tanh", True, "glorot_uniform"),
        _pair("relu", True, "he"),
        _pair("leaky_relu", True, "he"),
        _pair("softmax", False, "glorot_uniform"),
        _pair("log_softmax", False, "glorot_uniform"),
    )
}


def get(name: str) -> Activation:
    """Look up an activation by name.

    Raises
    ------
    ValueError
        For an unknown name; the message lists the known ones.
    """
    try:
        return ACTIVATIONS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"activations.get: name must be one of {', '.join(ACTIVATIONS)}; got {name!r}"
        ) from None


def local_jacobian(name: str, x: ArrayLike, *, negative_slope: float = 0.01) -> np.ndarray:
    """Closed-form Jacobian of one activation at one sample, for reading.

    Parameters
    ----------
    name : str
        An activation name from :data:`ACTIVATIONS`.
    x : array_like of shape (d,)
        The input of the activation.

    Returns
    -------
    J : ndarray of shape (d, d), float64
        ``J[i, j] = dy_i / dx_j`` (rows indexed by outputs). It is symmetric
        for every activation here except log_softmax, so the lecture's
        ``du/dx`` (rows indexed by inputs) is the same matrix, or ``J.T``.

    Notes
    -----
    Written in NumPy from the formulas, independently of the kernels; the
    tests compare it with the Jacobian assembled from the VJP kernels.
    """
    get(name)
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"local_jacobian: x must have shape (d,); got {x.shape}")
    if name == "identity":
        return np.eye(x.size)
    if name == "sigmoid":
        s: NDArray[np.float64] = 1.0 / (1.0 + np.exp(-x))
        return np.diag(s * (1.0 - s))
    if name == "tanh":
        return np.diag(1.0 - np.tanh(x) ** 2)
    if name == "relu":
        return np.diag((x > 0).astype(np.float64))
    if name == "leaky_relu":
        return np.diag(np.where(x > 0, 1.0, negative_slope))
    s = np.exp(x - x.max())
    s /= s.sum()
    if name == "softmax":
        return np.diag(s) - np.outer(s, s)
    return np.eye(x.size) - s[None, :]  # log_softmax: d(x_i - lse)/dx_j = delta_ij - s_j
