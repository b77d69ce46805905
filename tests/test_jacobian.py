"""Backprop made visible: Jacobians by hand, by chain, by differences; gradcheck."""

from __future__ import annotations

import numpy as np
import pytest

import chainrule as cr
from chainrule import activations
from chainrule.jacobian import chain_product


def _small_net():
    model = cr.Sequential(cr.Dense(3, 4), cr.Tanh(), cr.Dense(4, 2), cr.Softmax(), dtype="float64", seed=0)
    rng = np.random.default_rng(1)
    for p in model.parameters():
        p.data = rng.normal(size=p.shape)
    return model


def test_jacobian_of_a_small_network_matches_one_assembled_by_hand():
    model = _small_net()
    W1, b1, W2, b2 = (p.data for p in model.parameters())
    x = np.array([0.3, -0.7, 1.1])
    h = np.tanh(x @ W1 + b1)
    z = h @ W2 + b2
    s = np.exp(z - z.max())
    s /= s.sum()
    # numerator layout: J = J_softmax . J_dense2 . J_tanh . J_dense1
    by_hand = (np.diag(s) - np.outer(s, s)) @ W2.T @ np.diag(1 - h ** 2) @ W1.T
    J = cr.jacobian(model, x)
    assert J.shape == (2, 3)
    np.testing.assert_allclose(J, by_hand, rtol=1e-12, atol=1e-15)
    # the lecture's layout, rows indexed by x: du1/dx . du2/du1 . ...
    lecture = W1 @ np.diag(1 - h ** 2) @ W2 @ (np.diag(s) - np.outer(s, s))
    np.testing.assert_allclose(cr.jacobian(model, x, layout="lecture"), lecture, rtol=1e-12, atol=1e-15)


def test_batch_jacobian_is_per_sample_and_matches_finite_differences(rng):
    model = cr.Sequential(cr.Dense(3, 5), cr.Sigmoid(), cr.Dense(5, 4), cr.LogSoftmax(), dtype="float64", seed=2)
    X = rng.normal(size=(6, 3))
    J = cr.jacobian(model, X)
    assert J.shape == (6, 4, 3)
    eps = 1e-6
    for i in range(6):
        np.testing.assert_allclose(J[i], cr.jacobian(model, X[i]), rtol=1e-13, atol=1e-15)
        num = np.empty((4, 3))
        for j in range(3):
            d = np.zeros(3)
            d[j] = eps
            num[:, j] = (model(X[i:i + 1] + d)[0] - model(X[i:i + 1] - d)[0]) / (2 * eps)
        np.testing.assert_allclose(J[i], num, rtol=1e-6, atol=1e-9)


def test_jacobian_leaves_parameter_gradients_alone():
    model = _small_net()
    model.flat_grad[:] = 3.0
    cr.jacobian(model, np.ones((2, 3)))
    assert np.all(model.flat_grad == 3.0)


@pytest.mark.parametrize("layout", ["numerator", "lecture"])
def test_chain_of_local_jacobians(layout):
    model = _small_net()
    x = np.array([0.5, 0.1, -0.4])
    chain = cr.jacobian_chain(model, x, layout=layout)
    assert [f.index for f in chain] == [0, 1, 2, 3]
    W1 = model[0].weight.data
    # A Dense factor is W in the lecture's layout, W^T in the numerator layout.
    np.testing.assert_array_equal(chain[0].jacobian, W1 if layout == "lecture" else W1.T)
    np.testing.assert_array_equal(chain[0].x, x)
    u1 = x @ W1 + model[0].bias.data
    tanh_J = activations.local_jacobian("tanh", u1)
    np.testing.assert_allclose(chain[1].jacobian, tanh_J, rtol=1e-12, atol=1e-15)
    z = chain[3].x
    np.testing.assert_allclose(chain[3].jacobian, activations.local_jacobian("softmax", z).T
                               if layout == "lecture" else activations.local_jacobian("softmax", z), atol=1e-15)
    np.testing.assert_allclose(chain_product(chain, layout=layout), cr.jacobian(model, x, layout=layout),
                               rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", list(activations.ACTIVATIONS))
def test_layer_jacobian_matches_the_closed_form(name, rng):
    layer = {"identity": cr.Identity, "sigmoid": cr.Sigmoid, "tanh": cr.Tanh, "relu": cr.ReLU,
             "leaky_relu": cr.LeakyReLU, "softmax": cr.Softmax, "log_softmax": cr.LogSoftmax}[name](dtype="float64")
    x = rng.normal(size=5)
    np.testing.assert_allclose(layer.jacobian(x), activations.local_jacobian(name, x), rtol=1e-12, atol=1e-15)


def test_jacobian_errors():
    with pytest.raises(ValueError, match=r"jacobian: layout must be 'numerator' or 'lecture'; got 'row'"):
        cr.jacobian(_small_net(), np.ones(3), layout="row")
    with pytest.raises(ValueError, match=r"jacobian: x has 2 features per sample; the model expects d_in = 3 \(x\.shape is \(1, 2\)\)"):
        cr.jacobian(_small_net(), np.ones(2))
    with pytest.raises(ValueError, match=r"jacobian_chain: x must be one sample of shape \(n_in,\); got shape \(2, 3\)"):
        cr.jacobian_chain(_small_net(), np.ones((2, 3)))


HIDDEN = [cr.Sigmoid, cr.Tanh, cr.ReLU, lambda: cr.LeakyReLU(0.05), cr.Softmax, cr.LogSoftmax, cr.Identity]


@pytest.mark.parametrize("act", HIDDEN, ids=["sigmoid", "tanh", "relu", "leaky_relu", "softmax", "log_softmax", "identity"])
@pytest.mark.parametrize("loss, d_out", [(cr.CrossEntropy(), 3), (cr.BinaryCrossEntropy(), 1), (cr.MSE(), 2)],
                         ids=["ce", "bce", "mse"])
def test_gradcheck_on_random_networks_of_every_activation(act, loss, d_out, rng):
    model = cr.Sequential(cr.Dense(4, 6), act(), cr.Dense(6, 5), act(), cr.Dense(5, d_out), seed=int(rng.integers(100)))
    for layer in model:  # random biases keep pre-activations off ReLU's kink at exactly 0
        if isinstance(layer, cr.Dense):
            layer.bias.data = rng.normal(size=layer.bias.shape)
    X = rng.normal(size=(7, 4))
    if isinstance(loss, cr.CrossEntropy):
        y = rng.integers(0, 3, size=7)
    elif isinstance(loss, cr.BinaryCrossEntropy):
        y = rng.integers(0, 2, size=7)
    else:
        y = rng.normal(size=(7, 2))
    result = cr.gradcheck(model, loss, X, y)
    assert result.n_checked == sum(p.size for p in model.parameters())
    assert result.max_rel_error < 1e-5, result
    assert model.dtype == np.float32  # the check ran on a float64 copy


def test_gradcheck_finds_a_wrong_gradient(monkeypatch, rng):
    model = cr.Sequential(cr.Dense(3, 4), cr.Tanh(), cr.Dense(4, 1), seed=0)
    dense = cr.layers.Dense
    real = dense._backward

    def wrong(self, gz, need_gx=True, need_param_grad=True):
        gx = real(self, gz, need_gx, need_param_grad)
        if self.d_out == 1 and need_param_grad:
            self.bias.grad *= 1.5
        return gx

    monkeypatch.setattr(dense, "_backward", wrong)
    result = cr.gradcheck(model, cr.BinaryCrossEntropy(), rng.normal(size=(5, 3)), rng.integers(0, 2, 5))
    assert result.parameter == "2.bias" and result.index == (0,)
    assert result.max_rel_error == pytest.approx(1 / 3, rel=1e-4)
    assert result.analytic == pytest.approx(1.5 * result.numeric, rel=1e-6)
