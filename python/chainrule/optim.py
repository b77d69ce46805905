"""Optimizers (SGD, Adam/AdamW) and learning-rate schedules.

The update rules are exactly PyTorch's ``torch.optim.SGD``, ``Adam`` and
``AdamW``, so results can be checked against it. Each step is one native call
(:func:`chainrule.kernels.sgd_step` / :func:`~chainrule.kernels.adam_step`)
over the model's flat parameter buffer when the parameters are the whole
buffer of one :class:`~chainrule.Sequential` in order (``model.parameters()``),
and one call per parameter otherwise.

Optimizers know nothing of layers: they take a list of
:class:`~chainrule.layers.Parameter` (or anything with ``.parameters()``).

Schedules
---------
A schedule maps the epoch ``e`` (from 0) and the base rate ``lr0`` to the
rate used during that epoch; :func:`chainrule.fit` calls
``optimizer.set_epoch(e)`` at the start of every epoch (do it yourself in a
hand-written loop).

====================  =====================================================
ConstantLR()          ``lr0``
StepLR(s, gamma)      ``lr0 * gamma ** (e // s)``
ExponentialLR(gamma)  ``lr0 * gamma ** e``
InverseScalingLR(p)   ``lr0 / (e + 1) ** p`` (scikit-learn's "invscaling", per epoch)
CosineLR(T, eta_min)  ``eta_min + (lr0 - eta_min) (1 + cos(pi min(e, T) / T)) / 2``
====================  =====================================================
"""

from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING, Any, Iterable, cast

import numpy as np

from . import kernels

if TYPE_CHECKING:
    from .layers import Layer, Parameter, _FlatStore

__all__ = [
    "Optimizer", "SGD", "Adam",
    "Schedule", "ConstantLR", "StepLR", "ExponentialLR", "InverseScalingLR", "CosineLR",
]


def _real(value: Any, where: str, name: str, *, low: float | None = None, high: float | None = None,
          low_open: bool = False, high_open: bool = True) -> float:
    """A finite real in [low, high) (or the open/closed variant asked for)."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "" if low is None else ("(" if low_open else "[") + f"{low}, "
        hi = "" if high is None else f"{high}" + (")" if high_open else "]")
        if low is not None and high is None:
            want = f"> {low}" if low_open else f">= {low}"
        elif low is not None:
            want = f"in {lo}{hi}"
        else:
            want = "a finite number"
        raise ValueError(f"{where}: {name} must be {want}; got {value!r}")
    return float(value)


# -- schedules -------------------------------------------------------------------


class Schedule:
    """Base class: ``lr(lr0, epoch) -> float``."""

    def lr(self, lr0: float, epoch: int) -> float:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        return {"type": type(self).__name__, **vars(self)}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class ConstantLR(Schedule):
    """``lr = lr0`` every epoch."""

    def lr(self, lr0: float, epoch: int) -> float:
        return lr0


class StepLR(Schedule):
    """``lr = lr0 * gamma ** (epoch // step_size)`` (PyTorch's StepLR).

    Parameters
    ----------
    step_size : int > 0
    gamma : float in (0, 1], default 0.1
    """

    def __init__(self, step_size: int, gamma: float = 0.1) -> None:
        # cast: mypy deems int and numbers.Integral disjoint and the rest unreachable
        if not isinstance(cast(object, step_size), numbers.Integral) or isinstance(step_size, bool) or step_size <= 0:
            raise ValueError(f"StepLR: step_size must be a positive integer; got {step_size!r}")
        self.step_size = int(step_size)
        self.gamma = _real(gamma, "StepLR", "gamma", low=0, high=1, low_open=True, high_open=False)

    def lr(self, lr0: float, epoch: int) -> float:
        return lr0 * self.gamma ** (epoch // self.step_size)


class ExponentialLR(Schedule):
    """``lr = lr0 * gamma ** epoch`` (PyTorch's ExponentialLR); gamma in (0, 1]."""

    def __init__(self, gamma: float) -> None:
        self.gamma = _real(gamma, "ExponentialLR", "gamma", low=0, high=1, low_open=True, high_open=False)

    def lr(self, lr0: float, epoch: int) -> float:
        return lr0 * self.gamma ** epoch


class InverseScalingLR(Schedule):
    """``lr = lr0 / (epoch + 1) ** power_t``; power_t >= 0, default 0.5."""

    def __init__(self, power_t: float = 0.5) -> None:
        self.power_t = _real(power_t, "InverseScalingLR", "power_t", low=0)

    def lr(self, lr0: float, epoch: int) -> float:
        return cast(float, lr0 / (epoch + 1) ** self.power_t)


class CosineLR(Schedule):
    """Cosine annealing from ``lr0`` to ``eta_min`` over ``T_max`` epochs, then flat.

    ``lr = eta_min + (lr0 - eta_min) * (1 + cos(pi * min(e, T_max) / T_max)) / 2``
    (PyTorch's CosineAnnealingLR closed form, without restarts).
    """

    def __init__(self, T_max: int, eta_min: float = 0.0) -> None:
        if not isinstance(cast(object, T_max), numbers.Integral) or isinstance(T_max, bool) or T_max <= 0:
            raise ValueError(f"CosineLR: T_max must be a positive integer; got {T_max!r}")
        self.T_max = int(T_max)
        self.eta_min = _real(eta_min, "CosineLR", "eta_min", low=0)

    def lr(self, lr0: float, epoch: int) -> float:
        e = min(epoch, self.T_max)
        return self.eta_min + (lr0 - self.eta_min) * (1 + math.cos(math.pi * e / self.T_max)) / 2


_SCHEDULES: dict[str, type[Schedule]] = {c.__name__: c for c in (ConstantLR, StepLR, ExponentialLR, InverseScalingLR, CosineLR)}


def _schedule_from_config(cfg: Any) -> Schedule:
    if not isinstance(cfg, dict) or cfg.get("type") not in _SCHEDULES:
        raise ValueError(f"load_state_dict: unknown schedule {cfg!r:.100}")
    args = {k: v for k, v in cfg.items() if k != "type"}
    try:
        return _SCHEDULES[cfg["type"]](**args)
    except TypeError as e:
        raise ValueError(f"load_state_dict: bad schedule settings {args}: {e}") from None


# -- optimizers ------------------------------------------------------------------


class Optimizer:
    """Base class: parameters, the learning rate, its schedule and the step count.

    Attributes
    ----------
    params : list of Parameter
    lr : float
        The rate used by the next :meth:`step` (``schedule.lr(base_lr, epoch)``).
    base_lr : float
        The ``lr`` given to the constructor.
    steps : int
        Steps taken so far.
    """

    _state_names: tuple[str, ...] = ()

    def __init__(self, params: Iterable[Parameter] | Layer, lr: float, schedule: Schedule | None) -> None:
        name = type(self).__name__
        if hasattr(params, "parameters") and callable(params.parameters):
            params = params.parameters()
        params = list(cast("Iterable[Parameter]", params))
        from .layers import Parameter

        if not params:
            raise ValueError(f"{name}: params is empty; pass model.parameters()")
        for i, p in enumerate(params):
            if not isinstance(p, Parameter):
                raise TypeError(f"{name}: params[{i}] must be a Parameter; got {type(p).__name__}")
        if len({id(p) for p in params}) != len(params):
            raise ValueError(f"{name}: params lists the same Parameter twice")
        dtypes = {p.dtype.name for p in params}
        if len(dtypes) != 1:
            raise ValueError(f"{name}: all params must share one dtype; got {sorted(dtypes)}")
        self.params = params
        self._params_tuple = tuple(params)
        self.base_lr = _real(lr, name, "lr", low=0, low_open=True)
        if schedule is None:
            schedule = ConstantLR()
        if not isinstance(schedule, Schedule):
            raise TypeError(f"{name}: schedule must be a Schedule (e.g. StepLR(10, 0.5)); got {type(schedule).__name__}")
        self.schedule = schedule
        self.lr = self.base_lr
        self.epoch = 0
        self.steps = 0
        dtype = params[0].dtype
        total = sum(p.size for p in params)
        # State lives in flat buffers too; per-parameter views serve the fallback path.
        self._state = {k: np.zeros(total, dtype=dtype) for k in self._state_names}
        self._views: list[dict[str, np.ndarray]] = []
        offset = 0
        for p in params:
            self._views.append({k: v[offset:offset + p.size].reshape(p.shape) for k, v in self._state.items()})
            offset += p.size

    def set_epoch(self, epoch: int) -> None:
        """Set ``lr`` from the schedule for ``epoch`` (0-based)."""
        self.epoch = int(epoch)
        self.lr = float(self.schedule.lr(self.base_lr, self.epoch))

    def zero_grad(self) -> None:
        """Clear every parameter's gradient (one fill when they are one flat buffer)."""
        store = self._flat_store()
        if store is not None:
            store.grad.fill(0)
        else:
            for p in self.params:
                p.grad.fill(0)

    def _flat_store(self) -> _FlatStore | None:
        store = self.params[0]._owner
        if store is not None and store.params == self._params_tuple:
            return store
        return None

    def step(self) -> None:
        """Update every parameter from its ``grad``, in place."""
        store = self._flat_store()
        if store is not None:
            self._update(store.data, store.grad, self._state)
        else:
            for p, state in zip(self.params, self._views):
                self._update(p.data, p.grad, state)
        self.steps += 1

    def _update(self, p: np.ndarray, g: np.ndarray,
                state: dict[str, np.ndarray]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _fused_update(self, flat_params: np.ndarray) -> dict[str, Any] | None:
        """This step as an ``update=`` for :meth:`chainrule._core.MLPPlan.train_step`.

        The plan then takes the step inside its native call, each layer as
        soon as its gradient is final, with the same kernel and the same
        bits as :meth:`step`; the caller counts it with ``steps += 1``.
        None when that is not possible: the parameters are not the one flat
        buffer ``flat_params``, or a subclass changed the update rule.
        """
        store = self._flat_store()
        if store is None or store.data is not flat_params:
            return None
        return self._fused_rule()

    def _fused_rule(self) -> dict[str, Any] | None:
        return None

    def hyperparameters(self) -> dict[str, Any]:
        raise NotImplementedError

    # -- state ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: hyper-parameters, counters and buffers.

        Returns
        -------
        dict
            ``{"type", "hyper", "schedule", "steps", "epoch", "lr", "state"}``
            where ``state`` maps ``"<buffer>.<i>"`` to a copy of parameter
            ``i``'s buffer, shaped like the parameter.
        """
        state: dict[str, np.ndarray] = {}
        for i, (p, views) in enumerate(zip(self.params, self._views)):
            for k, v in views.items():
                state[f"{k}.{i}"] = v.copy()
        return {"type": type(self).__name__, "hyper": self.hyperparameters(),
                "schedule": self.schedule.config(), "steps": self.steps, "epoch": self.epoch,
                "lr": self.lr, "state": state}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (validated; ValueError on mismatch)."""
        name = f"{type(self).__name__}.load_state_dict"
        if not isinstance(sd, dict) or sd.get("type") != type(self).__name__:
            got = sd.get("type") if isinstance(sd, dict) else type(sd).__name__
            raise ValueError(f"{name}: expected a {type(self).__name__} state; got {got!r}")
        missing = {"hyper", "schedule", "steps", "epoch", "lr", "state"} - set(sd)
        if missing:
            raise ValueError(f"{name}: state is missing {sorted(missing)}")
        steps, epoch = sd["steps"], sd["epoch"]
        for k, v in (("steps", steps), ("epoch", epoch)):
            if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{name}: {k} must be an integer >= 0; got {v!r}")
        lr = _real(sd["lr"], name, "lr", low=0, low_open=True)
        schedule = _schedule_from_config(sd["schedule"])
        try:
            fresh = type(self)(self.params, **sd["hyper"], schedule=schedule)
        except TypeError as e:
            raise ValueError(f"{name}: bad hyper-parameters {sd['hyper']!r}: {e}") from None
        expected = {f"{k}.{i}": p.shape for i, p in enumerate(self.params) for k in fresh._state_names}
        state = sd["state"]
        if not isinstance(state, dict) or set(state) != set(expected):
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"{name}: state buffers must be {sorted(expected)}; got {got}")
        for key, shape in expected.items():
            a = np.asarray(state[key])
            if a.shape != shape or a.dtype.kind != "f" or not np.all(np.isfinite(a)):
                raise ValueError(f"{name}: buffer {key} must be finite floats of shape {shape}; "
                                 f"got shape {a.shape}, dtype {a.dtype}")
        for i, views in enumerate(fresh._views):
            for k, v in views.items():
                v[...] = np.asarray(state[f"{k}.{i}"])
        vars(self).update(vars(fresh))
        self.steps, self.epoch, self.lr = int(steps), int(epoch), lr


class SGD(Optimizer):
    """Stochastic gradient descent, with optional momentum (torch.optim.SGD).

    With ``momentum = 0`` this is the lecture's ``theta <- theta - eta grad l``.
    In full, for each parameter ``p`` with gradient ``g`` at step ``t``::

        g = g + weight_decay * p                    # L2 penalty, if weight_decay
        if momentum:
            b = g                          if t == 0
            b = momentum * b + (1 - dampening) * g  otherwise
            g = g + momentum * b           if nesterov else b
        p = p - lr * g

    This is PyTorch's form (the buffer accumulates gradients and ``lr``
    multiplies it), not the Sutskever form ``v = mu v - lr g; p += v`` that
    scikit-learn uses; they differ when ``lr`` changes during training.

    Parameters
    ----------
    params : list of Parameter, or a model
    lr : float > 0
    momentum : float in [0, 1), default 0
    dampening : float in [0, 1], default 0
    weight_decay : float >= 0, default 0
    nesterov : bool, default False
        Needs ``momentum > 0`` and ``dampening == 0`` (as PyTorch).
    schedule : Schedule, optional
        Learning-rate schedule over epochs (default constant).
    """

    def __init__(self, params: Iterable[Parameter] | Layer, lr: float, momentum: float = 0.0,
                 nesterov: bool = False, weight_decay: float = 0.0, dampening: float = 0.0, *,
                 schedule: Schedule | None = None) -> None:
        self.momentum = _real(momentum, "SGD", "momentum", low=0, high=1)
        self.dampening = _real(dampening, "SGD", "dampening", low=0, high=1, high_open=False)
        self.weight_decay = _real(weight_decay, "SGD", "weight_decay", low=0)
        if not isinstance(nesterov, bool):
            raise TypeError(f"SGD: nesterov must be a bool; got {nesterov!r}")
        if nesterov and (self.momentum == 0 or self.dampening != 0):
            raise ValueError(
                f"SGD: nesterov=True needs momentum > 0 and dampening == 0; "
                f"got momentum={self.momentum}, dampening={self.dampening}")
        self.nesterov = nesterov
        self._state_names = ("momentum_buffer",) if self.momentum else ()
        super().__init__(params, lr, schedule)

    def _update(self, p: np.ndarray, g: np.ndarray, state: dict[str, np.ndarray]) -> None:
        kernels.sgd_step(p, g, state.get("momentum_buffer"), lr=self.lr, momentum=self.momentum,
                         dampening=self.dampening, weight_decay=self.weight_decay,
                         nesterov=self.nesterov, first_step=self.steps == 0)

    def _fused_rule(self) -> dict[str, Any] | None:
        if type(self)._update is not SGD._update:
            return None
        rule: dict[str, Any] = {"kind": "sgd", "lr": self.lr, "momentum": self.momentum,
                                "dampening": self.dampening, "weight_decay": self.weight_decay,
                                "nesterov": self.nesterov, "first_step": self.steps == 0}
        if self.momentum:
            rule["momentum_buffer"] = self._state["momentum_buffer"]
        return rule

    def hyperparameters(self) -> dict[str, Any]:
        return {"lr": self.base_lr, "momentum": self.momentum, "nesterov": self.nesterov,
                "weight_decay": self.weight_decay, "dampening": self.dampening}

    def __repr__(self) -> str:
        return (f"SGD(lr={self.base_lr}, momentum={self.momentum}, nesterov={self.nesterov}, "
                f"weight_decay={self.weight_decay})")


class Adam(Optimizer):
    """Adam (torch.optim.Adam) or, with ``decoupled=True``, AdamW (torch.optim.AdamW).

    For each parameter ``p`` with gradient ``g`` at step ``t = 1, 2, ...``::

        if weight_decay:
            if decoupled: p = p * (1 - lr * weight_decay)      # AdamW
            else:         g = g + weight_decay * p             # Adam: L2 in the gradient
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g**2
        m_hat_scale = lr / (1 - beta1**t)
        denom = sqrt(v) / sqrt(1 - beta2**t) + eps             # eps outside the sqrt
        p = p - m_hat_scale * m / denom

    Parameters
    ----------
    params : list of Parameter, or a model
    lr : float > 0, default 1e-3
    betas : (float, float), each in [0, 1), default (0.9, 0.999)
    eps : float > 0, default 1e-8
    weight_decay : float >= 0, default 0
    decoupled : bool, default False
    schedule : Schedule, optional
    """

    _state_names = ("exp_avg", "exp_avg_sq")

    def __init__(self, params: Iterable[Parameter] | Layer, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, decoupled: bool = False, *,
                 schedule: Schedule | None = None) -> None:
        try:
            beta1, beta2 = betas
        except (TypeError, ValueError):
            raise ValueError(f"Adam: betas must be a pair (beta1, beta2); got {betas!r}") from None
        self.beta1 = _real(beta1, "Adam", "betas[0]", low=0, high=1)
        self.beta2 = _real(beta2, "Adam", "betas[1]", low=0, high=1)
        self.eps = _real(eps, "Adam", "eps", low=0, low_open=True)
        self.weight_decay = _real(weight_decay, "Adam", "weight_decay", low=0)
        if not isinstance(decoupled, bool):
            raise TypeError(f"Adam: decoupled must be a bool; got {decoupled!r}")
        self.decoupled = decoupled
        super().__init__(params, lr, schedule)

    def _update(self, p: np.ndarray, g: np.ndarray, state: dict[str, np.ndarray]) -> None:
        kernels.adam_step(p, g, state["exp_avg"], state["exp_avg_sq"], step=self.steps + 1, lr=self.lr,
                          beta1=self.beta1, beta2=self.beta2, eps=self.eps,
                          weight_decay=self.weight_decay, decoupled=self.decoupled)

    def _fused_rule(self) -> dict[str, Any] | None:
        if type(self)._update is not Adam._update:
            return None
        return {"kind": "adam", "lr": self.lr, "beta1": self.beta1, "beta2": self.beta2,
                "eps": self.eps, "weight_decay": self.weight_decay, "decoupled": self.decoupled,
                "step": self.steps + 1, "exp_avg": self._state["exp_avg"],
                "exp_avg_sq": self._state["exp_avg_sq"]}

    def hyperparameters(self) -> dict[str, Any]:
        return {"lr": self.base_lr, "betas": [self.beta1, self.beta2], "eps": self.eps,
                "weight_decay": self.weight_decay, "decoupled": self.decoupled}

    def __repr__(self) -> str:
        return (f"Adam(lr={self.base_lr}, betas=({self.beta1}, {self.beta2}), eps={self.eps}, "
                f"weight_decay={self.weight_decay}, decoupled={self.decoupled})")


OPTIMIZERS: dict[str, type[Optimizer]] = {"SGD": SGD, "Adam": Adam}
