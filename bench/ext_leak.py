"""A slow leak in the test C extension inside request-like churn: every iteration mallocs and
frees 64 bytes natively and builds a small dict; one iteration in 100 calls `leak_slowly`, whose
leak_malloc(4096) is never freed. Truth: ITERATIONS / 100 × 4,096 bytes unfreed, in
`leak_malloc` under `leak_slowly`.

Usage: ext_leak.py EXT_DIR ITERATIONS"""
import sys
import time

sys.path.insert(0, sys.argv[1])
import leakyext  # noqa: E402

import _bench  # noqa: E402


def leak_slowly():
    leakyext.leak_malloc(4096)


n = int(sys.argv[2])
t = _bench.start()
for i in range(n):
    leakyext.ok(64)
    d = {"i": i, "s": "x" * (i % 40)}
    del d
    if i % 100 == 0:
        leak_slowly()
_bench.done(time.perf_counter() - t)
