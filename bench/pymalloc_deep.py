"""One pymalloc allocation + free per iteration, made 20 Python frames deep: with
pymalloc_pair.py (1 frame) this gives the cost of walking Python frames in the kernel.

Usage: pymalloc_deep.py EXT_DIR ITERATIONS — prints LOOP_SECONDS=<seconds of the loop alone>."""
import itertools
import sys
import time

import _bench  # noqa: E402


def loop(n):
    t = _bench.start()
    for _ in itertools.repeat(None, n):  # no int objects per iteration
        object()
    return time.perf_counter() - t


def dive(depth, n):
    if depth == 0:
        return loop(n)
    return dive(depth - 1, n)


_bench.done(dive(18, int(sys.argv[2])))
