"""One libc malloc + free per iteration, through the test extension's ok(64).

Usage: malloc_free.py EXT_DIR ITERATIONS — prints LOOP_SECONDS=<seconds of the loop alone>."""
import sys
import itertools
import time

import _bench  # noqa: E402

sys.path.insert(0, sys.argv[1])
import leakyext  # noqa: E402

n = int(sys.argv[2])
ok = leakyext.ok
t = _bench.start()
for _ in itertools.repeat(None, n):  # no int objects per iteration
    ok(64)
_bench.done(time.perf_counter() - t)
