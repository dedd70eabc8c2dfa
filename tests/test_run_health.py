"""Run health the loop reports: a disjoint stage split of the iteration's wall time, and a run that stops
before it trains on a broken tool (issue: a run "finished" while every tool call failed)."""
from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from roles.executor import Rollout, ToolCall
from selfplay.config import RunConfig
from selfplay.run.loop import (SandboxUnhealthy, Scalars, StopRequested, check_sandbox, finish_timeline, stage,
                               timed)
from selfplay.run.rundir import RunDir


def test_nested_stages_are_disjoint_and_sum_to_the_wall_time():
    s = Scalars()
    t0 = time.perf_counter()
    with timed(s, "solve"):
        time.sleep(0.02)
        with timed(s, "verify"):  # nested: pauses "solve"
            time.sleep(0.03)
        time.sleep(0.01)
    with timed(s, "verify"):
        time.sleep(0.01)
    time.sleep(0.02)  # in no stage: "other"
    finish_timeline(s, t0)
    stages = {k: v for k, v in s.items() if k.startswith("time/stage/")}
    assert set(stages) == {"time/stage/solve", "time/stage/verify", "time/stage/other"}
    assert sum(stages.values()) == pytest.approx(s["time/total"], rel=1e-9, abs=1e-9)
    # a leaf stage's exclusive time is its inclusive time; the outer one loses what was nested in it
    assert s["time/stage/verify"] == pytest.approx(s["time/verify"], abs=1e-9)
    assert s["time/stage/solve"] < s["time/solve"] - 0.025
    assert s["time/stage/other"] > 0.0


def test_a_plain_dict_keeps_the_inclusive_timer():
    s: dict[str, float] = {}
    with timed(s, "propose"):
        pass
    assert set(s) == {"time/propose"}


def _rollouts(statuses: list[str]) -> list[Rollout]:
    r = Rollout(task_id="t", question="q", sample_index=0, prompt_ids=[1])
    for st in statuses:
        obs = "```output\n[sandbox] template: OSError: [Errno 30] Read-only file system\n```" \
            if st == "sandbox_error" else "```output\n1\n```"
        r.tool_calls.append(ToolCall(code="print(1)", status=st, observation=obs))
    return [r]


def _ctx(tmp_path, **sandbox) -> SimpleNamespace:
    cfg = RunConfig.model_validate({"sandbox": sandbox, "run_dir": str(tmp_path / "run")})
    return SimpleNamespace(cfg=cfg, rd=RunDir.create(cfg))


def test_check_sandbox_stops_the_run_and_quotes_the_last_error(tmp_path):
    ctx = _ctx(tmp_path)
    with pytest.raises(SandboxUnhealthy) as e:
        check_sandbox(ctx, [_rollouts(["ok", "sandbox_error", "sandbox_error", "ok", "ok"])])
    msg = str(e.value)
    assert "\n" not in msg and "2 of 5 tool calls" in msg and "Read-only file system" in msg
    assert "sandbox.max_error_rate=0.2" in msg
    assert any(ev["event"] == "sandbox_unhealthy" and ev["errors"] == 2 for ev in ctx.rd.read_events())


def test_check_sandbox_tolerates_the_configured_share_and_small_samples(tmp_path):
    ctx = _ctx(tmp_path)
    check_sandbox(ctx, [_rollouts(["ok"] * 4 + ["sandbox_error"])])  # 1/5 = 0.2: not above the bound
    check_sandbox(ctx, [_rollouts(["sandbox_error"] * 4)])  # 4 calls < min_calls_for_error_rate = 5
    check_sandbox(ctx, [_rollouts(["error", "timeout", "memory_limit", "killed", "output_limit"])])  # the code's fault
    strict = _ctx(tmp_path / "b", max_error_rate=0.0, min_calls_for_error_rate=1)
    with pytest.raises(SandboxUnhealthy):
        check_sandbox(strict, [_rollouts(["sandbox_error"])])


def test_stage_events_mark_every_boundary_and_a_stop_request_lands_before_the_next(tmp_path):
    """`stage` writes {"event": "stage", iteration, stage, phase} at both ends of a step (the resume test kills
    the driver on them); a step that raised has no "end"; a stop request raises before the next "start"."""
    ctx = _ctx(tmp_path)
    stop, shown = [False], []
    ctx.stop_requested, ctx.on_stage = (lambda: stop[0]), shown.append
    with stage(ctx, 3, "propose"):
        pass
    with pytest.raises(ValueError), stage(ctx, 3, "solve"):
        raise ValueError("step failed")
    stop[0] = True
    with stage(ctx, 3, "commit", safe_point=False):  # the driver's commit is no safe point
        pass
    with pytest.raises(StopRequested), stage(ctx, 3, "practice"):
        raise AssertionError("a stopped run must not start the next step")
    got = [(e["iteration"], e["stage"], e["phase"]) for e in ctx.rd.read_events() if e["event"] == "stage"]
    assert got == [(3, "propose", "start"), (3, "propose", "end"), (3, "solve", "start"),
                   (3, "commit", "start"), (3, "commit", "end")]
    assert shown == ["propose", "solve", "commit"]


@pytest.mark.slow
def test_a_run_whose_sandbox_dies_stops_before_training_on_it(tmp_path):
    """The sandbox actor is SIGKILLed for good (no restarts) once the actors are up: every later tool call
    fails inside the sandbox, and the run stops at the next safe point with one line that quotes the error,
    instead of training the executor on error messages."""
    import os
    import signal

    from test_selfplay_e2e import DEBUG, TINY, finish, replay_ids, selfplay, wait_for

    rd = RunDir(tmp_path / "run")
    # 4 candidates x 3 answers: with the seed fixed, some of them call the tool (the check needs a call)
    proc = selfplay("run", DEBUG, f"run_dir={rd.root}", *TINY, "proposer.candidates_per_iteration=4",
                    "loop.iterations=1", "ray.max_actor_restarts=0",
                    "ray.max_task_retries=0", "sandbox.max_error_rate=0", "sandbox.min_calls_for_error_rate=1")
    started = lambda name: [e for e in rd.read_events() if e.get("event") == "actor_start" and e["actor"] == name]  # noqa: E731
    # the first stage of iteration 1: every actor is up (a death during start-up is
    # test_actors.py::test_an_actor_that_dies_while_the_run_starts_is_named)
    wait_for(lambda: [e for e in rd.read_events() if e.get("event") == "stage"], 300, "iteration 1", proc)
    os.kill(started("sandbox")[0]["pid"], signal.SIGKILL)
    out = finish(proc)
    assert proc.returncode == 1, out
    errors = [line for line in out.splitlines() if line.startswith("error: sandbox broken")]
    # the answers' tool calls failed inside the sandbox, or (none called it) the dead actor was noticed
    assert len(errors) == 1 and ("tool calls failed inside the sandbox" in errors[0]
                                 or "the sandbox actor died" in errors[0]), out
    assert not [line for line in out.splitlines() if line.startswith("Traceback")], out  # none from the driver
    assert rd.state()["status"] == "failed" and rd.state()["iteration"] == 0
    assert any(e.get("event") == "sandbox_unhealthy" for e in rd.read_events())
    assert replay_ids(rd) == []  # stopped after solving, before any trajectory reached the replay buffer

