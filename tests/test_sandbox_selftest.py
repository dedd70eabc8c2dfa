"""The sandbox says loudly when it cannot run an ordinary tool call: its self-test (what a run checks before any
model loads) names the failing check and the fix, and `python -m sandbox doctor` exits non-zero and never
reports a pass for a call that ended in `sandbox_error`."""
from __future__ import annotations

import sys

import pytest

from sandbox import ExecResult, ExecStatus, Limits, SandboxPool, failures, self_test
from sandbox import doctor

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox needs Linux")


def test_a_working_pool_passes_every_check():
    with SandboxPool(workers=1) as pool:
        checks = self_test(pool)
    assert [c.name for c in checks] == ["print", "numpy+sympy import", "file write and read", "timeout"]
    assert all(c.ok and not c.fix for c in checks), checks
    assert failures(checks) == ""


def test_a_broken_tool_fails_with_the_check_and_the_fix():
    # a wall clock no call can meet: every call that should print something times out instead
    with SandboxPool(Limits(timeout_s=0.0001), workers=1) as pool:
        checks = self_test(pool)
    bad = {c.name: c for c in checks if not c.ok}
    assert set(bad) == {"print", "numpy+sympy import", "file write and read"}
    assert all(c.detail.startswith("timeout") and "sandbox.timeout_s" in c.fix for c in bad.values())
    line = failures(checks)
    assert line.startswith("sandbox self-test failed: print: timeout") and "\n" not in line


@pytest.mark.parametrize("name,code,contained", doctor.CHECKS)
def test_doctor_never_passes_a_call_that_did_not_run(name, code, contained):
    r = ExecResult("", "[sandbox] worker failed: EOFError", None, ExecStatus.SANDBOX_ERROR, 0.01)
    assert doctor.passed(contained, r) is False


def test_doctor_exits_non_zero_when_an_end_to_end_check_fails(capsys):
    assert doctor.main(["--timeout-s", "0.0001"]) == 1
    out = capsys.readouterr()
    assert "[FAIL] print" in out.out and "fix: raise sandbox.timeout_s" in out.out
    assert "FAILED: print" in out.err
    assert doctor.main([]) == 0



@pytest.mark.slow
def test_a_run_with_a_broken_tool_fails_before_any_model_loads(tmp_path):
    """`selfplay run` with a sandbox no call can succeed in: exit 1 with one line naming the failed checks and
    the fix, and the learner and rollout actors (the ones that load models) never start."""
    from test_selfplay_e2e import DEBUG, TINY, finish, selfplay

    from selfplay.run.rundir import RunDir

    rd = RunDir(tmp_path / "run")
    proc = selfplay("run", DEBUG, f"run_dir={rd.root}", *TINY, "loop.iterations=1", "sandbox.timeout_s=0.0001")
    out = finish(proc, timeout=600)
    assert proc.returncode == 1, out
    errors = [line for line in out.splitlines() if line.startswith("error: sandbox self-test failed: print:")]
    assert len(errors) == 1 and "fix: raise sandbox.timeout_s" in errors[0], out
    assert not [line for line in out.splitlines() if line.startswith("Traceback")], out
    started = {e["actor"] for e in rd.read_events() if e.get("event") == "actor_start"}
    assert "learner" not in started and "rollout" not in started, started
    assert rd.state()["status"] == "failed"
