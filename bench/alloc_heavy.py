"""An allocation-heavy pure-Python loop: dicts, lists, tuples and strings made and dropped, like
a request handler's temporaries.

Usage: alloc_heavy.py EXT_DIR ITERATIONS — prints LOOP_SECONDS=<seconds of the loop alone>."""
import sys
import time

import _bench  # noqa: E402

n = int(sys.argv[2])
t = _bench.start()
for i in range(n):
    d = {"id": i, "name": "user%d" % i, "tags": [str(i), "x" * (i % 50)], "pos": (i, i + 1)}
    s = ",".join(d["tags"])
    del d, s
_bench.done(time.perf_counter() - t)
