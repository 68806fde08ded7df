"""A numpy loop: arrays of 8 kB to 800 kB created, combined and dropped.

Usage: numpy_loop.py EXT_DIR ITERATIONS — prints LOOP_SECONDS=<seconds of the loop alone>."""
import sys
import time

import _bench  # noqa: E402

import numpy as np

n = int(sys.argv[2])
t = _bench.start()
for i in range(n):
    a = np.ones(1000 + (i % 100) * 1000)
    b = a * 2.0 + 1.0
    s = float(b.sum())
    del a, b
_bench.done(time.perf_counter() - t)
