"""Are two answers the same? math-verify in a child process that is killed when it overruns its deadline.

Why a process: sympy/math-verify hang on adversarial answers (`9^{9^{9^{9}}}`, `(10^{7})!`) inside C-level
big-integer arithmetic that no signal interrupts, and `signal.alarm` (math-verify's own timeout) only works
in a main thread, which Ray actors and thread pools are not (R-Zero README FAQ: math_verify hanging
forever). The worker is long-lived (one import of sympy), answers one pair at a time over JSON lines, has
an address-space cap, dies with its parent (PR_SET_PDEATHSIG), and is restarted after a timeout.
"""
from __future__ import annotations

import json
import logging
import os
import select
import subprocess
import sys
import threading
import time
from typing import Literal

log = logging.getLogger(__name__)

Verdict = Literal["equal", "different", "timeout", "error"]
STARTUP_TIMEOUT_S = 60.0  # importing sympy on a loaded 2-core machine


class EquivalenceChecker:
    """`check(a, b)` -> "equal" | "different" | "timeout" | "error"; thread-safe; never blocks past the deadline."""

    def __init__(self, timeout_s: float = 2.0, memory_mb: int = 2048):
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        self.restarts = 0
        self._proc: subprocess.Popen | None = None
        self._buf = b""
        self._lock = threading.Lock()

    def check(self, a: str, b: str) -> Verdict:
        with self._lock:
            try:
                self._ensure_started()
                assert self._proc is not None and self._proc.stdin is not None
                self._proc.stdin.write((json.dumps({"a": a, "b": b}) + "\n").encode())
                self._proc.stdin.flush()
                line = self._read_line(time.monotonic() + self.timeout_s)
            except (OSError, RuntimeError) as e:  # worker died (e.g. killed by its memory cap)
                log.warning("equivalence worker failed (%s); restarting it", e)
                self._kill()
                return "error"
            if line is None:
                log.warning("answer equivalence timed out after %.1fs on %.80r vs %.80r", self.timeout_s, a, b)
                self._kill()
                return "timeout"
            reply = json.loads(line)
            if "error" in reply:
                return "error"
            return "equal" if reply["eq"] else "different"

    def close(self) -> None:
        with self._lock:
            self._kill()

    def __enter__(self) -> "EquivalenceChecker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self._kill()
        except Exception:
            pass

    # ---------------------------------------------------------------- process
    def _ensure_started(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            return
        if self._proc is not None:
            self._kill()
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "roles.equivalence", str(self.memory_mb)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
        )
        self._buf = b""
        if self._read_line(time.monotonic() + STARTUP_TIMEOUT_S) != "ready":
            self._kill()
            raise RuntimeError("equivalence worker did not start")

    def _read_line(self, deadline: float) -> str | None:
        """One reply line, or None at the deadline; RuntimeError if the worker exited."""
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise RuntimeError(f"worker exited (code {self._proc.poll()})")
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
            self.restarts += 1
        proc.wait()
        for stream in (proc.stdin, proc.stdout):
            try:
                stream.close()
            except Exception:
                pass


# -------------------------------------------------------------------- worker side
def _die_with_parent() -> None:
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # not Linux: the parent's kill on timeout still bounds it
        pass


def _worker(memory_mb: int) -> None:
    import resource
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in the parent's terminal: the parent decides
    _die_with_parent()
    limit = memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    logging.disable(logging.WARNING)  # math-verify warns that its own (signal) timeouts are off
    from math_verify import parse, verify

    cache: dict[str, list] = {}

    def parsed(s: str) -> list:
        if s not in cache:
            if len(cache) > 4096:
                cache.clear()
            cache[s] = parse(f"${s}$", parsing_timeout=None)
        return cache[s]

    out = sys.stdout
    out.write("ready\n")
    out.flush()
    for line in sys.stdin:
        req = json.loads(line)
        try:
            pa, pb = parsed(req["a"]), parsed(req["b"])
            reply = {"eq": bool(pa and pb and verify(pa, pb, timeout_seconds=None))}
        except BaseException as e:  # MemoryError, RecursionError, sympy internals
            reply = {"error": f"{type(e).__name__}: {e}"[:300]}
        out.write(json.dumps(reply) + "\n")
        out.flush()


if __name__ == "__main__":
    _worker(int(sys.argv[1]) if len(sys.argv) > 1 else 2048)
