"""pytest plugin: ``pytest --leaktrace`` traces the test session from outside with leaktrace.

A test marked ``@pytest.mark.leaktrace(limit="1 MB")`` fails when the memory it allocated
(Python objects and native allocations, C extensions included) and still holds at its end
exceeds the limit; the failure names the stacks that hold it. leaktrace runs as a separate,
privileged process (root, or ``sudo -n``) attached to this one with eBPF and is asked over a
pipe (``leaktrace attach --control``, docs/control.md); nothing is imported into the tests.
"""

import gc
import json
import os
import re
import select
import shutil
import subprocess
import sysconfig
import tempfile
import time

import pytest

# How long leaktrace may take to attach (a loaded CI host) and to end after `stop`.
_READY_TIMEOUT_S = 120.0
_STOP_TIMEOUT_S = 60.0

_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
}


def parse_size(text):
    """``"1 MB"``, ``"512KiB"``, ``4096`` → bytes (k/M/G decimal, KiB/MiB/GiB binary)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(
            "leaktrace: bad limit %r (e.g. '1 MB', '512KiB', 4096)" % (text,)
        )
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def pytest_addoption(parser):
    group = parser.getgroup("leaktrace", "memory leaks, traced from outside with eBPF")
    group.addoption(
        "--leaktrace",
        action="store_true",
        help="trace the session with leaktrace; tests marked leaktrace(limit=...) fail "
        "when what they allocated and still hold at their end exceeds the limit",
    )
    group.addoption(
        "--leaktrace-bin",
        default=os.environ.get("LEAKTRACE_BIN"),
        help="the leaktrace executable (default: $LEAKTRACE_BIN, the one installed beside "
        "this Python, then PATH)",
    )
    group.addoption(
        "--leaktrace-top",
        type=int,
        default=5,
        help="stacks shown when a test is over its limit (default 5)",
    )
    group.addoption(
        "--leaktrace-log",
        default=None,
        help="write leaktrace's own output (its session report) to this file",
    )


# New-style hook wrappers (pluggy 1.1, pytest 7.4); an older pytest still loads this module.
try:
    _WRAPPER = pytest.hookimpl(wrapper=True)
except TypeError:
    _WRAPPER = None


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "leaktrace(limit): with --leaktrace, fail when the memory the test allocated and "
        "still holds at its end exceeds limit ('1 MB', '512KiB', bytes)",
    )
    # pytest-xdist: each worker traces itself; the controller runs no test.
    controller = getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput")
    if config.getoption("leaktrace") and not controller:
        if _WRAPPER is None:
            raise pytest.UsageError("pytest --leaktrace needs pytest 7.4 or later (pluggy 1.1)")
        config.pluginmanager.register(LeaktracePlugin(config), "leaktrace-session")


def _find_binary(configured):
    if configured:
        return configured if os.path.exists(configured) else None
    beside = os.path.join(sysconfig.get_path("scripts"), "leaktrace")
    if os.access(beside, os.X_OK):
        return beside
    return shutil.which("leaktrace")


def _privilege_prefix():
    """How to run leaktrace with the privileges eBPF needs; (prefix, None) or (None, why not)."""
    if os.geteuid() == 0:
        return [], None
    sudo = shutil.which("sudo")
    if sudo:
        ok = subprocess.run(
            [sudo, "-n", "true"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        if ok.returncode == 0:
            return [sudo, "-n", "--"], None
    return None, (
        "leaktrace needs root to load eBPF programs and uprobes (CAP_BPF, CAP_PERFMON, "
        "CAP_SYS_ADMIN): run pytest as root, or allow passwordless `sudo` for leaktrace"
    )


class TracerLost(RuntimeError):
    """leaktrace stopped answering: it was ended, its tables put back."""


class Refused(RuntimeError):
    """leaktrace answered a request with an error; it traces on."""


class Tracer:
    """A leaktrace process attached to this one, answering over its standard input and output.

    It runs in a session of its own, so a Ctrl-C meant for pytest does not end it under a
    test; any failure to read an answer (an interruption included) ends it, since a reply left
    in the pipe would be taken for the next one's.
    """

    def __init__(self, argv, log_path, append=False):
        self.log_path = log_path
        self.log = open(log_path, "a" if append else "w")
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            bufsize=1,
            start_new_session=True,
        )
        self.broken = None
        self._reply("ready", _READY_TIMEOUT_S)

    def _reply(self, key, timeout):
        try:
            ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
            line = self.proc.stdout.readline() if ready else ""
        except BaseException:
            self.end("interrupted while waiting for an answer")
            raise
        if not line:
            self.end("no answer")
            raise TracerLost(
                "leaktrace stopped answering (exit status %s)%s"
                % (self.proc.returncode, (": " + self.log_tail()) if self.log_tail() else "")
            )
        try:
            answer = json.loads(line)
        except ValueError:
            answer = None
        if isinstance(answer, dict) and "error" in answer:
            raise Refused(answer["error"])
        if not isinstance(answer, dict) or key not in answer:
            self.end("unexpected answer")
            raise TracerLost("leaktrace answered %r where %r was due" % (line[:200], key))
        return answer[key]

    def ask(self, request, key, timeout=60.0):
        """Sends one request and returns the `key` of its answer."""
        if self.broken:
            raise TracerLost(self.broken)
        try:
            self.proc.stdin.write(request + "\n")
            self.proc.stdin.flush()
        except (OSError, ValueError) as e:
            self.end("gone")
            raise TracerLost("leaktrace is gone (%s): %s" % (e, self.log_tail()))
        return self._reply(key, timeout)

    def end(self, why, timeout=10.0):
        """Ends leaktrace: the end of its input stops it (tables put back, probes detached);
        then SIGTERM, which sudo passes on; SIGKILL last."""
        self.broken = self.broken or why
        try:
            self.proc.stdin.close()
        except (OSError, ValueError):
            pass
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        try:
            self.proc.terminate()
            return self.proc.wait(timeout)
        except (OSError, subprocess.TimeoutExpired):
            try:
                self.proc.kill()
            except OSError:
                pass
        finally:
            self.log.close()

    def stop(self):
        """Ends the session normally: `stop`, and leaktrace writes its report to the log."""
        if not self.broken:
            try:
                self.proc.stdin.write("stop\n")
                self.proc.stdin.flush()
            except (OSError, ValueError):
                pass
        return self.end("stopped", _STOP_TIMEOUT_S)

    def log_tail(self, lines=8):
        try:
            self.log.flush()
        except (OSError, ValueError):
            pass
        try:
            with open(self.log_path) as f:
                return " | ".join(l.strip() for l in f.read().splitlines()[-lines:])
        except OSError:
            return ""


def _frame(f):
    if f.get("kind") == "python":
        return "%s:%s in %s" % (f.get("filename"), f.get("line"), f.get("function"))
    name = f.get("function") or "0x%x" % f.get("address", 0)
    where = ""
    if f.get("file"):
        where = " (%s:%s)" % (os.path.basename(f["file"]), f.get("line"))
    module = os.path.basename(f.get("module") or "?")
    return "%s%s in %s" % (name, where, module)


def _inner_frames(stack, most=16):
    """The frames from the test inward: pytest's and pluggy's own frames above it say nothing."""
    shown = [f for f in stack if not f.get("hidden")]
    runner = [
        i for i, f in enumerate(shown)
        if f.get("kind") == "python" and re.search(r"/(_pytest|pluggy)/", f.get("filename") or "")
    ]
    if runner:
        shown = shown[runner[-1] + 1:]
    return shown[-most:]


def failure_message(live, limit, top):
    """The failure text: totals, then the stacks holding the most, innermost frame last."""
    out = [
        "leaktrace: %s B in %s blocks allocated during this test are still live "
        "(limit %s B)" % (format(live["bytes"], ","), format(live["blocks"], ","),
                          format(limit, ","))
    ]
    for site in live["report"]["sites"][:top]:
        out.append(
            "  %s B in %s blocks from %s"
            % (format(site["unfreed_bytes"], ","), format(site["unfreed_count"], ","),
               site["allocator"])
        )
        for f in _inner_frames(site.get("stack", [])):
            out.append("      " + _frame(f))
    return "\n".join(out)


class LeaktracePlugin:
    """The session's tracer, and the check of each marked test."""

    def __init__(self, config):
        self.config = config
        self.tracer = None
        self.unavailable = None
        self.checked = 0
        self.over = 0
        self.started_s = None
        self.redirect = False
        self.fallback = None
        self.log_path = None

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionstart(self, session):
        t0 = time.monotonic()
        try:
            self._start()
        except (OSError, RuntimeError, ValueError) as e:
            self.unavailable = "leaktrace could not attach: %s" % e
            self.tracer = None
        self.started_s = time.monotonic() - t0

    def _start(self):
        binary = _find_binary(self.config.getoption("leaktrace_bin"))
        if binary is None:
            self.unavailable = (
                "leaktrace executable not found (pip install leaktrace, or --leaktrace-bin)"
            )
            return
        prefix, why = _privilege_prefix()
        if prefix is None:
            self.unavailable = why
            return
        argv = prefix + [binary, "attach", "-p", str(os.getpid()), "--mode", "exact",
                         "--control"]
        log = self.config.getoption("leaktrace_log") or os.path.join(
            tempfile.mkdtemp(prefix="leaktrace-"), "leaktrace.log"
        )
        # Python objects of 512 B or less come from pymalloc's pools, which are not traced
        # call by call by default (one trap per object would slow the whole session). During
        # a marked test leaktrace points the interpreter's allocator tables at malloc instead,
        # which is traced: exact, with stacks, at a cost paid only inside marked tests.
        self.tracer = Tracer(argv, log)
        self.log_path = log
        try:
            self.tracer.ask("redirect", "redirected")
            self.tracer.ask("restore", "restored")
            self.redirect = True
        except Refused as e:
            # A debug build or a hooked allocator: trace every Python-allocator call instead.
            self.tracer.stop()
            self.fallback = (
                "small objects cannot be redirected to malloc during marked tests (%s); "
                "every Python-allocator call is traced instead" % e
            )
            self.tracer = Tracer(argv + ["--python-allocators"], log, append=True)

    def _runtest_call(self, item):
        """Wraps the call phase of each test (installed as ``pytest_runtest_call``)."""
        marker = item.get_closest_marker("leaktrace")
        if marker is None:
            return (yield)
        given = marker.kwargs.get("limit", marker.args[0] if marker.args else None)
        if given is None:
            pytest.fail("@pytest.mark.leaktrace needs a limit, e.g. limit=\"1 MB\"", pytrace=False)
        try:
            limit, bad = parse_size(given), None
        except ValueError as e:
            limit, bad = None, str(e)
        if bad:
            pytest.fail(bad, pytrace=False)
        if self.tracer is None:
            pytest.skip(self.unavailable or "leaktrace is not tracing")
        gc.collect()
        try:
            # The mark first: its answer is made before the switch, so it is not counted.
            since = self.tracer.ask("mark", "mark_ns")
        except RuntimeError as e:
            self._lose(e)
            pytest.fail(self.unavailable, pytrace=False)
        switched = self.redirect and self._switch(item, "redirect", "redirected")
        try:
            result = yield
            gc.collect()
        finally:
            # Before the query, and whatever the test did: reading the query's answer makes
            # objects too, and the rest of the session runs on pymalloc again.
            if switched:
                self._switch(item, "restore", "restored")
        if self.tracer is None:
            pytest.fail(self.unavailable, pytrace=False)
        top = self.config.getoption("leaktrace_top")
        try:
            live = self.tracer.ask("live %d %d" % (since, top), "live")
        except RuntimeError as e:
            self._lose(e)
            pytest.fail(self.unavailable, pytrace=False)
        self.checked += 1
        if live["bytes"] > limit:
            self.over += 1
            pytest.fail(failure_message(live, limit, top), pytrace=False)
        return result

    def _switch(self, item, request, key):
        """`redirect` or `restore`; never raises (it may run while a test's exception is on its
        way). A refusal is a warning on the test; a lost tracer ends tracing."""
        try:
            self.tracer.ask(request, key)
            return True
        except Refused as e:
            item.warn(pytest.PytestWarning(
                "leaktrace: %s refused (%s): this test's small Python objects are not counted"
                % (request, e)
            ))
        except RuntimeError as e:
            self._lose(e)
        return False

    def _lose(self, e):
        """leaktrace cannot be asked any more: it is ended, and later marked tests skipped."""
        self.unavailable = "leaktrace stopped during the session: %s" % e
        if self.tracer is not None:
            self.tracer.end("lost")
        self.tracer = None

    def pytest_sessionfinish(self, session):
        if self.tracer is not None:
            self.tracer.stop()

    def pytest_terminal_summary(self, terminalreporter):
        tr = terminalreporter
        if self.log_path is None:
            tr.write_line("leaktrace: not tracing: %s" % self.unavailable, yellow=True)
            return
        if self.fallback:
            tr.write_line("leaktrace: %s" % self.fallback, yellow=True)
        tr.write_line(
            "leaktrace: attached in %.1f s; %d marked test(s) checked, %d over their limit; "
            "session report in %s" % (self.started_s, self.checked, self.over, self.log_path)
        )
        if self.unavailable:
            tr.write_line("leaktrace: %s" % self.unavailable, yellow=True)


if _WRAPPER is not None:
    LeaktracePlugin.pytest_runtest_call = _WRAPPER(LeaktracePlugin._runtest_call)
