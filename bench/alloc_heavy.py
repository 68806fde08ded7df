"""An allocation-heavy pure-Python loop: dicts, lists, tuples and strings made and dropped, like
a request handler's temporaries.

Usage: alloc_heavy.py EXT_DIR ITERATIONS — prints LOOP_SECONDS=<seconds of the loop alone>."""
import sys
import time

n = int(sys.argv[2])
t = time.perf_counter()
for i in range(n):
    d = {"id": i, "name": "user%d" % i, "tags": [str(i), "x" * (i % 50)], "pos": (i, i + 1)}
    s = ",".join(d["tags"])
    del d, s
print(f"LOOP_SECONDS={time.perf_counter() - t:.6f}", flush=True)
