"""Holds N live Python objects (100-byte bytes, one pymalloc block each) until it exits: the
tracer's memory, CPU and report time at scale.

Usage: hold.py EXT_DIR N"""
import sys
import time

import _bench  # noqa: E402

n = int(sys.argv[2])
t = _bench.start()
held = [bytes(100) + b"%d" % i for i in range(n)]
_bench.done(time.perf_counter() - t)
