"""pid 1 of the worker's call namespace: reaps orphans, and between calls kills everything else in it.

The template enters a user+mount+pid+ipc namespace once at start-up; its first child (this reaper) becomes
pid 1 there, and every snippet it forks afterwards lands in that pid namespace, where the template itself
does not exist (a snippet cannot see, signal or ptrace it). After each call the template asks for a sweep:
`kill(-1, SIGKILL)` from pid 1 reaches every other process of the namespace in one atomic pass (a process
with SIGKILL pending cannot fork), so double-fork daemons and fork bombs are gone before the next call.
The reaper mounts the namespace's own /proc, then drops every capability; it runs no untrusted code.
"""
from __future__ import annotations

import os
import select
import signal
import socket
import time

from sandbox import linux

SWEEP, DONE, FAILED = b"S", b"k", b"f"


def _reap() -> None:
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                return
        except ChildProcessError:
            return


def _others() -> list[str]:
    """Live processes of the namespace but us. Zombies are skipped: ours are reaped in the loop, and the only
    other parent a process here can have is the template (clone(CLONE_PARENT)), which reaps them itself
    right after the sweep."""
    out = []
    for p in os.listdir("/proc"):
        if p.isdigit() and p != "1":
            try:
                with open(f"/proc/{p}/stat", "rb") as f:
                    if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                        continue
            except (OSError, IndexError):
                continue  # gone
            out.append(p)
    return out


def _sweep(timeout_s: float = 5.0) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            os.kill(-1, signal.SIGKILL)  # everyone in this pid namespace but us
        except ProcessLookupError:  # nobody to signal: nothing alive, only zombies of ours could remain
            _reap()
            return True
        _reap()
        if not _others():
            return True
        time.sleep(0.0005)
    return False


def _serve(sock: socket.socket) -> None:
    linux.set_pdeathsig()  # the template died: pid 1 goes, and with it the whole namespace
    linux.mount("proc", "/proc", "proc", linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC)
    linux.drop_all_capabilities()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # pid 1 only gets signals it handles: handle none but SIGCHLD
    wake_r, wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.set_wakeup_fd(wake_w)
    sock.send(DONE)  # ready
    while True:
        ready, _, _ = select.select([sock, wake_r], [], [])
        if wake_r in ready:
            try:
                while os.read(wake_r, 512):
                    pass
            except BlockingIOError:
                pass
            _reap()  # orphans of a running call
        if sock in ready:
            msg = sock.recv(1)
            if not msg:
                return
            sock.send(DONE if _sweep() else FAILED)


def start() -> tuple[int, socket.socket]:
    """Fork the reaper (must be the first fork after unshare(CLONE_NEWPID)). Returns (pid, control socket)."""
    ours, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            ours.close()
            _serve(theirs)
        except BaseException:  # noqa: BLE001
            code = 1
        finally:
            os._exit(code)
    theirs.close()
    ours.settimeout(30)
    if ours.recv(1) != DONE:
        raise RuntimeError("the namespace's pid 1 failed to start")
    return pid, ours


def sweep(sock: socket.socket) -> None:
    """Kill every process of the call namespace except pid 1; returns once they are all gone."""
    sock.settimeout(10)
    sock.send(SWEEP)
    if sock.recv(1) != DONE:
        raise RuntimeError("processes survived the sweep of the call namespace")
