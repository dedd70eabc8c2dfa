"""One call, run by the template process itself: fork the snippet, feed its stdin, collect its output with
a cap per stream, enforce the wall clock, and make sure nothing of the call survives it.

With namespaces (see `sandbox.jail.reaper`), the snippet is forked into the worker's call pid namespace and
unshares its own IPC namespace there (SysV objects it creates die with it; the template never leaves its
own). When the snippet ends, the namespace's pid 1 sweeps everything else away. The call's inputs reach
the snippet in an anonymous mapping it unpacks itself, and its output is read into mappings: nothing of a
call is ever on the template's heap, so no later fork finds it (see `sandbox.jail.zygote._serve_one`).
Without namespaces, the template is a child subreaper: orphans of the call are re-parented to it and are
killed and reaped when the snippet exits or times out.

One fork per call from the warm template: on this kind of (virtualised) machine a fork+exit of a process
holding numpy+sympy costs ~3-4 ms of CPU, the largest item in a call's budget.
"""
from __future__ import annotations

import json
import mmap
import os
import select
import signal
import time

from sandbox import linux
from sandbox.jail import reaper, snippet


def enter_namespaces(uid: int, gid: int) -> None:
    """New user (1:1 id map, so we hold capabilities inside it), mount, ipc namespaces; children go to a
    new pid namespace."""
    linux.unshare(linux.CLONE_NEWUSER | linux.CLONE_NEWNS | linux.CLONE_NEWPID | linux.CLONE_NEWIPC)
    linux.write_id_maps(uid, gid)
    linux.mount("none", "/", None, linux.MS_REC | linux.MS_PRIVATE)


# Inodes of a call's /tmp and /dev/shm: the template empties them after each call, at ~40 us per entry here,
# so the cap bounds that clean-up (260k directories once cost ~10 s) while leaving room for any tool call.
SCRATCH_INODES, SHM_INODES = 16384, 1024


def mount_scratch(scratch_mb: int) -> None:
    """Our own size- and inode-capped tmpfs on /tmp and /dev/shm (bwrap's have no inode cap), mounted once in
    the worker's mount namespace before Landlock's rules are built on these paths."""
    flags = linux.MS_NOSUID | linux.MS_NODEV
    linux.mount("tmpfs", "/tmp", "tmpfs", flags, f"size={int(scratch_mb)}m,nr_inodes={SCRATCH_INODES},mode=1777")
    linux.mount("tmpfs", "/dev/shm", "tmpfs", flags, f"size=64m,nr_inodes={SHM_INODES},mode=1777")


class Outputs:
    """The call's stdout, stderr and info pipe, read straight into anonymous mappings (never onto the
    template's heap) of cap + 1 bytes each; unmapped after the reply is sent."""

    INFO_CAP = 4096

    def __init__(self, cap: int):
        self.cap = cap
        self.maps = [mmap.mmap(-1, cap + 1), mmap.mmap(-1, cap + 1), mmap.mmap(-1, self.INFO_CAP + 1)]
        self.used = [0, 0, 0]

    def views(self) -> list[memoryview]:
        """stdout and stderr as sent to the pool (at most `cap` bytes each)."""
        return [memoryview(self.maps[i])[:min(self.used[i], self.cap)] for i in (0, 1)]

    def over_cap(self, i: int) -> bool:
        return i < 2 and self.used[i] > self.cap

    def info(self) -> bytes:
        return self.maps[2][:self.used[2]]

    def close(self) -> None:
        for m in self.maps:
            try:
                m.close()
            except BufferError:  # a view is still exported (an error mid-send): the mapping goes with it
                pass


class _Streams:
    """Reads stdout/stderr with a cap per stream and the info pipe, until EOF or a deadline."""

    def __init__(self, out_r: int, err_r: int, info_r: int, outputs: Outputs):
        self.outputs = outputs
        self.index = {out_r: 0, err_r: 1, info_r: 2}
        self.open = {out_r, err_r, info_r}
        self.over_cap = False
        self._sink = bytearray(65536)  # reads past a full buffer (only the info pipe can get there)

    def _read(self, fd: int) -> None:
        i = self.index[fd]
        m, used = self.outputs.maps[i], self.outputs.used[i]
        with memoryview(m) as view:
            target = view[used:] if used < len(m) else memoryview(self._sink)
            try:
                n = os.readv(fd, [target])
            except BlockingIOError:
                return
            finally:
                target.release()
        if n == 0:
            self.open.discard(fd)
            os.close(fd)
            return
        if used < len(m):
            self.outputs.used[i] = used + n
        if self.outputs.over_cap(i):
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
        self._sink[:] = bytes(len(self._sink))

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


def run_call(header: dict, buf, scratch: str, ctx: dict, outputs: Outputs) -> dict:
    """Returns the result header; stdout/stderr are in `outputs`. ctx["reaper"]: the call namespace's pid 1
    (namespaces) or None (subreaper mode). The snippet unpacks its own code, stdin and files from `buf`."""
    limits = header["limits"]
    env = dict(ctx["env"], HOME=scratch, TMPDIR=scratch, PWD=scratch)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    info_r, info_w = os.pipe2(os.O_CLOEXEC)
    fds = {"stdout": out_w, "stderr": err_w, "info": info_w}
    namespaced = ctx["reaper"] is not None
    started = time.monotonic()
    deadline = started + float(limits["timeout_s"])
    snippet.reseed_before_fork()
    pid = linux.lean_fork() if ctx["lean_fork"] else os.fork()
    if pid == 0:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for fd in (out_r, err_r, info_r):
            os.close(fd)
        snippet.run(header, buf, ctx, limits, scratch, env, fds)
    for fd in fds.values():
        os.close(fd)
    streams = _Streams(out_r, err_r, info_r, outputs)
    reason = streams.pump(deadline, ctx["wake_fd"], lambda: _exited(pid))
    if reason != "exited":
        _kill(pid)
        if not namespaced:
            _kill(-pid)  # the snippet's process group (it is a session leader)
    _, wait_status, usage = os.wait4(pid, 0)  # before the sweep: a zombie of ours would look like a survivor
    ended = time.monotonic()
    if namespaced:
        if _call_namespace_busy():
            reaper.sweep(ctx["reaper"])
        _reap_strays(ctx["reaper_pid"])
    else:
        linux.kill_descendants()
    streams.drain()
    streams.close()
    head = _result(reason, wait_status, usage.ru_utime + usage.ru_stime, outputs, limits,
                   time.monotonic() - started)
    head["cleanup_s"] = time.monotonic() - ended  # the process sweep; the template adds the scratch wipe
    return head


def _reap_strays(reaper_pid: int) -> None:
    """Children of the template other than the snippet: only clone(CLONE_PARENT) from a snippet makes them
    (seccomp refuses it where seccomp is on). The sweep killed them; reap their zombies, so the call
    namespace is empty again. A dead reaper means the worker cannot isolate calls any more: fatal."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            pid = 0
        if pid == 0:
            return
        if pid == reaper_pid:
            raise RuntimeError("the call namespace's pid 1 died")


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


def _result(reason: str, wait_status: int, cpu_s: float, outputs: Outputs, limits: dict,
            duration: float) -> dict:
    info = outputs.info().decode("utf-8", "replace").splitlines()
    setup_errors = []
    for line in info:
        if line.startswith('{"setup_error"'):
            try:
                setup_errors.append(str(json.loads(line)["setup_error"]))
            except (ValueError, KeyError, TypeError):
                pass
    memory_flag = "M" in info
    truncated = outputs.over_cap(0) or outputs.over_cap(1)
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
    return head


def fail_result(detail: str) -> dict:
    return {"status": "sandbox_error", "exit_code": None, "duration_s": 0.0, "truncated": False, "cpu_s": 0.0,
            "detail": detail, "stdout": b"", "stderr": b""}

