"""One call, run by the template process itself: fork the snippet, feed its stdin, collect its output with
a cap per stream, enforce the wall clock, and make sure nothing of the call survives it.

With namespaces (see `sandbox.reaper`), the snippet is forked into the worker's call pid namespace, after
`unshare(CLONE_NEWIPC)` so SysV objects it creates die with it (the template returns to its own IPC
namespace right after the fork). When the snippet ends, the namespace's pid 1 sweeps everything else away.
Without namespaces, the template is a child subreaper: orphans of the call are re-parented to it and are
killed and reaped when the snippet exits or times out.

One fork per call from the warm template: on this kind of (virtualised) machine a fork+exit of a process
holding numpy+sympy costs ~3-4 ms of CPU, the largest item in a call's budget.
"""
from __future__ import annotations

import json
import os
import select
import signal
import time

from sandbox import linux, reaper, snippet


def write_files(root: str, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        path = os.path.normpath(os.path.join(root, name))
        if not path.startswith(root.rstrip("/") + "/"):
            raise ValueError(f"file name {name!r} escapes the scratch dir")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)


def enter_namespaces(uid: int, gid: int) -> None:
    """New user (1:1 id map, so we hold capabilities inside it), mount, ipc namespaces; children go to a
    new pid namespace."""
    linux.unshare(linux.CLONE_NEWUSER | linux.CLONE_NEWNS | linux.CLONE_NEWPID | linux.CLONE_NEWIPC)
    linux.write_id_maps(uid, gid)
    linux.mount("none", "/", None, linux.MS_REC | linux.MS_PRIVATE)


class _Streams:
    """Reads stdout/stderr with a cap per stream and the info pipe, until EOF or a deadline."""

    def __init__(self, out_r: int, err_r: int, info_r: int, cap: int):
        self.cap = cap
        self.bufs = {out_r: bytearray(), err_r: bytearray(), info_r: bytearray()}
        self.out_r, self.err_r, self.info_r = out_r, err_r, info_r
        self.open = {out_r, err_r, info_r}
        self.over_cap = False

    def _read(self, fd: int) -> None:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        if not data:
            self.open.discard(fd)
            os.close(fd)
            return
        buf = self.bufs[fd]
        limit = 4096 if fd == self.info_r else self.cap
        room = limit + 1 - len(buf)
        if room > 0:
            buf += data[:room]
        if fd != self.info_r and len(buf) > self.cap:
            self.over_cap = True

    def pump(self, deadline: float, wake_r: int, exited) -> str:
        """Until the child exits ('exited'), the deadline ('timeout') or an output cap ('output_limit').
        `wake_r` is the SIGCHLD wakeup pipe; `exited()` says whether it was our child that ended."""
        poller = select.poll()
        for fd in (*self.open, wake_r):
            poller.register(fd, select.POLLIN)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return "timeout"
            for fd, _ in poller.poll(left * 1000):
                if fd == wake_r:
                    while _try_read(wake_r):
                        pass
                    if exited():
                        return "exited"
                    continue
                self._read(fd)
                if fd not in self.open:
                    poller.unregister(fd)
                if self.over_cap:
                    return "output_limit"

    def close(self) -> None:
        for fd in self.open:
            os.close(fd)
        self.open.clear()

    def drain(self, seconds: float = 2.0) -> None:
        """After every writer is gone: read what is left in the pipes (EOF comes at once)."""
        end = time.monotonic() + seconds
        for fd in list(self.open):
            os.set_blocking(fd, False)
        while self.open and time.monotonic() < end:
            ready, _, _ = select.select(list(self.open), [], [], max(0.0, end - time.monotonic()))
            for fd in ready:
                self._read(fd)
                if self.over_cap:
                    return


def _try_read(fd: int) -> bytes:
    try:
        return os.read(fd, 4096)
    except BlockingIOError:
        return b""


def _stdin_fd(data: bytes | None) -> int:
    if not data:
        return os.open(os.devnull, os.O_RDONLY)
    fd = os.memfd_create("stdin")  # a file, not a pipe: feeding it never blocks, whatever the snippet does
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def run_call(call: dict, ctx: dict) -> dict:
    """Returns the result header plus raw 'stdout'/'stderr' bytes. ctx["reaper"]: the call namespace's pid 1
    (namespaces) or None (subreaper mode); ctx["ipc_ns"]: fd of the template's own IPC namespace."""
    limits = call["limits"]
    scratch = call["scratch"]
    write_files(scratch, call["files"])
    env = dict(ctx["env"], HOME=scratch, TMPDIR=scratch, PWD=scratch)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    info_r, info_w = os.pipe2(os.O_CLOEXEC)
    fds = {"stdin": _stdin_fd(call["stdin"]), "stdout": out_w, "stderr": err_w, "info": info_w}
    namespaced = ctx["reaper"] is not None
    started = time.monotonic()
    deadline = started + float(limits["timeout_s"])
    snippet.reseed_before_fork()
    if namespaced:
        linux.unshare(linux.CLONE_NEWIPC)  # for the child; we step back right after the fork
    try:
        pid = linux.lean_fork() if ctx["lean_fork"] else os.fork()
    finally:
        if namespaced:
            linux.setns(ctx["ipc_ns"], linux.CLONE_NEWIPC)
    if pid == 0:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for fd in (out_r, err_r, info_r):
            os.close(fd)
        snippet.run(call["code"], ctx, limits, scratch, env, fds)
    for fd in fds.values():
        os.close(fd)
    streams = _Streams(out_r, err_r, info_r, int(limits["max_output_bytes"]))
    reason = streams.pump(deadline, ctx["wake_fd"], lambda: _exited(pid))
    if reason != "exited":
        _kill(pid)
        if not namespaced:
            _kill(-pid)  # the snippet's process group (it is a session leader)
    _, wait_status, usage = os.wait4(pid, 0)  # before the sweep: a zombie of ours would look like a survivor
    if namespaced:
        if _call_namespace_busy():
            reaper.sweep(ctx["reaper"])
    else:
        linux.kill_descendants()
    streams.drain()
    streams.close()
    return _result(reason, wait_status, usage.ru_utime + usage.ru_stime, streams, limits,
                   time.monotonic() - started)


def _call_namespace_busy() -> bool:
    """Whether anything but pid 1 is left in the call pid namespace (our /proc is that namespace's, mounted
    by its pid 1). Most snippets leave nothing: then the sweep's round trip is skipped."""
    return any(p.isdigit() and p != "1" for p in os.listdir("/proc"))


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass


def _exited(pid: int) -> bool:
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _result(reason: str, wait_status: int, cpu_s: float, streams: _Streams, limits: dict,
            duration: float) -> dict:
    info = bytes(streams.bufs[streams.info_r]).decode("utf-8", "replace").splitlines()
    setup_errors = []
    for line in info:
        if line.startswith('{"setup_error"'):
            try:
                setup_errors.append(str(json.loads(line)["setup_error"]))
            except (ValueError, KeyError, TypeError):
                pass
    memory_flag = "M" in info
    out, err = bytes(streams.bufs[streams.out_r]), bytes(streams.bufs[streams.err_r])
    cap = streams.cap
    truncated = len(out) > cap or len(err) > cap
    head = {"exit_code": None, "duration_s": duration, "truncated": truncated, "cpu_s": cpu_s, "detail": ""}
    if reason == "timeout":
        head["status"] = "timeout"
    elif reason == "output_limit":
        head["status"] = "output_limit"
    else:
        code = os.waitstatus_to_exitcode(wait_status)
        head["exit_code"] = code
        cpu_limit = float(limits["cpu_time_s"])
        if code == snippet.SETUP_FAILED and setup_errors:
            head.update(status="sandbox_error", exit_code=None,
                        detail="isolation setup failed, code not run: " + setup_errors[-1])
        elif code == -signal.SIGXCPU or (code == -signal.SIGKILL and cpu_s >= cpu_limit):
            head.update(status="timeout", detail=f"cpu time limit ({cpu_limit:g} s)")
        elif code == 0:
            head["status"] = "ok"
        elif memory_flag and code > 0:
            head["status"] = "memory_limit"
        else:
            head["status"] = "error" if code > 0 else "killed"
    if head["status"] in ("timeout", "output_limit", "sandbox_error"):
        head["exit_code"] = None
    return {**head, "stdout": out[:cap], "stderr": err[:cap]}


def fail_result(detail: str) -> dict:
    return {"status": "sandbox_error", "exit_code": None, "duration_s": 0.0, "truncated": False, "cpu_s": 0.0,
            "detail": detail, "stdout": b"", "stderr": b""}

