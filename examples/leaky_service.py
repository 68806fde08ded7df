"""A tiny request-handling "service" with two leaks, traced by `cargo xtask demo`.

- handle_upload() passes each upload to a C extension (tests/fixtures/leakyext.c) that mallocs a
  working buffer and never frees it: a native leak, invisible to tracemalloc.
- remember() keeps every response in a module-level dict that nothing ever evicts: a Python-level
  leak that looks like a cache.
Everything else is allocated and freed per request, as a healthy service does.

It serves for a few seconds, so the trace has intervals to tell a leak from a cache.

Usage: leaky_service.py [DIR_WITH_LEAKYEXT] [SECONDS (default 6)]
"""
import json
import sys
import time

if len(sys.argv) > 1:
    sys.path.insert(0, sys.argv[1])
import leakyext

_responses = {}


def parse(raw):
    return json.loads(raw)


def handle_upload(req):
    # The extension "processes" the upload in a native buffer it forgets to free.
    leakyext.leak_malloc(8192)
    leakyext.ok(16384)
    return {"id": req["id"], "size": len(req["payload"])}


def remember(req_id, response):
    _responses[req_id] = json.dumps(response).encode() * 40


def serve(seconds):
    served = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for _ in range(25):
            raw = json.dumps({"id": served, "payload": "x" * 512})
            req = parse(raw)
            resp = handle_upload(req)
            remember(served, resp)
            served += 1
        time.sleep(0.05)
    return served


if __name__ == "__main__":
    n = serve(float(sys.argv[2]) if len(sys.argv) > 2 else 6.0)
    print(f"served {n} requests; {len(_responses)} responses remembered")
