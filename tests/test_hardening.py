"""Hostile input, concurrency and leaks across the whole API (issue: hardening)."""

import os
import subprocess
import sys
import textwrap
import threading
import tracemalloc

import numpy as np
import pytest

import chainrule as cr
import chainrule.kernels as K
from conftest import bits_equal


def _run_python(code, timeout=300):
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=timeout)
    return proc


def _train(seed, X, y, epochs=3):
    model = cr.Sequential(cr.Dense(20, 32), cr.ReLU(), cr.Dense(32, 3), seed=seed)
    opt = cr.Adam(model.parameters(), lr=0.01)
    cr.fit(model, X, y, loss=cr.CrossEntropy(), optimizer=opt, epochs=epochs, batch_size=16,
           seed=seed, progress=False)
    return model.flat_data.copy()


def test_separate_models_train_in_threads_bit_identically_to_serial():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((400, 20)).astype(np.float32)
    y = rng.integers(0, 3, 400)
    serial = [_train(s, X, y) for s in range(4)]
    results = [None] * 4
    errors = []

    def work(s):
        try:
            results[s] = _train(s, X, y)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for s in range(4):
        assert bits_equal(results[s], serial[s])


def test_kernels_from_many_threads_match_serial():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((200, 300)).astype(np.float32)
    b = rng.standard_normal((300, 150)).astype(np.float32)
    expected = K.dense_forward(a, b, activation="tanh")
    outs = [None] * 6

    def work(i):
        for _ in range(20):
            outs[i] = K.dense_forward(a, b, activation="tanh")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(bits_equal(o, expected) for o in outs)


def test_one_plan_from_two_threads_serialises_instead_of_corrupting():
    from chainrule import _core
    rng = np.random.default_rng(2)
    plan = _core.MLPPlan([30, 64, 5], ["relu", "identity"], "float64")
    P = rng.standard_normal(plan.n_params) * 0.1
    X = rng.standard_normal((256, 30))
    y = rng.integers(0, 5, 256)
    G0 = np.zeros_like(P)
    expected = plan.train_step(P, G0, X, y, loss="softmax_cross_entropy")
    grads = [np.zeros_like(P) for _ in range(4)]
    values = [None] * 4

    def work(i):
        for _ in range(30):
            values[i] = plan.train_step(P, grads[i], X, y, loss="softmax_cross_entropy")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(v == expected for v in values)
    assert all(bits_equal(g, G0) for g in grads)


def _all_kernel_calls(rng):
    x = rng.standard_normal((33, 17)).astype(np.float32)
    w = rng.standard_normal((17, 9)).astype(np.float32)
    b = np.zeros(9, np.float32)
    z = K.dense_forward(x, w, b, activation="relu")
    labels = rng.integers(0, 9, 33)
    p = np.zeros(100, np.float32)
    g = np.ones(100, np.float32)
    m, v, buf = np.zeros_like(p), np.zeros_like(p), np.zeros_like(p)

    def calls():
        K.gemm(x, w)
        K.dense_forward(x, w, b, activation="tanh")
        K.dense_vjp(x, w, z)
        for name in K.ACTIVATIONS:
            y = K.activation_forward(name, z)
            K.activation_vjp(name, y, z)
        K.softmax_cross_entropy(z, labels)
        K.soft_cross_entropy(z, np.full_like(z, 1 / 9))
        K.binary_cross_entropy(z, np.zeros_like(z))
        K.sgd_step(p, g, buf, lr=1e-6, momentum=0.9)
        K.adam_step(p, g, m, v, step=1, lr=1e-6)
        K.column_sums(z)
        try:
            K.gemm(x, x)  # a failing call must not leak either
        except ValueError:
            pass
    return calls


def test_repeated_kernel_calls_do_not_leak():
    calls = _all_kernel_calls(np.random.default_rng(3))
    for _ in range(200):
        calls()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for _ in range(2000):
            calls()
        grown = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert grown < 64 * 1024, f"{grown} bytes still allocated after 2000 rounds"


def _rss_kib():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    pytest.skip("no /proc/self/status")


def test_rss_does_not_grow_over_many_calls_and_a_long_training_loop():
    calls = _all_kernel_calls(np.random.default_rng(4))
    rng = np.random.default_rng(5)
    X = rng.standard_normal((512, 20)).astype(np.float32)
    y = rng.integers(0, 3, 512)
    for _ in range(300):
        calls()
    _train(0, X, y, epochs=2)
    before = _rss_kib()
    for _ in range(3000):
        calls()
    _train(0, X, y, epochs=20)
    grown = _rss_kib() - before
    assert grown < 8 * 1024, f"RSS grew by {grown} KiB"


def test_absurd_sizes_fail_cleanly_before_allocating():
    """Outputs of 2**40 elements (4 TiB) and parameter counts past 2**64: a
    clean MemoryError or ValueError in a child process, never a crash."""
    code = """
        import numpy as np, chainrule.kernels as K
        from chainrule import _core
        a = np.ones((2**20, 1), np.float32)
        b = np.ones((1, 2**20), np.float32)
        for call in (lambda: K.gemm(a, b), lambda: K.dense_forward(a, b, activation="relu"),
                     lambda: K.gemm(b, a, trans_a=True, trans_b=True),
                     lambda: _core.MLPPlan([2**40, 2**40], ["identity"], "float32"),
                     lambda: _core.MLPPlan([2**33, 2**33, 2**33], ["relu", "identity"])):
            try:
                call()
                print("no error")
            except (MemoryError, ValueError) as e:
                print("raised", type(e).__name__, str(e)[:60])
    """
    proc = _run_python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("raised") == 5, proc.stdout + proc.stderr


def test_loader_fuzz_never_crashes_or_overallocates(tmp_path):
    """Byte flips, truncations and splices of a saved model, in a child
    process with a capped address space: every outcome is a model or a clean
    ValueError, never a crash, a hang, or a MemoryError from a giant request."""
    path = tmp_path / "m.npz"
    model = cr.Sequential(cr.Dense(6, 5), cr.Tanh(), cr.Dense(5, 2), seed=0)
    cr.save(model, path)
    code = f"""
        import resource, random, io
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
        import numpy as np, chainrule as cr
        data = open({str(path)!r}, "rb").read()
        rnd = random.Random(0)
        outcomes = {{"ok": 0, "ValueError": 0}}
        target = {str(tmp_path / "fuzz.npz")!r}
        for i in range(400):
            buf = bytearray(data)
            kind = i % 4
            if kind == 0:
                for _ in range(rnd.randint(1, 8)):
                    buf[rnd.randrange(len(buf))] = rnd.randrange(256)
            elif kind == 1:
                buf = buf[: rnd.randrange(len(buf))]
            elif kind == 2:
                pos = rnd.randrange(len(buf) - 8)
                buf[pos:pos + 8] = rnd.choice([b"\\xff" * 8, b"\\x00" * 8, b"99999999"])
            else:
                a, b = sorted(rnd.sample(range(len(buf)), 2))
                buf = buf[:a] + buf[b:] + buf[a:b]
            open(target, "wb").write(bytes(buf))
            try:
                m = cr.load(target)
                m.forward(np.zeros((1, 6), np.float32))
                outcomes["ok"] += 1
            except ValueError:
                outcomes["ValueError"] += 1
        print(outcomes)
    """
    proc = _run_python(code, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ValueError" in proc.stdout


def test_stable_formulas_stay_finite_at_huge_logits():
    z = np.array([[-1e4, 1e4, 0.0], [1e30, -1e30, 1.0]], np.float32)
    for name in ("sigmoid", "tanh", "softmax", "log_softmax"):
        y = K.activation_forward(name, z)
        assert np.all(np.isfinite(y)), name
    t = np.array([[0, 1, 0.5], [1, 0, 1]], np.float32)
    loss, grad = K.binary_cross_entropy(z[:1], t[:1])
    assert np.isfinite(loss) and np.all(np.isfinite(grad))
    loss, grad = K.softmax_cross_entropy(z[:1], np.array([0]))
    assert np.isfinite(loss) and loss == pytest.approx(2e4, rel=1e-6)


def test_overflow_during_training_names_epoch_and_batch():
    rng = np.random.default_rng(0)
    X = (rng.standard_normal((64, 4)) * 1e18).astype(np.float32)
    y = rng.standard_normal((64, 1)).astype(np.float32) * 1e18
    model = cr.Sequential(cr.Dense(4, 8), cr.ReLU(), cr.Dense(8, 1), seed=0)
    with pytest.raises(FloatingPointError, match=r"epoch \d+/5, batch \d+/4"):
        cr.fit(model, X, y, loss=cr.MSE(), optimizer=cr.SGD(model.parameters(), lr=1.0),
               epochs=5, batch_size=16, progress=False)
    assert np.all(np.isfinite(model.flat_data))  # the weights before the bad batch
