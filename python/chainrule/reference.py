"""NumPy twins of the native kernels, written for reading.

Each function has the name and arguments of its twin in
:mod:`chainrule.kernels` and computes in float64; the tests compare the two.
Results are returned as float64 arrays (``out=`` buffers, when given, receive
a cast copy, so the functions can stand in for the kernels).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
from numpy.typing import ArrayLike, NDArray

_F64 = NDArray[np.float64]


def _f64(a: Any) -> _F64:
    return np.asarray(a, dtype=np.float64)


def _put(result: _F64, out: np.ndarray | None) -> np.ndarray:
    if out is None:
        return result
    out[...] = result
    return out


def gemm(a: ArrayLike, b: ArrayLike, *, trans_a: bool = False, trans_b: bool = False,
         alpha: float = 1.0, beta: float = 0.0, out: np.ndarray | None = None) -> np.ndarray:
    """C = alpha * op(a) @ op(b) + beta * C."""
    a, b = _f64(a), _f64(b)
    op_a = a.T if trans_a else a
    op_b = b.T if trans_b else b
    c = alpha * (op_a @ op_b)
    if beta != 0.0:
        c = c + beta * _f64(out)
    return _put(c, out)


def _act(name: str, z: _F64, negative_slope: float = 0.01) -> Any:
    if name in ("identity", "linear"):
        return z
    if name in ("sigmoid", "logistic"):
        # 1 / (1 + e^-z), written with e^-|z| so it never overflows
        e = np.exp(-np.abs(z))
        return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    if name == "tanh":
        return np.tanh(z)
    if name == "relu":
        return np.maximum(z, 0.0)
    if name == "leaky_relu":
        return np.where(z > 0, z, negative_slope * z)
    if name in ("softmax", "log_softmax") and z.shape[-1] == 0:
        return z.copy()  # rows of no classes: nothing to normalise
    if name == "softmax":
        s = np.exp(z - z.max(axis=-1, keepdims=True))
        return s / s.sum(axis=-1, keepdims=True)
    if name == "log_softmax":
        shifted = z - z.max(axis=-1, keepdims=True)
        return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    raise ValueError(f"reference: unknown activation {name!r}")


def _act_vjp(name: str, y: _F64, gy: _F64, negative_slope: float = 0.01) -> Any:
    if name in ("identity", "linear"):
        return gy
    if name in ("sigmoid", "logistic"):
        return gy * y * (1.0 - y)
    if name == "tanh":
        return gy * (1.0 - y * y)
    # Products, as the kernels compute them (not selects), so that a NaN or inf
    # in gy gives NaN at an inactive unit too (0 * NaN), as in the forward.
    if name == "relu":
        return gy * (y > 0)
    if name == "leaky_relu":
        return gy * np.where(y > 0, 1.0, negative_slope)
    if name == "softmax":
        # J = diag(s) - s s^T, so J^T gy = s * (gy - <gy, s>)
        return y * (gy - (gy * y).sum(axis=-1, keepdims=True))
    if name == "log_softmax":
        # d log s_i / d z_j = [i == j] - s_j, so J^T gy = gy - s * sum(gy)
        return gy - np.exp(y) * gy.sum(axis=-1, keepdims=True)
    raise ValueError(f"reference: unknown activation {name!r}")


def dense_forward(x: ArrayLike, w: ArrayLike, b: ArrayLike | None = None, *,
                  activation: str = "identity", negative_slope: float = 0.01,
                  out: np.ndarray | None = None) -> np.ndarray:
    """y = act(x @ w + b)."""
    z = _f64(x) @ _f64(w)
    if b is not None:
        z = z + _f64(b)
    return _put(_act(activation, z, negative_slope), out)


def dense_vjp(x: ArrayLike, w: ArrayLike, gz: ArrayLike, *, gx: np.ndarray | None = None,
              gw: np.ndarray | None = None, gb: np.ndarray | None = None, need_gx: bool = True,
              need_gw: bool = True, need_gb: bool = True, accumulate: bool = False
              ) -> tuple[np.ndarray | None, ...]:
    """(gx, gw, gb) = (gz @ w.T, x.T @ gz, gz.sum(0)), added to the buffers if accumulate."""
    x, w, gz = _f64(x), _f64(w), _f64(gz)
    results: list[np.ndarray | None] = []
    for need, value, buf in ((need_gx, gz @ w.T, gx), (need_gw, x.T @ gz, gw),
                             (need_gb, gz.sum(axis=0), gb)):
        if not need:
            results.append(None)
            continue
        if accumulate:
            value = value + _f64(buf)
        results.append(_put(value, buf))
    return tuple(results)


def activation_forward(name: str, x: ArrayLike, *, negative_slope: float = 0.01,
                       out: np.ndarray | None = None) -> np.ndarray:
    """y = act(x); softmax and log_softmax along the last axis."""
    return _put(_act(name, _f64(x), negative_slope), out)


def activation_vjp(name: str, y: ArrayLike, gy: ArrayLike, *, negative_slope: float = 0.01,
                   out: np.ndarray | None = None) -> np.ndarray:
    """gx = J^T gy, from the forward output y."""
    return _put(_act_vjp(name, _f64(y), _f64(gy), negative_slope), out)


def _named(name: str) -> tuple[Callable[..., np.ndarray], Callable[..., np.ndarray]]:
    if name == "leaky_relu":
        def forward(x: ArrayLike, *, negative_slope: float = 0.01,
                    out: np.ndarray | None = None) -> np.ndarray:
            return activation_forward(name, x, negative_slope=negative_slope, out=out)

        def vjp(y: ArrayLike, gy: ArrayLike, *, negative_slope: float = 0.01,
                out: np.ndarray | None = None) -> np.ndarray:
            return activation_vjp(name, y, gy, negative_slope=negative_slope, out=out)
    else:
        def forward(x: ArrayLike, *, out: np.ndarray | None = None) -> np.ndarray:  # type: ignore[misc]
            return activation_forward(name, x, out=out)

        def vjp(y: ArrayLike, gy: ArrayLike, *, out: np.ndarray | None = None) -> np.ndarray:  # type: ignore[misc]
            return activation_vjp(name, y, gy, out=out)
    forward.__name__, vjp.__name__ = f"{name}_forward", f"{name}_vjp"
    forward.__doc__ = f"Forward of {name}; see activation_forward."
    vjp.__doc__ = f"VJP of {name} from the forward output; see activation_vjp."
    return forward, vjp


identity_forward, identity_vjp = _named("identity")
sigmoid_forward, sigmoid_vjp = _named("sigmoid")
tanh_forward, tanh_vjp = _named("tanh")
relu_forward, relu_vjp = _named("relu")
leaky_relu_forward, leaky_relu_vjp = _named("leaky_relu")
softmax_forward, softmax_vjp = _named("softmax")
log_softmax_forward, log_softmax_vjp = _named("log_softmax")


def _scale(reduction: str, total: float) -> float:
    return 1.0 / total if reduction == "mean" else 1.0


def softmax_cross_entropy(logits: ArrayLike, labels: ArrayLike, *,
                          sample_weight: ArrayLike | None = None, reduction: str = "mean",
                          grad: np.ndarray | None = None, need_grad: bool = True
                          ) -> tuple[float, np.ndarray | None]:
    """Softmax cross-entropy from logits and integer labels: (loss, grad)."""
    z = _f64(logits)
    labels = np.asarray(labels, dtype=np.int64)
    n, k = z.shape
    w = np.ones(n) if sample_weight is None else _f64(sample_weight)
    log_p = _act("log_softmax", z)
    onehot = np.eye(k)[labels]
    scale = _scale(reduction, w.sum() if sample_weight is not None else n)
    loss = scale * float(np.sum(w * -(log_p * onehot).sum(axis=1)))
    g = scale * w[:, None] * (np.exp(log_p) - onehot)
    return loss, (_put(g, grad) if need_grad else None)


def soft_cross_entropy(logits: ArrayLike, targets: ArrayLike, *,
                       sample_weight: ArrayLike | None = None, reduction: str = "mean",
                       grad: np.ndarray | None = None, need_grad: bool = True
                       ) -> tuple[float, np.ndarray | None]:
    """Softmax cross-entropy from logits and probability targets: (loss, grad)."""
    z, t = _f64(logits), _f64(targets)
    n = z.shape[0]
    w = np.ones(n) if sample_weight is None else _f64(sample_weight)
    log_p = _act("log_softmax", z)
    scale = _scale(reduction, w.sum() if sample_weight is not None else n)
    loss = scale * float(np.sum(w * -(t * log_p).sum(axis=1)))
    g = scale * w[:, None] * (np.exp(log_p) * t.sum(axis=1, keepdims=True) - t)
    return loss, (_put(g, grad) if need_grad else None)


def binary_cross_entropy(logits: ArrayLike, targets: ArrayLike, *,
                         sample_weight: ArrayLike | None = None, reduction: str = "mean",
                         grad: np.ndarray | None = None, need_grad: bool = True
                         ) -> tuple[float, np.ndarray | None]:
    """Binary cross-entropy from logits: the lecture's NLL on sigma(z), (loss, grad)."""
    z, t = _f64(logits), _f64(targets)
    n = z.shape[0]
    k = 1 if z.ndim == 1 else z.shape[1]
    w = np.ones(n) if sample_weight is None else _f64(sample_weight)
    w_b = w if z.ndim == 1 else w[:, None]
    # -[t log s + (1-t) log(1-s)] = softplus(z) - t z
    softplus = np.maximum(z, 0.0) + np.log1p(np.exp(-np.abs(z)))
    scale = _scale(reduction, (w.sum() if sample_weight is not None else n) * k)
    loss = scale * float(np.sum(w_b * (softplus - t * z)))
    g = scale * w_b * (_act("sigmoid", z) - t)
    return loss, (_put(g, grad) if need_grad else None)


def sgd_step(param: np.ndarray, grad: ArrayLike, momentum_buffer: Any = None, *, lr: float,
             momentum: float = 0.0, dampening: float = 0.0, weight_decay: float = 0.0,
             nesterov: bool = False, first_step: bool = False) -> None:
    """One torch.optim.SGD step, in place (computed in float64)."""
    p, g = _f64(param), _f64(grad).reshape(np.shape(param))
    g = g + weight_decay * p
    if momentum != 0.0:
        buf = g if first_step else momentum * _f64(momentum_buffer) + (1.0 - dampening) * g
        momentum_buffer[...] = buf
        g = g + momentum * buf if nesterov else buf
    param[...] = p - lr * g


def adam_step(param: np.ndarray, grad: ArrayLike, exp_avg: np.ndarray, exp_avg_sq: np.ndarray, *,
              step: int, lr: float, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
              weight_decay: float = 0.0, decoupled: bool = False) -> None:
    """One torch.optim.Adam (AdamW if decoupled) step, in place (computed in float64)."""
    p, g = _f64(param), _f64(grad).reshape(np.shape(param))
    if decoupled:
        p = p * (1.0 - lr * weight_decay)
    else:
        g = g + weight_decay * p
    m = beta1 * _f64(exp_avg) + (1.0 - beta1) * g
    v = beta2 * _f64(exp_avg_sq) + (1.0 - beta2) * g * g
    exp_avg[...], exp_avg_sq[...] = m, v
    bc1, bc2 = 1.0 - beta1**step, 1.0 - beta2**step
    param[...] = p - (lr / bc1) * m / (np.sqrt(v) / np.sqrt(bc2) + eps)


def column_sums(a: ArrayLike, *, out: np.ndarray | None = None, accumulate: bool = False
                ) -> np.ndarray:
    """a.sum(axis=0)."""
    s = _f64(a).sum(axis=0)
    if accumulate:
        s = s + _f64(out)
    return _put(s, out)
