"""The forked child of one call: confine this process, then run the untrusted code as `__main__`.

Confinement order matters: file descriptors and environment first (nothing of the template leaks), then
rlimits, then capabilities, no_new_privs, Landlock, seccomp (seccomp last, it forbids what came before).
If any step the pool promised fails, the code does not run: the process exits with SETUP_FAILED and the
template reports `sandbox_error`. Nothing ever runs with less isolation than the start-up report says.

Everything here is kept cheap: each page a forked child writes is a copy (~4 us on this machine), so what
can happen before the fork does (RNG reseed, prepared ctypes structs and BPF). Every import is at module
level, so the template imports it before it drops privileges (in the fallback mode the interpreter's own
files may be unreadable afterwards).
"""
from __future__ import annotations

import atexit
import builtins
import json
import linecache
import math
import os
import random
import resource
import sys
import traceback
import types

from sandbox import linux
from sandbox.jail import landlock, seccomp

SETUP_FAILED = 111
INFO_FD = 3  # write end of the monitor's info pipe (close-on-exec): memory-error flags
SNIPPET_FILENAME = "<snippet>"


def _set_rlimit(which: int, soft: int, hard: int | None = None) -> None:
    hard = soft if hard is None else hard
    _, cur_hard = resource.getrlimit(which)
    if cur_hard != resource.RLIM_INFINITY:
        soft, hard = min(soft, cur_hard), min(hard, cur_hard)
    resource.setrlimit(which, (soft, hard))


def _apply_rlimits(limits: dict, nproc_extra: int) -> None:
    mib = 1024 * 1024
    cpu = max(1, math.ceil(limits["cpu_time_s"]))
    _set_rlimit(resource.RLIMIT_CPU, cpu, cpu + 1)  # SIGXCPU at the soft limit, SIGKILL one second later
    _set_rlimit(resource.RLIMIT_AS, int(limits["memory_mb"] * mib))
    _set_rlimit(resource.RLIMIT_NPROC, int(limits["max_processes"]) + nproc_extra)
    _set_rlimit(resource.RLIMIT_NOFILE, int(limits["max_open_files"]))
    _set_rlimit(resource.RLIMIT_FSIZE, max(1, int(limits["max_file_size_mb"] * mib)))
    _set_rlimit(resource.RLIMIT_CORE, 0)


def reseed_before_fork() -> None:
    """Called by the template right before each fork: forked children share its RNG state, so every call
    must start from fresh entropy. Done here rather than in the child, where rewriting numpy's state would
    copy ~150 pages (0.5 ms) on every call, even for snippets that never draw a number."""
    random.seed()
    np_random = sys.modules.get("numpy.random")
    if np_random is not None:
        np_random.seed()


def write_files(root: str, names: list[str], contents: list[memoryview]) -> None:
    """In the snippet, before confinement. The pool checked the names (`sandbox.host.pool.check_file_name`)."""
    for name, data in zip(names, contents, strict=True):
        path = os.path.normpath(os.path.join(root, name))
        if not path.startswith(root.rstrip("/") + "/"):
            raise ValueError(f"file name {name!r} escapes the scratch dir")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        try:
            view = data
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)


def unpack_call(header: dict, buf) -> tuple[str, bytes | None, list[str], list[memoryview]]:
    """(code, stdin, file names, file contents) from the call's blob buffer; runs in the snippet."""
    view = memoryview(buf)
    parts, at = [], 0
    for size in header["blob_sizes"]:
        parts.append(view[at:at + size])
        at += size
    code = bytes(parts[0]).decode("utf-8", "surrogatepass")
    stdin = bytes(parts[1]) if header.get("stdin") else None
    names = bytes(parts[2]).decode().split("\0") if header.get("files") else []
    return code, stdin, names, parts[3:]


def stdin_fd(data: bytes | None) -> int:
    """In the snippet: a file, not a pipe (reading it never blocks on anyone)."""
    if not data:
        return os.open(os.devnull, os.O_RDONLY)
    fd = os.memfd_create("stdin")
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def confine(ctx: dict, limits: dict, scratch: str, env: dict, fds: dict) -> None:
    """ctx: what the template activated (namespaces, landlock_fd, seccomp filter). fds: stdin/stdout/stderr/info."""
    os.dup2(fds["stdin"], 0)
    os.dup2(fds["stdout"], 1)
    os.dup2(fds["stderr"], 2)
    os.dup2(fds["info"], INFO_FD)
    os.set_inheritable(INFO_FD, False)  # close-on-exec: shells and exec'd programs do not get it
    fds["info"] = INFO_FD
    keep = ctx.get("landlock_fd")
    if keep is None:
        os.closerange(INFO_FD + 1, 1 << 16)
    else:
        os.closerange(INFO_FD + 1, keep)
        os.closerange(keep + 1, 1 << 16)
    if os.getsid(0) != os.getpid():
        os.setsid()
    os.chdir(scratch)
    for key, value in env.items():  # the template's environment is already the scrubbed set
        if os.environ.get(key) != value:
            os.environ[key] = value
    # The OOM killer takes the snippet, never the template. Only a dumpable process owns its /proc files
    # (the template is not dumpable, and neither is its fork until now): without this the write failed with
    # EACCES and the snippet kept the template's score. Checked, not assumed.
    linux.set_dumpable(True)
    oom = os.open("/proc/self/oom_score_adj", os.O_RDWR)
    try:
        os.write(oom, b"1000")
        if os.pread(oom, 16, 0).strip() != b"1000":
            raise RuntimeError("oom_score_adj did not take the value 1000")
    finally:
        os.close(oom)
    _apply_rlimits(limits, nproc_extra=2 if ctx["namespaces"] else 0)  # the template and pid 1 share the count
    if ctx["namespaces"]:
        linux.drop_all_capabilities()  # the ones the call's user namespace gave us
    linux.set_pdeathsig()  # the template died: so do we
    linux.prctl(seccomp.PR_SET_NO_NEW_PRIVS, 1)
    if keep is not None:
        landlock.restrict_self(keep, linux.libc)
        os.close(keep)
    if ctx.get("seccomp") is not None:
        ctx["seccomp"].install(linux.libc)
    linux.set_dumpable(True)
    # sys.stdin/stdout/stderr are the interpreter's own objects on fds 0-2, never used by the template
    # (so their buffers are empty) and now reading/writing this call's pipes: nothing to rebuild.


def _exit_code(e: SystemExit) -> int:
    code = e.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def execute(code: str) -> int:
    """Run `code` like `python -c` would and return the process exit status."""
    main = types.ModuleType("__main__")
    main.__builtins__ = builtins
    sys.modules["__main__"] = main
    sys.argv = ["-c"]
    linecache.cache[SNIPPET_FILENAME] = (len(code), None, code.splitlines(True), SNIPPET_FILENAME)
    try:
        exec(compile(code, SNIPPET_FILENAME, "exec"), main.__dict__)
        rc = 0
    except SystemExit as e:
        rc = _exit_code(e)
    except BaseException as e:  # noqa: BLE001 - report like the interpreter does
        if isinstance(e, MemoryError):
            try:
                os.write(INFO_FD, b"M\n")
            except OSError:
                pass
        try:
            traceback.print_exception(type(e), e, e.__traceback__.tb_next if e.__traceback__ else None)
        except BaseException:  # noqa: BLE001 - stderr closed or memory gone: the exit code still tells
            pass
        rc = 1
    try:
        atexit._run_exitfuncs()
    except BaseException:  # noqa: BLE001
        pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001 - the snippet closed or broke its own stdout
            if stream is sys.stdout and rc == 0:
                rc = 120  # what CPython exits with when flushing stdout fails at shutdown
    return rc


def run(header: dict, buf, ctx: dict, limits: dict, scratch: str, env: dict, fds: dict) -> None:
    """Never returns: unpack the call, confine, execute, _exit. The call's data is read here, in the fork,
    never by the template (see `sandbox.jail.zygote._receive`)."""
    try:
        if ctx["namespaces"]:
            linux.unshare(linux.CLONE_NEWIPC)  # SysV objects and POSIX queues of this call die with it
        code, stdin, names, contents = unpack_call(header, buf)
        write_files(scratch, names, contents)
        fds["stdin"] = stdin_fd(stdin)
        del names, contents, stdin
        confine(ctx, limits, scratch, env, fds)
    except BaseException as e:  # noqa: BLE001
        try:
            os.write(fds["info"], json.dumps({"setup_error": f"{type(e).__name__}: {e}"}).encode() + b"\n")
        finally:
            os._exit(SETUP_FAILED)
    os._exit(execute(code))
