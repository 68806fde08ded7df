"""One pymalloc allocation + free per iteration, made 20 Python frames deep: with
pymalloc_pair.py (1 frame) this gives the cost of walking Python frames in the kernel.

Usage: pymalloc_deep.py EXT_DIR ITERATIONS — prints LOOP_SECONDS=<seconds of the loop alone>."""
import itertools
import sys
import time


def loop(n):
    t = time.perf_counter()
    for _ in itertools.repeat(None, n):  # no int objects per iteration
        object()
    return time.perf_counter() - t


def dive(depth, n):
    if depth == 0:
        return loop(n)
    return dive(depth - 1, n)


print(f"LOOP_SECONDS={dive(18, int(sys.argv[2])):.6f}", flush=True)
