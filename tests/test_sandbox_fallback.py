"""The fallback path hosts without user namespaces get (typical GPU nodes in Docker): no bwrap jail, a plain
template process, and whatever of seccomp/Landlock/cgroups/uid 65534 the kernel still offers. Forced here
by disabling mechanisms; everything runs on real processes."""
from __future__ import annotations

import os
import secrets
import signal
import sys
import time
from pathlib import Path

import pytest

from sandbox import ExecStatus, Limits, SandboxPool

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox needs Linux")

REPO = Path(__file__).resolve().parents[1]
SECRET = f"sbx-fallback-secret-{secrets.token_hex(8)}"
# As root the fallback template drops to uid 65534 after its imports, so modules it did not preimport may be
# unreachable (the interpreter can live under a 0700 home dir): preimport what the snippets below use.
LIMITS = Limits(timeout_s=3.0, cpu_time_s=3.0, memory_mb=512,
                preimport=("math", "numpy", "socket", "encodings.idna", "ctypes", "glob", "resource"))


@pytest.fixture(scope="module")
def plain_pool():
    os.environ["SELFPLAY_SANDBOX_FALLBACK_SECRET"] = SECRET
    with SandboxPool(LIMITS, workers=1, disable=("bwrap",), hang_grace_s=4.0) as p:
        p.baseline = {i: len(t) for i, t in p.worker_processes().items()}
        yield p


def _named(comm: str) -> list[str]:
    out = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and Path(f"/proc/{entry}/comm").read_text().strip() == comm:
                out.append(entry)
        except OSError:
            pass
    return out


def test_fallback_says_what_it_is(plain_pool):
    report = plain_pool.report
    assert report.level == "rlimits"
    assert not report.mechanisms["bwrap"].active and "disabled" in report.mechanisms["bwrap"].detail
    assert not report.mechanisms["namespaces"].active


def test_fallback_runs_ordinary_code(plain_pool):
    r = plain_pool.run("import sys, numpy\nprint(sys.stdin.read(), numpy.arange(4).sum(), open('f.txt').read())",
                       stdin="in", files={"f.txt": "file"})
    assert (r.status, r.stdout) == (ExecStatus.OK, "in 6 file\n"), r.stderr
    r = plain_pool.run("import os\nopen('marker', 'w').write('x')\nprint(os.getcwd())")
    cwd = r.stdout.strip()
    assert cwd.startswith(plain_pool.scratch_root)
    assert not os.path.exists(cwd)  # the scratch dir is gone once the call returns


def test_fallback_hides_secrets_and_blocks_writes(plain_pool, tmp_path):
    landlock = plain_pool.report.mechanisms["landlock"].active
    dedicated = plain_pool.report.mechanisms["dedicated_uid"].active
    code = ("import os\nprint(sorted(os.environ))\n"
            f"for path in ('/etc/shadow', {str(REPO / 'pyproject.toml')!r}, '/proc/{os.getpid()}/environ'):\n"
            "    try:\n        print(path, open(path, 'rb').read()[:300])\n"
            "    except OSError as e:\n        print(path, 'denied')\n"
            f"for path in ({str(tmp_path / 'pwned')!r}, {str(REPO / 'sbx-pwned')!r}):\n"
            "    try:\n        open(path, 'w').write('x')\n        print('wrote', path)\n"
            "    except OSError:\n        print('denied', path)\n")
    r = plain_pool.run(code)
    assert r.status is ExecStatus.OK, r.stderr
    assert SECRET not in r.stdout and "SELFPLAY_SANDBOX_FALLBACK_SECRET" not in r.stdout
    if dedicated or landlock:
        assert "/etc/shadow denied" in r.stdout
        assert f"/proc/{os.getpid()}/environ denied" in r.stdout
    if landlock:  # without Landlock (or namespaces) the host filesystem is only guarded by permissions
        assert f"{REPO / 'pyproject.toml'} denied" in r.stdout
        assert not (tmp_path / "pwned").exists() and not (REPO / "sbx-pwned").exists()


def test_fallback_blocks_network_and_signals(plain_pool):
    r = plain_pool.run(
        "import socket, os\ntry:\n    socket.create_connection(('127.0.0.1', 9), timeout=1)\n"
        "    print('CONNECTED')\n"
        "except OSError:\n    print('no network')\n"
        f"try:\n    os.kill({os.getpid()}, 0)\n    print('CAN SIGNAL PARENT')\n"
        "except OSError:\n    print('no signal')\n")
    mech = plain_pool.report.mechanisms
    if mech["seccomp"].active or mech["landlock"].active:
        assert "no network" in r.stdout, r
    if mech["dedicated_uid"].active or mech["landlock"].active:
        assert "no signal" in r.stdout, r


def test_fallback_kills_the_whole_tree(plain_pool):
    name = f"sbxf{secrets.token_hex(4)}"
    daemon = ("import os, time, ctypes\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
              f"        ctypes.CDLL(None).prctl(15, {name.encode()!r}, 0, 0, 0)\n        time.sleep(600)\n"
              "    os._exit(0)\nos.wait()\nprint('returned')")
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    r = plain_pool.run(daemon)
    assert r.stdout == "returned\n"
    r = plain_pool.run("import os\nfor _ in range(1100):\n    os.mkdir('d')\n    os.chdir('d')\nos.chmod('..', 0)\n"
                       "print('littered')", timeout_s=20)
    assert r.stdout == "littered\n", r
    r = plain_pool.run(bomb, timeout_s=2.0)
    assert r.status is ExecStatus.TIMEOUT
    deadline = time.monotonic() + 5
    while _named(name) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _named(name) == []
    assert {i: len(t) for i, t in plain_pool.worker_processes().items()} == plain_pool.baseline
    assert os.listdir(os.path.join(plain_pool.scratch_root, "slot-0")) == []
    assert plain_pool.run("print('after')").stdout == "after\n"


def test_rlimits_only_still_contains_runaways():
    """The weakest host: nothing but rlimits, a scrubbed environment and the subreaper tree kill."""
    off = ("bwrap", "seccomp", "landlock", "cgroup")
    with SandboxPool(LIMITS, workers=1, disable=off) as p:
        assert p.report.level == "rlimits"
        assert [m for m in off if p.report.mechanisms[m].active] == []
        results = p.run_many(["while True:\n    pass", "x = ' ' * 10 ** 10", "print('fine')",
                              "import os\nos.kill(os.getpid(), 9)"])
        assert [r.status for r in results] == [ExecStatus.TIMEOUT, ExecStatus.MEMORY_LIMIT, ExecStatus.OK,
                                               ExecStatus.KILLED]
        assert results[3].exit_code == -signal.SIGKILL
