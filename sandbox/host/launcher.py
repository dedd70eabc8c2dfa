"""First process of every worker, run as a script (`python -I -S launcher.py SPEC`), before the jail exists.

As the caller's uid it: joins the worker's cgroup slot (so everything it ever forks is counted there);
when we are root, gives the Python install a path the sandbox uid can traverse (a private mount
namespace with bind mounts: the interpreter may live under a 0700 home dir) and drops to uid/gid 65534;
then execs bwrap (or, in the fallback, the template itself). bwrap therefore always runs unprivileged,
in its own user namespace mapped onto 65534, never onto host root.

Self-contained (standard library only, run with -I -S so nothing on the caller's path, such as the package's
own `types` module, can shadow the standard library): it runs before anything is set up. It lives on the host
side: it never enters the jail, it execs it.
"""
from __future__ import annotations

import ctypes
import json
import os
import sys

CLONE_NEWNS, MS_BIND, MS_REC, MS_PRIVATE = 0x00020000, 4096, 0x4000, 1 << 18


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def main(spec: dict) -> None:
    for path in spec.get("cgroup_procs", []):
        with open(path, "w") as f:
            f.write("0")  # "0" moves the writing process itself
    if spec.get("stage"):
        libc = ctypes.CDLL(None, use_errno=True)
        _check(libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
        _check(libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "mount --make-rprivate /")
        for source, target in spec["stage"]:
            _check(libc.mount(source.encode(), target.encode(), None, MS_BIND | MS_REC, None), f"bind {source}")
    uid, gid = spec.get("uid"), spec.get("gid")
    if uid is not None and os.getuid() == 0:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    os.execve(spec["argv"][0], spec["argv"], spec["env"])


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
