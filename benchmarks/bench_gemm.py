"""GEMM benchmark: chainrule against NumPy (OpenBLAS) and, when installed, PyTorch (MKL).

    python benchmarks/bench_gemm.py                  # 1 and 2 threads, float32 and float64
    python benchmarks/bench_gemm.py --quick          # fewer shapes and repeats
    python benchmarks/bench_gemm.py --threads 1 --dtype float32

Shapes: squares 64 ... 2048 and the products of an MLP training step for
configs (c) 784-256-128-10 at batch 128 and (d) 784-1024-1024-10 at batch 256
(forward X W, weight gradient X^T dZ, input gradient dZ W^T). Each thread
count runs in its own process with OMP/OPENBLAS/MKL_NUM_THREADS set before
NumPy and PyTorch are imported (1 thread: pinned to one core). Within a shape
the frameworks are timed alternately, one sample each per round (a sample is
a loop of calls lasting ~20 ms, all writing into a preallocated out=), with a
0.5 s pause between frameworks at 2 threads (OpenBLAS and OpenMP workers keep
spinning after a call). The table gives median GFLOP/s and ``speed-up`` = the faster peer's
median time / chainrule's (above 1: chainrule is faster); ``best-of`` uses
each side's fastest sample, which a busy host disturbs less.
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

from bench_kernels import calibrate, sample  # the same timing loop as the kernel benchmark

SQUARES = (64, 128, 256, 512, 1024, 2048)
QUICK_SQUARES = (64, 256, 1024)


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


def run_child(args):
    threads = args.child
    if threads == 1 and hasattr(os, "sched_setaffinity"):
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpus[0]})
    import numpy as np

    import chainrule.kernels as K

    K.set_num_threads(threads)
    peers = {"numpy": None}
    try:
        import torch
        torch.set_num_threads(threads)
        peers["torch"] = torch
    except ImportError:
        pass
    rng = np.random.default_rng(0)
    squares = QUICK_SQUARES if args.quick else SQUARES
    shapes = [(f"{s}^3", s, s, s, False, False) for s in squares] + mlp_shapes()
    repeats = 3 if args.quick else (7 if threads == 1 else 5)
    target = 0.01 if args.quick else 0.02
    # OpenMP and OpenBLAS workers spin after a call (OpenBLAS ~0.1 s, and
    # 0.15 s measured too short here: a 512^3 GEMM right after another
    # framework's ran at a third of its speed); the next framework's second
    # thread would share a core with them.
    pause = 0.5 if threads > 1 else 0.0
    rows = []
    for dtype_name in args.dtype:
        dtype = np.dtype(dtype_name)
        for label, m, n, k, ta, tb in shapes:
            if args.quick and dtype_name == "float64" and label.startswith("("):
                continue
            a = rng.standard_normal((k, m) if ta else (m, k)).astype(dtype)
            b = rng.standard_normal((n, k) if tb else (k, n)).astype(dtype)
            a_op, b_op = (a.T if ta else a), (b.T if tb else b)
            outs = {name: np.empty((m, n), dtype) for name in ("chainrule", "numpy", "torch")}
            fns = {"chainrule": lambda: K.gemm(a, b, trans_a=ta, trans_b=tb, out=outs["chainrule"]),
                   "numpy": lambda: np.matmul(a_op, b_op, out=outs["numpy"])}
            if "torch" in peers:
                torch = peers["torch"]
                ta_t, tb_t = torch.from_numpy(a_op), torch.from_numpy(b_op)  # views: no copy
                tc = torch.from_numpy(outs["torch"])
                fns["torch"] = lambda: torch.matmul(ta_t, tb_t, out=tc)
            # Same result before timing (loose: float32 sums in different orders).
            for fn in fns.values():
                fn()
            ref = outs["numpy"].astype(np.float64)
            tol = (1e-3 if dtype == np.float32 else 1e-10) * float(np.abs(ref).max() + 1)
            for name in fns:
                if not np.allclose(outs[name], ref, atol=tol, rtol=0):
                    raise SystemExit(f"bench_gemm: {name} disagrees on {label} {dtype_name}")
            numbers = {name: calibrate(fn, target) for name, fn in fns.items()}
            times = {name: [] for name in fns}
            names = list(fns)
            for r in range(repeats):
                order = names[r % len(names):] + names[:r % len(names)]
                for name in order:
                    if pause:
                        time.sleep(pause)
                    times[name].append(sample(fns[name], numbers[name]))
            flops = 2.0 * m * n * k
            med = {name: statistics.median(ts) for name, ts in times.items()}
            best = {name: min(ts) for name, ts in times.items()}
            peer = min((p for p in med if p != "chainrule"), key=lambda p: med[p])
            peer_best = min(best[p] for p in best if p != "chainrule")
            rows.append(dict(shape=label, m=m, n=n, k=k, trans_a=ta, trans_b=tb, dtype=dtype_name,
                             threads=threads,
                             gflops={p: flops / t * 1e-9 for p, t in med.items()},
                             best_peer=peer, speedup=med[peer] / med["chainrule"],
                             speedup_best_of=peer_best / best["chainrule"]))
            print(f"  [{threads}T] {dtype_name} {label:<18} " +
                  "  ".join(f"{p} {g:6.1f}" for p, g in rows[-1]["gflops"].items()) +
                  f"  speed-up {rows[-1]['speedup']:.2f}", file=sys.stderr, flush=True)
    with open(args.child_out, "w") as f:
        json.dump(dict(rows=rows, peers=sorted(peers)), f)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--dtype", nargs="+", default=["float32", "float64"],
                    choices=["float32", "float64"])
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        run_child(args)
        return
    import tempfile

    rows, peers = [], set()
    for t in [int(x) for x in args.threads.split(",")]:
        env = dict(os.environ, OMP_NUM_THREADS=str(t), OPENBLAS_NUM_THREADS=str(t),
                   MKL_NUM_THREADS=str(t))
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
            out = tmp.name
        cmd = [sys.executable, __file__, "--child", str(t), "--child-out", out,
               "--dtype", *args.dtype] + (["--quick"] if args.quick else [])
        subprocess.run(cmd, env=env, check=True)
        with open(out) as f:
            res = json.load(f)
        os.unlink(out)
        rows += res["rows"]
        peers |= set(res["peers"])
    skipped = [] if "torch" in peers else ["torch (not installed)"]
    print(f"# bench_gemm: GFLOP/s (median), {platform.machine()}, {os.cpu_count()} cpus")
    if skipped:
        print(f"# skipped: {', '.join(skipped)}")
    names = ["chainrule", "numpy"] + (["torch"] if "torch" in peers else [])
    print("| threads | dtype | shape (m x n x k) | " + " | ".join(names) +
          " | speed-up vs the faster peer | best-of |")
    print("|---|---|---|" + "---|" * len(names) + "---|---|")
    for r in rows:
        op = ("T" if r["trans_a"] else "N") + ("T" if r["trans_b"] else "N")
        print(f"| {r['threads']} | {r['dtype']} | {r['shape']} {r['m']}x{r['n']}x{r['k']} {op} | " +
              " | ".join(f"{r['gflops'][p]:.1f}" for p in names) +
              f" | {r['speedup']:.2f} ({r['best_peer']}) | {r['speedup_best_of']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(rows=rows, command=" ".join(sys.argv)), f, indent=1)


if __name__ == "__main__":
    main()
