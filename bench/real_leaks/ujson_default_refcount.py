"""ujson <= 5.12.0: refcount leak of the str returned by `default=` (ultrajson issue #631, fixed in 5.12.1).
When default() returns a str containing non-ASCII characters and ensure_ascii=True (the default),
PyUnicodeToUTF8() (python/objToJSON.c) stores the temporary UTF-8 bytes object in
TypeContext->newObj, overwriting the reference to the str returned by default() without Py_DECREF.
usage: python ujson_default_refcount.py [N] [STRLEN]"""
import sys, os
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _leakcommon import run, n_from_argv
import ujson
N = n_from_argv(10000)
STRLEN = int(sys.argv[2]) if len(sys.argv) > 2 else 2000

class Item:            # not JSON-serialisable -> ujson calls default()
    __slots__ = ()
ITEM = Item()
BASE = "\u00e9" * STRLEN   # non-ASCII (latin-1, 1 byte/char)

def fallback(o):
    return BASE + str(len(BASE))[:0] + "x"   # fresh non-ASCII str each call (STRLEN+1 chars)

def step(i):
    s = ujson.dumps({"k": ITEM}, default=fallback)   # <-- leaking line (leaks the str from fallback)
    assert len(s) > STRLEN

def refcount_probe():
    const = "\u00e9" * 50 + "const"
    f = lambda o: const
    before = sys.getrefcount(const)
    for _ in range(1000):
        ujson.dumps([ITEM], default=f)
    after = sys.getrefcount(const)
    print(f"REFCOUNT probe: sys.getrefcount(str returned by default) grew by {after-before} over 1000 dumps() calls")

NORMAL = {"id": 12345, "name": "widget", "tags": ["a", "b", "c"], "price": 9.99, "ok": True, "n": list(range(30))}
def ballast():
    ujson.dumps(NORMAL)                # non-leaking encode (default() not involved)

run("ujson", ujson.__version__, N, step, tm_iters=200, extra=refcount_probe, ballast=ballast, ballast_default=50)
print(f"expected leak per iter (leaky): one str of {STRLEN+1} latin-1 chars = {STRLEN+1+73} B (PyUnicode compact header 72 B + NUL)")
