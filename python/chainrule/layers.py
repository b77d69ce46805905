"""Layers: parameters, a dense layer, activation layers and ``Sequential``.

A layer maps a batch ``x`` of shape ``(n, d_in)`` to ``y`` of shape
``(n, d_out)``. ``forward(x)`` keeps what the backward pass needs;
``backward(gy)`` takes ``gy = dL/dy`` of shape ``(n, d_out)``, *adds* each
parameter's gradient into its ``.grad`` and returns ``gx = dL/dx`` of shape
``(n, d_in)``. This is the lecture's chain rule, one factor per layer::

    dL/dx = (du/dx) . (dL/du)        (lecture: rows of du/dx indexed by x)

which, per sample, is the vector-Jacobian product ``gx = J^T gy`` with
``J[i, j] = dy_i / dx_j``.

Speed without hiding the maths
------------------------------
* Every heavy operation is one call into :mod:`chainrule.kernels`.
* Inside :class:`Sequential`, a :class:`Dense` followed by an activation runs
  as one fused ``dense_forward`` call (``y = act(x @ w + b)``); its backward is
  one ``activation_vjp`` and one ``dense_vjp``.
* The parameters of a :class:`Sequential` live in one contiguous buffer, and
  their gradients in another; each :class:`Parameter`'s ``data`` and ``grad``
  are views into them. An optimizer then updates the whole model with one
  native call, and a data-parallel reduction would be one buffer.
* Scratch arrays are kept per batch size, so a steady training loop
  (:func:`chainrule.fit`) allocates nothing per step. The public
  ``forward``/``backward`` return copies that the caller owns; the training
  loop uses the internal buffers directly.
"""

from __future__ import annotations

from collections import OrderedDict
import numbers
from typing import TYPE_CHECKING, Any, Iterator, cast

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

from . import activations as _act
from . import kernels

if TYPE_CHECKING:
    from typing import TypeAlias

    from ._core import _Act

    #: What every ``seed=`` argument accepts.
    Seed: TypeAlias = int | np.random.Generator | None

__all__ = [
    "Parameter",
    "Layer",
    "Dense",
    "Sigmoid",
    "Tanh",
    "ReLU",
    "LeakyReLU",
    "Softmax",
    "LogSoftmax",
    "Identity",
    "Sequential",
    "layer_from_config",
    "INITS",
]

#: Weight initialisations understood by :class:`Dense`.
INITS = ("auto", "glorot_uniform", "he", "normal", "zeros")

_FLOAT_DTYPES = {"float32": np.dtype(np.float32), "float64": np.dtype(np.float64)}


def _as_dtype(dtype: DTypeLike, where: str) -> np.dtype:
    """Resolve a dtype argument to float32 or float64."""
    try:
        dt = np.dtype(dtype)
    except TypeError:
        dt = None
    if dt is None or dt.name not in _FLOAT_DTYPES:
        raise ValueError(f"{where}: dtype must be 'float32' or 'float64'; got {dtype!r}")
    return dt


def _rng(seed: Seed, where: str) -> np.random.Generator:
    """A Generator from ``seed``: None (fresh entropy), an int, or a Generator."""
    if isinstance(seed, np.random.Generator):
        return seed
    if seed is None or (isinstance(seed, numbers.Integral) and not isinstance(seed, bool)):
        if seed is not None and seed < 0:
            raise ValueError(f"{where}: seed must be >= 0; got {seed}")
        return np.random.default_rng(seed)
    raise TypeError(
        f"{where}: seed must be None, an int or a numpy.random.Generator; got {type(seed).__name__}"
    )


def _positive_int(value: Any, where: str, name: str) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{where}: {name} must be a positive integer; got {value!r}")
    return int(value)


class _Buffers:
    """Scratch arrays keyed by (tag, shape), kept for the last few shapes.

    A training loop sees two batch sizes (the full batch and the remainder)
    plus the evaluation sizes, so a small least-recently-used cache makes the
    steady state allocation-free without keeping every size ever seen.
    """

    def __init__(self, capacity: int = 16) -> None:
        self._arrays: OrderedDict[tuple[str, tuple[int, ...]], np.ndarray] = OrderedDict()
        self._capacity = capacity

    def get(self, tag: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        key = (tag, shape)
        a = self._arrays.get(key)
        if a is None or a.dtype != dtype:
            a = np.empty(shape, dtype=dtype)
            self._arrays[key] = a
            if len(self._arrays) > self._capacity:
                self._arrays.popitem(last=False)
        else:
            self._arrays.move_to_end(key)
        return a

    def clear(self) -> None:
        self._arrays.clear()


class _FlatStore:
    """The two contiguous buffers behind a Sequential's parameters."""

    __slots__ = ("data", "grad", "params")

    def __init__(self, data: np.ndarray, grad: np.ndarray, params: tuple[Parameter, ...]) -> None:
        self.data, self.grad, self.params = data, grad, params


class Parameter:
    """A trainable array and its gradient.

    Attributes
    ----------
    data : ndarray, float32 or float64
        The value. Assigning ``p.data = a`` copies ``a`` into the existing
        array (same shape required), so views held elsewhere (the model's
        flat buffer, an optimizer) stay valid.
    grad : ndarray, same shape and dtype as ``data``
        The accumulated gradient ``dL/d(data)``; ``backward`` adds into it and
        ``zero_grad`` clears it. Assignment copies, as for ``data``.
    name : str
        ``"weight"`` or ``"bias"``; :meth:`Sequential.named_parameters` adds
        the layer index.
    """

    __slots__ = ("name", "_data", "_grad", "_owner")

    def __init__(self, data: ArrayLike, name: str = "") -> None:
        data = np.array(data, order="C")  # always a private copy
        if data.dtype.name not in _FLOAT_DTYPES:
            raise TypeError(f"Parameter: data must be float32 or float64; got {data.dtype}")
        self.name = name
        self._data = data
        self._grad = np.zeros_like(data)
        self._owner: _FlatStore | None = None

    def _assign(self, target: np.ndarray, value: ArrayLike, attr: str) -> None:
        value = np.asarray(value)
        if value.shape != target.shape:
            raise ValueError(
                f"Parameter.{attr}: shape must stay {target.shape}; got {value.shape}"
            )
        np.copyto(target, value, casting="same_kind")

    @property
    def data(self) -> np.ndarray:
        return self._data

    @data.setter
    def data(self, value: ArrayLike) -> None:
        self._assign(self._data, value, "data")

    @property
    def grad(self) -> np.ndarray:
        return self._grad

    @grad.setter
    def grad(self, value: ArrayLike) -> None:
        self._assign(self._grad, value, "grad")

    @property
    def shape(self) -> tuple[int, ...]:
        return self._data.shape

    @property
    def size(self) -> int:
        return self._data.size

    @property
    def dtype(self) -> np.dtype:
        return self._data.dtype

    def _rebind(self, data: np.ndarray, grad: np.ndarray, owner: _FlatStore) -> None:
        data[...] = self._data
        grad[...] = self._grad
        self._data, self._grad, self._owner = data, grad, owner

    def _set_dtype(self, dtype: np.dtype) -> None:
        self._data = self._data.astype(dtype)
        self._grad = self._grad.astype(dtype)
        self._owner = None

    def __repr__(self) -> str:
        return f"Parameter({self.name!r}, shape={self.shape}, dtype={self.dtype.name})"


class Layer:
    """Base class: a differentiable map from ``(n, d_in)`` to ``(n, d_out)``.

    Subclasses implement ``_forward(x)`` and
    ``_backward(gy, need_gx, need_param_grad)`` on trusted, contiguous arrays
    of the layer's dtype, returning internal buffers; the public
    :meth:`forward` and :meth:`backward` validate and return copies.

    Parameters
    ----------
    dtype : {"float32", "float64"} or None
        None means float32 unless a :class:`Sequential` passes its own down.
    """

    def __init__(self, *, dtype: DTypeLike | None = None) -> None:
        self._dtype_explicit = dtype is not None
        self._dtype = _as_dtype("float32" if dtype is None else dtype, type(self).__name__)
        self._buffers = _Buffers()
        self._out_shape: tuple[int, ...] | None = None

    # -- what a layer is -------------------------------------------------
    @property
    def dtype(self) -> np.dtype:
        """The float dtype of the parameters and buffers."""
        return self._dtype

    @property
    def d_in(self) -> int | None:
        """Input features, or None when any width works (activations)."""
        return None

    def output_dim(self, d_in: int | None) -> int | None:
        """Output features for ``d_in`` input features."""
        return d_in

    def parameters(self) -> list[Parameter]:
        """The trainable parameters, in order (weight, then bias)."""
        return []

    def named_parameters(self) -> list[tuple[str, Parameter]]:
        """``[(name, Parameter), ...]`` in the order of :meth:`parameters`."""
        return [(p.name, p) for p in self.parameters()]

    def zero_grad(self) -> None:
        """Set every parameter's ``grad`` to zero."""
        for p in self.parameters():
            p.grad.fill(0)

    def config(self) -> dict[str, Any]:
        """A JSON-ready description, enough to rebuild the layer (not its weights)."""
        return {"type": type(self).__name__}

    def copy(self, dtype: DTypeLike | None = None) -> Layer:
        """A deep copy with the same weights, optionally cast to ``dtype``."""
        new = layer_from_config(self.config())
        new._set_dtype(_as_dtype(dtype or self._dtype, f"{type(self).__name__}.copy"))
        if isinstance(self, Sequential):
            cast(Sequential, new)._flat[...] = self._flat
        else:
            for p, q in zip(self.parameters(), new.parameters()):
                q.data = p.data
        return new

    def _set_dtype(self, dtype: np.dtype) -> None:
        self._dtype = dtype
        self._buffers.clear()
        for p in self.parameters():
            p._set_dtype(dtype)

    # -- the public pass ---------------------------------------------------
    def _check_x(self, x: ArrayLike, where: str, what: str = "x") -> np.ndarray:
        """Numbers, 2-D, the layer's feature count; converted to its dtype, C-contiguous."""
        x = np.asarray(x)
        if x.dtype.kind not in "fiub":
            raise TypeError(f"{where}: {what} must hold numbers; got dtype {x.dtype}")
        d_in = self.d_in
        if x.ndim != 2:
            want = f"(n, {d_in})" if d_in is not None else "(n, d)"
            raise ValueError(f"{where}: {what} must be 2-D of shape {want}; got shape {x.shape}")
        if d_in is not None and x.shape[1] != d_in:
            raise ValueError(
                f"{where}: {what} has {x.shape[1]} features per sample; the model expects "
                f"d_in = {d_in} ({what}.shape is {x.shape})"
            )
        return np.ascontiguousarray(x, dtype=self._dtype)

    def forward(self, x: ArrayLike) -> np.ndarray:
        """Compute ``y`` for a batch and keep what :meth:`backward` needs.

        Parameters
        ----------
        x : array_like of shape (n, d_in)
            Converted to the layer's dtype (float32 unless set otherwise).

        Returns
        -------
        y : ndarray of shape (n, d_out), the layer's dtype
            A new array owned by the caller.
        """
        name = f"{type(self).__name__}.forward"
        x = self._check_x(x, name)
        if x.shape[0] == 0:
            self._out_shape = None
            return np.empty((0, cast(int, self.output_dim(x.shape[1]))), dtype=self._dtype)
        y = self._forward(x)
        self._out_shape = y.shape
        return y.copy()

    __call__ = forward

    def backward(self, gy: ArrayLike) -> np.ndarray:
        """Back-propagate ``gy = dL/dy`` through the last :meth:`forward`.

        Adds ``dL/dp`` into every parameter's ``grad`` and returns ``dL/dx``.

        Parameters
        ----------
        gy : array_like of shape (n, d_out)
            The gradient of the loss with respect to the last output.

        Returns
        -------
        gx : ndarray of shape (n, d_in), the layer's dtype
            A new array owned by the caller.
        """
        name = f"{type(self).__name__}.backward"
        if self._out_shape is None:
            raise RuntimeError(f"{name}: call forward(x) with a non-empty batch first")
        gy = np.asarray(gy)
        if gy.shape != self._out_shape:
            raise ValueError(
                f"{name}: gy.shape is {gy.shape}; expected {self._out_shape}, the shape of the last output"
            )
        gy = np.ascontiguousarray(gy, dtype=self._dtype)
        return cast(np.ndarray, self._backward(gy, True, True)).copy()

    def jacobian(self, x: ArrayLike, *, layout: str = "numerator") -> np.ndarray:
        """The local Jacobian of this layer at ``x``, built from its VJPs.

        ``layout="numerator"`` (default) gives ``J[i, j] = dy_i / dx_j`` of
        shape (d_out, d_in) per sample, as :func:`chainrule.jacobian`;
        ``layout="lecture"`` gives the transpose, the lecture's ``du/dx`` with
        rows indexed by the input. For :class:`Dense` the lecture layout is
        exactly ``W``; for elementwise activations it is diagonal; for
        softmax it is ``diag(s) - s s^T``. Runs a forward pass; does not touch
        parameter gradients. See :func:`chainrule.jacobian.jacobian`.
        """
        from .jacobian import jacobian

        return jacobian(self, x, layout=layout)

    def _forward(self, x: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def _backward(self, gy: np.ndarray, need_gx: bool = True,
                  need_param_grad: bool = True) -> np.ndarray | None:  # pragma: no cover
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Dense(Layer):
    """Affine layer ``y = x @ W + b``.

    Parameters
    ----------
    d_in, d_out : int
        Input and output features.
    bias : bool, default True
        Whether to learn ``b``.
    init : {"auto", "glorot_uniform", "he", "normal", "zeros"}
        Weight initialisation (the bias starts at zero):

        * ``"glorot_uniform"`` (Glorot/Xavier): ``U(-a, a)``,
          ``a = sqrt(6 / (d_in + d_out))``; suits sigmoid and tanh;
        * ``"he"``: ``N(0, 2 / d_in)``; suits ReLU;
        * ``"normal"``: ``N(0, 1 / d_in)``;
        * ``"zeros"``;
        * ``"auto"`` (default): He when the next layer of a
          :class:`Sequential` is ReLU or LeakyReLU, Glorot otherwise.
    seed : None, int or numpy.random.Generator
        Randomness for the initialisation. A :class:`Sequential` given its
        own ``seed`` re-draws all its layers from that one.
    dtype : {"float32", "float64"} or None
        float32 unless set here or by a :class:`Sequential`.

    Attributes
    ----------
    weight : Parameter of shape (d_in, d_out)
        Row ``j`` holds input ``j``'s weights. This is scikit-learn's layout
        (``MLPClassifier.coefs_``) and the *transpose* of PyTorch's
        ``nn.Linear.weight`` (d_out, d_in). It is also the lecture's local
        Jacobian ``du/dx`` (rows indexed by x) of ``u = x W + b``.
    bias : Parameter of shape (d_out,), or None
    """

    def __init__(self, d_in: int, d_out: int, bias: bool = True, init: str = "auto", *,
                 seed: Seed = None, dtype: DTypeLike | None = None) -> None:
        super().__init__(dtype=dtype)
        self._d_in = _positive_int(d_in, "Dense", "d_in")
        self.d_out = _positive_int(d_out, "Dense", "d_out")
        if init not in INITS:
            raise ValueError(f"Dense: init must be one of {', '.join(INITS)}; got {init!r}")
        self.init = init
        self.seed = seed
        self.weight = Parameter(np.zeros((self._d_in, self.d_out), dtype=self._dtype), "weight")
        self.bias = Parameter(np.zeros(self.d_out, dtype=self._dtype), "bias") if bias else None
        self._x: Any = None  # the last forward's input, for the backward
        self.reset_parameters(_rng(seed, "Dense"))

    @property
    def d_in(self) -> int:
        return self._d_in

    def output_dim(self, d_in: int | None) -> int:
        return self.d_out

    def parameters(self) -> list[Parameter]:
        return [self.weight] if self.bias is None else [self.weight, self.bias]

    def reset_parameters(self, rng: Seed = None, init: str | None = None) -> None:
        """Re-draw the weights (bias to zero).

        Parameters
        ----------
        rng : None, int or numpy.random.Generator
            Draws are made in float64, then cast, so float32 and float64
            models from the same seed hold the same values up to rounding.
        init : str, optional
            Overrides ``self.init`` for this draw; ``"auto"`` means Glorot.
        """
        rng = _rng(rng, "Dense.reset_parameters")
        kind = self.init if init is None else init
        if kind not in INITS:
            raise ValueError(f"Dense.reset_parameters: init must be one of {', '.join(INITS)}; got {kind!r}")
        shape = (self._d_in, self.d_out)
        if kind in ("auto", "glorot_uniform"):
            limit = np.sqrt(6.0 / (self._d_in + self.d_out))
            w = rng.uniform(-limit, limit, size=shape)
        elif kind == "he":
            w = rng.normal(0.0, np.sqrt(2.0 / self._d_in), size=shape)
        elif kind == "normal":
            w = rng.normal(0.0, np.sqrt(1.0 / self._d_in), size=shape)
        else:
            w = np.zeros(shape)
        self.weight.data = w
        if self.bias is not None:
            self.bias.data.fill(0)

    def config(self) -> dict[str, Any]:
        return {"type": "Dense", "d_in": self._d_in, "d_out": self.d_out,
                "bias": self.bias is not None, "init": self.init}

    def _forward(self, x: np.ndarray, activation: _Act = "identity",
                 negative_slope: float = 0.01) -> np.ndarray:
        """``y = act(x @ W + b)`` in one native call; ``act`` is fused by Sequential."""
        y = self._buffers.get("y", (x.shape[0], self.d_out), self._dtype)
        b = None if self.bias is None else self.bias.data
        kernels.dense_forward(x, self.weight.data, b, activation=activation,
                              negative_slope=negative_slope, out=y)
        self._x = x
        return y

    def _backward(self, gz: np.ndarray, need_gx: bool = True,
                  need_param_grad: bool = True) -> np.ndarray | None:
        """``gx = gz @ W^T``; adds ``x^T @ gz`` into W.grad and ``sum_n gz`` into b.grad."""
        x, w = self._x, self.weight.data
        gx = self._buffers.get("gx", x.shape, self._dtype) if need_gx else None
        if not need_param_grad:
            if need_gx:
                kernels.dense_vjp(x, w, gz, gx=gx, need_gw=False, need_gb=False)
            return gx
        if need_gx:
            cast(np.ndarray, gx).fill(0)  # accumulate=True adds into every output, gx included
        has_b = self.bias is not None
        kernels.dense_vjp(x, w, gz, gx=gx, gw=self.weight.grad,
                          gb=cast(Parameter, self.bias).grad if has_b else None,
                          need_gx=need_gx, need_gw=True, need_gb=has_b, accumulate=True)
        return gx

    def __repr__(self) -> str:
        extra = "" if self.bias is not None else ", bias=False"
        return f"Dense({self._d_in}, {self.d_out}{extra})"


class _ActivationLayer(Layer):
    """An activation from :mod:`chainrule.activations`, as a layer."""

    activation: _Act = "identity"
    negative_slope = 0.01

    def __init__(self, *, dtype: DTypeLike | None = None) -> None:
        super().__init__(dtype=dtype)
        self._fn = _act.get(self.activation)
        self._y: Any = None  # the last forward's output, for the VJP

    def _forward(self, x: np.ndarray) -> np.ndarray:
        y = self._buffers.get("y", x.shape, self._dtype)
        self._fn.forward(x, negative_slope=self.negative_slope, out=y)
        self._y = y
        return y

    def _backward(self, gy: np.ndarray, need_gx: bool = True,
                  need_param_grad: bool = True) -> np.ndarray | None:
        if not need_gx:
            return None
        gx = self._buffers.get("gx", gy.shape, self._dtype)
        self._fn.vjp(self._y, gy, negative_slope=self.negative_slope, out=gx)
        return gx


class Sigmoid(_ActivationLayer):
    """``y = 1 / (1 + exp(-x))``, elementwise; ``gx = gy * y * (1 - y)``."""

    activation = "sigmoid"


class Tanh(_ActivationLayer):
    """``y = tanh(x) = 2 sigma(2x) - 1``, elementwise; ``gx = gy * (1 - y**2)``."""

    activation = "tanh"


class ReLU(_ActivationLayer):
    """``y = max(0, x)``, elementwise; ``gx = gy * (y > 0)`` (0 at x = 0)."""

    activation = "relu"


class LeakyReLU(_ActivationLayer):
    """``y = x`` for ``x > 0``, ``a x`` otherwise; ``gx = gy`` or ``a gy``.

    Parameters
    ----------
    negative_slope : float >= 0, default 0.01
        ``a``. It must be >= 0 so that the VJP can read the sign of ``x``
        from ``y``.
    """

    activation = "leaky_relu"

    def __init__(self, negative_slope: float = 0.01, *, dtype: DTypeLike | None = None) -> None:
        # cast: mypy deems float and numbers.Real disjoint and the rest unreachable
        if not isinstance(cast(object, negative_slope), numbers.Real) or not np.isfinite(negative_slope) or negative_slope < 0:
            raise ValueError(f"LeakyReLU: negative_slope must be a finite number >= 0; got {negative_slope!r}")
        self.negative_slope = float(negative_slope)
        super().__init__(dtype=dtype)

    def config(self) -> dict[str, Any]:
        return {"type": "LeakyReLU", "negative_slope": self.negative_slope}

    def __repr__(self) -> str:
        return f"LeakyReLU({self.negative_slope})"


class Softmax(_ActivationLayer):
    """``y_i = exp(x_i) / sum_j exp(x_j)`` along each row.

    Jacobian per sample: ``diag(s) - s s^T``; ``gx = y * (gy - sum_j gy_j y_j)``.
    For training, prefer a plain :class:`Dense` output with
    :class:`chainrule.losses.CrossEntropy`, which fuses softmax into the loss.
    """

    activation = "softmax"


class LogSoftmax(_ActivationLayer):
    """``y_i = x_i - logsumexp(x)`` along each row; ``gx = gy - exp(y) sum_j gy_j``."""

    activation = "log_softmax"


class Identity(_ActivationLayer):
    """``y = x``; ``gx = gy``. Costs nothing (returns its input)."""

    activation = "identity"

    def _forward(self, x: np.ndarray) -> np.ndarray:
        self._y = x
        return x

    def _backward(self, gy: np.ndarray, need_gx: bool = True,
                  need_param_grad: bool = True) -> np.ndarray | None:
        return gy if need_gx else None


class Sequential(Layer):
    """Layers applied in order: ``y = f_L(... f_2(f_1(x)))``.

    Parameters
    ----------
    *layers : Layer
        :class:`Dense` and activation layers (also accepted as one list).
        A layer belongs to one model at a time.
    dtype : {"float32", "float64"} or None
        Passed down to every layer (parameters are cast). None: the dtype the
        layers were given explicitly, else float32.
    seed : None, int or numpy.random.Generator
        When given, every :class:`Dense` is re-initialised from it, in layer
        order, so the same seed gives bit-identical weights.

    Notes
    -----
    * A :class:`Dense` followed by an activation runs as one fused
      ``dense_forward`` call.
    * All parameters live in one contiguous buffer (``flat_data``) and all
      gradients in another (``flat_grad``), in the order of
      :meth:`parameters`: W1, b1, W2, b2, ...
    * Logistic regression is ``Sequential(Dense(d, 1))`` trained with
      ``BinaryCrossEntropy(from_logits=True)``: a network with no hidden
      layer. On the features ``phi(x)`` of
      :class:`chainrule.features.PolynomialBasis` it is basis-function
      logistic regression.

    Examples
    --------
    >>> import chainrule as cr
    >>> model = cr.Sequential(cr.Dense(2, 8), cr.Tanh(), cr.Dense(8, 1), seed=0)
    >>> [p.shape for p in model.parameters()]
    [(2, 8), (8,), (8, 1), (1,)]
    """

    def __init__(self, *layers: Layer, dtype: DTypeLike | None = None, seed: Seed = None) -> None:
        if len(layers) == 1 and isinstance(layers[0], (list, tuple)):
            layers = tuple(layers[0])
        if not layers:
            raise ValueError("Sequential: needs at least one layer; got none")
        seen: dict[int, int] = {}
        for i, layer in enumerate(layers):
            if isinstance(layer, Sequential) or not isinstance(layer, Layer):
                what = "a nested Sequential (pass its layers instead)" if isinstance(layer, Sequential) \
                    else type(layer).__name__
                raise TypeError(f"Sequential: layer {i} must be a Dense or activation layer; got {what}")
            if id(layer) in seen:
                raise ValueError(f"Sequential: layer {i} is the same object as layer {seen[id(layer)]}")
            seen[id(layer)] = i
        if dtype is None:
            explicit = {l._dtype.name for l in layers if l._dtype_explicit}
            if len(explicit) > 1:
                raise ValueError(
                    f"Sequential: layers have different dtypes {sorted(explicit)}; pass dtype= to choose one"
                )
            dtype = explicit.pop() if explicit else "float32"
        super().__init__(dtype=dtype)
        self.layers = list(layers)
        self.seed = seed
        d: int | None = None
        for i, layer in enumerate(self.layers):
            if layer.d_in is not None and d is not None and layer.d_in != d:
                raise ValueError(
                    f"Sequential: layer {i} ({layer!r}) expects d_in = {layer.d_in} inputs "
                    f"but the layers before it output {d}"
                )
            d = layer.output_dim(d)
            if layer._dtype != self._dtype:
                layer._set_dtype(self._dtype)
        self._init_weights(seed)
        self._build()

    def _init_weights(self, seed: Seed) -> None:
        rng = None if seed is None else _rng(seed, "Sequential")
        for i, layer in enumerate(self.layers):
            if not isinstance(layer, Dense):
                continue
            kind = layer.init
            if kind == "auto":
                nxt = self.layers[i + 1] if i + 1 < len(self.layers) else None
                kind = _act.get(nxt.activation).init if isinstance(nxt, _ActivationLayer) else "glorot_uniform"
            if rng is not None:
                layer.reset_parameters(rng, kind)
            elif kind != "glorot_uniform" and layer.init == "auto":
                # The layer drew Glorot before it knew its activation.
                layer.reset_parameters(layer.seed, kind)

    def _build(self) -> None:
        params = tuple(self.parameters())
        total = sum(p.size for p in params)
        self._flat = np.empty(total, dtype=self._dtype)
        self._flat_grad = np.zeros(total, dtype=self._dtype)
        store = _FlatStore(self._flat, self._flat_grad, params)
        offset = 0
        for p in params:
            end = offset + p.size
            p._rebind(self._flat[offset:end].reshape(p.shape),
                      self._flat_grad[offset:end].reshape(p.shape), store)
            offset = end
        # Fusion plan: (layer, activation fused into it or None).
        plan: list[tuple[Layer, _ActivationLayer | None]] = []
        i = 0
        while i < len(self.layers):
            layer = self.layers[i]
            nxt = self.layers[i + 1] if i + 1 < len(self.layers) else None
            if isinstance(layer, Dense) and isinstance(nxt, _ActivationLayer):
                plan.append((layer, nxt))
                i += 2
            else:
                plan.append((layer, None))
                i += 1
        self._plan = plan
        self._reversed = self.layers[::-1]
        # Layers below the first one with parameters never need a backward in training.
        self._first_trainable = next(
            (i for i, l in enumerate(self.layers) if l.parameters()), len(self.layers))

    # -- structure ---------------------------------------------------------
    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i: int) -> Layer:
        return self.layers[i]

    def __iter__(self) -> Iterator[Layer]:
        return iter(self.layers)

    @property
    def d_in(self) -> int | None:
        return next((l.d_in for l in self.layers if l.d_in is not None), None)

    @property
    def d_out(self) -> int | None:
        """Output features (None when the model has no Dense layer)."""
        return self.output_dim(self.d_in)

    def output_dim(self, d_in: int | None) -> int | None:
        for layer in self.layers:
            d_in = layer.output_dim(d_in)
        return d_in

    @property
    def flat_data(self) -> np.ndarray:
        """All parameters as one contiguous 1-D array (a view, not a copy)."""
        return self._flat

    @property
    def flat_grad(self) -> np.ndarray:
        """All parameter gradients as one contiguous 1-D array (a view)."""
        return self._flat_grad

    def parameters(self) -> list[Parameter]:
        """``[W1, b1, W2, b2, ...]`` in layer order."""
        return [p for layer in self.layers for p in layer.parameters()]

    def named_parameters(self) -> list[tuple[str, Parameter]]:
        """``[("0.weight", W1), ("0.bias", b1), ("2.weight", W2), ...]``."""
        return [(f"{i}.{p.name}", p) for i, layer in enumerate(self.layers) for p in layer.parameters()]

    def zero_grad(self) -> None:
        """Clear all gradients (one fill of the flat gradient buffer)."""
        self._flat_grad.fill(0)

    def config(self) -> dict[str, Any]:
        return {"type": "Sequential", "dtype": self._dtype.name,
                "layers": [l.config() for l in self.layers]}

    def _set_dtype(self, dtype: np.dtype) -> None:
        self._dtype = dtype
        self._buffers.clear()
        for layer in self.layers:
            layer._set_dtype(dtype)
        self._build()

    def summary(self) -> str:
        """A table of layers, output shapes and parameter counts.

        Returns
        -------
        str
            Print it. Fused pairs are marked with ``+``.
        """
        fused = {id(a) for _, a in self._plan if a is not None}
        rows = [("#", "layer", "output", "params")]
        d = self.d_in
        for i, layer in enumerate(self.layers):
            d = layer.output_dim(d)
            count = sum(p.size for p in layer.parameters())
            name = ("+ " if id(layer) in fused else "") + repr(layer)
            rows.append((str(i), name, f"(n, {d})", str(count)))
        widths = [max(len(r[c]) for r in rows) for c in range(4)]
        lines = ["  ".join(r[c].ljust(widths[c]) if c < 3 else r[c].rjust(widths[c]) for c in range(4))
                 for r in rows]
        lines.insert(1, "-" * len(lines[0]))
        lines.append("-" * len(lines[0]))
        lines.append(f"{self._flat.size} parameters, {self._dtype.name}; '+' = fused into the Dense above")
        return "\n".join(lines)

    def __repr__(self) -> str:
        inner = ", ".join(repr(l) for l in self.layers)
        return f"Sequential({inner})"

    # -- passes --------------------------------------------------------------
    def _forward(self, x: np.ndarray) -> np.ndarray:
        for layer, act in self._plan:
            if act is None:
                x = layer._forward(x)
            else:
                x = cast(Dense, layer)._forward(x, act.activation, act.negative_slope)
                act._y = x
        return x

    def _backward(self, gy: np.ndarray, need_gx: bool = True,
                  need_param_grad: bool = True) -> np.ndarray | None:
        """Reverse pass. ``need_gx=False`` (the training path) skips the layers
        below the first trainable one and that layer's ``gx`` GEMM."""
        first = 0 if need_gx else self._first_trainable
        i = len(self.layers) - 1
        for layer in self._reversed:
            if i < first:
                break
            gy = cast(np.ndarray, layer._backward(gy, need_gx or i > first, need_param_grad))
            i -= 1
        return gy if need_gx else None


#: Layer classes by name, for :func:`layer_from_config` and :mod:`chainrule.io`.
LAYER_TYPES: dict[str, type[Layer]] = {c.__name__: c for c in (Dense, Sigmoid, Tanh, ReLU, LeakyReLU, Softmax, LogSoftmax, Identity)}


def layer_from_config(config: Any) -> Layer:
    """Rebuild a layer (weights zero) from :meth:`Layer.config`.

    Raises
    ------
    ValueError
        When the record is not a valid layer description; the message says
        which field is wrong.
    """
    if not isinstance(config, dict) or "type" not in config:
        raise ValueError(f"layer_from_config: expected a dict with a 'type' key; got {config!r:.80}")
    kind = config["type"]
    keys = set(config) - {"type"}
    if kind == "Sequential":
        if keys != {"dtype", "layers"} or not isinstance(config["layers"], list):
            raise ValueError(f"layer_from_config: Sequential needs keys dtype, layers (a list); got {sorted(keys)}")
        dtype = config["dtype"]
        if dtype not in _FLOAT_DTYPES:
            raise ValueError(f"layer_from_config: Sequential dtype must be 'float32' or 'float64'; got {dtype!r}")
        layers = [layer_from_config(c) for c in config["layers"]]
        return Sequential(*layers, dtype=dtype)
    if kind not in LAYER_TYPES:
        raise ValueError(
            f"layer_from_config: unknown layer type {kind!r}; expected one of {', '.join(LAYER_TYPES)} or Sequential"
        )
    if kind == "Dense":
        if keys != {"d_in", "d_out", "bias", "init"} or not isinstance(config["bias"], bool):
            raise ValueError(f"layer_from_config: Dense needs keys bias (bool), d_in, d_out, init; got {config!r:.200}")
        layer = Dense(config["d_in"], config["d_out"], config["bias"], init="zeros")
        if config["init"] not in INITS:
            raise ValueError(f"layer_from_config: Dense init must be one of {', '.join(INITS)}; got {config['init']!r}")
        layer.init = config["init"]
        return layer
    if kind == "LeakyReLU":
        if keys != {"negative_slope"}:
            raise ValueError(f"layer_from_config: LeakyReLU needs key negative_slope; got {sorted(keys)}")
        return LeakyReLU(config["negative_slope"])
    if keys:
        raise ValueError(f"layer_from_config: {kind} takes no settings; got {sorted(keys)}")
    return LAYER_TYPES[kind]()
