"""The per-call monitor: a fork of the template that owns one call from start to finish.

With namespaces, the monitor enters fresh user+mount+net+ipc+uts namespaces and mounts a private tmpfs
on /tmp (the scratch dir: gone when the call ends, size-capped), then forks the call's pid-namespace init,
which forks the snippet. The snippet is not pid 1 because pid 1 ignores signals it sends itself
(sandbox.md pitfall 2). When the snippet exits, init kills whatever it left (double-fork daemons) and exits;
killing init tears the whole namespace down at once, which is how a timeout kills the process tree.

Without namespaces, the monitor is a child subreaper: orphans of the call are re-parented to it and are
killed and reaped when the snippet exits or times out.

The monitor enforces the wall clock and the output caps, so the template never blocks on a call.
"""
from __future__ import annotations

import json
import os
import select
import signal
import time

from sandbox import landlock, linux, snippet

MIB = 1024 * 1024


def write_files(root: str, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        path = os.path.normpath(os.path.join(root, name))
        if not path.startswith(root.rstrip("/") + "/"):
            raise ValueError(f"file name {name!r} escapes the scratch dir")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)


def enter_namespaces(uid: int, gid: int, scratch_mb: int) -> None:
    """New user (1:1 id map), mount, net, ipc, uts namespaces; children go to a new pid namespace.
    /tmp and /dev/shm become fresh private tmpfs mounts."""
    linux.unshare(linux.CLONE_NEWUSER | linux.CLONE_NEWNS | linux.CLONE_NEWPID | linux.CLONE_NEWNET
                  | linux.CLONE_NEWIPC | linux.CLONE_NEWUTS)
    linux.write_id_maps(uid, gid)
    linux.mount("none", "/", None, linux.MS_REC | linux.MS_PRIVATE)
    opts = f"size={scratch_mb}m,nr_inodes=65536,mode=1777"
    linux.mount("tmpfs", "/tmp", "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, opts)
    if os.path.isdir("/dev/shm"):
        linux.mount("tmpfs", "/dev/shm", "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, "size=64m,mode=1777")


def with_landlock_ruleset(ctx: dict) -> dict:
    """Build the call's Landlock ruleset, after the call's mounts exist: rules attach to inodes, and a rule
    on a mount point does not cover what is later mounted over it (/tmp, /proc)."""
    rules = ctx["landlock"]
    if not rules:
        return ctx
    return dict(ctx, landlock_fd=landlock.build_high(rules["read"], rules["write"], rules["list"]))


def _init_process(code: str, ctx: dict, limits: dict, scratch: str, env: dict, fds: dict, status_w: int) -> None:
    """pid 1 of the call's namespace: mount its /proc, fork the snippet, reap everything, report, exit."""
    try:
        linux.set_pdeathsig()  # the monitor died (killed by the template's backstop): take the namespace down
        try:
            linux.mount("proc", "/proc", "proc", linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC)
        except OSError:
            pass  # the template's /proc stays: other pids are still invisible to the snippet's pid namespace
        ctx = with_landlock_ruleset(ctx)
        pid = os.fork()
        if pid == 0:
            os.close(status_w)
            snippet.run(code, ctx, limits, scratch, env, fds)
        for fd in (fds["stdin"], fds["stdout"], fds["stderr"], fds["info"]):
            os.close(fd)
        report: dict = {}
        while True:
            try:
                got, status, usage = os.wait4(-1, 0)
            except ChildProcessError:
                break
            if got == pid:
                report = {"wait_status": status, "cpu_s": usage.ru_utime + usage.ru_stime}
                try:
                    os.kill(-1, signal.SIGKILL)  # everything the snippet left behind
                except ProcessLookupError:
                    pass  # nothing was left
        os.write(status_w, json.dumps(report).encode())
    finally:
        os._exit(0)


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
    """Runs in the monitor process. Returns the result header plus raw 'stdout'/'stderr' bytes."""
    limits = call["limits"]
    if ctx["namespaces"]:
        enter_namespaces(ctx["uid"], ctx["gid"], scratch_mb=int(limits["memory_mb"]))
        scratch = "/tmp"
    else:
        linux.set_child_subreaper()
        scratch = call["scratch"]
    write_files(scratch, call["files"])
    env = dict(ctx["env"], HOME=scratch, TMPDIR=scratch, PWD=scratch)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    info_r, info_w = os.pipe2(os.O_CLOEXEC)
    status_r, status_w = os.pipe2(os.O_CLOEXEC)
    fds = {"stdin": _stdin_fd(call["stdin"]), "stdout": out_w, "stderr": err_w, "info": info_w}
    wake_r, wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.set_wakeup_fd(wake_w)
    started = time.monotonic()
    deadline = started + float(limits["timeout_s"])
    pid = os.fork()
    if pid == 0:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for fd in (status_r, wake_r, wake_w):
            os.close(fd)
        for fd in (out_r, err_r, info_r):
            os.close(fd)
        if ctx["namespaces"]:
            _init_process(call["code"], ctx, limits, scratch, env, fds, status_w)
        os.close(status_w)
        snippet.run(call["code"], with_landlock_ruleset(ctx), limits, scratch, env, fds)
    for fd in (*fds.values(), status_w):
        os.close(fd)
    streams = _Streams(out_r, err_r, info_r, int(limits["max_output_bytes"]))
    reason = streams.pump(deadline, wake_r, lambda: _exited(pid))
    if reason != "exited":
        os.kill(pid, signal.SIGKILL)
        if not ctx["namespaces"]:
            try:
                os.killpg(pid, signal.SIGKILL)  # the snippet's process group (it is a session leader)
            except OSError:
                pass
    wait_status, cpu_s = _reap(pid, ctx["namespaces"], status_r)
    if not ctx["namespaces"]:
        linux.kill_descendants()
    streams.drain()
    duration = time.monotonic() - started
    return _result(reason, wait_status, cpu_s, streams, limits, duration)


def _exited(pid: int) -> bool:
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _reap(pid: int, namespaces: bool, status_r: int) -> tuple[int | None, float]:
    _, status, usage = os.wait4(pid, 0)
    if not namespaces:
        return status, usage.ru_utime + usage.ru_stime
    raw = b""
    while chunk := os.read(status_r, 4096):
        raw += chunk
    try:
        report = json.loads(raw)
        return report.get("wait_status"), float(report.get("cpu_s", 0.0))
    except ValueError:
        return None, 0.0  # init was killed (timeout, output cap): no report


def _result(reason: str, wait_status: int | None, cpu_s: float, streams: _Streams, limits: dict,
            duration: float) -> dict:
    info = bytes(streams.bufs[streams.info_r]).decode("utf-8", "replace").splitlines()
    setup_errors = [json.loads(line)["setup_error"] for line in info if line.startswith('{"setup_error"')]
    memory_flag = "M" in info
    out, err = bytes(streams.bufs[streams.out_r]), bytes(streams.bufs[streams.err_r])
    cap = streams.cap
    truncated = len(out) > cap or len(err) > cap
    head = {"exit_code": None, "duration_s": duration, "truncated": truncated, "cpu_s": cpu_s, "detail": ""}
    if reason == "timeout":
        head["status"] = "timeout"
    elif reason == "output_limit":
        head["status"] = "output_limit"
    elif wait_status is None:
        head.update(status="sandbox_error", detail="the call's init process vanished without a report")
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

