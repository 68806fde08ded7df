"""One pymalloc allocation + free per iteration (object() is a 16-byte PyObject_Malloc).

Usage: pymalloc_pair.py EXT_DIR ITERATIONS — prints LOOP_SECONDS=<seconds of the loop alone>."""
import sys
import itertools
import time

import _bench  # noqa: E402

n = int(sys.argv[2])
t = _bench.start()
for _ in itertools.repeat(None, n):  # no int objects per iteration
    object()
_bench.done(time.perf_counter() - t)
