"""Optimizers against a NumPy transcription of torch.optim's formulas; schedules; state."""

from __future__ import annotations

import math

import numpy as np
import pytest

import chainrule as cr
from chainrule import optim


# -- torch.optim.SGD / Adam / AdamW, transcribed (single tensor, float64) ------------


def torch_sgd(p, grads, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False):
    p, buf = p.copy(), None
    for g in grads:
        d_p = g + weight_decay * p if weight_decay else g.copy()
        if momentum:
            buf = d_p.copy() if buf is None else momentum * buf + (1 - dampening) * d_p
            d_p = d_p + momentum * buf if nesterov else buf
        p = p - lr * d_p
    return p


def torch_adam(p, grads, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decoupled=False):
    b1, b2 = betas
    p, m, v = p.copy(), np.zeros_like(p), np.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        if weight_decay and decoupled:
            p = p * (1 - lr * weight_decay)
        elif weight_decay:
            g = g + weight_decay * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        step_size = lr / (1 - b1 ** t)
        denom = np.sqrt(v) / math.sqrt(1 - b2 ** t) + eps
        p = p - step_size * m / denom
    return p


def _model():
    return cr.Sequential(cr.Dense(3, 4), cr.Tanh(), cr.Dense(4, 2), dtype="float64", seed=0)


def _run(model, make_opt, grads_per_step, reverse=False):
    params = model.parameters()
    opt = make_opt(params[::-1] if reverse else params)
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
    return model.flat_data.copy()


SGD_CASES = [
    dict(lr=0.1),
    dict(lr=0.05, momentum=0.9),
    dict(lr=0.05, momentum=0.9, dampening=0.3),
    dict(lr=0.05, momentum=0.8, nesterov=True),
    dict(lr=0.1, momentum=0.5, weight_decay=0.01),
    dict(lr=0.1, weight_decay=0.1),
]
ADAM_CASES = [
    dict(lr=1e-2),
    dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-6),
    dict(lr=1e-2, weight_decay=0.1),
    dict(lr=1e-2, weight_decay=0.1, decoupled=True),
]


@pytest.mark.parametrize("kw", SGD_CASES + ADAM_CASES, ids=lambda kw: str(kw))
@pytest.mark.parametrize("reverse", [False, True], ids=["flat", "per-param"])
def test_steps_match_pytorch_formulas(kw, reverse, rng):
    model = _model()
    start = [p.data.copy() for p in model.parameters()]
    grads = [[rng.normal(size=p.shape) for p in model.parameters()] for _ in range(5)]
    is_adam = kw in ADAM_CASES
    cls = cr.Adam if is_adam else cr.SGD
    _run(model, lambda ps: cls(ps, **kw), grads, reverse=reverse)
    for i, (p, p0) in enumerate(zip(model.parameters(), start)):
        gs = [g[i] for g in grads]
        expected = torch_adam(p0, gs, **kw) if is_adam else torch_sgd(p0, gs, **kw)
        np.testing.assert_allclose(p.data, expected, rtol=1e-12, atol=1e-14)


def test_flat_and_per_parameter_paths_agree_bitwise(rng):
    grads = [[rng.normal(size=p.shape) for p in _model().parameters()] for _ in range(4)]
    make = lambda ps: cr.Adam(ps, lr=1e-2, weight_decay=0.01)  # noqa: E731
    assert _run(_model(), make, grads).tobytes() == _run(_model(), make, grads, reverse=True).tobytes()


def test_flat_path_is_one_native_call_per_step(monkeypatch):
    model = _model()
    calls = []
    real = optim.kernels.sgd_step
    monkeypatch.setattr(optim.kernels, "sgd_step", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    opt = cr.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt.step()
    assert calls == [(model.flat_data.size,)]
    calls.clear()
    cr.SGD(model.parameters()[:2], lr=0.1).step()  # a subset: one call per parameter
    assert calls == [(3, 4), (4,)]


def test_optimizer_accepts_a_model_and_zero_grad():
    model = _model()
    opt = cr.SGD(model, lr=0.1)
    assert opt.params == model.parameters()
    model.flat_grad[:] = 1
    opt.zero_grad()
    assert not model.flat_grad.any()


def test_schedules():
    assert optim.ConstantLR().lr(0.1, 7) == 0.1
    assert [optim.StepLR(2, 0.5).lr(1.0, e) for e in range(5)] == [1, 1, 0.5, 0.5, 0.25]
    assert optim.ExponentialLR(0.9).lr(1.0, 3) == pytest.approx(0.729)
    assert optim.InverseScalingLR(0.5).lr(1.0, 3) == pytest.approx(0.5)
    cos = optim.CosineLR(10, eta_min=0.1)
    assert cos.lr(1.0, 0) == pytest.approx(1.0) and cos.lr(1.0, 5) == pytest.approx(0.55)
    assert cos.lr(1.0, 10) == pytest.approx(0.1) and cos.lr(1.0, 20) == pytest.approx(0.1)
    opt = cr.SGD(_model().parameters(), lr=0.4, schedule=optim.StepLR(1, 0.5))
    opt.set_epoch(2)
    assert opt.lr == pytest.approx(0.1) and opt.base_lr == 0.4


@pytest.mark.parametrize("make, message", [
    (lambda ps: cr.SGD(ps, lr=0), r"SGD: lr must be > 0; got 0"),
    (lambda ps: cr.SGD(ps, lr=-0.1), r"SGD: lr must be > 0; got -0\.1"),
    (lambda ps: cr.SGD(ps, lr=float("nan")), r"SGD: lr must be > 0; got nan"),
    (lambda ps: cr.SGD(ps, lr=0.1, momentum=1.0), r"SGD: momentum must be in \[0, 1\); got 1\.0"),
    (lambda ps: cr.SGD(ps, lr=0.1, momentum=-0.5), r"SGD: momentum must be in \[0, 1\); got -0\.5"),
    (lambda ps: cr.SGD(ps, lr=0.1, weight_decay=-1), r"SGD: weight_decay must be >= 0; got -1"),
    (lambda ps: cr.SGD(ps, lr=0.1, nesterov=True), r"SGD: nesterov=True needs momentum > 0 and dampening == 0"),
    (lambda ps: cr.Adam(ps, lr=-1e-3), r"Adam: lr must be > 0; got -0\.001"),
    (lambda ps: cr.Adam(ps, betas=(0.9, 1.0)), r"Adam: betas\[1\] must be in \[0, 1\); got 1\.0"),
    (lambda ps: cr.Adam(ps, betas=0.9), r"Adam: betas must be a pair \(beta1, beta2\); got 0\.9"),
    (lambda ps: cr.Adam(ps, eps=0), r"Adam: eps must be > 0; got 0"),
    (lambda ps: cr.SGD([], lr=0.1), r"SGD: params is empty; pass model\.parameters\(\)"),
    (lambda ps: optim.StepLR(0), r"StepLR: step_size must be a positive integer; got 0"),
    (lambda ps: optim.ExponentialLR(1.5), r"ExponentialLR: gamma must be in \(0, 1\]; got 1\.5"),
])
def test_bad_hyperparameters_are_rejected_with_the_value(make, message):
    with pytest.raises(ValueError, match=message):
        make(_model().parameters())


def test_params_must_be_parameters():
    with pytest.raises(TypeError, match=r"SGD: params\[0\] must be a Parameter; got ndarray"):
        cr.SGD([np.zeros(3)], lr=0.1)


@pytest.mark.parametrize("make", [
    lambda ps: cr.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, schedule=optim.StepLR(3, 0.5)),
    lambda ps: cr.Adam(ps, lr=1e-2, decoupled=True, weight_decay=0.1, schedule=optim.CosineLR(5)),
], ids=["sgd", "adamw"])
def test_state_dict_round_trip_resumes_exactly(make, rng):
    grads = [[rng.normal(size=p.shape) for p in _model().parameters()] for _ in range(6)]
    model = _model()
    opt = make(model.parameters())
    for step, gs in enumerate(grads):
        if step == 3:
            sd = opt.state_dict()
            weights = model.flat_data.copy()
        opt.set_epoch(step)
        for p, g in zip(model.parameters(), gs):
            p.grad = g
        opt.step()
    resumed = _model()
    resumed.flat_data[:] = weights
    opt2 = cr.SGD(resumed.parameters(), lr=1.0)  # replaced wholesale by the state
    if isinstance(opt, cr.Adam):
        opt2 = cr.Adam(resumed.parameters())
    opt2.load_state_dict(sd)
    assert opt2.steps == 3 and opt2.hyperparameters() == opt.hyperparameters()
    for step, gs in enumerate(grads[3:], start=3):
        opt2.set_epoch(step)
        for p, g in zip(resumed.parameters(), gs):
            p.grad = g
        opt2.step()
    assert resumed.flat_data.tobytes() == model.flat_data.tobytes()


def test_load_state_dict_rejects_mismatches():
    model = _model()
    sgd = cr.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sd = sgd.state_dict()
    with pytest.raises(ValueError, match=r"Adam\.load_state_dict: expected a Adam state; got 'SGD'"):
        cr.Adam(model.parameters()).load_state_dict(sd)
    bad = {**sd, "state": {**sd["state"], "momentum_buffer.0": np.zeros((2, 2))}}
    with pytest.raises(ValueError, match=r"SGD\.load_state_dict: buffer momentum_buffer\.0 must be finite floats of shape \(3, 4\)"):
        sgd.load_state_dict(bad)
    with pytest.raises(ValueError, match=r"SGD\.load_state_dict: state buffers must be"):
        sgd.load_state_dict({**sd, "state": {}})
    with pytest.raises(ValueError, match=r"SGD\.load_state_dict: steps must be an integer >= 0; got -1"):
        sgd.load_state_dict({**sd, "steps": -1})
