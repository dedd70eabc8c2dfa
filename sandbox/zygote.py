"""The warm template ("zygote"): one per pool worker, started once, forked once per call.

Start-up: drop to the sandbox uid, import `preimport` (numpy, sympy, ... so snippets pay nothing for them),
compile the seccomp filter and the Landlock ruleset, then *probe* every mechanism in a throw-away child and
report what really works in a hello frame. Serving: read a call from the control socket, fork a monitor
(`sandbox.monitor`) for it, relay its result. The template itself never runs untrusted code, holds no
capabilities and is not dumpable (a snippet cannot ptrace it or read its memory through /proc).

Runs inside the jail with only the standard library and this package; started by `sandbox.launch`.
"""
from __future__ import annotations

import gc
import importlib
import json
import os
import shutil
import signal
import socket
import stat
import sys
import time

from sandbox import landlock, linux, monitor, protocol, seccomp

BACKSTOP_S = 5.0  # extra seconds a monitor gets past the call's timeout before the template kills it


def _drop_privileges(cfg: dict) -> None:
    uid, gid = cfg.get("uid"), cfg.get("gid")
    if uid is None or os.getuid() != 0:
        return
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if os.getuid() != uid or os.geteuid() != uid or os.getgid() != gid:
        raise RuntimeError(f"could not drop to uid {uid}")


def _preimport(names: list[str]) -> tuple[list[str], dict[str, str]]:
    done, failed = [], {}
    for name in names:
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
            err = f"{type(e).__name__}: {e}" or "failed"
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
    return None if reply == "ok" else (reply or "probe child died")


def _probe_namespaces(uid: int, gid: int) -> None:
    monitor.enter_namespaces(uid, gid, scratch_mb=16)
    pid = os.fork()
    if pid == 0:  # pid 1 of the new namespace
        try:
            linux.mount("proc", "/proc", "proc", linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC)
            os._exit(0 if os.getpid() == 1 else 2)
        except OSError as e:
            os._exit(10 + e.errno)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"pid namespace init check failed (exit {code})")


def _probe_seccomp(bpf: bytes) -> None:
    seccomp.install(bpf, linux.libc)
    try:
        socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    except OSError:
        return
    raise RuntimeError("filter loaded but socket(AF_INET) still works")


def _activate(cfg: dict) -> tuple[dict, dict]:
    """Build and probe each mechanism. Returns (ctx for calls, {name: [active, detail]})."""
    disabled = set(cfg.get("disable", ()))
    uid, gid = os.getuid(), os.getgid()
    ctx: dict = {"namespaces": False, "uid": uid, "gid": gid, "env": cfg["env"], "landlock": None,
                 "seccomp_bpf": None}
    mech: dict = {}
    if not cfg["jail"]:
        mech["namespaces"] = [False, "no filesystem jail, so no per-call namespaces"]
    elif "namespaces" in disabled:
        mech["namespaces"] = [False, "disabled by request"]
    else:
        err = _probe(lambda: _probe_namespaces(uid, gid))
        ctx["namespaces"] = err is None
        mech["namespaces"] = [err is None, err or "per call: user (1:1 map), pid, mount, net (lo only), ipc, uts; "
                                                 "private tmpfs /tmp and /dev/shm"]
    if "landlock" in disabled:
        mech["landlock"] = [False, "disabled by request"]
    else:
        # Built per call, after the call's mounts (see monitor.with_landlock_ruleset).
        rules = {"read": cfg["read_paths"],
                 "write": (["/tmp", "/dev/shm"] if ctx["namespaces"] else [_scratch_root(cfg)]) + ["/dev/null"],
                 "list": ["/"] if cfg["jail"] else []}  # in the jail only bound paths exist: listing is harmless
        try:
            abi = landlock.abi_version()
            fd = landlock.build_high(rules["read"], rules["write"], rules["list"])
            err = _probe(lambda: (linux.prctl(seccomp.PR_SET_NO_NEW_PRIVS, 1), landlock.restrict_self(fd, linux.libc)))
            os.close(fd)
            if err is None:
                ctx["landlock"] = rules
            scope = "signals+abstract sockets scoped" if abi >= 6 else "no signal scoping (ABI < 6)"
            mech["landlock"] = [err is None, err or f"ABI {abi}: read-only system+python paths, write only "
                                                    f"scratch; TCP {'denied' if abi >= 4 else 'not covered'}; {scope}"]
        except (landlock.LandlockUnavailable, OSError) as e:
            mech["landlock"] = [False, str(e)]
    if "seccomp" in disabled:
        mech["seccomp"] = [False, "disabled by request"]
    else:
        try:
            bpf = seccomp.build_filter(allow_unix_sockets=ctx["namespaces"])
            err = _probe(lambda: _probe_seccomp(bpf))
            if err is None:
                ctx["seccomp_bpf"] = bpf
            mech["seccomp"] = [err is None, err or f"libseccomp deny-list, {len(bpf) // 8} BPF instructions: "
                                                   "sockets (except AF_UNIX in a private netns), ptrace, "
                                                   "namespaces, mount, bpf, perf, keyring, io_uring"]
        except (seccomp.SeccompUnavailable, OSError) as e:
            mech["seccomp"] = [False, str(e)]
    return ctx, mech


def _scratch_root(cfg: dict) -> str:
    """Where per-call scratch dirs go when there is no per-call tmpfs: the jail's own /tmp, else the slot dir
    the pool made for us."""
    return cfg["scratch_root"] or "/tmp"


def _remove_tree(path: str) -> None:
    def fix(func, p, _exc):  # the snippet may have chmod-ed its own dirs to 000
        try:
            os.chmod(os.path.dirname(p), stat.S_IRWXU)
            os.chmod(p, stat.S_IRWXU)
        except OSError:
            pass
        func(p)

    shutil.rmtree(path, onerror=fix)


def _execute(header: dict, blobs: list[bytes], ctx: dict, cfg: dict, number: int) -> tuple[dict, list[bytes]]:
    names = header.get("files", [])
    call = {"code": blobs[0].decode("utf-8", "surrogatepass"), "stdin": blobs[1] if header.get("stdin") else None,
            "files": dict(zip(names, blobs[2:])), "limits": header["limits"]}
    scratch = None
    if not ctx["namespaces"]:
        scratch = call["scratch"] = os.path.join(_scratch_root(cfg), f"call-{number}")
        os.mkdir(scratch, 0o700)
    mine, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        try:
            mine.close()
            os.close(cfg["ctrl_fd"])  # the monitor never talks to the pool directly
            result = monitor.run_call(call, ctx)
        except BaseException as e:  # noqa: BLE001
            result = monitor.fail_result(f"monitor: {type(e).__name__}: {e}")
        try:
            out, err = result.pop("stdout"), result.pop("stderr")
            protocol.send(theirs, result, [out, err])
        finally:
            os._exit(0)
    theirs.close()
    del call, blobs
    deadline = time.monotonic() + float(header["limits"]["timeout_s"]) + float(header.get("backstop_s", BACKSTOP_S))
    try:
        head, (out, err) = protocol.recv(mine, deadline=deadline)
    except (EOFError, TimeoutError, protocol.ProtocolError, ValueError, OSError) as e:
        os.kill(pid, signal.SIGKILL)
        res = monitor.fail_result(f"monitor failed: {type(e).__name__}: {e}")
        head, out, err = res, res.pop("stdout"), res.pop("stderr")
    finally:
        mine.close()
    os.waitpid(pid, 0)
    if scratch is not None:
        linux.kill_descendants()
        _remove_tree(scratch)
    return head, [out, err]


def serve(ctrl: socket.socket, ctx: dict, cfg: dict) -> None:
    number = 0
    while True:
        try:
            header, blobs = protocol.recv(ctrl)
        except (EOFError, ConnectionError):
            return  # the pool closed or died: nothing else to do
        number += 1
        if header.get("type") == "run":
            head, out = _execute(header, blobs, ctx, cfg, number)
            protocol.send(ctrl, dict(head, id=header.get("id")), out)
        elif header.get("type") == "ping":
            protocol.send(ctrl, {"type": "pong", "id": header.get("id")})


def main(config_json: str) -> None:
    cfg = json.loads(config_json)
    ctrl = socket.socket(fileno=cfg["ctrl_fd"])
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.close(devnull)
    done, failed = _preimport(cfg["preimport"])
    if not cfg["jail"]:
        _drop_privileges(cfg)  # after the imports: the interpreter may live under a private home dir
        linux.set_pdeathsig()  # (after the uid change, which clears it) the pool died: so do we
        linux.set_child_subreaper()
    linux.set_dumpable(False)
    ctx, mech = _activate(cfg)
    gc.collect()
    gc.freeze()  # children never scan (and so never copy-on-write) the template's objects
    protocol.send(ctrl, {"type": "hello", "pid": os.getpid(), "uid": os.getuid(), "mechanisms": mech,
                         "preimported": done, "preimport_failed": failed, "python": sys.version.split()[0]})
    serve(ctrl, ctx, cfg)
