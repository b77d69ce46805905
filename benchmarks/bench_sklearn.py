"""chainrule.sklearn vs scikit-learn: the same MLP fit, timed per epoch.

Both estimators get the same data (same dtype), hyper-parameters, seed and
number of epochs (``tol=0`` and ``n_iter_no_change=inf`` so that neither
stops early), in the same process. Fits alternate between the two
implementations, and the time per epoch is the median over the repeats.
Both run on the same number of threads: NumPy's BLAS through threadpoolctl,
chainrule through ``set_num_threads``.

Problems (hidden layers relu, solver adam, batch_size "auto" = 200):

* digits: 64-128-10, 1347 train / 450 test rows;
* synthetic: 784-256-128-10, 20000 train / 5000 test rows
  (``make_classification``, 10 classes, standardised);
* circles: 2-16-16-1, 4000 train / 1000 test rows (``make_circles``).

Usage::

    python benchmarks/bench_sklearn.py            # 3 repeats, 1 thread, float32
    python benchmarks/bench_sklearn.py --quick    # fewer epochs, 1 repeat
    python benchmarks/bench_sklearn.py --threads 1 2 --dtype float64
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import warnings

import numpy as np
from sklearn.datasets import load_digits, make_circles, make_classification
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier as SkMLPClassifier
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

import chainrule.kernels as K
from chainrule.sklearn import MLPClassifier as CrMLPClassifier


def problems(quick: bool):
    """(name, dims, hidden, epochs, X_train, X_test, y_train, y_test)."""
    X, y = load_digits(return_X_y=True)
    X = X / 16.0
    Xa, Xb, ya, yb = train_test_split(X, y, test_size=0.25, stratify=y, random_state=0)
    yield "digits", "64-128-10", (128,), 5 if quick else 30, Xa, Xb, ya, yb

    X, y = make_classification(n_samples=25000, n_features=784, n_informative=64,
                               n_redundant=0, n_classes=10, n_clusters_per_class=1,
                               class_sep=2.0, random_state=0)
    X = StandardScaler().fit_transform(X)
    Xa, Xb, ya, yb = train_test_split(X, y, test_size=5000, random_state=0)
    yield "synthetic", "784-256-128-10", (256, 128), 2 if quick else 5, Xa, Xb, ya, yb

    X, y = make_circles(n_samples=5000, noise=0.1, factor=0.5, random_state=0)
    Xa, Xb, ya, yb = train_test_split(X, y, test_size=1000, random_state=0)
    yield "circles", "2-16-16-1", (16, 16), 10 if quick else 50, Xa, Xb, ya, yb


def fit_once(cls, hidden, epochs, X, y):
    est = cls(hidden_layer_sizes=hidden, max_iter=epochs, random_state=0, tol=0.0,
              n_iter_no_change=np.inf)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        t0 = time.perf_counter()
        est.fit(X, y)
        elapsed = time.perf_counter() - t0
    assert est.n_iter_ == epochs
    return est, elapsed / epochs


def run(threads: int, dtype, repeats: int, quick: bool):
    rows = []
    with threadpool_limits(threads):
        K.set_num_threads(threads)
        for name, dims, hidden, epochs, Xa, Xb, ya, yb in problems(quick):
            Xa, Xb = Xa.astype(dtype), Xb.astype(dtype)
            times = {"sklearn": [], "chainrule": []}
            acc = {}
            for r in range(repeats):
                # Alternate which goes first, so drifts in machine load hit both.
                order = [("sklearn", SkMLPClassifier), ("chainrule", CrMLPClassifier)]
                for label, cls in (order if r % 2 == 0 else order[::-1]):
                    est, per_epoch = fit_once(cls, hidden, epochs, Xa, ya)
                    times[label].append(per_epoch)
                    acc[label] = est.score(Xb, yb)
            sk, cr = statistics.median(times["sklearn"]), statistics.median(times["chainrule"])
            rows.append(dict(problem=name, dims=dims, n_train=len(Xa), epochs=epochs,
                             threads=threads, dtype=np.dtype(dtype).name,
                             sklearn_ms=1e3 * sk, chainrule_ms=1e3 * cr, speedup=sk / cr,
                             sklearn_best_ms=1e3 * min(times["sklearn"]),
                             chainrule_best_ms=1e3 * min(times["chainrule"]),
                             sklearn_acc=acc["sklearn"], chainrule_acc=acc["chainrule"]))
            print_row(rows[-1])
            sys.stdout.flush()
    return rows


HEADER = (f"{'problem':10s} {'dims':>15s} {'n_train':>7s} {'epochs':>6s} {'thr':>3s} "
          f"{'dtype':>7s} {'sklearn ms/ep':>13s} {'chainrule ms/ep':>15s} {'speedup':>7s} "
          f"{'acc sk':>7s} {'acc cr':>7s}")


def print_row(r):
    print(f"{r['problem']:10s} {r['dims']:>15s} {r['n_train']:7d} {r['epochs']:6d} "
          f"{r['threads']:3d} {r['dtype']:>7s} {r['sklearn_ms']:13.2f} {r['chainrule_ms']:15.2f} "
          f"{r['speedup']:6.1f}x {r['sklearn_acc']:7.4f} {r['chainrule_acc']:7.4f}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer epochs, one repeat")
    ap.add_argument("--repeats", type=int, default=None, help="fits per implementation (3)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1])
    ap.add_argument("--dtype", choices=["float32", "float64"], nargs="+", default=["float32"])
    ap.add_argument("--json", help="also save the rows and the machine context here")
    args = ap.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 3)

    import sklearn
    print(f"chainrule ISA {K.isa()}, scikit-learn {sklearn.__version__}, NumPy "
          f"{np.__version__}, {platform.processor() or platform.machine()}; "
          f"median of {repeats} fit(s) per implementation")
    print(HEADER)
    rows = []
    for threads in args.threads:
        for dtype in args.dtype:
            rows += run(threads, np.dtype(dtype).type, repeats, args.quick)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"isa": K.isa(), "sklearn": sklearn.__version__, "numpy": np.__version__,
                       "machine": platform.machine(), "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
