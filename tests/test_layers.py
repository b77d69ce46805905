"""Layers: shapes, layout, finite-difference backward, fusion, flat buffers, seeds, errors."""

from __future__ import annotations

import numpy as np
import pytest

import chainrule as cr
from chainrule import layers as L

F64 = np.float64


def _fd_check(layer, x, gy, eps=1e-6):
    """Backward of ``sum(gy * layer(x))`` against central differences, in float64."""
    layer.zero_grad()
    layer.forward(x)
    gx = layer.backward(gy)

    def f():
        return float(np.sum(gy * layer.forward(x)))

    num_gx = np.zeros_like(x)
    for k in range(x.size):
        orig = x.flat[k]
        x.flat[k] = orig + eps
        up = f()
        x.flat[k] = orig - eps
        down = f()
        x.flat[k] = orig
        num_gx.flat[k] = (up - down) / (2 * eps)
    np.testing.assert_allclose(gx, num_gx, rtol=1e-6, atol=1e-8)
    for p in layer.parameters():
        num = np.zeros_like(p.data)
        flat = p.data.reshape(-1)
        for k in range(flat.size):
            orig = flat[k]
            flat[k] = orig + eps
            up = f()
            flat[k] = orig - eps
            down = f()
            flat[k] = orig
            num.flat[k] = (up - down) / (2 * eps)
        np.testing.assert_allclose(p.grad, num, rtol=1e-6, atol=1e-8, err_msg=p.name)


LAYERS = {
    "Dense": lambda: cr.Dense(3, 4, seed=1, dtype="float64"),
    "Dense-nobias": lambda: cr.Dense(3, 4, bias=False, seed=2, dtype="float64"),
    "Sigmoid": lambda: cr.Sigmoid(dtype="float64"),
    "Tanh": lambda: cr.Tanh(dtype="float64"),
    "ReLU": lambda: cr.ReLU(dtype="float64"),
    "LeakyReLU": lambda: cr.LeakyReLU(0.1, dtype="float64"),
    "Softmax": lambda: cr.Softmax(dtype="float64"),
    "LogSoftmax": lambda: cr.LogSoftmax(dtype="float64"),
    "Identity": lambda: cr.Identity(dtype="float64"),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_every_layer_backward_matches_central_differences(name, rng):
    layer = LAYERS[name]()
    x = rng.uniform(-2, 2, size=(5, 3))
    x[np.abs(x) < 1e-2] = 0.5  # keep ReLU's kink out of the finite-difference stencil
    d_out = layer.output_dim(3)
    gy = rng.normal(size=(5, d_out))
    _fd_check(layer, x, gy)


@pytest.mark.parametrize("act", ["Sigmoid", "Tanh", "ReLU", "LeakyReLU", "Softmax", "LogSoftmax", "Identity"])
def test_fused_sequential_backward_matches_central_differences(act, rng):
    model = cr.Sequential(cr.Dense(3, 4), LAYERS[act](), cr.Dense(4, 2), dtype="float64", seed=3)
    x = rng.uniform(-2, 2, size=(6, 3))
    _fd_check(model, x, rng.normal(size=(6, 2)))


def test_dense_weight_layout_is_d_in_by_d_out(rng):
    layer = cr.Dense(3, 5, seed=0, dtype="float64")
    assert layer.weight.shape == (3, 5) and layer.bias.shape == (5,)
    layer.bias.data = rng.normal(size=5)
    x = rng.normal(size=(4, 3))
    np.testing.assert_allclose(layer(x), x @ layer.weight.data + layer.bias.data, rtol=1e-13)
    assert "transpose" in cr.Dense.__doc__ and "scikit-learn" in cr.Dense.__doc__


def test_parameters_in_layer_order_and_views_of_flat_buffers():
    model = cr.Sequential(cr.Dense(2, 3), cr.Tanh(), cr.Dense(3, 1), seed=0)
    params = model.parameters()
    assert [p.shape for p in params] == [(2, 3), (3,), (3, 1), (1,)]
    assert [n for n, _ in model.named_parameters()] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    offset = 0
    for p in params:
        assert np.shares_memory(p.data, model.flat_data) and np.shares_memory(p.grad, model.flat_grad)
        np.testing.assert_array_equal(model.flat_data[offset:offset + p.size], p.data.reshape(-1))
        offset += p.size
    assert offset == model.flat_data.size == 13
    # assignment copies into the view instead of rebinding
    params[0].data = np.ones((2, 3))
    assert np.all(model.flat_data[:6] == 1) and np.shares_memory(params[0].data, model.flat_data)
    with pytest.raises(ValueError, match=r"Parameter\.data: shape must stay \(2, 3\); got \(3, 2\)"):
        params[0].data = np.ones((3, 2))


def test_dense_followed_by_activation_is_one_fused_kernel_call(monkeypatch, rng):
    calls = []
    for name in ("dense_forward", "activation_forward", "activation_vjp", "dense_vjp"):
        real = getattr(L.kernels, name)

        def spy(*a, _real=real, _name=name, **kw):
            calls.append((_name, kw.get("activation", a[0] if _name.startswith("activation") else None)))
            return _real(*a, **kw)

        monkeypatch.setattr(L.kernels, name, spy)
    model = cr.Sequential(cr.Dense(2, 4), cr.Tanh(), cr.Dense(4, 3), cr.Softmax(), seed=0)
    x = rng.normal(size=(5, 2)).astype(np.float32)
    model(x)
    assert calls == [("dense_forward", "tanh"), ("dense_forward", "softmax")]
    calls.clear()
    model.backward(np.ones((5, 3), np.float32))
    assert [c[0] for c in calls] == ["activation_vjp", "dense_vjp", "activation_vjp", "dense_vjp"]


def test_fused_equals_layer_by_layer(rng):
    dense, act = cr.Dense(3, 4, seed=0), cr.Sigmoid()
    model = cr.Sequential(dense, act)
    x = rng.normal(size=(7, 3))
    fused = model(x)
    np.testing.assert_array_equal(fused, act(dense(x)))


def test_public_forward_returns_a_copy_the_caller_owns(rng):
    model = cr.Sequential(cr.Dense(2, 3), cr.ReLU(), seed=0)
    a = model(rng.normal(size=(4, 2)))
    a_before = a.copy()
    model(rng.normal(size=(4, 2)))
    np.testing.assert_array_equal(a, a_before)


def test_backward_adds_into_grad_and_zero_grad_clears(rng):
    model = cr.Sequential(cr.Dense(2, 3), cr.Tanh(), cr.Dense(3, 1), dtype="float64", seed=0)
    x, gy = rng.normal(size=(4, 2)), rng.normal(size=(4, 1))
    model.zero_grad()
    model(x)
    gx1 = model.backward(gy)
    g1 = model.flat_grad.copy()
    gx2 = model.backward(gy)
    np.testing.assert_allclose(model.flat_grad, 2 * g1, rtol=1e-14)
    np.testing.assert_array_equal(gx1, gx2)  # gx is not accumulated
    assert gx1.shape == (4, 2)
    model.zero_grad()
    assert not model.flat_grad.any()


def test_same_seed_bit_identical_weights_and_generators():
    def make(seed):
        return cr.Sequential(cr.Dense(2, 16), cr.ReLU(), cr.Dense(16, 16), cr.Tanh(), cr.Dense(16, 1), seed=seed)

    a, b, c = make(7), make(7), make(8)
    assert a.flat_data.tobytes() == b.flat_data.tobytes()
    assert a.flat_data.tobytes() != c.flat_data.tobytes()
    g1, g2 = make(np.random.default_rng(5)), make(np.random.default_rng(5))
    assert g1.flat_data.tobytes() == g2.flat_data.tobytes()
    assert cr.Dense(3, 2, seed=4).weight.data.tobytes() == cr.Dense(3, 2, seed=4).weight.data.tobytes()


def test_auto_init_is_he_before_relu_and_glorot_otherwise():
    model = cr.Sequential(cr.Dense(400, 300), cr.ReLU(), cr.Dense(300, 300), cr.Tanh(), seed=0)
    w_relu, w_tanh = model[0].weight.data, model[2].weight.data
    assert abs(w_relu.std() - np.sqrt(2 / 400)) < 0.02 * np.sqrt(2 / 400)
    limit = np.sqrt(6 / 600)
    assert np.abs(w_tanh).max() <= limit and abs(w_tanh.std() - limit / np.sqrt(3)) < 0.02 * limit
    assert not model[0].bias.data.any()
    z = cr.Dense(3, 2, init="zeros")
    assert not z.weight.data.any()
    n = cr.Dense(1000, 50, init="normal", seed=0)
    assert abs(n.weight.data.std() - np.sqrt(1 / 1000)) < 0.05 * np.sqrt(1 / 1000)


def test_dtypes_default_float32_and_passed_down():
    m32 = cr.Sequential(cr.Dense(2, 3), cr.Tanh())
    assert m32.dtype == np.float32 and m32.flat_data.dtype == np.float32
    m64 = cr.Sequential(cr.Dense(2, 3), cr.Tanh(), dtype="float64")
    assert all(p.dtype == np.float64 for p in m64.parameters())
    assert m64(np.ones((1, 2), np.float32)).dtype == np.float64
    explicit = cr.Sequential(cr.Dense(2, 3, dtype="float64"), cr.Tanh())
    assert explicit.dtype == np.float64
    with pytest.raises(ValueError, match=r"Sequential: layers have different dtypes \['float32', 'float64'\]"):
        cr.Sequential(cr.Dense(2, 3, dtype="float64"), cr.Dense(3, 1, dtype="float32"))
    with pytest.raises(ValueError, match=r"Dense: dtype must be 'float32' or 'float64'; got 'float16'"):
        cr.Dense(2, 3, dtype="float16")


def test_copy_keeps_weights_and_casts():
    model = cr.Sequential(cr.Dense(2, 3), cr.LeakyReLU(0.2), cr.Dense(3, 2), seed=0)
    twin = model.copy(dtype="float64")
    assert twin.dtype == np.float64 and twin[1].negative_slope == 0.2
    np.testing.assert_array_equal(twin.flat_data, model.flat_data.astype(np.float64))
    assert not np.shares_memory(twin.flat_data, model.flat_data)


def test_summary_lists_layers_shapes_and_counts():
    text = cr.Sequential(cr.Dense(2, 8), cr.Tanh(), cr.Dense(8, 1)).summary()
    assert "Dense(2, 8)" in text and "(n, 8)" in text and "33 parameters" in text and "+ Tanh()" in text


def test_empty_batch_gives_empty_output():
    model = cr.Sequential(cr.Dense(2, 3), cr.Tanh())
    assert model(np.zeros((0, 2))).shape == (0, 3)


def test_layer_errors():
    model = cr.Sequential(cr.Dense(2, 3), cr.Tanh())
    with pytest.raises(ValueError, match=r"Sequential\.forward: x has 3 features per sample; the model expects d_in = 2 \(x\.shape is \(4, 3\)\)"):
        model(np.ones((4, 3)))
    with pytest.raises(ValueError, match=r"Sequential\.forward: x must be 2-D of shape \(n, 2\); got shape \(2,\)"):
        model(np.ones(2))
    with pytest.raises(TypeError, match=r"Sequential\.forward: x must hold numbers; got dtype <U1"):
        model(np.array([["a", "b"]]))
    with pytest.raises(RuntimeError, match=r"Dense\.backward: call forward\(x\) with a non-empty batch first"):
        cr.Dense(2, 3).backward(np.ones((1, 3)))
    model(np.ones((4, 2)))
    with pytest.raises(ValueError, match=r"Sequential\.backward: gy\.shape is \(4, 2\); expected \(4, 3\)"):
        model.backward(np.ones((4, 2)))
    with pytest.raises(ValueError, match=r"Dense: d_in must be a positive integer; got 0"):
        cr.Dense(0, 3)
    with pytest.raises(ValueError, match=r"Dense: d_out must be a positive integer; got 2\.5"):
        cr.Dense(2, 2.5)
    with pytest.raises(ValueError, match=r"Dense: init must be one of auto, glorot_uniform, he, normal, zeros; got 'xavier'"):
        cr.Dense(2, 3, init="xavier")
    with pytest.raises(ValueError, match=r"LeakyReLU: negative_slope must be a finite number >= 0; got -0\.1"):
        cr.LeakyReLU(-0.1)
    with pytest.raises(ValueError, match=r"Sequential: layer 2 \(Dense\(4, 1\)\) expects d_in = 4 inputs but the layers before it output 3"):
        cr.Sequential(cr.Dense(2, 3), cr.ReLU(), cr.Dense(4, 1))
    with pytest.raises(ValueError, match=r"Sequential: needs at least one layer; got none"):
        cr.Sequential()
    with pytest.raises(TypeError, match=r"Sequential: layer 0 must be a Dense or activation layer; got a nested Sequential"):
        cr.Sequential(cr.Sequential(cr.Tanh()))
    relu = cr.ReLU()
    with pytest.raises(ValueError, match=r"Sequential: layer 2 is the same object as layer 0"):
        cr.Sequential(relu, cr.Dense(2, 2), relu)
    with pytest.raises(TypeError, match=r"Dense: seed must be None, an int or a numpy\.random\.Generator; got str"):
        cr.Dense(2, 3, seed="0")


def test_layer_from_config_rejects_bad_records():
    with pytest.raises(ValueError, match=r"layer_from_config: unknown layer type 'Conv2D'"):
        L.layer_from_config({"type": "Conv2D"})
    with pytest.raises(ValueError, match=r"layer_from_config: Tanh takes no settings; got \['x'\]"):
        L.layer_from_config({"type": "Tanh", "x": 1})
    model = cr.Sequential(cr.Dense(2, 3, bias=False), cr.LeakyReLU(0.3), cr.Dense(3, 2), cr.LogSoftmax())
    again = L.layer_from_config(model.config())
    assert again.config() == model.config()
