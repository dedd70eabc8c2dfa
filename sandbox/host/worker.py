"""One pool worker, seen from the pool: a template process, its control socket and its cgroup slot.

A worker serves one call at a time (the pool hands it to one thread). Anything unexpected from the template
(death, a hang past the grace period, a malformed frame) kills the whole worker, including every process
in its cgroup slot, and the call gets `sandbox_error`; the pool then starts a replacement.
"""
from __future__ import annotations

import logging
import os
import socket
import subprocess
import tempfile
import time

from sandbox import linux, protocol
from sandbox.host.cgroups import Slot
from sandbox.host.launch import LaunchSpec
from sandbox.types import ExecResult, ExecStatus, Limits

log = logging.getLogger("sandbox")
MIB = 1024 * 1024
CGROUP_HEADROOM_MB = 64  # page tables and kernel memory of the snippet's forks, its pipes and sockets
CGROUP_EXTRA_PIDS = 8  # launcher/bwrap, bwrap's init, the template, pid 1 of the calls' namespace (+ slack)


def _children(pid: int) -> list[int]:
    try:
        return linux.children_of(pid)
    except OSError:
        return []


class WorkerStartError(RuntimeError):
    pass


class Worker:
    def __init__(self, index: int, spec: LaunchSpec, slot: Slot | None, scratch_root: str | None,
                 hang_grace_s: float):
        self.index, self.spec, self.slot, self.hang_grace_s = index, spec, slot, hang_grace_s
        self.scratch_root = scratch_root
        self.proc: subprocess.Popen | None = None
        self.sock: socket.socket | None = None
        self.hello: dict = {}
        self.dead = False
        self._errfile = None
        self._baseline_bytes = 0
        self._cg_limits: tuple[int, int] | None = None
        self._cpu_cores: float | None = None
        self._calls = 0

    # -- lifecycle -------------------------------------------------------------------------------------
    def popen(self) -> None:
        """Start the process. The pool calls this from its one long-lived spawner thread, because bwrap's
        --die-with-parent follows the thread that forked it."""
        parent, child = socket.socketpair()
        child_fd = child.fileno()
        self._errfile = tempfile.TemporaryFile()
        cmd = self.spec.command(child.fileno(), self.scratch_root,
                                self.slot.procs_files if self.slot else [])
        try:
            self.proc = subprocess.Popen(cmd, pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=self._errfile,
                                         env={"PATH": "/usr/bin:/bin"},
                                         cwd=self.scratch_root or "/", start_new_session=True)
        finally:
            child.close()
        self.sock = parent
        # the template's configuration travels on its socket, not in argv (see LaunchSpec.config)
        protocol.send(parent, {"type": "config", "config": self.spec.config(child_fd, self.scratch_root)},
                      deadline=time.monotonic() + 10)

    def await_hello(self, timeout_s: float) -> dict:
        try:
            header, _ = protocol.recv(self.sock, deadline=time.monotonic() + timeout_s, max_blob_bytes=0)
            if header.get("type") != "hello":
                raise protocol.ProtocolError(f"expected hello, got {header.get('type')!r}")
        except (EOFError, TimeoutError, protocol.ProtocolError, OSError) as e:
            detail = self.stderr_tail() or f"{type(e).__name__}: {e}"
            self.kill()
            raise WorkerStartError(detail) from None
        self.hello = header
        if self.slot is not None:
            self._baseline_bytes = self.slot.memory_usage()
        return header

    def stderr_tail(self, limit: int = 2000) -> str:
        if self._errfile is None:
            return ""
        try:
            self._errfile.seek(0)
            return self._errfile.read()[-limit:].decode("utf-8", "replace").strip()
        except (OSError, ValueError):
            return ""

    def kill(self) -> None:
        self.dead = True
        if self.sock is not None:
            self.sock.close()
        if self.slot is not None:
            try:
                self.slot.kill_all()
            except OSError:
                pass
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, 9)  # start_new_session: the launcher/bwrap/template group
            except (ProcessLookupError, PermissionError):
                self.proc.kill()
        if self.proc is not None:
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                log.error("sandbox worker %d (pid %d) did not die", self.index, self.proc.pid)
        if self._errfile is not None:
            self._errfile.close()
            self._errfile = None

    def close(self) -> None:
        """Polite stop: closing the socket makes the template exit; anything left is killed."""
        if self.sock is not None:
            self.sock.close()
        if self.proc is not None:
            try:
                self.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def process_tree(self) -> list[int]:
        """Host pids of this worker's processes, parents first (launcher/bwrap, its init, the template, the
        call namespace's pid 1, a running call)."""
        if self.proc is None or self.proc.poll() is not None:
            return []
        tree, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop(0)
            tree.append(pid)
            todo.extend(_children(pid))
        return tree

    def template_pid(self) -> int | None:
        """Host pid of the template process: the first Python process below the launcher/bwrap ones."""
        tree = self.process_tree()
        comms = {}
        for pid in tree:
            try:
                comms[pid] = open(f"/proc/{pid}/comm").read().strip()
            except OSError:
                pass
        for pid in tree:  # breadth of the tree comes parent-first
            if comms.get(pid, "").startswith("python") and all(
                    not comms.get(p, "").startswith("python") for p in tree if pid in _children(p)):
                return pid
        return None

    # -- calls -----------------------------------------------------------------------------------------
    def _set_cgroup_limits(self, limits: Limits) -> None:
        want = (self._baseline_bytes + (limits.memory_mb + CGROUP_HEADROOM_MB) * MIB,
                limits.max_processes + CGROUP_EXTRA_PIDS)
        if want != self._cg_limits:
            self.slot.set_limits(*want)
            self._cg_limits = want
        if limits.cpu_cores != self._cpu_cores:
            self.slot.set_cpu(limits.cpu_cores)
            self._cpu_cores = limits.cpu_cores

    def call(self, header: dict, blobs: list[bytes], limits: Limits) -> ExecResult:
        self._calls += 1
        started = time.monotonic()
        oom_before = 0
        try:
            if self.slot is not None:
                self._set_cgroup_limits(limits)
                oom_before = self.slot.oom_kills()
            deadline = started + limits.timeout_s + self.hang_grace_s + len(blobs[0]) / 20e6
            protocol.send(self.sock, dict(header, id=self._calls), blobs,
                          deadline=deadline)
            head, payload = protocol.recv(self.sock, deadline=deadline, max_blob_bytes=limits.max_output_bytes)
            if head.get("id") != self._calls or len(payload) != 2:
                raise protocol.ProtocolError("reply does not match the call")
            status = ExecStatus(head["status"])
            exit_code = head.get("exit_code")
            if exit_code is not None and not isinstance(exit_code, int):
                raise protocol.ProtocolError(f"bad exit code {exit_code!r}")
            cleanup_s = head.get("cleanup_s", 0.0)
            if isinstance(cleanup_s, bool) or not isinstance(cleanup_s, (int, float)) or not cleanup_s >= 0:
                raise protocol.ProtocolError(f"bad clean-up time {cleanup_s!r}")
        except (EOFError, TimeoutError, protocol.ProtocolError, OSError, ValueError, KeyError) as e:
            why = "hung past its grace period" if isinstance(e, TimeoutError) else f"{type(e).__name__}: {e}"
            tail = self.stderr_tail()
            self.kill()
            log.warning("sandbox worker %d failed (%s); replacing it", self.index, why)
            return ExecResult("", f"[sandbox] worker failed: {why}" + (f"\n{tail}" if tail else ""), None,
                              ExecStatus.SANDBOX_ERROR, time.monotonic() - started, False)
        except BaseException:  # interrupted mid-frame: the stream is out of sync, the worker unusable
            self.kill()
            raise
        if head.get("fatal"):  # the template reported its own failure and exits: never give it another call
            log.warning("sandbox worker %d failed (%s); replacing it", self.index, head.get("detail"))
            self.kill()
        if self.slot is not None and status in (ExecStatus.OK, ExecStatus.ERROR, ExecStatus.KILLED):
            if self.slot.oom_kills() > oom_before:
                status = ExecStatus.MEMORY_LIMIT  # the cgroup's OOM killer ended a process of this call
        stderr = payload[1].decode("utf-8", "replace")
        if status is ExecStatus.SANDBOX_ERROR and head.get("detail"):
            stderr = f"[sandbox] {head['detail']}\n{stderr}"
        return ExecResult(payload[0].decode("utf-8", "replace"), stderr, exit_code, status,
                          time.monotonic() - started, bool(head.get("truncated")), float(cleanup_s))
