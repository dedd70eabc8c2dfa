"""Resume "with no duplicate and no gap" (README), synchronous loop: one signal at every stage boundary of an
iteration (tests/test_resume.py: every boundary of both pipelines by SIGKILL, the asynchronous pipeline's chain).

One run of the tiny config is stopped at each boundary of iteration 2 in turn (SIGKILL of the whole process
group, SIGTERM, or SIGINT to the group as Ctrl-C sends it), each time at the moment the loop writes the
boundary's `stage` event (not after a sleep), and resumed. What every stop left behind is counted before the
resume and must be what the resume event says it dropped. After the last resume, pool, replay buffer, task
records and metrics must equal those of an uninterrupted run from the same seed, value for value.

One chained run instead of one run per boundary: each resume redoes iteration 2 up to the next boundary, so
the nine stops cost about as much as four plain runs.
"""
from __future__ import annotations

import json
import math
import os
import signal
import sqlite3
import time

import pytest

from selfplay.run.rundir import RunDir
from test_selfplay_e2e import DEBUG, TINY, finish, selfplay, wait_for

pytestmark = pytest.mark.slow
ARGS = (DEBUG, *TINY, "loop.iterations=2", "verifier.probes=0")  # probes: their own seeded solve, not needed here
ITERATION = 2
# Every boundary of iteration 2, in order. SIGTERM/SIGINT stop at the next safe point, which exists before
# each loop stage up to `learn_executor`; from there on the iteration runs to its commit, so the later
# boundaries get SIGKILL (the one stop that can land between the metrics and the commit).
STOPS = [
    ("propose", "start", signal.SIGTERM),
    ("solve", "start", signal.SIGINT),
    ("reward", "start", signal.SIGKILL),
    ("learn_proposer", "start", signal.SIGTERM),
    ("practice", "start", signal.SIGINT),
    ("learn_executor", "start", signal.SIGKILL),
    ("log_metrics", "start", signal.SIGKILL),
    ("commit", "start", signal.SIGKILL),
    ("commit", "end", signal.SIGKILL),
]
# wall-clock and speed scalars differ between any two runs; everything else must match exactly
VOLATILE = ("time/", "throughput/", "learner/proposer/time_s", "learner/executor/time_s",
            "learner/proposer/tokens_per_s", "learner/executor/tokens_per_s")


def _stage_events(rd: RunDir, stage: str, phase: str) -> int:
    return sum(e.get("event") == "stage" and e.get("iteration") == ITERATION and e.get("stage") == stage
               and e.get("phase") == phase for e in rd.read_events())


def _stop_at(rd: RunDir, proc, stage: str, phase: str, sig: signal.Signals) -> None:
    """Send `sig` as soon as the run writes its next (iteration 2, stage, phase) event."""
    seen = _stage_events(rd, stage, phase)
    deadline = time.monotonic() + 900
    while _stage_events(rd, stage, phase) == seen:
        assert proc.poll() is None, f"run ended before {stage}/{phase}:\n{proc.stdout.read()}"
        assert time.monotonic() < deadline, f"no {stage}/{phase} event"
        time.sleep(0.02)
    if sig == signal.SIGTERM:
        os.kill(proc.pid, sig)  # what `selfplay stop` / `ray job stop` send: the driver only
    else:
        os.killpg(proc.pid, sig)  # Ctrl-C, or the OOM killer's/`kill -9`'s worst case: the driver and its Ray


def _contents(rd: RunDir) -> dict:
    """Everything a run keeps, without run-specific ids (task ids are uuids) or wall-clock values."""
    from selfplay.data.replay import ReplayBuffer

    con = sqlite3.connect(f"file:{rd.metrics}?mode=ro", uri=True)
    try:
        scalars = sorted((it, k, v) for it, k, v in con.execute("SELECT iteration, key, value FROM scalars")
                         if not k.startswith(VOLATILE))
        tasks = sorted(con.execute("SELECT iteration, question, pseudo_label, p_hat, proposer_reward, accepted, "
                                   "reject_reason, n_samples FROM tasks").fetchall(), key=repr)
        trajs = sorted(con.execute("SELECT iteration, text, reward, correct, answer FROM trajectories").fetchall(),
                       key=repr)
    finally:
        con.close()
    pool = [(t["question"], t["pseudo_label"], t["p_hat"], t["iteration"])
            for t in map(json.loads, rd.pool.read_text().splitlines())] if rd.pool.exists() else []
    with ReplayBuffer(rd.replay, rd.load_config().replay) as buf:
        replay = sorted(((t.role, t.meta.get("iteration"), tuple(t.prompt_ids), tuple(t.completion_ids), t.reward,
                          t.policy_version, buf.is_consumed(t.traj_id), round(t.advantage, 6))
                         for t in buf.trajectories()), key=repr)
    return {"scalars": scalars, "tasks": tasks, "trajectories": trajs, "pool": pool, "replay": replay}


def _left_over(rd: RunDir, committed: int) -> dict:
    """What iterations after the committed one left in pool, replay buffer and metrics store."""
    from selfplay.data.replay import ReplayBuffer

    pool = sum(t["iteration"] > committed for t in map(json.loads, rd.pool.read_text().splitlines())) \
        if rd.pool.exists() else 0
    with ReplayBuffer(rd.replay, rd.load_config().replay) as buf:
        replay = sum(int(t.meta.get("iteration", 0)) > committed for t in buf.trajectories())
    con = sqlite3.connect(f"file:{rd.metrics}?mode=ro", uri=True)
    try:
        metrics = {t: con.execute(f"SELECT COUNT(*) FROM {t} WHERE iteration > ?", (committed,)).fetchone()[0]
                   for t in ("scalars", "tasks", "trajectories")}
    finally:
        con.close()
    return {"pool": pool, "replay": replay, "metrics": metrics}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> RunDir:
    rd = RunDir(tmp_path_factory.mktemp("straight") / "run")
    proc = selfplay("run", *ARGS, f"run_dir={rd.root}")
    out = finish(proc)
    assert proc.returncode == 0, out
    return rd


@pytest.mark.timeout(3000)  # nine stops and resumes: ~8 min on an idle 2-core VM, ~20 under load
def test_stopped_at_every_stage_boundary_resumes_to_the_uninterrupted_run(tmp_path, uninterrupted):
    rd = RunDir(tmp_path / "run")
    procs = [selfplay("run", *ARGS, f"run_dir={rd.root}", start_new_session=True)]
    try:
        _stop_and_resume_everywhere(rd, procs)
    finally:
        for p in procs:  # a failed assertion must not leave a run (and its Ray) behind
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    _compare(rd, uninterrupted)


def _stop_and_resume_everywhere(rd: RunDir, procs: list) -> None:
    proc = procs[0]
    left_behind = []
    for stage, phase, sig in STOPS:
        where = f"{sig.name} at {stage}/{phase}"
        _stop_at(rd, proc, stage, phase, sig)
        out = finish(proc)
        state = rd.state()
        committed = state.get("iteration", 0)
        if sig == signal.SIGKILL and (stage, phase) == ("commit", "end"):
            # after the last commit: iteration 2 stays committed; the kill may come before or after the driver
            # wrote "finished" on its way out
            assert proc.returncode == -signal.SIGKILL and committed == ITERATION, (where, out)
            assert state["status"] in ("running", "finished"), (where, state)
        elif sig == signal.SIGKILL:
            assert proc.returncode == -signal.SIGKILL, (where, out)
            assert state["status"] == "running" and committed == ITERATION - 1, (where, state)
        else:
            assert proc.returncode == 130 and "selfplay resume" in out, (where, out)
            assert state["status"] == "stopped" and committed == ITERATION - 1, (where, state)
            assert any(e.get("event") == "signal" and e["signal"] == sig.name for e in rd.read_events()), where
        left = _left_over(rd, committed)
        left_behind.append(left)
        if committed == ITERATION:  # nothing past the commit to drop
            assert left == {"pool": 0, "replay": 0, "metrics": {"scalars": 0, "tasks": 0, "trajectories": 0}}
        if state["status"] == "finished":
            break
        resumes = sum(e.get("event") == "resume" for e in rd.read_events())
        proc = selfplay("resume", str(rd.root), start_new_session=True)
        procs.append(proc)
        wait_for(lambda: sum(e.get("event") == "resume" for e in rd.read_events()) > resumes, 300,
                 f"the resume after {where}", proc)
        event = [e for e in rd.read_events() if e.get("event") == "resume"][-1]
        assert event["iteration"] == committed, (where, event)
        assert event["pool_dropped"] == left["pool"], (where, event, left)
        assert event["replay"]["iterations"] == left["replay"], (where, event, left)
        assert event["metrics"] == left["metrics"], (where, event, left)
    else:
        out = finish(proc)
        assert proc.returncode == 0, out
    # the stops did land where iteration 2 had written something of each kind
    assert any(left["pool"] for left in left_behind), left_behind
    assert any(left["replay"] for left in left_behind), left_behind
    assert any(left["metrics"]["scalars"] for left in left_behind), left_behind
    # a resume of a finished run does nothing and says so
    again = selfplay("resume", str(rd.root))
    procs.append(again)
    assert "already finished" in finish(again) and again.returncode == 0


def _compare(rd: RunDir, uninterrupted: RunDir) -> None:
    assert rd.state()["status"] == "finished" and rd.state()["iteration"] == ITERATION
    assert rd.state()["versions"] == uninterrupted.state()["versions"]
    assert sum(e.get("event") == "resume" for e in rd.read_events()) in (len(STOPS) - 1, len(STOPS))
    got, want = _contents(rd), _contents(uninterrupted)
    for part in ("pool", "replay", "tasks", "trajectories"):
        assert got[part] == want[part], part
    # a resumed learner's float32 reductions may end one ulp off (learner/proposer/grad_norm seen): 1e-6 relative
    assert [s[:2] for s in got["scalars"]] == [s[:2] for s in want["scalars"]]
    assert all(a[2] == b[2] or math.isclose(a[2], b[2], rel_tol=1e-6) for a, b in zip(got["scalars"], want["scalars"]))
    # no duplicate, no gap; both roles trained in both runs
    assert {it for it, _, _ in got["scalars"]} == {1, 2}
    assert {(role, it) for role, it, *_ in got["replay"]} >= {("proposer", 1), ("proposer", 2), ("executor", 2)}
