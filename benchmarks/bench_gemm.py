"""GEMM benchmark: chainrule against NumPy (OpenBLAS) and, when installed, PyTorch (MKL).

    python benchmarks/bench_gemm.py                  # 1 and 2 threads, float32 and float64
    python benchmarks/bench_gemm.py --quick          # fewer shapes and repeats
    python benchmarks/bench_gemm.py --threads 1 --dtype float32

Shapes: squares 8 ... 2048 (up to 64 the call overhead dominates) and the
products of an MLP training step for configs (c) 784-256-128-10 at batch
128 and (d) 784-1024-1024-10 at batch 256 (forward X W, weight gradient X^T dZ, input gradient dZ W^T). Each
framework runs in its own worker process, with OMP/OPENBLAS/MKL_NUM_THREADS
set before anything is imported (1 thread: pinned to one core), and only the
one being timed runs: the others are stopped (SIGSTOP) between requests.
Without that, on a 2-core host the idle OpenBLAS workers (which spin long
after a call) shared the second core with the next framework's 2-thread
OpenMP region and stalled it for milliseconds. Within a shape the frameworks
are timed alternately, one sample each per round (a sample is a loop of calls
lasting ~20 ms, all writing into a preallocated out=). Results are checked
against NumPy's first. The table gives median GFLOP/s and ``speed-up`` = the
faster peer's median time / chainrule's (above 1: chainrule is faster);
``best-of`` uses each side's fastest sample, which a busy host disturbs less.
At 2 threads the sub-millisecond products still vary run to run on a shared
2-core host (any preempted vCPU stalls a 2-thread region); trust the 1-thread
rows and the large 2-thread ones.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time

import numpy as np

from bench_kernels import calibrate, sample  # the same timing loop as the kernel benchmark

SQUARES = (8, 16, 32, 64, 128, 256, 512, 1024, 2048)
QUICK_SQUARES = (16, 64, 256, 1024)


def mlp_shapes():
    """(label, m, n, k, trans_a, trans_b) of the training-step products."""
    out = []
    for cfg, batch, dims in (("c", 128, (784, 256, 128, 10)), ("d", 256, (784, 1024, 1024, 10))):
        for layer, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:]), 1):
            if d_out < 16:
                continue  # the 10-wide output layer: microseconds, see bench_kernels
            out.append((f"({cfg}) L{layer} X W", batch, d_out, d_in, False, False))
            out.append((f"({cfg}) L{layer} X^T dZ", d_in, d_out, batch, True, False))
            if layer > 1:
                out.append((f"({cfg}) L{layer} dZ W^T", batch, d_in, d_out, False, True))
    return out


def serve(framework, threads):
    """A worker holding one framework: reads one JSON request per line on
    stdin, answers one JSON line. Each framework lives in its own process so
    that its thread pool (OpenMP, OpenBLAS, MKL) never shares a process with
    another's; in one process, 2-thread GEMMs stalled for milliseconds."""
    if threads == 1 and hasattr(os, "sched_setaffinity"):
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpus[0]})
    import numpy as np

    if framework == "chainrule":
        import chainrule.kernels as K
        K.set_num_threads(threads)
    elif framework == "torch":
        import torch
        torch.set_num_threads(threads)
    cache = {}
    for line in sys.stdin:
        req = json.loads(line)
        key = (req["dtype"], req["m"], req["n"], req["k"], req["ta"], req["tb"])
        if key not in cache:
            cache.clear()
            dtype = np.dtype(req["dtype"])
            m, n, k, ta, tb = key[1:]
            rng = np.random.default_rng(m * 1_000_003 + n * 1009 + k)  # same data in every worker
            a = rng.standard_normal((k, m) if ta else (m, k)).astype(dtype)
            b = rng.standard_normal((n, k) if tb else (k, n)).astype(dtype)
            a_op, b_op = (a.T if ta else a), (b.T if tb else b)
            c = np.empty((m, n), dtype)
            if framework == "chainrule":
                def fn(a=a, b=b, c=c, ta=ta, tb=tb):
                    K.gemm(a, b, trans_a=ta, trans_b=tb, out=c)
            elif framework == "numpy":
                def fn(a_op=a_op, b_op=b_op, c=c):
                    np.matmul(a_op, b_op, out=c)
            else:
                ta_t, tb_t, tc = torch.from_numpy(a_op), torch.from_numpy(b_op), torch.from_numpy(c)

                def fn(ta_t=ta_t, tb_t=tb_t, tc=tc):
                    torch.matmul(ta_t, tb_t, out=tc)
            fn()
            probe = c.ravel()[:: max(1, c.size // 64)][:64].astype(np.float64).tolist()
            cache[key] = (fn, probe)
        fn, probe = cache[key]
        number = req.get("number") or calibrate(fn, req["target"])
        print(json.dumps({"seconds": sample(fn, number), "number": number, "probe": probe}),
              flush=True)


class Worker:
    def __init__(self, framework, threads):
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads),
                   MKL_NUM_THREADS=str(threads))
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve", framework, "--child", str(threads)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def ask(self, **req):
        # Only the framework being asked runs: the others are stopped between
        # requests, so their idle thread pools (OpenBLAS workers spin with
        # sched_yield long after a call) cannot hold the second core.
        self.proc.send_signal(signal.SIGCONT)
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit("bench_gemm: a worker died (see its error above)")
        self.proc.send_signal(signal.SIGSTOP)
        return json.loads(line)

    def close(self):
        self.proc.send_signal(signal.SIGCONT)
        self.proc.stdin.close()
        self.proc.wait()


def run_threads(threads, frameworks, args):
    workers = {f: Worker(f, threads) for f in frameworks}
    squares = QUICK_SQUARES if args.quick else SQUARES
    shapes = [(f"{s}^3", s, s, s, False, False) for s in squares] + mlp_shapes()
    repeats = 3 if args.quick else 7
    target = 0.01 if args.quick else 0.02
    # A short rest between frameworks at 2 threads (the idle ones are stopped).
    pause = args.pause if threads > 1 else 0.0
    rows = []
    try:
        for dtype in args.dtype:
            for label, m, n, k, ta, tb in shapes:
                if args.quick and dtype == "float64" and label.startswith("("):
                    continue
                spec = dict(dtype=dtype, m=m, n=n, k=k, ta=ta, tb=tb, target=target)
                first = {f: w.ask(**spec) for f, w in workers.items()}  # calibrate, check
                ref = np.asarray(first["numpy"]["probe"])
                scale = float(np.abs(ref).max()) + 1.0
                tol = (1e-3 if dtype == "float32" else 1e-10) * scale
                for f, r in first.items():
                    if not np.allclose(r["probe"], ref, atol=tol, rtol=0):
                        raise SystemExit(f"bench_gemm: {f} disagrees on {label} {dtype}")
                times = {f: [] for f in workers}
                names = list(workers)
                for rep in range(repeats):
                    for f in names[rep % len(names):] + names[:rep % len(names)]:
                        if pause:
                            time.sleep(pause)
                        times[f].append(workers[f].ask(**spec, number=first[f]["number"])["seconds"])
                flops = 2.0 * m * n * k
                med = {f: statistics.median(t) for f, t in times.items()}
                best = {f: min(t) for f, t in times.items()}
                peer = min((f for f in med if f != "chainrule"), key=lambda f: med[f])
                peer_best = min(best[f] for f in best if f != "chainrule")
                rows.append(dict(shape=label, m=m, n=n, k=k, trans_a=ta, trans_b=tb, dtype=dtype,
                                 threads=threads,
                                 gflops={f: flops / t * 1e-9 for f, t in med.items()},
                                 best_peer=peer, speedup=med[peer] / med["chainrule"],
                                 speedup_best_of=peer_best / best["chainrule"]))
                print(f"  [{threads}T] {dtype} {label:<18} " +
                      "  ".join(f"{f} {g:6.1f}" for f, g in rows[-1]["gflops"].items()) +
                      f"  speed-up {rows[-1]['speedup']:.2f}", file=sys.stderr, flush=True)
    finally:
        for w in workers.values():
            w.close()
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--dtype", nargs="+", default=["float32", "float64"],
                    choices=["float32", "float64"])
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--pause", type=float, default=0.05,
                    help="seconds between frameworks at 2+ threads (0.05)")
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve, args.child)
        return
    frameworks = ["chainrule", "numpy"]
    try:
        import torch  # noqa: F401  (only whether it is installed)
        frameworks.append("torch")
        skipped = []
    except ImportError:
        skipped = ["torch (not installed)"]
    rows = []
    for t in [int(x) for x in args.threads.split(",")]:
        rows += run_threads(t, frameworks, args)
    print(f"# bench_gemm: GFLOP/s (median), {platform.machine()}, {os.cpu_count()} cpus")
    if skipped:
        print(f"# skipped: {', '.join(skipped)}")
    print("| threads | dtype | shape (m x n x k) | " + " | ".join(frameworks) +
          " | speed-up vs the faster peer | best-of |")
    print("|---|---|---|" + "---|" * len(frameworks) + "---|---|")
    for r in rows:
        op = ("T" if r["trans_a"] else "N") + ("T" if r["trans_b"] else "N")
        print(f"| {r['threads']} | {r['dtype']} | {r['shape']} {r['m']}x{r['n']}x{r['k']} {op} | " +
              " | ".join(f"{r['gflops'][f]:.1f}" for f in frameworks) +
              f" | {r['speedup']:.2f} ({r['best_peer']}) | {r['speedup_best_of']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(rows=rows, command=" ".join(sys.argv)), f, indent=1)


if __name__ == "__main__":
    main()
