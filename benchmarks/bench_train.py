"""Training-step and inference benchmark: chainrule against its peers.

A training step is forward + loss + backward + SGD update on one mini-batch
drawn by index from a fixed data set. Each framework runs in its own worker
process (so thread pools and allocators do not interfere), the frameworks are
alternated across repeats, and the table reports median microseconds per step
and each framework's ratio to the best peer (chainrule's time / the fastest
other framework's time: below 1 means chainrule is faster).

    python benchmarks/bench_train.py              # full run, 1 and 2 threads
    python benchmarks/bench_train.py --quick      # a short run
    python benchmarks/bench_train.py --inference  # forward only, batch 1024

Runs with only NumPy and chainrule installed; PyTorch, JAX and scikit-learn
are used when importable and the skipped ones are listed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

# name: (dims, hidden activation, loss, batch)
CONFIGS = {
    "a": ([2, 16, 16, 1], "tanh", "bce", 32),
    "b": ([64, 128, 10], "relu", "ce", 64),
    "c": ([784, 256, 128, 10], "relu", "ce", 128),
    "d": ([784, 1024, 1024, 10], "relu", "ce", 256),
    "e": ([32] + [64] * 10 + [1], "sigmoid", "bce", 64),
}
N_BATCHES = 16
LR = 0.01
FRAMEWORKS = ["chainrule", "numpy", "torch_eager", "torch_manual", "torch_compile", "sklearn",
              "jax"]


def describe(name):
    dims, act, loss, batch = CONFIGS[name]
    return f"({name}) {'-'.join(map(str, dims))} {act} {loss} b{batch}"


def make_data(name, inference, dtype=np.float32):
    dims, _, loss, batch = CONFIGS[name]
    rng = np.random.default_rng(0)
    n = 1024 if inference else batch * N_BATCHES
    x = rng.standard_normal((n, dims[0])).astype(dtype)
    if loss == "ce":
        y = rng.integers(0, dims[-1], n).astype(np.int64)
    else:
        y = (rng.random((n, dims[-1])) < 0.5).astype(dtype)
    params = []
    for d_in, d_out in zip(dims[:-1], dims[1:]):
        bound = np.sqrt(6.0 / (d_in + d_out))
        params.append((rng.uniform(-bound, bound, (d_in, d_out)).astype(dtype),
                       np.zeros(d_out, dtype)))
    batches = [np.arange(i * batch, (i + 1) * batch) for i in range(N_BATCHES)]
    perm = rng.permutation(n)
    batches = [perm[b] for b in batches] if not inference else []
    return x, y, params, batches


# ------------------------------------------------------------------ workers
def worker_chainrule(name, inference):
    from chainrule import _core, kernels
    dims, act, loss, batch = CONFIGS[name]
    x, y, params, batches = make_data(name, inference)
    acts = [act] * (len(dims) - 2) + ["identity"]
    plan = _core.MLPPlan(dims, acts, "float32")
    flat = np.concatenate([np.concatenate([w.ravel(), b]) for w, b in params])
    grads = np.zeros_like(flat)
    if inference:
        out = np.empty((x.shape[0], dims[-1]), np.float32)
        return lambda i: plan.forward(flat, x, out=out)
    loss_name = "softmax_cross_entropy" if loss == "ce" else "binary_cross_entropy"
    step_fn = plan.train_step
    update = {"kind": "sgd", "lr": LR}

    def step(i):
        # One native call: gather, forward, loss, backward and the SGD update.
        step_fn(flat, grads, x, y, loss=loss_name, indices=batches[i % N_BATCHES], update=update)
    return step


def _np_act(act):
    if act == "relu":
        return (lambda z: np.maximum(z, 0, out=z)), (lambda a, g: g * (a > 0))
    if act == "tanh":
        return (lambda z: np.tanh(z, out=z)), (lambda a, g: g * (1 - a * a))
    return (lambda z: np.divide(1, 1 + np.exp(-z), out=z)), (lambda a, g: g * a * (1 - a))


def worker_numpy(name, inference):
    dims, act, loss, batch = CONFIGS[name]
    x, y, params, batches = make_data(name, inference)
    f, fprime = _np_act(act)
    L = len(params)

    def forward(xb):
        acts = [xb]
        for l, (w, b) in enumerate(params):
            z = acts[-1] @ w
            z += b
            acts.append(f(z) if l < L - 1 else z)
        return acts

    if inference:
        return lambda i: forward(x)

    def step(i):
        idx = batches[i % N_BATCHES]
        acts = forward(x[idx])
        z, n = acts[-1], len(idx)
        if loss == "ce":
            p = np.exp(z - z.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            p[np.arange(n), y[idx]] -= 1
            g = p / n
        else:
            g = (1 / (1 + np.exp(-z)) - y[idx]) / z.size
        for l in range(L - 1, -1, -1):
            w, b = params[l]
            gw = acts[l].T @ g
            gb = g.sum(axis=0)
            if l > 0:
                g = fprime(acts[l], g @ w.T)
            w -= LR * gw
            b -= LR * gb
    return step


def _torch_model(name, torch):
    dims, act, loss, batch = CONFIGS[name]
    _, _, params, _ = make_data(name, False)
    layers = []
    act_cls = {"relu": torch.nn.ReLU, "tanh": torch.nn.Tanh, "sigmoid": torch.nn.Sigmoid}[act]
    for l, (w, b) in enumerate(params):
        lin = torch.nn.Linear(w.shape[0], w.shape[1])
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(w.T.copy()))
            lin.bias.copy_(torch.from_numpy(b))
        layers.append(lin)
        if l < len(params) - 1:
            layers.append(act_cls())
    return torch.nn.Sequential(*layers)


def worker_torch_eager(name, inference, compiled=False):
    import torch
    dims, act, loss, batch = CONFIGS[name]
    x, y, _, batches = make_data(name, inference)
    model = _torch_model(name, torch)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    if inference:
        def infer(i):
            with torch.no_grad():
                return model(xt)
        return infer
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    loss_fn = torch.nn.CrossEntropyLoss() if loss == "ce" else torch.nn.BCEWithLogitsLoss()
    bt = [torch.from_numpy(b) for b in batches]

    def train(xb, yb):
        opt.zero_grad(set_to_none=True)
        out = loss_fn(model(xb), yb)
        out.backward()
        opt.step()
    fn = torch.compile(train) if compiled else train

    def step(i):
        idx = bt[i % N_BATCHES]
        fn(xt[idx], yt[idx])
    return step


def worker_torch_compile(name, inference):
    return worker_torch_eager(name, inference, compiled=True)


def worker_torch_manual(name, inference):
    import torch
    dims, act, loss, batch = CONFIGS[name]
    x, y, params, batches = make_data(name, inference)
    ps = [(torch.from_numpy(w), torch.from_numpy(b)) for w, b in params]
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    f = {"relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid}[act]
    L = len(ps)

    def forward(xb):
        acts = [xb]
        for l, (w, b) in enumerate(ps):
            z = torch.addmm(b, acts[-1], w)
            acts.append(f(z) if l < L - 1 else z)
        return acts

    if inference:
        return lambda i: forward(xt)
    bt = [torch.from_numpy(b) for b in batches]

    def step(i):
        idx = bt[i % N_BATCHES]
        acts = forward(xt[idx])
        z, n = acts[-1], len(idx)
        if loss == "ce":
            g = torch.softmax(z, dim=1)
            g[torch.arange(n), yt[idx]] -= 1
            g /= n
        else:
            g = (torch.sigmoid(z) - yt[idx]) / z.numel()
        for l in range(L - 1, -1, -1):
            w, b = ps[l]
            gw = acts[l].T @ g
            gb = g.sum(0)
            if l > 0:
                a = acts[l]
                g = g @ w.T
                if act == "relu":
                    g *= a > 0
                elif act == "tanh":
                    g *= 1 - a * a
                else:
                    g *= a * (1 - a)
            w.sub_(gw, alpha=LR)
            b.sub_(gb, alpha=LR)
    return step


def worker_sklearn(name, inference):
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier
    dims, act, loss, batch = CONFIGS[name]
    x, y, params, _ = make_data(name, inference)
    labels = y if loss == "ce" else y[:, 0].astype(np.int64)
    clf = MLPClassifier(hidden_layer_sizes=tuple(dims[1:-1]),
                        activation={"sigmoid": "logistic"}.get(act, act), solver="sgd",
                        learning_rate_init=LR, momentum=0.0, alpha=0.0, batch_size=batch,
                        max_iter=1, shuffle=True, random_state=0, tol=0.0)
    warnings.simplefilter("ignore", ConvergenceWarning)
    clf.fit(x[: 2 * batch], labels[: 2 * batch])
    clf.coefs_ = [w.copy() for w, _ in params]
    clf.intercepts_ = [b.copy() for _, b in params]
    if inference:
        return lambda i: clf.predict_proba(x)
    clf.set_params(warm_start=True)
    # One epoch of N_BATCHES mini-batches; the caller divides by N_BATCHES.
    return lambda i: clf.fit(x, labels)


def worker_jax(name, inference):
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import jax.numpy as jnp
    dims, act, loss, batch = CONFIGS[name]
    x, y, params, batches = make_data(name, inference)
    f = {"relu": jax.nn.relu, "tanh": jnp.tanh, "sigmoid": jax.nn.sigmoid}[act]
    ps = [(jnp.asarray(w), jnp.asarray(b)) for w, b in params]

    def forward(ps, xb):
        h = xb
        for l, (w, b) in enumerate(ps):
            h = h @ w + b
            if l < len(ps) - 1:
                h = f(h)
        return h

    if inference:
        fwd = jax.jit(forward)
        xj = jnp.asarray(x)
        return lambda i: fwd(ps, xj).block_until_ready()

    def loss_fn(ps, xb, yb):
        z = forward(ps, xb)
        if loss == "ce":
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(z), yb[:, None], axis=1))
        return jnp.mean(jnp.logaddexp(0.0, z) - yb * z)

    # The whole step, batch gather included, is one jitted call (JAX at its best).
    @jax.jit
    def train(ps, xs, ys, idx):
        xb, yb = xs[idx], ys[idx]
        g = jax.grad(loss_fn)(ps, xb, yb)
        return jax.tree_util.tree_map(lambda p, gp: p - LR * gp, ps, g)

    xj, yj = jnp.asarray(x), jnp.asarray(y)
    bj = [jnp.asarray(b) for b in batches]
    state = {"ps": ps}

    def step(i):
        state["ps"] = train(state["ps"], xj, yj, bj[i % N_BATCHES])
        jax.block_until_ready(state["ps"])
    return step


def run_worker(framework, name, inference, seconds):
    step = globals()[f"worker_{framework}"](name, inference)
    per_call = N_BATCHES if framework == "sklearn" and not inference else 1
    for i in range(3 if framework != "torch_compile" else 5):
        step(i)
    # Calibrate a group size of about 20 ms, then time groups.
    t0 = time.perf_counter()
    calls = 0
    while time.perf_counter() - t0 < 0.05:
        step(calls)
        calls += 1
    group = max(1, int(calls * 0.02 / (time.perf_counter() - t0)))
    samples = []
    end = time.perf_counter() + seconds
    i = 0
    while time.perf_counter() < end or len(samples) < 5:
        t0 = time.perf_counter()
        for _ in range(group):
            step(i)
            i += 1
        samples.append((time.perf_counter() - t0) / group / per_call * 1e6)
    return statistics.median(samples)


def available(framework):
    mod = {"torch_eager": "torch", "torch_manual": "torch", "torch_compile": "torch",
           "sklearn": "sklearn", "jax": "jax"}.get(framework)
    if mod is None:
        return True
    try:
        __import__(mod)
        return True
    except Exception:
        return False


def thread_env(threads):
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    flags = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    if threads == 1:
        env["XLA_FLAGS"] = flags
    env["JAX_PLATFORMS"] = "cpu"
    return env


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short run: fewer repeats, no torch.compile")
    ap.add_argument("--inference", action="store_true", help="forward only, batch 1024, configs c and d")
    ap.add_argument("--configs", default=None, help="e.g. abc")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--frameworks", default=",".join(FRAMEWORKS))
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", nargs=4, metavar=("FW", "CONFIG", "INFER", "SECONDS"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        fw, name, infer, seconds = args.worker
        if os.environ.get("OMP_NUM_THREADS") == "1" and hasattr(os, "sched_setaffinity"):
            # One core for everyone: XLA ignores the thread variables and
            # would otherwise run its 1-thread case on both cores.
            os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
        if fw.startswith("torch"):
            import torch
            torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        print(json.dumps({"us": run_worker(fw, name, infer == "1", float(seconds))}))
        return

    configs = args.configs or ("cd" if args.inference else "abcde")
    threads = [int(t) for t in args.threads.split(",")]
    frameworks = [f for f in args.frameworks.split(",") if f]
    if args.quick and "torch_compile" in frameworks and args.frameworks == ",".join(FRAMEWORKS):
        frameworks.remove("torch_compile")
    if args.inference:
        frameworks = [f for f in frameworks if f != "torch_manual"]
    skipped = [f for f in frameworks if not available(f)]
    frameworks = [f for f in frameworks if f not in skipped]
    repeats = args.repeats or (2 if args.quick else 3)
    seconds = 0.3 if args.quick else 1.0

    import chainrule.kernels as K
    print(f"# bench_train: {'inference (batch 1024)' if args.inference else 'training step'}, "
          f"float32, median us per step")
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
          f"chainrule isa={K.isa()}, numpy {np.__version__}, python {platform.python_version()}")
    if skipped:
        print(f"# skipped (not installed): {', '.join(skipped)}")
    results = {}
    # Thread counts alternate inside each repeat, as the frameworks do: the
    # host's speed drifts over minutes, and a scaling figure from two blocks
    # of runs minutes apart measured the drift (a 1-vs-2-thread (a) of 0.94x
    # with every peer ~6% slower in the later block).
    for r in range(repeats):
        order = frameworks[r % len(frameworks):] + frameworks[: r % len(frameworks)]
        for t in threads:
            env = thread_env(t)
            for name in configs:
                for fw in order:
                    cmd = [sys.executable, __file__, "--worker", fw, name,
                           "1" if args.inference else "0", str(seconds)]
                    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
                    key = (t, name, fw)
                    if proc.returncode != 0:
                        results.setdefault(key, [])
                        print(f"# {fw} failed on {name}: {proc.stderr.strip().splitlines()[-1:]}",
                              file=sys.stderr)
                        continue
                    results.setdefault(key, []).append(json.loads(proc.stdout.splitlines()[-1])["us"])
                    time.sleep(0.2)  # let other pools' spinning threads settle

    header = "| threads | config | " + " | ".join(frameworks) + " | chainrule / best peer |"
    print(header)
    print("|" + "---|" * (len(frameworks) + 3))
    table = []
    for t in threads:
        for name in configs:
            med = {fw: statistics.median(results[(t, name, fw)]) if results.get((t, name, fw)) else None
                   for fw in frameworks}
            peers = [v for fw, v in med.items() if fw != "chainrule" and v is not None]
            ratio = med.get("chainrule") / min(peers) if peers and med.get("chainrule") else None
            cells = [f"{med[fw]:.1f}" if med[fw] is not None else "-" for fw in frameworks]
            print(f"| {t} | {describe(name)} | " + " | ".join(cells) +
                  (f" | {ratio:.2f} |" if ratio else " | - |"))
            table.append({"threads": t, "config": name, "us": med, "ratio_to_best_peer": ratio})
    if "chainrule" in frameworks and len(threads) > 1:
        print("\nchainrule scaling (1-thread time / n-thread time):")
        for name in configs:
            base = results.get((threads[0], name, "chainrule"))
            for t in threads[1:]:
                other = results.get((t, name, "chainrule"))
                if base and other:
                    print(f"  {describe(name)}: {t} threads {statistics.median(base) / statistics.median(other):.2f}x")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"inference": args.inference, "rows": table, "skipped": skipped}, fh, indent=1)


if __name__ == "__main__":
    main()
