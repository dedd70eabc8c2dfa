"""Thin ctypes wrappers for the Linux calls CPython 3.10/3.11 lacks: unshare, mount, prctl, capset.

Only what the template, the monitor and the snippet need; constants from <sched.h>, <sys/mount.h>,
<linux/prctl.h>, <linux/capability.h>.
"""
from __future__ import annotations

import ctypes
import os
import signal

libc = ctypes.CDLL(None, use_errno=True)
_pylibc = ctypes.PyDLL(None, use_errno=True)  # PyDLL: the GIL stays held across the call
_pylibc.fork.restype = ctypes.c_int
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
libc.unshare.argtypes = [ctypes.c_int]
libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]

CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS = 0x00020000, 0x02000000, 0x04000000
CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x08000000, 0x10000000, 0x20000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 2, 4, 8, 0x4000, 1 << 18
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NAME = 1, 4, 15
PR_SET_CHILD_SUBREAPER = 36
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def lean_fork() -> int:
    """fork(2) without CPython's after-fork protocol (lock re-initialisation, os.register_at_fork hooks).

    Only for the template: it is single-threaded and holds no lock at this point, so there is nothing for
    that protocol to repair, and skipping it saves ~200 copy-on-write page faults (~0.5 ms of CPU here) per
    call. The GIL is held throughout (PyDLL), so the child resumes with a consistent interpreter. What the
    hooks would have done that matters, reseeding `random`, the template does before forking."""
    pid = _pylibc.fork()
    if pid < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"fork: {os.strerror(err)}")
    return pid


def unshare(flags: int) -> None:
    _check(libc.unshare(flags), "unshare")


def setns(fd: int, nstype: int) -> None:
    _check(libc.setns(fd, nstype), "setns")


def mount(source: str, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(libc.mount(source.encode(), target.encode(), fstype.encode() if fstype else None, flags,
                      data.encode() if data else None), f"mount {target}")


def prctl(option: int, arg2: int = 0) -> None:
    _check(libc.prctl(option, arg2, 0, 0, 0), f"prctl({option})")


def set_pdeathsig(sig: int = signal.SIGKILL) -> None:
    prctl(PR_SET_PDEATHSIG, sig)


def set_dumpable(on: bool) -> None:
    prctl(PR_SET_DUMPABLE, int(on))


def set_child_subreaper() -> None:
    prctl(PR_SET_CHILD_SUBREAPER, 1)


def write_id_maps(uid: int, gid: int) -> None:
    """After unshare(CLONE_NEWUSER): map our own ids 1:1 (the only mapping an unprivileged process may write)."""
    set_dumpable(True)  # a non-dumpable process's /proc/self files belong to root: we could not write them
    with open("/proc/self/setgroups", "w") as f:
        f.write("deny")
    with open("/proc/self/uid_map", "w") as f:
        f.write(f"{uid} {uid} 1")
    with open("/proc/self/gid_map", "w") as f:
        f.write(f"{gid} {gid} 1")
    set_dumpable(False)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


_CAP_HEADER = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
_CAP_NONE = (_CapData * 2)()


def drop_all_capabilities() -> None:
    """Empty the effective, permitted and inheritable (and so ambient) sets: capset with all-zero sets
    either succeeds completely or fails. The bounding set is left alone: with no_new_privs set right after,
    exec cannot gain capabilities from file caps or setuid bits, so clearing it (one prctl per capability)
    would buy nothing. The structs are built at import (in the template): a snippet allocates nothing."""
    _check(libc.capset(ctypes.byref(_CAP_HEADER), _CAP_NONE), "capset")


def children_of(pid: int) -> list[int]:
    """Direct children, from /proc (task/*/children where the kernel has it, else a scan of stat files)."""
    kids: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids.extend(int(x) for x in f.read().split())
        return kids
    except OSError:
        pass
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry))
    return kids


def descendants(pid: int) -> list[int]:
    out, todo = [], children_of(pid)
    while todo:
        child = todo.pop()
        out.append(child)
        try:
            todo.extend(children_of(child))
        except OSError:
            pass
    return out


def kill_descendants() -> None:
    """SIGKILL and reap every descendant of this process. Needs PR_SET_CHILD_SUBREAPER, so that orphans of
    killed processes are re-parented to us. Each round kills the whole visible tree at once, then reaps one
    child; a process forked behind a sweep is caught by the next one."""
    me = os.getpid()
    while True:
        for pid in descendants(me):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return
