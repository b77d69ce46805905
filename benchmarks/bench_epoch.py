"""What one epoch costs besides the training steps: the shuffle and the batch gather.

    python benchmarks/bench_epoch.py [--rows 20000] [--threads 1]

Config (c) of bench_train (784-256-128-10 relu, softmax CE, batch 128, SGD).
Times a whole epoch of chainrule.fit, the shuffle of the index array, and
the gather of every batch's rows (the plan copies each batch's rows from X
by index; timed here with the same memory traffic through np.take into a
reused buffer). Prints medians and the share of the epoch.
"""

import argparse
import statistics
import time

import numpy as np

import chainrule as cr


def median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    cr.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((args.rows, 784), dtype=np.float32)
    y = rng.integers(0, 10, args.rows)
    model = cr.Sequential(cr.Dense(784, 256), cr.ReLU(), cr.Dense(256, 128), cr.ReLU(),
                          cr.Dense(128, 10), seed=0)
    opt = cr.SGD(model.parameters(), lr=0.01)
    batch = 128

    def epoch():
        cr.fit(model, X, y, loss=cr.CrossEntropy(), optimizer=opt, epochs=1, batch_size=batch,
               seed=0, progress=False)

    idx = np.arange(args.rows)
    shuffle_rng = np.random.default_rng(1)
    buf = np.empty((batch, 784), np.float32)

    def gather():
        for start in range(0, args.rows, batch):
            sel = idx[start:start + batch]
            np.take(X, sel, axis=0, out=buf[:len(sel)], mode="clip")

    epoch()  # warm up buffers and the plan
    t_epoch = median_time(epoch, args.repeats)
    t_shuffle = median_time(lambda: shuffle_rng.shuffle(idx), args.repeats * 4)
    t_gather = median_time(gather, args.repeats * 2)
    share = (t_shuffle + t_gather) / t_epoch
    print(f"config (c), {args.rows} rows, batch {batch}, {args.threads} thread(s), isa {cr.kernels.isa()}")
    print(f"epoch   {t_epoch * 1e3:8.2f} ms")
    print(f"shuffle {t_shuffle * 1e3:8.3f} ms")
    print(f"gather  {t_gather * 1e3:8.3f} ms")
    print(f"shuffle + gather = {share * 100:.2f}% of the epoch (target <= 5%)")


if __name__ == "__main__":
    main()
