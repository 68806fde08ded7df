"""A leaking numpy workload: arrays created and dropped, and one in 50 kept in a module-level
list by `keep` (the leak). Truth: ITERATIONS / 50 arrays of 80,000 bytes (10,000 float64)
unfreed, allocated by numpy under `keep`.

Usage: numpy_leak.py EXT_DIR ITERATIONS"""
import sys
import time

import numpy as np

import _bench  # noqa: E402

_kept = []


def keep(i):
    _kept.append(np.full(10_000, float(i)))


n = int(sys.argv[2])
t = _bench.start()
for i in range(n):
    a = np.ones(1000 + (i % 100) * 100)
    b = a * 2.0
    del a, b
    if i % 50 == 0:
        keep(i)
_bench.done(time.perf_counter() - t)
