"""Compiled training steps: one native call per mini-batch.

:func:`fit` trains a plain multilayer perceptron -- ``Dense`` layers with
biases, each followed by at most one elementwise activation, ending in logits
-- through :class:`chainrule._core.MLPPlan`, which runs gather, forward, loss,
backward and the optimizer step (SGD or Adam) for a whole mini-batch in C++
over preallocated buffers. The
arithmetic is that of the per-layer path (the same kernels in the same
order), minus the Python between the layers. Any other model trains on the
per-layer path, which stays the one to read and to step through by hand.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from . import _core
from . import losses as _losses
from .layers import Dense, Identity, LeakyReLU, ReLU, Sequential, Sigmoid, Tanh

_PlanLoss = Literal["softmax_cross_entropy", "binary_cross_entropy", "squared_error"]

_ELEMENTWISE: dict[type, str] = {Identity: "identity", Sigmoid: "sigmoid", Tanh: "tanh", ReLU: "relu",
                LeakyReLU: "leaky_relu"}


class TrainPlan:
    """A model and loss compiled for :func:`fit`.

    Attributes
    ----------
    plan : chainrule._core.MLPPlan
    loss_name : str
        The native loss: softmax_cross_entropy, binary_cross_entropy or
        squared_error.
    scale : float or None
        None: the loss's mean; 1.0 for ``reduction="sum"``.
    """

    def __init__(self, model: Sequential, plan: _core.MLPPlan, loss_name: _PlanLoss,
                 scale: float | None) -> None:
        self.model, self.plan, self.loss_name, self.scale = model, plan, loss_name, scale
        self._params, self._grads = model.flat_data, model.flat_grad

    def step(self, X: np.ndarray, t: np.ndarray, indices: np.ndarray | None = None,
             grad_norms: np.ndarray | None = None,
             update: dict[str, Any] | None = None) -> float:
        """Write d loss / d params for the batch ``X[indices]`` into the model's grads.

        Returns the batch loss. ``indices=None`` takes all of ``X``. Each
        Dense layer's gradient norm is added to ``grad_norms`` (float64, one
        entry per Dense layer) when given. ``update`` (from
        ``Optimizer._fused_update``) also takes the optimizer step in the
        same native call, unless the loss is not finite.
        """
        return self.plan.train_step(self._params, self._grads, X, t, loss=self.loss_name,
                                    indices=indices, scale=self.scale, grad_norms=grad_norms,
                                    update=update)


def compile_plan(model: Any, loss: _losses.Loss, target: np.ndarray) -> TrainPlan | None:
    """A :class:`TrainPlan` for ``model`` and ``loss``, or None if they do not fit one.

    Fits: a Sequential of ``Dense(bias=True)`` layers, each followed by at
    most one of Identity, Sigmoid, Tanh, ReLU, LeakyReLU (one slope for
    all), the last Dense not followed by an activation; with
    ``CrossEntropy`` on integer labels, ``BinaryCrossEntropy(from_logits=True)``
    or ``MSE``, and no sample weights.
    """
    if not isinstance(model, Sequential):
        return None
    name: _PlanLoss
    if isinstance(loss, _losses.CrossEntropy):
        if target.ndim != 1 or target.dtype != np.int64:
            return None  # probability targets take the per-layer path
        name = "softmax_cross_entropy"
    elif isinstance(loss, _losses.BinaryCrossEntropy) and loss.from_logits:
        name = "binary_cross_entropy"
    elif isinstance(loss, _losses.MSE):
        name = "squared_error"
    else:
        return None
    if loss.reduction not in ("mean", "sum"):
        return None

    dims: list[int] = []
    acts: list[str] = []
    slopes: set[float] = set()
    layers = list(model.layers)
    i = 0
    while i < len(layers):
        dense = layers[i]
        if not isinstance(dense, Dense) or dense.bias is None:
            return None
        if not dims:
            dims.append(dense.weight.shape[0])
        dims.append(dense.weight.shape[1])
        act = "identity"
        nxt = layers[i + 1] if i + 1 < len(layers) else None
        if nxt is not None and not isinstance(nxt, Dense):
            if type(nxt) not in _ELEMENTWISE:
                return None
            act = _ELEMENTWISE[type(nxt)]
            if isinstance(nxt, LeakyReLU):
                slopes.add(nxt.negative_slope)
            i += 1
        acts.append(act)
        i += 1
    if not dims or acts[-1] != "identity" or len(slopes) > 1:
        return None  # the loss takes the last layer's logits
    expected = [p for layer in layers if isinstance(layer, Dense) for p in (layer.weight, layer.bias)]
    if [id(p) for p in model.parameters()] != [id(p) for p in expected]:
        return None
    plan = _core.MLPPlan(dims, acts, model.dtype.name,
                         negative_slope=slopes.pop() if slopes else 0.01)
    return TrainPlan(model, plan, name, None if loss.reduction == "mean" else 1.0)
