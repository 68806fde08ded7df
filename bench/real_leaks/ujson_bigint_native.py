"""ujson < 5.12.0: native buffer leak in Object_newIntegerFromString (python/JSONtoObj.c).
Decoding an integer literal that does not fit in 64 bits copies the digits into
PyObject_Malloc(length+1) and never frees it (fixed in 5.12.0 by PyObject_Free(buf)).
With >512 digits PyObject_Malloc forwards to libc malloc -> one leaked malloc(DIGITS+1) per call.
usage: python ujson_bigint_native.py [N] [DIGITS]"""
import sys, os
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _leakcommon import run, n_from_argv
import ujson
N = n_from_argv(10000)
DIGITS = int(sys.argv[2]) if len(sys.argv) > 2 else 4000   # CPython int str limit is 4300
doc = "[" + "7" * DIGITS + "]"

def step(i):
    v = ujson.loads(doc)          # <-- leaking line: Object_newIntegerFromString leaks DIGITS+1 bytes
    assert v[0] > 0

NORMAL = ujson.dumps({"id": 12345, "name": "widget", "tags": ["a", "b", "c"], "price": 9.99, "ok": True, "n": list(range(30))})
def ballast():
    ujson.loads(NORMAL)                # non-leaking decode (small ints only)

run("ujson", ujson.__version__, N, step, tm_iters=200, ballast=ballast, ballast_default=10)
print(f"expected leak per iter (leaky): ~{DIGITS+1} B requested, ~{(DIGITS+1+8+15)//16*16} B malloc chunk")
