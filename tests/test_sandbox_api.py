"""The sandbox's pool-level API on real processes: the module functions and their default pool, the
isolation floor, `python -m sandbox doctor`, a pool owned by a Ray actor, and a pool's workers dying with the
process that owns it. (tests/test_sandbox.py holds the per-call battery on one module pool.)"""
from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

import pytest

import sandbox
import sandbox.host.pool
from sandbox import IsolationError, Limits, SandboxPool
from sandbox.linux import descendants

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox needs Linux")

REPO = Path(__file__).resolve().parents[1]


def test_module_level_api_uses_one_default_pool():
    try:
        assert sandbox.run("print('default')").stdout == "default\n"
        assert [r.stdout for r in sandbox.run_many(["print(1)", "print(2)"])] == ["1\n", "2\n"]
        assert asyncio.run(sandbox.arun("print(3)")).stdout == "3\n"
        assert [r.stdout for r in asyncio.run(sandbox.arun_many(["print(4)"]))] == ["4\n"]
        assert sandbox.default_pool() is sandbox.default_pool()
    finally:
        sandbox.default_pool().close()
    with pytest.raises(sandbox.SandboxClosedError):
        pool = sandbox.host.pool._default
        pool.run("print(1)")


def test_min_isolation_refuses_to_run_below_it():
    with pytest.raises(IsolationError, match="seccomp"):
        SandboxPool(workers=1, min_isolation="full", disable=("seccomp",))
    with pytest.raises(IsolationError, match="bwrap"):
        SandboxPool(workers=1, min_isolation="namespaces", disable=("bwrap",))


def test_doctor_reports_every_mechanism():
    import json
    import subprocess

    out = subprocess.run([sys.executable, "-m", "sandbox", "doctor", "--json"], capture_output=True, text=True,
                         timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["level"] in sandbox.ISOLATION_LEVELS
    assert set(report["mechanisms"]) == set(sandbox.host.pool.MECHANISMS)
    assert all(c["contained"] for c in report["checks"].values()), report["checks"]
    human = subprocess.run([sys.executable, "-m", "sandbox", "doctor"], capture_output=True, text=True,
                           timeout=300, cwd=REPO)
    assert f"isolation level: {report['level']}" in human.stdout
    for name, mech in report["mechanisms"].items():
        assert f"[{'on ' if mech['active'] else 'off'}] {name}" in human.stdout


@pytest.mark.slow
def test_pool_inside_a_ray_actor():
    """A Ray actor process owns its pool (workers are spawned from the actor's long-lived threads) and
    serves concurrent actor calls; runaway code there is contained the same way."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        @ray.remote(max_concurrency=4)
        class Tool:
            def __init__(self):
                from sandbox import Limits as L
                from sandbox import SandboxPool as P

                self.pool = P(L(timeout_s=2, cpu_time_s=2), workers=2)

            def run(self, codes):
                return [(r.status.value, r.stdout) for r in self.pool.run_many(codes)]

            def isolation(self):
                return self.pool.isolation

        tool = Tool.remote()
        batches = ray.get([tool.run.remote([f"print({i})", "while True:\n    pass"]) for i in range(3)])
        assert batches == [[("ok", f"{i}\n"), ("timeout", "")] for i in range(3)]
        assert ray.get(tool.isolation.remote()) in sandbox.ISOLATION_LEVELS
    finally:
        ray.shutdown()


def test_sandbox_dies_with_the_pool_process(monkeypatch):
    """SIGKILL the process that owns a pool: every launcher, jail, template and snippet goes with it."""
    import shutil
    import subprocess
    import tempfile

    # A private temp dir (world-traversable like /tmp: the jail's uid reads below it): any other pool on the
    # machine would otherwise clean the dead owner's dir before this test looks for it.
    tmp_path = tempfile.mkdtemp(prefix="selfplay-test-tmp-")
    os.chmod(tmp_path, 0o1777)
    monkeypatch.setenv("TMPDIR", tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", tmp_path)
    try:
        _dies_with_the_pool_process(tmp_path)
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)


def _dies_with_the_pool_process(tmp_path: str) -> None:
    import subprocess

    script = ("import sys, time\nfrom sandbox import SandboxPool\np = SandboxPool(workers=1)\n"
              "print(p.worker_processes()[0], flush=True)\n"
              "p.run('import time; time.sleep(60)', timeout_s=60)\n")
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=REPO)
    idle_tree = [int(p) for p in owner.stdout.readline().strip("[]\n").split(",")]
    deadline = time.monotonic() + 20
    while len(set(descendants(owner.pid))) <= len(idle_tree) and time.monotonic() < deadline:
        time.sleep(0.05)  # until the call's snippet exists
    tree = sorted(set(descendants(owner.pid)))
    assert len(tree) > len(idle_tree)
    owner.kill()
    owner.wait()
    deadline = time.monotonic() + 10
    while any(os.path.exists(f"/proc/{p}") for p in tree) and time.monotonic() < deadline:
        time.sleep(0.05)
    alive = [p for p in tree if os.path.exists(f"/proc/{p}")]
    assert alive == [], [Path(f"/proc/{p}/cmdline").read_bytes()[:60] for p in alive]
    # No close() ran: its work dir (and cgroups) stay until the next pool notices the owner is dead.
    import glob

    left = glob.glob(os.path.join(tmp_path, f"selfplay-sandbox-{owner.pid}-*"))
    assert left
    with SandboxPool(Limits(preimport=("math",)), workers=1):
        assert not any(os.path.exists(d) for d in left)
