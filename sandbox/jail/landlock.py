"""Landlock (unprivileged LSM, Linux >= 5.13): limit a snippet's file access to read-only system paths plus
its scratch dir, forbid TCP bind/connect (ABI >= 4), and keep it from signalling or ptrace-ing processes
outside its own domain (ABI >= 6 for signals; ptrace from ABI 1).

It is the filesystem fence where namespaces are blocked (typical GPU nodes: Docker's seccomp profile or
AppArmor forbid user namespaces) and defence in depth where they are not. The ruleset is built once in the
template process; each snippet only calls landlock_restrict_self on the inherited fd. (Rules attach to
inodes, and a rule on a mount point does not cover a filesystem mounted over it later: so nothing is
mounted per call over a path that has a rule.)
Constants are from <linux/landlock.h>; the syscall numbers are the same on every architecture.
"""
from __future__ import annotations

import ctypes
import fcntl
import os
import struct

SYS_CREATE_RULESET, SYS_ADD_RULE, SYS_RESTRICT_SELF = 444, 445, 446
CREATE_RULESET_VERSION = 1
RULE_PATH_BENEATH, RULE_NET_PORT = 1, 2

FS_EXECUTE, FS_WRITE_FILE, FS_READ_FILE, FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
FS_REMOVE_DIR, FS_REMOVE_FILE, FS_MAKE_CHAR, FS_MAKE_DIR = 1 << 4, 1 << 5, 1 << 6, 1 << 7
FS_MAKE_REG, FS_MAKE_SOCK, FS_MAKE_FIFO, FS_MAKE_BLOCK = 1 << 8, 1 << 9, 1 << 10, 1 << 11
FS_MAKE_SYM, FS_REFER, FS_TRUNCATE = 1 << 12, 1 << 13, 1 << 14
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1

READ = FS_EXECUTE | FS_READ_FILE | FS_READ_DIR
FILE_RIGHTS = FS_EXECUTE | FS_READ_FILE | FS_WRITE_FILE | FS_TRUNCATE  # the only rights a file rule may hold


class LandlockUnavailable(RuntimeError):
    pass


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


def abi_version() -> int:
    """0 when the kernel has no Landlock (or it is disabled at boot)."""
    rc = _libc().syscall(SYS_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(CREATE_RULESET_VERSION))
    return max(0, int(rc))


def _fs_rights(abi: int) -> int:
    rights = (1 << 13) - 1  # ABI 1: EXECUTE .. MAKE_SYM
    if abi >= 2:
        rights |= FS_REFER
    if abi >= 3:
        rights |= FS_TRUNCATE
    return rights  # IOCTL_DEV (ABI 5) stays unhandled: isatty() on /dev/null must keep working


def build_ruleset(read_paths: list[str], write_paths: list[str]) -> tuple[int, int]:
    """Create a ruleset fd: read+execute beneath `read_paths`, everything beneath `write_paths` (files or
    dirs; missing ones are skipped). Returns (fd, abi)."""
    abi = abi_version()
    if abi < 1:
        raise LandlockUnavailable("kernel has no Landlock (needs Linux >= 5.13 with lsm=landlock)")
    libc = _libc()
    handled_fs = _fs_rights(abi)
    attr = struct.pack("=Q", handled_fs)
    if abi >= 4:
        attr += struct.pack("=Q", NET_BIND_TCP | NET_CONNECT_TCP)
    if abi >= 6:
        attr += struct.pack("=Q", SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL)
    buf = ctypes.create_string_buffer(attr, len(attr))
    fd = libc.syscall(SYS_CREATE_RULESET, buf, ctypes.c_size_t(len(attr)), ctypes.c_uint32(0))
    if fd < 0:
        raise LandlockUnavailable(f"landlock_create_ruleset: {os.strerror(ctypes.get_errno())}")
    try:
        for rights, paths in ((READ, read_paths), (handled_fs, write_paths)):
            for path in paths:
                try:
                    pfd = os.open(path, os.O_PATH | os.O_CLOEXEC)
                except OSError:
                    continue
                try:
                    allowed = rights & handled_fs
                    if not os.path.isdir(path):
                        allowed &= FILE_RIGHTS
                    rule = ctypes.create_string_buffer(struct.pack("=Qi", allowed, pfd), 12)
                    if libc.syscall(SYS_ADD_RULE, ctypes.c_int(fd), ctypes.c_int(RULE_PATH_BENEATH), rule,
                                    ctypes.c_uint32(0)) != 0:
                        raise LandlockUnavailable(f"landlock_add_rule({path}): {os.strerror(ctypes.get_errno())}")
                finally:
                    os.close(pfd)
    except BaseException:
        os.close(fd)
        raise
    return fd, abi


def build_high(read_paths: list[str], write_paths: list[str]) -> int:
    """build_ruleset, with the fd moved to >= 100 (clear of the 0-3 a snippet's stdio is dup'ed onto)."""
    fd, _ = build_ruleset(read_paths, write_paths)
    try:
        return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100)
    finally:
        os.close(fd)


def restrict_self(ruleset_fd: int, libc: ctypes.CDLL) -> None:
    """Enforce the ruleset on the calling process and its future children (needs no_new_privs)."""
    if libc.syscall(SYS_RESTRICT_SELF, ctypes.c_int(ruleset_fd), ctypes.c_uint32(0)) != 0:
        raise OSError(ctypes.get_errno(), "landlock_restrict_self")
