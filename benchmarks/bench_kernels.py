"""chainrule's native kernels against their NumPy equivalents, in one run.

Usage
-----
    python benchmarks/bench_kernels.py            # full: GEMM 64..2048, every kernel
    python benchmarks/bench_kernels.py --quick    # a few minutes less: fewer sizes/repeats
    python benchmarks/bench_kernels.py --threads 1 --json out.json --filter gemm

For each thread count (default 1 and 2) the script re-runs itself in a child
process with ``OPENBLAS_NUM_THREADS`` / ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS``
set before NumPy is imported, and calls ``chainrule.kernels.set_num_threads``
with the same count, so both sides get the same number of threads.

Method: for each case, chainrule and NumPy are timed alternately (``repeats``
rounds; in each round one sample per framework, a sample being a loop of
calls long enough to last ~20 ms), with a pause between frameworks when more
than one thread is used (OpenBLAS workers spin for ~0.1 s after a call and
would slow whatever runs next; see perf-notes.md). Reported times are medians
per call. ``ratio`` = NumPy time / chainrule time (> 1: chainrule is faster).
GEMM-like kernels report GFLOP/s (2*m*n*k); memory-bound kernels report GB/s
of the arrays they must read and write once. Before timing, each pair is
checked to compute the same thing (loose tolerance), so a ratio never compares
different work.

The NumPy side is written the way a careful NumPy user would: in-place
operations and ``out=`` buffers where they help, BLAS for every product.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

THREAD_ENV = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
              "BLIS_NUM_THREADS", "NUMEXPR_NUM_THREADS")


# ---------------------------------------------------------------- cases
# Built in the child (after NumPy is imported with the right thread count).


def build_cases(np, K, quick: bool):
    """A list of (kernel, dtype, shape, work, unit, make); make() -> (cr, ref, check)."""
    rng = np.random.default_rng(0)
    f32, f64 = np.float32, np.float64
    cases = []

    def rand(shape, dtype, lo=-1.0, hi=1.0):
        return rng.uniform(lo, hi, size=shape).astype(dtype)

    def close(a, b, dtype, rtol=None):
        rtol = rtol or (2e-3 if dtype == f32 else 1e-9)
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return bool(np.allclose(a, b, rtol=rtol, atol=rtol * max(1.0, float(np.max(np.abs(b)))
                                                                    if b.size else 1.0)))

    # ---- GEMM: C = op(A) @ op(B)
    def gemm_case(m, n, k, dtype, ta=False, tb=False):
        def make():
            a = rand((k, m) if ta else (m, k), dtype)
            b = rand((n, k) if tb else (k, n), dtype)
            c = np.empty((m, n), dtype)
            c_np = np.empty((m, n), dtype)
            a_op, b_op = (a.T if ta else a), (b.T if tb else b)

            def cr():
                return K.gemm(a, b, trans_a=ta, trans_b=tb, out=c)

            def ref():
                return np.matmul(a_op, b_op, out=c_np)  # BLAS takes the transposed views as-is

            return cr, ref, lambda: close(cr(), ref(), dtype)

        op = ("T" if ta else "N") + ("T" if tb else "N")
        cases.append(("gemm " + op, np.dtype(dtype).name, f"{m}x{n}x{k}", 2.0 * m * n * k,
                      "GFLOP/s", make))

    squares = (64, 256, 1024) if quick else (64, 128, 256, 512, 1024, 2048)
    for dtype in (f32, f64):
        for s in squares:
            if dtype == f64 and quick and s == 64:
                continue
            gemm_case(s, s, s, dtype)
        for ta, tb in ((False, True), (True, False), (True, True)):
            if quick and (dtype == f64 or (ta, tb) == (True, False)):
                continue
            gemm_case(1024, 1024, 1024, dtype, ta, tb)
        # MLP shapes: forward (n, d_in) @ (d_in, d_out); backward gW = X^T gZ, gX = gZ W^T.
        gemm_case(256, 512, 784, dtype)
        if not quick:
            gemm_case(784, 512, 256, dtype, ta=True)
            gemm_case(256, 784, 512, dtype, tb=True)
            gemm_case(1, 10, 784, dtype)
            gemm_case(32, 16, 2, dtype)

    # ---- dense forward: act(x @ w + b)
    def np_act(name, z):
        if name == "relu":
            return np.maximum(z, 0, out=z)
        if name == "tanh":
            return np.tanh(z, out=z)
        if name == "sigmoid":
            np.negative(z, out=z)
            np.exp(z, out=z)
            z += 1
            return np.reciprocal(z, out=z)
        if name == "softmax":
            z -= z.max(axis=1, keepdims=True)
            np.exp(z, out=z)
            z /= z.sum(axis=1, keepdims=True)
            return z
        return z

    def dense_case(n, d_in, d_out, act, dtype):
        def make():
            x, w, b = rand((n, d_in), dtype), rand((d_in, d_out), dtype), rand((d_out,), dtype)
            y = np.empty((n, d_out), dtype)
            z = np.empty((n, d_out), dtype)

            def cr():
                return K.dense_forward(x, w, b, activation=act, out=y)

            def ref():
                zz = np.matmul(x, w, out=z)
                zz += b
                return np_act(act, zz)

            return cr, ref, lambda: close(cr(), ref(), dtype)

        cases.append((f"dense_forward {act}", np.dtype(dtype).name, f"{n}x{d_in}x{d_out}",
                      2.0 * n * d_in * d_out, "GFLOP/s", make))

    for dtype in (f32,) if quick else (f32, f64):
        dense_case(256, 784, 512, "relu", dtype)
        dense_case(256, 512, 10, "softmax", dtype)
        dense_case(1, 784, 10, "sigmoid", dtype)
        if not quick:
            dense_case(1024, 1024, 1024, "tanh", dtype)
            dense_case(32, 2, 16, "tanh", dtype)

    # ---- dense VJP: gx = gz w^T, gw = x^T gz, gb = sum(gz)
    def dense_vjp_case(n, d_in, d_out, dtype):
        def make():
            x, w, gz = (rand(s, dtype) for s in ((n, d_in), (d_in, d_out), (n, d_out)))
            bufs = [np.empty(s, dtype) for s in ((n, d_in), (d_in, d_out), (d_out,))]
            nbufs = [np.empty(s, dtype) for s in ((n, d_in), (d_in, d_out), (d_out,))]

            def cr():
                return K.dense_vjp(x, w, gz, gx=bufs[0], gw=bufs[1], gb=bufs[2])

            def ref():
                np.matmul(gz, w.T, out=nbufs[0])
                np.matmul(x.T, gz, out=nbufs[1])
                np.sum(gz, axis=0, out=nbufs[2])
                return tuple(nbufs)

            def check():
                return all(close(a, b, dtype) for a, b in zip(cr(), ref()))

            return cr, ref, check

        cases.append(("dense_vjp", np.dtype(dtype).name, f"{n}x{d_in}x{d_out}",
                      4.0 * n * d_in * d_out, "GFLOP/s", make))

    for dtype in (f32,) if quick else (f32, f64):
        dense_vjp_case(256, 784, 512, dtype)
        if not quick:
            dense_vjp_case(1024, 1024, 1024, dtype)
            dense_vjp_case(32, 2, 16, dtype)

    # ---- activations (GB/s: read x, write y; VJP: read y, gy, write gx)
    def act_case(name, shape, dtype, vjp=False):
        size = 1
        for s in shape:
            size *= s
        itemsize = np.dtype(dtype).itemsize

        def make():
            x = rand(shape, dtype, -4, 4)
            out = np.empty(shape, dtype)
            nout = np.empty(shape, dtype)
            if not vjp:
                def cr():
                    return K.activation_forward(name, x, out=out)

                def ref():
                    np.copyto(nout, x)
                    return np_act(name, nout)
            else:
                y = K.activation_forward(name, x)
                gy = rand(shape, dtype)

                def cr():
                    return K.activation_vjp(name, y, gy, out=out)

                def ref():
                    if name == "relu":
                        return np.multiply(gy, y > 0, out=nout)
                    if name == "tanh":
                        np.multiply(y, y, out=nout)
                        np.subtract(1, nout, out=nout)
                        return np.multiply(nout, gy, out=nout)
                    if name == "sigmoid":
                        np.subtract(1, y, out=nout)
                        np.multiply(nout, y, out=nout)
                        return np.multiply(nout, gy, out=nout)
                    if name == "softmax":
                        dot = np.einsum("ij,ij->i", gy, y)[:, None]
                        np.subtract(gy, dot, out=nout)
                        return np.multiply(nout, y, out=nout)
                    raise ValueError(name)

            return cr, ref, lambda: close(cr(), ref(), dtype)

        nbytes = (3 if vjp else 2) * size * itemsize
        cases.append((f"{name}_{'vjp' if vjp else 'forward'}", np.dtype(dtype).name,
                      "x".join(map(str, shape)), float(nbytes), "GB/s", make))

    big = (1 << 20,)
    rows = (1024, 1000)
    for dtype in (f32,) if quick else (f32, f64):
        for name in ("relu", "sigmoid", "tanh"):
            act_case(name, big, dtype)
            act_case(name, big, dtype, vjp=True)
        act_case("softmax", rows, dtype)
        act_case("softmax", rows, dtype, vjp=True)
        if not quick:
            act_case("relu", (256, 512), dtype)
            act_case("sigmoid", (32, 16), dtype)

    # ---- losses (GB/s: read logits (+ targets), write grad)
    def sce_case(n, k, dtype):
        def make():
            z = rand((n, k), dtype, -3, 3)
            labels = rng.integers(0, k, size=n)
            g = np.empty((n, k), dtype)
            rows_ = np.arange(n)

            def cr():
                return K.softmax_cross_entropy(z, labels, grad=g)

            def ref():
                m = z.max(axis=1, keepdims=True)
                e = np.subtract(z, m)
                np.exp(e, out=e)
                s = e.sum(axis=1, keepdims=True)
                loss = float(np.mean(np.log(s[:, 0]) + m[:, 0] - z[rows_, labels]))
                e /= s
                e[rows_, labels] -= 1
                e *= 1.0 / n
                return loss, e

            def check():
                (l1, g1), (l2, g2) = cr(), ref()
                return close(l1, l2, dtype) and close(g1, g2, dtype)

            return cr, ref, check

        cases.append(("softmax_cross_entropy", np.dtype(dtype).name, f"{n}x{k}",
                      2.0 * n * k * np.dtype(dtype).itemsize, "GB/s", make))

    def bce_case(n, k, dtype):
        def make():
            z = rand((n, k), dtype, -6, 6)
            t = rng.uniform(0, 1, size=(n, k)).astype(dtype)
            g = np.empty((n, k), dtype)

            def cr():
                return K.binary_cross_entropy(z, t, grad=g)

            def ref():
                # softplus(z) - t z and (sigmoid(z) - t) / size, overflow-free
                e = np.exp(-np.abs(z))
                loss = float(np.mean(np.maximum(z, 0) + np.log1p(e) - t * z))
                sig = np.where(z >= 0, 1 / (1 + e), e / (1 + e))
                sig -= t
                sig *= 1.0 / z.size
                return loss, sig

            def check():
                (l1, g1), (l2, g2) = cr(), ref()
                return close(l1, l2, dtype) and close(g1, g2, dtype)

            return cr, ref, check

        cases.append(("binary_cross_entropy", np.dtype(dtype).name, f"{n}x{k}",
                      3.0 * n * k * np.dtype(dtype).itemsize, "GB/s", make))

    for dtype in (f32,) if quick else (f32, f64):
        sce_case(256, 10, dtype)
        sce_case(4096, 1000, dtype)
        bce_case(4096, 100, dtype)

    # ---- column sums (the bias gradient on its own)
    def colsum_case(n, d, dtype):
        def make():
            a = rand((n, d), dtype)
            out, nout = np.empty(d, dtype), np.empty(d, dtype)
            return (lambda: K.column_sums(a, out=out),
                    lambda: np.sum(a, axis=0, out=nout),
                    lambda: close(K.column_sums(a), a.astype(np.float64).sum(0), dtype))

        cases.append(("column_sums", np.dtype(dtype).name, f"{n}x{d}",
                      float(n * d * np.dtype(dtype).itemsize), "GB/s", make))

    for dtype in (f32,) if quick else (f32, f64):
        colsum_case(256, 512, dtype)
        if not quick:
            colsum_case(4096, 1024, dtype)

    # ---- optimizer steps, in place (GB/s: SGD+momentum reads p, g, buf and
    # writes p, buf; Adam reads p, g, m, v and writes p, m, v)
    def sgd_case(size, dtype):
        def make():
            p, g, buf = rand((size,), dtype), rand((size,), dtype), rand((size,), dtype)
            pn, bufn, tmp = p.copy(), buf.copy(), np.empty(size, dtype)
            lr, mom = 0.01, 0.9

            def cr():
                K.sgd_step(p, g, buf, lr=lr, momentum=mom)
                return p

            def ref():
                nonlocal bufn, pn
                bufn *= mom
                bufn += g
                np.multiply(bufn, lr, out=tmp)
                pn -= tmp
                return pn

            def check():
                p0, b0 = rand((size,), dtype), rand((size,), dtype)
                p.__setitem__(Ellipsis, p0), buf.__setitem__(Ellipsis, b0)
                pn.__setitem__(Ellipsis, p0), bufn.__setitem__(Ellipsis, b0)
                return close(cr(), ref(), dtype) and close(buf, bufn, dtype)

            return cr, ref, check

        cases.append(("sgd_step momentum", np.dtype(dtype).name, str(size),
                      5.0 * size * np.dtype(dtype).itemsize, "GB/s", make))

    def adam_case(size, dtype):
        def make():
            p, g = rand((size,), dtype), rand((size,), dtype)
            m, v = np.zeros(size, dtype), np.zeros(size, dtype)
            pn, mn, vn = p.copy(), m.copy(), v.copy()
            t1, t2 = np.empty(size, dtype), np.empty(size, dtype)
            lr, b1, b2, eps, step = 1e-3, 0.9, 0.999, 1e-8, 10

            def cr():
                K.adam_step(p, g, m, v, step=step, lr=lr, beta1=b1, beta2=b2, eps=eps)
                return p

            def ref():
                nonlocal mn, vn, pn, t1, t2
                mn *= b1
                np.multiply(g, 1 - b1, out=t1)
                mn += t1
                vn *= b2
                np.multiply(g, g, out=t1)
                t1 *= 1 - b2
                vn += t1
                bc1, bc2 = 1 - b1 ** step, 1 - b2 ** step
                np.sqrt(vn, out=t2)
                t2 *= 1 / np.sqrt(bc2)
                t2 += eps
                np.divide(mn, t2, out=t1)
                t1 *= lr / bc1
                pn -= t1
                return pn

            def check():
                p0 = rand((size,), dtype)
                for a in (p, pn):
                    a[...] = p0
                for a in (m, v, mn, vn):
                    a[...] = 0
                return close(cr(), ref(), dtype) and close(m, mn, dtype) and close(v, vn, dtype)

            return cr, ref, check

        cases.append(("adam_step", np.dtype(dtype).name, str(size),
                      7.0 * size * np.dtype(dtype).itemsize, "GB/s", make))

    for dtype in (f32,) if quick else (f32, f64):
        sgd_case(1 << 20, dtype)
        adam_case(1 << 20, dtype)
        if not quick:
            sgd_case(1 << 14, dtype)
            adam_case(1 << 14, dtype)

    return cases


# ---------------------------------------------------------------- timing


def sample(fn, number):
    t0 = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - t0) / number


def calibrate(fn, target):
    """Calls per sample so that a sample lasts about `target` seconds."""
    fn()  # warm-up: page in buffers, start thread pools
    number = 1
    while True:
        t = sample(fn, number) * number
        if t >= target / 4 or number >= 1 << 20:
            return max(1, int(number * target / max(t, 1e-9)))
        number *= 4


def time_pair(cr, ref, repeats, target, pause):
    n_cr, n_np = calibrate(cr, target), calibrate(ref, target)
    t_cr, t_np = [], []
    for r in range(repeats):
        # Alternate which framework goes first, so neither always follows the other.
        order = ((cr, n_cr, t_cr), (ref, n_np, t_np))
        for fn, number, out in (order if r % 2 == 0 else order[::-1]):
            if pause:
                time.sleep(pause)
            out.append(sample(fn, number))
    return t_cr, t_np


# ---------------------------------------------------------------- child


def run_child(args):
    import numpy as np

    import chainrule.kernels as K

    threads = args.threads_child
    K.set_num_threads(threads)
    if args.isa:
        K.set_isa(args.isa)
    blas_threads = None
    try:
        from threadpoolctl import threadpool_info, threadpool_limits

        threadpool_limits(threads)  # env vars already did it; this makes sure
        blas_threads = [i.get("num_threads") for i in threadpool_info()
                        if i.get("user_api") == "blas"]
    except ImportError:
        pass

    repeats = args.repeats or (3 if args.quick else 7)
    target = 0.01 if args.quick else 0.025
    pause = 0.15 if threads > 1 else 0.0
    results = []
    for kernel, dtype, shape, work, unit, make in build_cases(np, K, args.quick):
        label = f"{kernel} {dtype} {shape}"
        if args.filter and not any(f in label for f in args.filter.split(",")):
            continue
        cr, ref, check = make()
        with np.errstate(all="ignore"):
            same = check()
            s_cr, s_np = time_pair(cr, ref, repeats, target, pause)
        t_cr, t_np = statistics.median(s_cr), statistics.median(s_np)
        scale = 1e-9
        results.append(dict(kernel=kernel, dtype=dtype, shape=shape, threads=threads,
                            isa=K.isa(), unit=unit, chainrule_s=t_cr, numpy_s=t_np,
                            chainrule_min_s=min(s_cr), numpy_min_s=min(s_np),
                            chainrule_rate=work / t_cr * scale, numpy_rate=work / t_np * scale,
                            ratio=t_np / t_cr, same_result=same, repeats=repeats))
        print(f"  [{threads}T] {label:<44} chainrule {t_cr * 1e6:10.1f} us  numpy "
              f"{t_np * 1e6:10.1f} us  ratio {t_np / t_cr:5.2f}{'' if same else '  MISMATCH'}",
              file=sys.stderr, flush=True)
        del cr, ref, check
    with open(args.child_out, "w") as f:
        json.dump(dict(results=results, blas_threads=blas_threads,
                       chainrule_threads=K.get_num_threads()), f)


# ---------------------------------------------------------------- parent


def machine_info():
    import numpy as np

    import chainrule.kernels as K

    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    flags = " ".join(x for x in ("avx2", "fma", "avx512f", "amx_tile") if x in have)
                    break
    except OSError:
        pass
    blas = "?"
    try:
        cfg = np.show_config(mode="dicts")
        b = cfg["Build Dependencies"]["blas"]
        blas = f"{b.get('name', '?')} {b.get('version', '')}".strip()
    except Exception:  # older NumPy: no dict mode
        pass
    try:
        from threadpoolctl import threadpool_info

        for i in threadpool_info():
            if i.get("user_api") == "blas":
                blas += f" ({i.get('internal_api')} {i.get('version')}, {i.get('architecture')})"
                break
    except ImportError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    return dict(cpu=cpu, cpu_flags=flags, cores=cores, python=platform.python_version(),
                numpy=np.__version__, blas=blas, isa=K.isa(),
                available_isas=list(K.available_isas()),
                chainrule_default_threads=K.get_num_threads(),
                compiler=K._core._build_info().get("compiler", "?")
                if hasattr(K, "_core") and hasattr(K._core, "_build_info") else "?")


def _loadavg():
    """1-minute load average: above the core count, timings (2-thread ones
    most) are polluted by other processes."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def fmt_time(s):
    if s < 1e-3:
        return f"{s * 1e6:.1f} µs"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def markdown(results):
    lines = ["| kernel | dtype | shape | threads | chainrule | NumPy | chainrule rate | "
             "NumPy rate | ratio | ratio of bests |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        flag = "" if r["same_result"] else " ⚠ differs"
        lines.append(
            f"| {r['kernel']} | {r['dtype']} | {r['shape']} | {r['threads']} | "
            f"{fmt_time(r['chainrule_s'])} | {fmt_time(r['numpy_s'])} | "
            f"{r['chainrule_rate']:.1f} {r['unit']} | {r['numpy_rate']:.1f} {r['unit']} | "
            f"{r['ratio']:.2f}{flag} | {r['numpy_min_s'] / r['chainrule_min_s']:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    ap.add_argument("--json", metavar="PATH", help="also write machine info and results here")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts (1,2)")
    ap.add_argument("--repeats", type=int, default=0, help="rounds per case (3 quick, 7 full)")
    ap.add_argument("--isa", default="", help="force chainrule's ISA (scalar, avx2, avx512)")
    ap.add_argument("--filter", default="",
                    help="only cases whose 'kernel dtype shape' contains one of these "
                         "comma-separated strings")
    ap.add_argument("--threads-child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.threads_child is not None:
        run_child(args)
        return 0

    counts = [int(t) for t in args.threads.split(",") if t.strip()]
    load_start = _loadavg()
    all_results, per_threads = [], {}
    for t in counts:
        env = dict(os.environ)
        for var in THREAD_ENV:
            env[var] = str(t)
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "child.json")
            cmd = [sys.executable, os.path.abspath(__file__), "--threads-child", str(t),
                   "--child-out", out, "--repeats", str(args.repeats)]
            cmd += ["--quick"] if args.quick else []
            cmd += ["--isa", args.isa] if args.isa else []
            cmd += ["--filter", args.filter] if args.filter else []
            print(f"# {t} thread(s)", file=sys.stderr, flush=True)
            subprocess.run(cmd, env=env, check=True)
            with open(out) as f:
                child = json.load(f)
        all_results += child["results"]
        per_threads[t] = dict(blas_threads=child["blas_threads"],
                              chainrule_threads=child["chainrule_threads"])

    # Rows grouped by case, thread counts side by side.
    order = {}
    for r in all_results:
        order.setdefault((r["kernel"], r["dtype"], r["shape"]), len(order))
    all_results.sort(key=lambda r: (order[(r["kernel"], r["dtype"], r["shape"])], r["threads"]))

    info = machine_info()
    info["threads"] = per_threads
    info["load_average_at_start"] = load_start
    info["load_average_at_end"] = _loadavg()
    info["command"] = " ".join([os.path.basename(sys.executable), *sys.argv])
    print("## Machine\n")
    for key, val in info.items():
        print(f"- {key}: {val}")
    print("\n## chainrule kernels vs NumPy (median per call; ratio = NumPy time / chainrule "
          "time, > 1 means chainrule is faster; 'ratio of bests' uses each side's fastest "
          "sample, less sensitive to a busy host)\n")
    print(markdown(all_results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(machine=info, results=all_results), f, indent=1)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
