"""A seccomp syscall filter for snippets, compiled once by libseccomp and loaded per call with prctl.

Why libseccomp through ctypes: it resolves syscall names per architecture and handles the traps a hand-built
BPF program gets wrong (x32 syscalls on x86_64, foreign-architecture calls), and `libseccomp.so.2` is on
every systemd host (apt and systemd depend on it), while the Python bindings are not on PyPI in a kept form
(`pyseccomp`'s last release is from 2021). The filter is compiled in the template process (slow part, once)
and exported as raw BPF; each snippet only does two prctl calls (about 0.1 ms).

The filter is a deny-list (default: allow). An allow-list breaks numpy/sympy/CPython in unpredictable ways;
namespaces and rlimits do the confinement, seccomp removes the kernel surface a confined process could use
to get out: namespace and mount syscalls, ptrace and cross-process memory access, BPF, perf, keyrings,
userfaultfd, io_uring, module loading, and every socket family except AF_UNIX (which only reaches peers
inside the per-call network namespace; without one, AF_UNIX is denied too).
"""
from __future__ import annotations

import ctypes
import errno
import os

SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_NE = 1
SCMP_CMP_MASKED_EQ = 7
PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
AF_UNIX = 1

CLONE_NAMESPACE_FLAGS = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000,
                         0x40000000, 0x00000080)  # NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET, NEWTIME
# CLONE_PARENT makes the new process a sibling of the caller, i.e. a child of the template (outside the
# call's pid namespace): its zombie outlived the call's sweep and failed the next call. (CLONE_THREAD also
# shares the caller's parent, but a thread never becomes a zombie of it.)
CLONE_REPARENT_FLAGS = (0x00008000,)

DENIED = (
    # namespaces, mounts, root changes
    "unshare", "setns", "mount", "umount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree",
    "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr",
    # other processes' memory and state
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd", "process_madvise",
    # kernel attack surface an unprivileged process can still reach
    "bpf", "perf_event_open", "userfaultfd", "keyctl", "add_key", "request_key", "io_uring_setup",
    "io_uring_enter", "io_uring_register", "open_by_handle_at", "name_to_handle_at", "fanotify_init",
    # host administration (needs capabilities anyway; denied so a capability slip is not enough)
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "reboot", "swapon",
    "swapoff", "acct", "quotactl", "syslog", "iopl", "ioperm", "vhangup", "settimeofday", "clock_settime",
    "clock_adjtime", "sethostname", "setdomainname", "lookup_dcookie", "uselib",
)


class SeccompUnavailable(RuntimeError):
    pass


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _errno_action(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)  # SCMP_ACT_ERRNO(code)


def _load_libseccomp() -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    except OSError:
        from ctypes.util import find_library  # runs ldconfig: only when the usual soname is missing

        name = find_library("seccomp")
        try:
            lib = ctypes.CDLL(name, use_errno=True) if name else None
        except OSError:
            lib = None
    if lib is None:
        raise SeccompUnavailable("libseccomp.so.2 not found; install libseccomp2 (apt) / libseccomp (dnf)")
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                           ctypes.POINTER(_ArgCmp)]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    return lib


def build_filter(allow_unix_sockets: bool) -> bytes:
    """Compile the deny-list into raw BPF (struct sock_filter[]). Raises SeccompUnavailable."""
    lib = _load_libseccomp()
    ctx = lib.seccomp_init(SCMP_ACT_ALLOW)
    if not ctx:
        raise SeccompUnavailable("seccomp_init failed")
    try:
        def add(action: int, name: str, *cmps: tuple[int, int, int, int]) -> None:
            nr = lib.seccomp_syscall_resolve_name(name.encode())
            if nr < 0:  # not on this architecture
                return
            arr = (_ArgCmp * max(1, len(cmps)))(*[_ArgCmp(*c) for c in cmps])
            rc = lib.seccomp_rule_add_array(ctx, action, nr, len(cmps), arr)
            if rc < 0:
                raise SeccompUnavailable(f"seccomp_rule_add({name}) failed: {os.strerror(-rc)}")

        for name in DENIED:
            add(_errno_action(errno.EPERM), name)
        # clone3 passes its flags in memory seccomp cannot read: ENOSYS makes glibc fall back to clone().
        add(_errno_action(errno.ENOSYS), "clone3")
        for flag in CLONE_NAMESPACE_FLAGS + CLONE_REPARENT_FLAGS:
            add(_errno_action(errno.EPERM), "clone", (0, SCMP_CMP_MASKED_EQ, flag, flag))
        if allow_unix_sockets:
            add(_errno_action(errno.EAFNOSUPPORT), "socket", (0, SCMP_CMP_NE, AF_UNIX, 0))
        else:
            add(_errno_action(errno.EAFNOSUPPORT), "socket")
        fd = os.memfd_create("seccomp-bpf")
        try:
            rc = lib.seccomp_export_bpf(ctx, fd)
            if rc < 0:
                raise SeccompUnavailable(f"seccomp_export_bpf failed: {os.strerror(-rc)}")
            size = os.lseek(fd, 0, os.SEEK_END)
            return os.pread(fd, size, 0)
        finally:
            os.close(fd)
    finally:
        lib.seccomp_release(ctx)


class Filter:
    """A compiled filter, with its sock_fprog built ahead (in the template) so loading it in each snippet
    allocates nothing: two prctl calls."""

    def __init__(self, program: bytes):
        if not program or len(program) % 8:
            raise SeccompUnavailable("empty or malformed BPF program")
        self.program = program
        self._buf = ctypes.create_string_buffer(program, len(program))
        self._prog = _SockFprog(len(program) // 8, ctypes.cast(self._buf, ctypes.c_void_p))
        self._addr = ctypes.addressof(self._prog)

    def __len__(self) -> int:
        return len(self.program) // 8

    def install(self, libc: ctypes.CDLL) -> None:
        """Load into the calling process (and its future children). Irreversible."""
        if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
        if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, self._addr, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")
