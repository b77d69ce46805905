"""The native kernels, as NumPy functions.

Every function here runs in C++ (``chainrule._core``): it checks its
arguments once, releases the GIL and calls the kernel set chosen for this CPU
(``isa()``). Each has a NumPy twin of the same name and arguments in
:mod:`chainrule.reference`, which the tests compare against.

Conventions
-----------
* Arrays are row-major. Weights are ``(d_in, d_out)`` (scikit-learn's layout,
  the transpose of PyTorch's), so a dense layer is ``y = x @ w + b``.
* Dtypes: float32 or float64. The first float argument picks the kernel; the
  other float arguments must have the same dtype, or ``TypeError`` is raised
  (there is no silent cast). Labels, targets and sample weights are converted.
* Non-contiguous or Fortran-ordered inputs are copied, so they give the same
  result as contiguous ones. ``out=`` (and ``grad=``, ``gx=``...) buffers are
  written in place and must be C-contiguous with the exact dtype and shape.
* Results are bit-identical for any :func:`set_num_threads` count (NaN
  payloads aside: the sign bit of a NaN may differ).

Functions
---------
``gemm(a, b, *, trans_a=False, trans_b=False, alpha=1.0, beta=0.0, out=None)``
    ``C = alpha * op(a) @ op(b) + beta * C``; op(a) is (m, k), op(b) (k, n).
    With ``beta == 0`` the output is never read.
``dense_forward(x, w, b=None, *, activation="identity", negative_slope=0.01, out=None)``
    ``y = act(x @ w + b)`` in one pass, the bias and activation applied as
    each output tile is written. x (n, d_in), w (d_in, d_out), b (d_out,).
``dense_vjp(x, w, gz, *, gx=None, gw=None, gb=None, need_gx=True, need_gw=True, need_gb=True, accumulate=False)``
    For ``z = x @ w + b``: ``gx = gz @ w.T``, ``gw = x.T @ gz``,
    ``gb = gz.sum(0)``; returns ``(gx, gw, gb)`` with None for what is not
    needed; ``accumulate=True`` adds into the given buffers.
``activation_forward(name, x, *, negative_slope=0.01, out=None)``, ``activation_vjp(name, y, gy, *, negative_slope=0.01, out=None)``
    ``y = act(x)`` and ``gx = J(x)^T gy``, the VJP computed from the forward
    output ``y``. Names: identity, sigmoid, tanh, relu, leaky_relu (needs
    ``negative_slope >= 0``), softmax and log_softmax (along the last axis of
    a 1-D or 2-D array). Named twins: ``sigmoid_forward(x)``,
    ``sigmoid_vjp(y, gy)``, and so on for each name.
``softmax_cross_entropy(logits, labels, *, sample_weight=None, reduction="mean", grad=None, need_grad=True)``
    ``loss = sum_i w_i (logsumexp(z_i) - z_i[y_i])`` divided by n (or by
    ``sum(w)``) for ``reduction="mean"``; returns ``(loss, dloss/dlogits)``.
``soft_cross_entropy(logits, targets, ...)``
    The same with probability (or one-hot) targets of shape (n, k).
``binary_cross_entropy(logits, targets, ...)``
    ``loss = sum softplus(z) - t z`` over all elements (the lecture's NLL on
    ``sigma(z)``), mean over elements; stable for any finite logit.
``sgd_step(param, grad, momentum_buffer=None, *, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, first_step=False)``, ``adam_step(param, grad, exp_avg, exp_avg_sq, *, step, lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=False)``
    One in-place step of ``torch.optim.SGD`` / ``Adam`` (``AdamW`` when
    decoupled) over a flat buffer; see :mod:`chainrule.optim` for the formulas.
``column_sums(a, *, out=None, accumulate=False)``
    ``a.sum(axis=0)`` with rows added in order.
``isa()``, ``available_isas()``, ``set_isa(name)``
    The instruction set in use, those this CPU can run, and a switch (tests
    and benchmarks use it; ``CHAINRULE_ISA=scalar|avx2|avx512`` sets it at
    import).
``set_num_threads(n)``, ``get_num_threads()``
    Threads for problems large enough to split (default ``OMP_NUM_THREADS``
    or the core count). Small problems always run on the calling thread.
"""

from __future__ import annotations

import warnings

from . import _core
from ._core import (
    activation_forward,
    activation_vjp,
    adam_step,
    available_isas,
    binary_cross_entropy,
    column_sums,
    dense_forward,
    dense_vjp,
    gemm,
    get_num_threads,
    identity_forward,
    identity_vjp,
    isa,
    leaky_relu_forward,
    leaky_relu_vjp,
    log_softmax_forward,
    log_softmax_vjp,
    relu_forward,
    relu_vjp,
    set_isa,
    set_num_threads,
    sgd_step,
    sigmoid_forward,
    sigmoid_vjp,
    soft_cross_entropy,
    softmax_cross_entropy,
    softmax_forward,
    softmax_vjp,
    tanh_forward,
    tanh_vjp,
)

ACTIVATIONS = ("identity", "sigmoid", "tanh", "relu", "leaky_relu", "softmax", "log_softmax")

if _core._isa_env_problem():
    warnings.warn(
        f"CHAINRULE_ISA={_core._isa_env_problem()!r} is not available on this CPU; "
        f"expected one of {', '.join(available_isas())}. Using {isa()!r}.",
        RuntimeWarning,
        stacklevel=2,
    )

__all__ = [
    "ACTIVATIONS",
    "activation_forward",
    "activation_vjp",
    "adam_step",
    "available_isas",
    "binary_cross_entropy",
    "column_sums",
    "dense_forward",
    "dense_vjp",
    "gemm",
    "get_num_threads",
    "identity_forward",
    "identity_vjp",
    "isa",
    "leaky_relu_forward",
    "leaky_relu_vjp",
    "log_softmax_forward",
    "log_softmax_vjp",
    "relu_forward",
    "relu_vjp",
    "set_isa",
    "set_num_threads",
    "sgd_step",
    "sigmoid_forward",
    "sigmoid_vjp",
    "soft_cross_entropy",
    "softmax_cross_entropy",
    "softmax_forward",
    "softmax_vjp",
    "tanh_forward",
    "tanh_vjp",
]
