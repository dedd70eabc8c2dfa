"""A learner rank that dies restarts the group from the last checkpoint (selfplay/run/recovery.py), on a real
local Ray with two fsdp2 ranks (gloo): also the end-to-end run of `learner.strategy=fsdp2` under Ray.

Exact timing, no sleeps: with `SELFPLAY_PAUSE_AT_ITERATION=2` the driver stops itself (SIGSTOP) after each
stage event of iteration 2 (loop.py `pause_point`). At the start of `learn_proposer` (the proposer's step was
sent to the ranks at the end of `reward`) the test SIGKILLs rank 1's process (its pid from `actor_start`) and
lets the driver go on. The run must notice, say so, roll iteration 2 back as a resume does, restart every
actor, run iteration 2 again and finish: each iteration's scalars once, the versions equal to the steps the
iterations took (nothing lost, nothing trained twice).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from selfplay.run.loop import PAUSE_ENV
from selfplay.run.rundir import RunDir
from test_selfplay_e2e import DEBUG, REPO, metrics_rows

pytestmark = pytest.mark.slow
RANKS = ["learner.world_size=2", "learner.strategy=fsdp2", "loop.iterations=2", "engine.backend=hf",
         "proposer.candidates_per_iteration=2", "proposer.group_size=2", "proposer.max_tokens=64",
         "executor.samples_per_task=2", "executor.group_size=2", "executor.tasks_per_iteration=1",
         "executor.max_turns=1", "executor.max_tokens_per_turn=64", "eval.every=0", "verifier.probes=0",
         "verifier.band_low=0.0", "verifier.band_high=1.0", "learner.micro_batch_tokens=512",
         "learner.gradient_checkpointing=off"]  # tiny batches: checkpointing would only cost time


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


def _run_killing_rank_1(rd: RunDir, log: Path, *extra: str, at: int = 2, stage: str = "learn_proposer"
                        ) -> tuple[int, str, int | None]:
    """The run, with rank 1 SIGKILLed at the start of iteration `at`'s `stage`; (exit code, output, killed pid)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", RAY_DEDUP_LOGS="0", **{PAUSE_ENV: str(at)})
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "selfplay", "run", DEBUG, f"run_dir={rd.root}", *RANKS,
                                 *extra], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    killed, seen, deadline = None, 0, time.monotonic() + 900
    try:
        while proc.poll() is None:
            assert time.monotonic() < deadline, "the run did not end"
            if _state(proc.pid) == "T":  # paused at a stage event (or not yet woken by the last SIGCONT)
                stages = [e for e in rd.read_events() if e.get("event") == "stage"]
                if len(stages) > seen:  # a new pause
                    seen = len(stages)
                    if killed is None and (stages[-1]["stage"], stages[-1]["phase"]) == (stage, "start"):
                        starts = [e for e in rd.read_events()
                                  if e.get("event") == "actor_start" and e["actor"] == "learner-1"]
                        killed = starts[-1]["pid"]
                        os.kill(killed, signal.SIGKILL)
                        while Path(f"/proc/{killed}").exists() and _state(killed) not in ("Z", ""):
                            assert time.monotonic() < deadline, "rank 1 did not die"
                            time.sleep(0.01)
                os.kill(proc.pid, signal.SIGCONT)
            time.sleep(0.005)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.wait(), log.read_text(), killed


def _forensics(rd: RunDir) -> str:
    """What a failure needs to be understood on a CI machine: the restarts (with Ray's account of each death),
    the ranks' last output lines and the kernel's last words (an OOM kill) where readable."""
    lines = [json.dumps(e) for e in rd.read_events() if e.get("event", "").startswith(("learner_restart", "actor_"))]
    for log in sorted(rd.logs.glob("learner-*.log")):
        tail = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()][-8:]
        lines += [f"--- {log.name}", *tail]
    dmesg = subprocess.run(["dmesg"], capture_output=True, text=True)
    lines += ["--- dmesg", *(dmesg.stdout.splitlines()[-10:] if dmesg.returncode == 0 else [dmesg.stderr.strip()])]
    return "\n".join(lines)


def test_a_killed_fsdp2_rank_restarts_the_group_and_the_run_finishes_as_if_uninterrupted(tmp_path):
    rd = RunDir(tmp_path / "run")
    code, out, killed = _run_killing_rank_1(rd, tmp_path / "out.log")
    assert killed is not None, out[-3000:]
    assert code == 0, out[-4000:] + "\n" + _forensics(rd)
    events = rd.read_events()
    restarts = [e for e in events if e.get("event") == "learner_restart"]
    assert len(restarts) == 1, restarts
    assert restarts[0]["iteration"] == 2 and restarts[0]["committed"] == 1
    assert restarts[0]["ranks"] == [1] and restarts[0]["pids"] == [killed]
    assert restarts[0]["why"][0], restarts  # Ray's account of the death, and the console names the rank's log
    assert f"its log: {rd.logs / 'learner-1.log'}" in out, out[-3000:]
    assert "rank 1" in out and "restarting the learner group" in out
    state = rd.state()
    assert state["status"] == "finished" and state["iteration"] == 2
    # every iteration's scalars exactly once, iteration 2 from its second run (it knows the restart)
    rows = metrics_rows(rd, "SELECT iteration, key, COUNT(*) FROM scalars GROUP BY iteration, key")
    assert {it for it, _, _ in rows} == {1, 2} and all(n == 1 for _, _, n in rows)
    scalars = {it: dict(metrics_rows(rd, f"SELECT key, value FROM scalars WHERE iteration={it}")) for it in (1, 2)}
    assert scalars[2]["faults/learner_restarts"] == 1 and scalars[1]["faults/learner_restarts"] == 0
    # nothing lost, nothing trained twice: each role's version is the steps its iterations took, and
    # every rank trained (both took part in iteration 2's proposer step after the restart)
    for role in ("proposer", "executor"):
        steps = sum(scalars[it].get(f"learner/{role}/steps", 0.0) for it in (1, 2))
        assert state["versions"][role] == steps, (role, state["versions"], steps)
    assert scalars[2]["learner/proposer/steps"] >= 1 and scalars[2]["learner/proposer/ranks"] == 2
    # the rerun's pool holds iteration 2's tasks once
    pool_its = [json.loads(line)["iteration"] for line in rd.pool.read_text().splitlines()] if rd.pool.exists() else []
    assert pool_its.count(2) <= 2  # proposer.candidates_per_iteration


def test_a_rank_dying_beyond_max_learner_restarts_stops_the_run_with_one_line(tmp_path):
    """`ray.max_learner_restarts=0`: the first dead rank ends the run, one line naming the field; the last
    commit (none yet) stays the resume point. The rank dies as iteration 1's commit starts (the shortest way
    there), so the ranks' checkpoint save fails: a death there is a dead rank too, not a crash."""
    rd = RunDir(tmp_path / "run")
    code, out, killed = _run_killing_rank_1(rd, tmp_path / "out.log", "ray.max_learner_restarts=0", at=1,
                                            stage="commit")
    assert killed is not None and code == 1, out[-3000:]
    assert "ray.max_learner_restarts=0" in out and "Traceback" not in out, out[-3000:]
    assert rd.state()["status"] == "failed" and rd.state().get("iteration", 0) == 0
    assert [e["event"] for e in rd.read_events() if e.get("event", "").startswith("learner_restart")] == [
        "learner_restarts_exhausted"]
