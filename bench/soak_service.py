"""A busy service for the soak bench: serves requests flat out on one core until killed.

Each request parses a JSON body, builds a response (dicts, strings, a 2-8 KiB bytearray through
libc), keeps it in a bounded LRU cache, and every 200th request leaks a 1 KiB buffer into a
module-level list: a slow leak the tracer should name at the end. Every second it appends the
running request count to the file named by argv[1].
"""
import collections
import json
import sys
import time

COUNTS = sys.argv[1]
CACHE = collections.OrderedDict()
LEAKED = []


def handle(i):
    body = json.loads('{"user": %d, "items": [%s]}' % (i, ",".join(str(j) for j in range(i % 40))))
    resp = {"user": body["user"], "total": sum(body["items"]), "tag": "r%d" % i}
    resp["payload"] = bytearray(2048 + (i % 4) * 2048)
    CACHE[i % 5000] = resp
    CACHE.move_to_end(i % 5000)
    if len(CACHE) > 4000:
        CACHE.popitem(last=False)
    if i % 200 == 0:
        LEAKED.append(bytearray(1024))


def main():
    i = 0
    next_report = time.monotonic() + 1
    with open(COUNTS, "a", buffering=1) as out:
        while True:
            handle(i)
            i += 1
            if i % 256 == 0 and time.monotonic() >= next_report:
                out.write("%f %d\n" % (time.time(), i))
                next_report += 1


main()
