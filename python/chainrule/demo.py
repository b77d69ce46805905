"""The lecture, end to end: ``python -m chainrule demo``.

1. Two circles: logistic regression on x is near chance; on the hand-built
   basis phi(x) = (1, x1, x2, x1^2, x2^2) it is near perfect; a network with
   one tanh hidden layer learns its own phi and is near perfect too.
2. Backpropagation is the chain rule: the product of the local Jacobians
   equals the network's Jacobian, and every parameter gradient matches
   central finite differences.
3. Vanishing gradients: per-layer gradient norms of a deep sigmoid network
   against the same depth with ReLU, at the start of training.
4. A real data set: a digits classifier trained by mini-batch SGD.

Seeded: the same command prints the same numbers.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import numpy as np

from . import data, kernels
from .features import PolynomialBasis
from .jacobian import chain_product, gradcheck, jacobian, jacobian_chain
from .layers import Dense, ReLU, Sequential, Sigmoid, Tanh
from .losses import BinaryCrossEntropy, CrossEntropy
from .metrics import accuracy
from .optim import SGD, Adam
from .train import fit, gradient_norms, predict, predict_proba


def _rule(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 66 - len(title)))


def _logistic(d_in: int, seed: int) -> Sequential:
    """Logistic regression: a network with no hidden layer, f(x) = sigma(w^T x + b)."""
    return Sequential(Dense(d_in, 1), seed=seed)


def two_circles(report: dict[str, Any], seed: int = 0) -> None:
    _rule("1. Two circles: learn phi(x) instead of programming it")
    X, y = data.make_circles(1000, noise=0.08, factor=0.5, seed=seed)
    X_tr, X_te, y_tr, y_te = data.train_test_split(X, y, test_size=0.3, seed=seed)
    bce = BinaryCrossEntropy(from_logits=True)
    basis = PolynomialBasis(degree=2)
    runs = {}

    lr_raw = _logistic(2, seed)
    runs["logistic regression on x"] = (lr_raw, X_tr, X_te, fit(
        lr_raw, X_tr, y_tr, loss=bce, optimizer=SGD(lr_raw.parameters(), lr=0.5),
        epochs=60, batch_size=32, seed=seed, progress=False))

    P_tr, P_te = basis.fit_transform(X_tr), basis.transform(X_te)
    lr_phi = _logistic(P_tr.shape[1], seed)
    runs["logistic regression on phi(x)"] = (lr_phi, P_tr, P_te, fit(
        lr_phi, P_tr, y_tr, loss=bce, optimizer=SGD(lr_phi.parameters(), lr=0.5),
        epochs=60, batch_size=32, seed=seed, progress=False))

    net = Sequential(Dense(2, 16), Tanh(), Dense(16, 1), seed=seed)
    runs["network, one tanh hidden layer"] = (net, X_tr, X_te, fit(
        net, X_tr, y_tr, loss=bce, optimizer=Adam(net.parameters(), lr=0.02),
        epochs=60, batch_size=32, seed=seed, progress=False))

    print(f"data: {len(X)} points on two circles (radii 1 and 0.5, noise 0.08), "
          f"{len(X_tr)} train / {len(X_te)} test")
    print("phi(x) = (1, x1, x2, x1^2, x2^2): PolynomialBasis(degree=2)")
    print(f"{'model':34s} {'params':>6s} {'train acc':>9s} {'test acc':>8s} {'final loss':>10s}")
    for name, (model, A_tr, A_te, hist) in runs.items():
        tr = accuracy(y_tr, predict(model, A_tr, loss=bce))
        te = accuracy(y_te, predict(model, A_te, loss=bce))
        n_params = sum(p.size for p in model.parameters())
        print(f"{name:34s} {n_params:6d} {tr:9.3f} {te:8.3f} {hist.loss[-1]:10.4f}")
        report[name] = {"test_accuracy": te, "history": hist, "model": model}
    report["circles"] = (X, y, basis)


def backprop_as_chain_rule(seed: int = 0) -> None:
    _rule("2. Backpropagation is the chain rule, written with Jacobians")
    model = Sequential(Dense(2, 3), Tanh(), Dense(3, 2), Sigmoid(), seed=seed, dtype="float64")
    x = np.array([0.5, -1.0])
    chain = jacobian_chain(model, x, layout="lecture")
    print("the lecture's layout: du/dx has one row per input x_i, one column per output u_j")
    for f in chain:
        print(f"  d(layer {f.index} out)/d(in) of {f.layer!r:14s} shape {f.jacobian.shape}")
    J_chain = chain_product(chain, layout="lecture")
    J = jacobian(model, x, layout="lecture")
    print(f"dg/dx = du1/dx . du2/du1 . ... (product of the chain):\n{np.array2string(J_chain, precision=4)}")
    print(f"max |chain product - jacobian(model, x)| = {np.abs(J_chain - J).max():.2e}")
    X = np.random.default_rng(seed).standard_normal((8, 2))
    y = (X[:, :1] * X[:, 1:] > 0).astype(float).repeat(2, axis=1)
    check = gradcheck(model, BinaryCrossEntropy(from_logits=False), X, y)
    print(f"gradcheck against central differences over {check.n_checked} parameters: "
          f"largest relative error {check.max_rel_error:.2e} (at {check.parameter}{list(check.index)})")


def vanishing_gradients(report: dict[str, Any], seed: int = 0, depth: int = 8,
                        width: int = 32) -> None:
    _rule(f"3. Vanishing gradients: {depth} hidden layers of sigmoid vs ReLU")
    X, y = data.make_circles(512, noise=0.1, factor=0.5, seed=seed)
    bce = BinaryCrossEntropy(from_logits=True)
    rows = {}
    for name, act in (("sigmoid", Sigmoid), ("relu", ReLU)):
        layers, d = [], 2
        for _ in range(depth):
            layers += [Dense(d, width), act()]
            d = width
        layers.append(Dense(d, 1))
        model = Sequential(*layers, seed=seed)
        rows[name] = gradient_norms(model, bce, X, y)
    print("||dJ/dW|| per Dense layer at initialisation (input side first):")
    print("layer    " + " ".join(f"{i + 1:>8d}" for i in range(depth + 1)))
    for name, norms in rows.items():
        print(f"{name:8s} " + " ".join(f"{v:8.1e}" for v in norms))
    ratio = {k: v[0] / v[-1] for k, v in rows.items()}
    print(f"first/last layer: sigmoid {ratio['sigmoid']:.1e}, relu {ratio['relu']:.1e} -- "
          f"sigma'(z) <= 1/4 shrinks the gradient at every sigmoid layer")
    report["vanishing"] = rows


def digits(report: dict[str, Any], seed: int = 0) -> None:
    _rule("4. A real data set: handwritten digits, 64-128-10, softmax cross-entropy")
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        print("scikit-learn is not installed: pip install 'chainrule[demo]' (or scikit-learn) "
              "for its bundled digits data set; skipping")
        return
    Xd, yd = load_digits(return_X_y=True)
    Xd = (Xd / 16.0).astype(np.float32)
    X_tr, X_te, y_tr, y_te = data.train_test_split(Xd, yd, test_size=0.25, seed=seed)
    model = Sequential(Dense(64, 128), ReLU(), Dense(128, 10), seed=seed)
    t0 = time.perf_counter()
    hist = fit(model, X_tr, y_tr, loss=CrossEntropy(),
               optimizer=SGD(model.parameters(), lr=0.1, momentum=0.9),
               epochs=30, batch_size=64, seed=seed, progress=False, validation_data=(X_te, y_te),
               metrics=["accuracy"])
    secs = time.perf_counter() - t0
    te = accuracy(y_te, predict(model, X_te, loss=CrossEntropy()))
    n_params = sum(p.size for p in model.parameters())
    print(f"{len(X_tr)} train / {len(X_te)} test images of 8x8 pixels; {n_params} parameters")
    print(f"30 epochs of mini-batch SGD (batch 64, momentum 0.9) in {secs:.2f} s: "
          f"final loss {hist.loss[-1]:.4f}, test accuracy {te:.3f}")
    report["digits"] = {"test_accuracy": te, "history": hist}


def plots(report: dict[str, Any], out_dir: str) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"\nmatplotlib is not installed: no plots written to {out_dir} "
              "(pip install 'chainrule[demo]')")
        return []
    os.makedirs(out_dir, exist_ok=True)
    written: list[str] = []
    X, y, basis = report["circles"]
    names = ["logistic regression on x", "logistic regression on phi(x)",
             "network, one tanh hidden layer"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
    g = np.linspace(-1.5, 1.5, 200)
    gx, gy = np.meshgrid(g, g)
    grid = np.c_[gx.ravel(), gy.ravel()]
    for ax, name in zip(axes, names):
        model = report[name]["model"]
        inputs = basis.transform(grid) if "phi" in name else grid
        proba = predict_proba(model, inputs, loss=BinaryCrossEntropy())
        p = proba[:, -1] if proba.ndim == 2 else proba  # P(y = 1 | x)
        ax.contourf(gx, gy, p.reshape(gx.shape), levels=20, cmap="RdBu_r", alpha=0.7)
        ax.scatter(X[:, 0], X[:, 1], c=y, s=6, cmap="RdBu_r", edgecolors="k", linewidths=0.2)
        ax.set_title(f"{name}\ntest acc {report[name]['test_accuracy']:.3f}", fontsize=9)
        ax.set_aspect("equal")
    path = os.path.join(out_dir, "decision_boundaries.png")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in names:
        ax.plot(report[name]["history"].loss, label=name)
    if "digits" in report:
        ax.plot(report["digits"]["history"].loss, label="digits 64-128-10")
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    path = os.path.join(out_dir, "loss_curves.png")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, norms in report["vanishing"].items():
        ax.semilogy(range(1, len(norms) + 1), norms, marker="o", label=name)
    ax.set_xlabel("Dense layer (input side first)")
    ax.set_ylabel("||dJ/dW|| at initialisation")
    ax.legend()
    path = os.path.join(out_dir, "gradient_norms.png")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="chainrule demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", metavar="DIR", help="write PNG plots there (needs matplotlib)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    print(f"chainrule demo -- kernels: {kernels.isa()}, threads: {kernels.get_num_threads()}")
    report: dict[str, Any] = {}
    two_circles(report, args.seed)
    backprop_as_chain_rule(args.seed)
    vanishing_gradients(report, args.seed)
    digits(report, args.seed)
    if args.out:
        for path in plots(report, args.out):
            print(f"wrote {path}")
    print(f"\ndone in {time.perf_counter() - t0:.1f} s")
    return 0
