"""A numpy loop: arrays of 8 kB to 800 kB created, combined and dropped.

Usage: numpy_loop.py EXT_DIR ITERATIONS — prints LOOP_SECONDS=<seconds of the loop alone>."""
import sys
import time

import numpy as np

n = int(sys.argv[2])
t = time.perf_counter()
for i in range(n):
    a = np.ones(1000 + (i % 100) * 1000)
    b = a * 2.0 + 1.0
    s = float(b.sum())
    del a, b
print(f"LOOP_SECONDS={time.perf_counter() - t:.6f}", flush=True)
