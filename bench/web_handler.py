"""A JSON request handler's churn with a slow leak: each request parses a JSON body, builds a
response dict and serializes it; one response in 200 is kept in a module-level list that is
never trimmed (the leak).

Usage: web_handler.py EXT_DIR ITERATIONS — prints LOOP_SECONDS=<seconds of the loop alone>.
       web_handler.py EXT_DIR --seconds S — serves for S seconds (a long-running service)."""
import json
import sys
import time

import _bench  # noqa: E402

_kept = []


def handle(i):
    body = json.dumps({"user": i, "items": [{"sku": j, "qty": j % 3} for j in range(8)]})
    req = json.loads(body)
    total = sum(item["qty"] for item in req["items"])
    resp = {"user": req["user"], "total": total, "status": "ok", "trace": "t%08d" % i}
    out = json.dumps(resp)
    if i % 200 == 0:
        _kept.append(out)
    return out


if __name__ == "__main__":
    t = _bench.start()
    if sys.argv[2] == "--seconds":
        end = t + float(sys.argv[3])
        i = 0
        while time.perf_counter() < end:
            for _ in range(100):
                handle(i)
                i += 1
            time.sleep(0.001)
        print(f"served {i} requests; kept {len(_kept)}", flush=True)
    else:
        for i in range(int(sys.argv[2])):
            handle(i)
    _bench.done(time.perf_counter() - t)
