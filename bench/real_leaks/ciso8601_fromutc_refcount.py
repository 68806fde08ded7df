"""ciso8601 <= 2.3.2: refcount leak in FixedOffset_fromutc() (timezone.c), fixed in 2.3.3 (changelog: "Fixed memory
leak in FixedOffset_fromutc (#172)"). fromutc() did `return PyNumber_Add(dt, FixedOffset_utcoffset(self, self))`;
the timedelta returned by FixedOffset_utcoffset() (a new PyDelta_FromDSU object) was never Py_DECREF'd.
datetime.astimezone(tz) calls tz.fromutc(), so every astimezone() to a ciso8601 FixedOffset leaks one timedelta.
usage: python ciso8601_fromutc_refcount.py [N]"""
import sys, os, datetime
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _leakcommon import run, n_from_argv
import ciso8601, importlib.metadata
N = n_from_argv(400000)
dt = ciso8601.parse_datetime("2024-05-06T07:08:09+05:30")
TZ = dt.tzinfo                         # ciso8601 FixedOffset instance
UTC = datetime.datetime(2024, 1, 1, 12, 0, tzinfo=datetime.timezone.utc)

def step(i):
    x = UTC.astimezone(TZ)             # <-- leaking line: FixedOffset_fromutc leaks one timedelta
    return x

def obj_probe():
    import gc
    # timedelta objects are not GC-tracked, so count them via pymalloc blocks instead of gc.get_objects()
    b0 = sys.getallocatedblocks()
    for _ in range(10000):
        TZ.fromutc(UTC.replace(tzinfo=TZ))
    gc.collect()
    print(f"OBJECT probe: sys.getallocatedblocks() delta over 10000 direct tz.fromutc() calls = {sys.getallocatedblocks()-b0} "
          f"(~10000 => one leaked timedelta per call)")

def ballast():
    ciso8601.parse_datetime("2024-05-06T07:08:09.123456+05:30")   # non-leaking

run("ciso8601", importlib.metadata.version("ciso8601"), N, step, tm_iters=2000, extra=obj_probe, ballast=ballast, ballast_default=20)
print(f"expected leak per iter (leaky): one datetime.timedelta = {sys.getsizeof(datetime.timedelta(seconds=1))} B object (48 B pymalloc size class)")
