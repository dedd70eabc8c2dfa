"""Asynchronous pipeline (loop.pipeline=async) and per-conversation rollouts: the pure parts here; the slow
end-to-end check (staleness of what was trained) at the end. Kills and resumes: tests/test_resume.py."""
from __future__ import annotations

import pytest

from selfplay.config import ConfigError, load_config
from selfplay.run.pipeline import overlap_seconds, staleness_stats


def test_overlap_counts_time_both_were_busy_once():
    assert overlap_seconds([(0, 10)], [(5, 15)]) == 5
    assert overlap_seconds([(0, 10)], [(10, 20)]) == 0
    # overlapping spans of one actor (a threaded actor) are merged before intersecting
    assert overlap_seconds([(0, 4), (2, 6), (8, 9)], [(1, 8.5)]) == pytest.approx(5.5)
    assert overlap_seconds([(0, 1), (2, 3), (4, 5)], [(0, 5)]) == 3
    assert overlap_seconds([], [(0, 5)]) == 0


def test_staleness_stats():
    assert staleness_stats([0, 1, 1, 0]) == {"staleness_mean": 0.5, "staleness_max": 1.0}
    assert staleness_stats([]) == {}


def test_async_pipeline_needs_a_staleness_bound_of_one():
    with pytest.raises(ConfigError, match="replay.max_staleness"):
        load_config(None, ["loop.pipeline=async"])
    assert load_config(None, ["loop.pipeline=async", "replay.max_staleness=1"]).loop.pipeline == "async"
    assert load_config(None, []).loop.pipeline == "sync"
    with pytest.raises(ConfigError, match="loop.pipeline"):
        load_config(None, ["loop.pipeline=fast"])


# ---------------------------------------------------------------------------------------------- slow
REPO = __import__("pathlib").Path(__file__).resolve().parents[1]
DEBUG = str(REPO / "configs" / "debug.yaml")
ASYNC = [  # tiny sizes (as in test_selfplay_e2e.py), three iterations, the async pipeline
    "proposer.candidates_per_iteration=2", "proposer.group_size=2", "proposer.max_tokens=96",
    "executor.samples_per_task=3", "executor.group_size=2", "executor.tasks_per_iteration=1",
    "executor.max_turns=2", "executor.max_tokens_per_turn=80", "eval.every=0",
    "verifier.band_low=0.3", "verifier.band_high=0.7", "engine.backend=hf",
    "loop.iterations=3", "loop.pipeline=async", "replay.max_staleness=1",
]


def _selfplay(*args: str, **kw):
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONUNBUFFERED="1", RAY_DEDUP_LOGS="0")
    return subprocess.Popen([sys.executable, "-m", "selfplay", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _trained(rd) -> list[tuple[str, str, int, int | None, int]]:
    """(role, traj_id, policy_version, consumed_at, iteration) of everything in the run's replay buffer."""
    from selfplay.data.replay import ReplayBuffer

    buf = ReplayBuffer(rd.replay, rd.load_config().replay)
    try:
        return [(t.role, t.traj_id, t.policy_version, buf.consumed_at(t.traj_id), int(t.meta["iteration"]))
                for t in buf.trajectories()]
    finally:
        buf.close()


def _scalars(rd, key: str) -> dict[int, float]:
    import sqlite3

    con = sqlite3.connect(f"file:{rd.metrics}?mode=ro", uri=True)
    try:
        return dict(con.execute("SELECT iteration, value FROM scalars WHERE key=?", (key,)).fetchall())
    finally:
        con.close()


def _check_async_run(rd, iterations: int = 3) -> None:
    """Invariants of a finished asynchronous run (also after kills and resumes, tests/test_resume.py)."""
    state = rd.state()
    assert state["status"] == "finished" and state["iteration"] == iterations, state
    rows = _trained(rd)
    assert len({r[1] for r in rows}) == len(rows)  # no trajectory twice
    # every rollout was trained (the last iteration drains), one step each (proposer_updates=1): the proposer's
    # version counts its steps, so a lost or repeated step on any iteration's rollouts changes it
    assert all(consumed is not None for _, _, _, consumed, _ in rows)
    assert {it for role, *_, it in rows if role == "proposer"} == set(range(1, iterations + 1))
    assert state["versions"]["proposer"] == iterations
    ages = [consumed - 1 - born for _, _, born, consumed, _ in rows]
    assert max(ages) == 1 and min(ages) == 0  # one version old at most, and some were: the pipeline overlapped
    for role in ("proposer", "executor"):
        assert max(_scalars(rd, f"learner/{role}/staleness_max").values(), default=0.0) <= 1.0
    assert max(_scalars(rd, "learner/proposer/staleness_max").values()) == 1.0
    assert any(v > 0 for v in _scalars(rd, "time/overlap").values())  # the learner worked during rollouts


@pytest.mark.slow
def test_async_pipeline_trains_samples_one_version_old_and_none_older(tmp_path):
    from selfplay.run.rundir import RunDir

    rd = RunDir(tmp_path / "run")
    proc = _selfplay("run", DEBUG, f"run_dir={rd.root}", *ASYNC)
    out, _ = proc.communicate(timeout=1500)
    assert proc.returncode == 0, out
    _check_async_run(rd)


def test_resume_forgets_adapters_published_after_the_commit(tmp_path):
    """The async pipeline pushes adapters between commits: a resumed rollout worker must not load them."""
    from selfplay.run.rundir import published_adapters, record_published, rollback_published

    record_published(tmp_path, "proposer", "/a/proposer/v000002", 2)
    record_published(tmp_path, "executor", "/a/executor/v000001", 1)
    assert rollback_published(tmp_path, {"proposer": 1, "executor": 1}) == ["proposer"]
    assert published_adapters(tmp_path) == {"executor": {"path": "/a/executor/v000001", "version": 1}}
    assert rollback_published(tmp_path, {}) == ["executor"]  # version 0 committed: the base model
    assert published_adapters(tmp_path) == {}
