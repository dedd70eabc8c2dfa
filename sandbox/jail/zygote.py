"""The warm template ("zygote"): one per pool worker, started once, forked once per call.

Start-up: drop to the sandbox uid (fallback mode; in the jail the launcher did), import `preimport` (numpy,
sympy, ... so snippets pay nothing for them), compile the seccomp filter and the Landlock ruleset, *probe*
every mechanism in a throw-away child, then enter the worker's namespaces (user, mount, pid, ipc: see
`sandbox.jail.reaper`) and report what really works in a hello frame. Serving: read a call from the control
socket and run it (`sandbox.jail.monitor`), one call at a time.

The template never runs untrusted code and is not dumpable. With namespaces it is outside the pid
namespace its calls run in, so a snippet can neither see nor signal it; it keeps capabilities only inside
its own user namespace (to give each call a fresh IPC namespace), and every snippet drops them.

Runs inside the jail with only the standard library and this package; started by `sandbox.host.launch`.
"""
from __future__ import annotations

import gc
import importlib
import mmap
import os
import secrets
import signal
import socket
import stat
import sys
import time

from sandbox import linux, protocol
from sandbox.jail import landlock, monitor, reaper, seccomp


def _drop_privileges(cfg: dict) -> None:
    uid, gid = cfg.get("uid"), cfg.get("gid")
    if uid is None or os.getuid() != 0:
        return
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if os.getuid() != uid or os.geteuid() != uid or os.getgid() != gid:
        raise RuntimeError(f"could not drop to uid {uid}")


# Submodules a library loads lazily on first attribute access: warm them with it, or every snippet that
# touches `numpy.random` pays the import (~10-30 ms) again in its own fork.
COMPANIONS = {"numpy": ("numpy.random", "numpy.fft", "numpy.polynomial")}


def _preimport(names: list[str]) -> tuple[list[str], dict[str, str]]:
    done, failed = [], {}
    for name in [mod for top in names for mod in (top, *COMPANIONS.get(top, ()))]:
        try:
            importlib.import_module(name)
            done.append(name)
        except BaseException as e:  # noqa: BLE001 - a broken optional library must not stop the sandbox
            failed[name] = f"{type(e).__name__}: {e}"
    return done, failed


def _probe(fn) -> str | None:
    """Run fn in a throw-away child; None if it worked, else the error text."""
    a, b = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        err = ""
        try:
            a.close()
            fn()
        except BaseException as e:  # noqa: BLE001
            err = f"{type(e).__name__}: {e}"
        try:
            b.sendall(err.encode() or b"ok")
        finally:
            os._exit(0)
    b.close()
    a.settimeout(30)
    try:
        reply = a.recv(65536).decode(errors="replace")
    except OSError as e:
        reply = f"probe failed: {e}"
    os.waitpid(pid, 0)
    a.close()
    while True:  # orphans of the probe (its namespace's pid 1) were re-parented to us, a subreaper
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                break
        except ChildProcessError:
            break
    return None if reply == "ok" else (reply or "probe child died")


def _probe_namespaces(uid: int, gid: int, scratch_mb: int) -> None:
    monitor.enter_namespaces(uid, gid)
    monitor.mount_scratch(scratch_mb)
    _, sock = reaper.start()
    pid = os.fork()
    if pid == 0:
        try:
            linux.unshare(linux.CLONE_NEWIPC)  # what every call does
        except OSError:
            os._exit(4)
        os._exit(0 if os.getpid() == 2 and os.getppid() == 0 else 3)
    _, status = os.waitpid(pid, 0)
    reaper.sweep(sock)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError("a forked call did not land in the call pid namespace, or could not get its own "
                           "IPC namespace")


def _enter_namespaces(ctx: dict) -> None:
    """For real, in the template itself (after the probe said it works)."""
    monitor.enter_namespaces(ctx["uid"], ctx["gid"])
    monitor.mount_scratch(ctx["scratch_mb"])
    ctx["reaper_pid"], ctx["reaper"] = reaper.start()


def _probe_seccomp(flt: seccomp.Filter) -> None:
    flt.install(linux.libc)
    try:
        socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    except OSError:
        return
    raise RuntimeError("filter loaded but socket(AF_INET) still works")


def _activate(cfg: dict) -> tuple[dict, dict]:
    """Build and probe each mechanism. Returns (ctx for calls, {name: [active, detail]})."""
    disabled = set(cfg.get("disable", ()))
    uid, gid = os.getuid(), os.getgid()
    ctx: dict = {"namespaces": False, "uid": uid, "gid": gid, "env": cfg["env"], "landlock_fd": None,
                 "seccomp": None, "reaper": None, "reaper_pid": None,
                 "scratch_mb": cfg.get("scratch_mb", 1096)}
    mech: dict = {}
    if not cfg["jail"]:
        mech["namespaces"] = [False, "no filesystem jail, so no per-call namespaces"]
    elif "namespaces" in disabled:
        mech["namespaces"] = [False, "disabled by request"]
    else:
        err = _probe(lambda: _probe_namespaces(uid, gid, ctx["scratch_mb"]))
        if err is None:
            _enter_namespaces(ctx)
            ctx["namespaces"] = True
        mech["namespaces"] = [err is None, err or "user, mount, pid namespaces of the worker's calls (the "
                                                 "template is not in the pid one), a fresh ipc namespace per "
                                                 "call, everything but pid 1 killed after each call"]
    if "landlock" in disabled:
        mech["landlock"] = [False, "disabled by request"]
    else:
        read = cfg["read_paths"]
        write = ["/tmp", "/dev/shm", "/dev/null"] if cfg["jail"] else [_scratch_root(cfg), "/dev/null"]
        try:
            abi = landlock.abi_version()
            fd = landlock.build_high(read, write)
            err = _probe(lambda: (linux.prctl(seccomp.PR_SET_NO_NEW_PRIVS, 1),
                                  landlock.restrict_self(fd, linux.libc)))
            if err is None:
                ctx["landlock_fd"] = fd
            else:
                os.close(fd)
            scope = "signals+abstract sockets scoped" if abi >= 6 else "no signal scoping (ABI < 6)"
            what = ("read-only jail, write only /tmp" if cfg["jail"]
                    else "read-only system+python paths, write only scratch")
            tcp = "denied" if abi >= 4 else "not covered"
            mech["landlock"] = [err is None, err or f"ABI {abi}: {what}; TCP {tcp}; {scope}"]
        except (landlock.LandlockUnavailable, OSError) as e:
            mech["landlock"] = [False, str(e)]
    if "seccomp" in disabled:
        mech["seccomp"] = [False, "disabled by request"]
    else:
        try:
            flt = seccomp.Filter(seccomp.build_filter(allow_unix_sockets=cfg["jail"]))
            err = _probe(lambda: _probe_seccomp(flt))
            if err is None:
                ctx["seccomp"] = flt
            mech["seccomp"] = [err is None, err or f"libseccomp deny-list, {len(flt)} BPF instructions: "
                                                   "sockets (AF_UNIX only inside the jail's netns), ptrace, "
                                                   "namespaces, mount, CLONE_PARENT, bpf, perf, keyring, io_uring"]
        except (seccomp.SeccompUnavailable, OSError) as e:
            mech["seccomp"] = [False, str(e)]
    return ctx, mech


def _scratch_root(cfg: dict) -> str:
    """Where per-call scratch dirs go when a call does not own the jail's whole /tmp: the jail's /tmp
    (jail without namespaces), else the slot dir the pool made for us (fallback mode)."""
    return cfg["scratch_root"] or "/tmp"


def _wipe(root: str) -> None:
    """Empty `root` (the jail's /tmp and /dev/shm, or a call's scratch dir) whatever the snippet left there:
    no recursion and no long paths (a snippet can nest directories deeper than any recursion limit or
    PATH_MAX): each round deletes the files one level down and moves subdirectories up to `root`."""
    tag = secrets.token_hex(4)
    moved = 0
    while entries := os.listdir(root):
        for name in entries:
            path = os.path.join(root, name)
            if os.path.islink(path) or not os.path.isdir(path):
                os.unlink(path)
                continue
            os.chmod(path, stat.S_IRWXU)  # the snippet may have made it unreadable (it is ours: same uid)
            for sub in os.listdir(path):
                child = os.path.join(path, sub)
                if os.path.isdir(child) and not os.path.islink(child):
                    moved += 1
                    os.chmod(child, stat.S_IRWXU)  # moving a dir rewrites its "..": needs write access to it
                    os.rename(child, os.path.join(root, f".wipe-{tag}-{moved}"))
                else:
                    os.unlink(child)
            os.rmdir(path)


def _receive(ctrl: socket.socket) -> tuple[dict, mmap.mmap] | None:
    """One call frame: the JSON header, and every blob read straight into an anonymous mapping (the call's
    code, stdin, file names and contents never become objects on the template's heap: the mapping is
    unmapped after the call, so no later fork of the template holds any of it)."""
    try:
        header = protocol.recv_header(ctrl)
    except (EOFError, ConnectionError):
        return None  # the pool closed or died: nothing else to do
    total = sum(header["blob_sizes"])
    buf = mmap.mmap(-1, max(1, total))
    with memoryview(buf) as view:
        protocol.recv_into(ctrl, view[:total])
    return header, buf


def _cleanup(ctx: dict, scratch: str, shared_tmp: bool) -> None:
    if shared_tmp:
        _wipe("/tmp")
        _wipe("/dev/shm")
    else:
        _wipe(scratch)
        os.rmdir(scratch)


def _serve_one(ctrl: socket.socket, ctx: dict, cfg: dict, number: int) -> bool:
    """One call, start to reply; every object of the call lives in this frame and is gone when it returns
    (a later call's snippet, forked from below `serve`, finds nothing of it by walking frames)."""
    received = _receive(ctrl)
    if received is None:
        return False
    header, buf = received
    shared_tmp = ctx["namespaces"]  # jail: the call owns the worker's whole /tmp
    scratch = "/tmp" if shared_tmp else os.path.join(_scratch_root(cfg), f"call-{number}")
    outputs = monitor.Outputs(int(header["limits"]["max_output_bytes"]))
    try:
        try:
            if not shared_tmp:
                os.mkdir(scratch, 0o700)
            head = monitor.run_call(header, buf, scratch, ctx, outputs)
        finally:
            buf.close()
            started = time.monotonic()
            _cleanup(ctx, scratch, shared_tmp)
        # what the call left behind, cleaned before the reply: counted in its duration and reported
        head["cleanup_s"] = head.get("cleanup_s", 0.0) + time.monotonic() - started
        protocol.send(ctrl, dict(head, id=header.get("id")), outputs.views())
    except BaseException as e:  # noqa: BLE001 - our state is suspect now: say so, then let the pool replace us
        res = monitor.fail_result(f"template: {type(e).__name__}: {e}")
        res.pop("stdout"), res.pop("stderr")
        protocol.send(ctrl, dict(res, id=header.get("id"), fatal=True), [b"", b""])
        raise
    finally:
        outputs.close()
    return True


def serve(ctrl: socket.socket, ctx: dict, cfg: dict) -> None:
    number = 0
    while True:
        number += 1
        if not _serve_one(ctrl, ctx, cfg, number):
            return


def main(ctrl_fd: int) -> None:
    ctrl = socket.socket(fileno=ctrl_fd)
    header, _ = protocol.recv(ctrl, deadline=None, max_blob_bytes=0)
    if header.get("type") != "config":
        raise RuntimeError(f"expected the config frame, got {header.get('type')!r}")
    cfg = header["config"]
    os.environ.clear()  # exactly the scrubbed set: snippets inherit it as is (no per-call rebuild)
    os.environ.update(cfg["env"], PWD=os.getcwd())
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.close(devnull)
    done, failed = _preimport(cfg["preimport"])
    # Before the first fork: children never scan (so never copy-on-write) these objects, and the heap's
    # huge pages stay whole in the template (a collection after a fork would touch, and split, them all).
    gc.collect()
    gc.freeze()
    if not cfg["jail"]:
        _drop_privileges(cfg)  # after the imports: the interpreter may live under a private home dir
        linux.set_pdeathsig()  # (after the uid change, which clears it) the pool died: so do we
    linux.set_child_subreaper()
    linux.set_dumpable(False)
    # linux.lean_fork is only safe single-threaded: a preimported library may have started threads
    threads = len(os.listdir("/proc/self/task"))
    ctx, mech = _activate(cfg)
    ctx["lean_fork"] = threads == 1
    wake_r, wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)  # SIGCHLD wakes the call's poll loop
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.set_wakeup_fd(wake_w)
    ctx["wake_fd"] = wake_r
    gc.collect()
    gc.freeze()  # children never scan (and so never copy-on-write) the template's objects
    protocol.send(ctrl, {"type": "hello", "uid": os.getuid(), "mechanisms": mech,
                         "preimported": done, "preimport_failed": failed, "python": sys.version.split()[0]})
    serve(ctrl, ctx, cfg)
