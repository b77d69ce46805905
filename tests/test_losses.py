"""Losses: values against the formulas, gradients against central differences, errors."""

from __future__ import annotations

import numpy as np
import pytest

import chainrule as cr


def _fd_grad(loss, pred, target, eps=1e-6, **kw):
    num = np.zeros_like(pred)
    for k in range(pred.size):
        orig = pred.flat[k]
        pred.flat[k] = orig + eps
        up = loss.forward(pred, target, **kw)
        pred.flat[k] = orig - eps
        down = loss.forward(pred, target, **kw)
        pred.flat[k] = orig
        num.flat[k] = (up - down) / (2 * eps)
    return num


def _sigmoid(z):
    return 1 / (1 + np.exp(-z))


@pytest.mark.parametrize("shape", [(6,), (6, 1), (6, 3)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_bce_from_logits_is_the_lecture_nll(shape, reduction, rng):
    z = rng.normal(size=shape) * 3
    y = (rng.uniform(size=shape) > 0.5).astype(np.float64)
    loss = cr.BinaryCrossEntropy(reduction=reduction)
    f = _sigmoid(z)
    nll = -(y * np.log(f) + (1 - y) * np.log(1 - f))
    expected = nll.mean() if reduction == "mean" else nll.sum()
    assert loss.forward(z, y) == pytest.approx(expected, rel=1e-12)
    np.testing.assert_allclose(loss.backward(), _fd_grad(loss, z, y), rtol=1e-6, atol=1e-9)


def test_bce_accepts_n_or_n1_targets_and_is_stable_for_huge_logits():
    loss = cr.BinaryCrossEntropy()
    z = np.array([[1000.0], [-1000.0], [1000.0], [-1000.0]])
    y = np.array([1, 0, 0, 1])
    value = loss.forward(z, y)
    assert value == pytest.approx(500.0)  # two perfect, two off by 1000 each, mean over 4
    g = loss.backward()
    assert g.shape == (4, 1) and np.all(np.isfinite(g))
    np.testing.assert_allclose(g[:, 0], [0, 0, 0.25, -0.25])


def test_bce_on_probabilities_matches_from_logits(rng):
    z = rng.normal(size=(8, 1))
    y = rng.integers(0, 2, size=8)
    from_logits, on_proba = cr.BinaryCrossEntropy(), cr.BinaryCrossEntropy(from_logits=False)
    f = _sigmoid(z)
    assert on_proba.forward(f, y) == pytest.approx(from_logits.forward(z, y), rel=1e-10)
    # chain rule through the sigmoid: dL/dz = dL/df * f (1 - f)
    np.testing.assert_allclose(on_proba.backward() * f * (1 - f), from_logits.backward(), rtol=1e-8)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cross_entropy_labels_and_one_hot(reduction, rng):
    z = rng.normal(size=(7, 4)) * 2
    labels = rng.integers(0, 4, size=7)
    loss = cr.CrossEntropy(reduction=reduction)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    terms = -logp[np.arange(7), labels]
    expected = terms.mean() if reduction == "mean" else terms.sum()
    assert loss.forward(z, labels) == pytest.approx(expected, rel=1e-12)
    g = loss.backward()
    np.testing.assert_allclose(g, _fd_grad(loss, z, labels), rtol=1e-6, atol=1e-9)
    onehot = np.eye(4)[labels]
    assert loss.forward(z, onehot) == pytest.approx(expected, rel=1e-12)
    np.testing.assert_allclose(loss.backward(), g, rtol=1e-12, atol=1e-15)


def test_cross_entropy_sample_weights_divide_by_their_sum(rng):
    z = rng.normal(size=(5, 3))
    labels = rng.integers(0, 3, size=5)
    w = rng.uniform(0.5, 2, size=5)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    expected = np.sum(-w * logp[np.arange(5), labels]) / w.sum()
    assert cr.CrossEntropy().forward(z, labels, sample_weight=w) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_mse_is_mean_over_elements_without_half(reduction, rng):
    p, t = rng.normal(size=(6, 2)), rng.normal(size=(6, 2))
    loss = cr.MSE(reduction=reduction)
    sq = (p - t) ** 2
    assert loss.forward(p, t) == pytest.approx(sq.mean() if reduction == "mean" else sq.sum(), rel=1e-12)
    scale = 1 / p.size if reduction == "mean" else 1.0
    np.testing.assert_allclose(loss.backward(), 2 * (p - t) * scale, rtol=1e-12)
    np.testing.assert_allclose(loss.backward(), _fd_grad(loss, p, t), rtol=1e-6, atol=1e-9)
    w = rng.uniform(0.5, 2, size=6)
    weighted = np.sum(w[:, None] * sq) / (w.sum() * 2 if reduction == "mean" else 1)
    assert loss.forward(p, t, sample_weight=w) == pytest.approx(weighted, rel=1e-12)
    np.testing.assert_allclose(loss.backward(), _fd_grad(loss, p, t, sample_weight=w), rtol=1e-6, atol=1e-9)


def test_float32_losses_run_natively(rng):
    z = rng.normal(size=(16, 3)).astype(np.float32)
    loss = cr.CrossEntropy()
    value = loss.forward(z, rng.integers(0, 3, size=16))
    assert isinstance(value, float) and loss.backward().dtype == np.float32


def test_loss_errors():
    with pytest.raises(ValueError, match=r"CrossEntropy: reduction must be 'mean' or 'sum'; got 'avg'"):
        cr.CrossEntropy(reduction="avg")
    with pytest.raises(RuntimeError, match=r"MSE\.backward: call forward\(pred, target\) first"):
        cr.MSE().backward()
    z = np.zeros((3, 3))
    with pytest.raises(ValueError, match=r"CrossEntropy\.forward: labels must be in \[0, 3\) for 3 outputs; got 5 at index 1"):
        cr.CrossEntropy().forward(z, [0, 5, 1])
    with pytest.raises(ValueError, match=r"CrossEntropy\.forward: labels must be in \[0, 3\) for 3 outputs; got -1 at index 2"):
        cr.CrossEntropy().forward(z, [0, 1, -1])
    with pytest.raises(ValueError, match=r"CrossEntropy\.forward: labels must be integers in \[0, 3\); got non-integer values"):
        cr.CrossEntropy().forward(z, [0.5, 1, 1])
    with pytest.raises(ValueError, match=r"CrossEntropy\.forward: target has 2 samples but pred has 3"):
        cr.CrossEntropy().forward(z, [0, 1])
    with pytest.raises(ValueError, match=r"BinaryCrossEntropy\.forward: target must be in \[0, 1\]"):
        cr.BinaryCrossEntropy().forward(np.zeros((2, 1)), [0, 2])
    with pytest.raises(ValueError, match=r"MSE\.forward: target\.shape is \(3, 2\); expected \(3, 1\) like pred"):
        cr.MSE().forward(np.zeros((3, 1)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match=r"MSE\.forward: sample_weight\.shape is \(2,\); expected \(3,\)"):
        cr.MSE().forward(np.zeros((3, 1)), np.zeros((3, 1)), sample_weight=[1, 1])
    with pytest.raises(ValueError, match=r"losses\.get: loss must be a Loss or one of"):
        cr.losses.get("hinge")
