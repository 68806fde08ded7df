"""One pymalloc allocation + free per iteration (object() is a 16-byte PyObject_Malloc).

Usage: pymalloc_pair.py EXT_DIR ITERATIONS — prints LOOP_SECONDS=<seconds of the loop alone>."""
import sys
import itertools
import time

n = int(sys.argv[2])
t = time.perf_counter()
for _ in itertools.repeat(None, n):  # no int objects per iteration
    object()
print(f"LOOP_SECONDS={time.perf_counter() - t:.6f}", flush=True)
