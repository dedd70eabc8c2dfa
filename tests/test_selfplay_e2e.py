"""End to end on real parts: the CLI, a local Ray runtime, the embedded model, real sandboxes.

Each test runs `selfplay` as a user would (a subprocess), then checks what every stage left in the run
directory. Sizes are shrunk with dotted overrides so the suite stays short on 2 CPU cores.
"""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from selfplay.run.rundir import RunDir
from selfplay.data.task_pool import question_key

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
DEBUG = str(REPO / "configs" / "debug.yaml")
# Small but complete: every stage runs and writes something.
TINY = [
    "proposer.candidates_per_iteration=2", "proposer.group_size=2", "proposer.max_tokens=96",
    "executor.samples_per_task=3", "executor.group_size=2", "executor.tasks_per_iteration=1",
    "executor.max_turns=2", "executor.max_tokens_per_turn=80", "eval.every=0",
    "verifier.band_low=0.3", "verifier.band_high=0.7", "verifier.probes=1", "metrics.trajectories_per_iteration=4",
    "engine.backend=hf",  # starts in 2 s instead of ~60 (vLLM runs through Ray in test_jobs.py)
]


def selfplay(*args: str, env_update: dict[str, str | None] | None = None, **kw) -> subprocess.Popen:
    """`selfplay ARGS` as a user runs it; `env_update` sets (or, with None, removes) environment variables."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", RAY_DEDUP_LOGS="0")
    for key, value in (env_update or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return subprocess.Popen([sys.executable, "-m", "selfplay", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def finish(proc: subprocess.Popen, timeout: float = 900) -> str:
    out, _ = proc.communicate(timeout=timeout)
    return out


def metrics_rows(rd: RunDir, sql: str) -> list[tuple]:
    con = sqlite3.connect(f"file:{rd.metrics}?mode=ro", uri=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def wait_for(pred, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended before {what}:\n{proc.stdout.read()}")
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def check_run_outputs(rd: RunDir, iterations: int) -> None:
    """What each stage must have produced, for every iteration."""
    state = rd.state()
    assert state["status"] == "finished" and state["iteration"] == iterations, state
    assert Path(state["checkpoint"]).is_dir()
    its = [r[0] for r in metrics_rows(rd, "SELECT DISTINCT iteration FROM scalars ORDER BY iteration")]
    assert its == list(range(1, iterations + 1)), its  # no gap, no duplicate
    for it in its:
        keys = {r[0] for r in metrics_rows(rd, f"SELECT key FROM scalars WHERE iteration={it}")}
        for k in ("tasks/proposed", "proposer/parse_rate", "proposer/reward_mean", "pool/size",
                  "time/total", "time/propose", "faults/actor_restarts", "verifier/probes",
                  "verifier/label_accuracy", "time/stage/probes"):
            assert k in keys, (it, k, sorted(keys))
        n_tasks = metrics_rows(rd, f"SELECT COUNT(*) FROM tasks WHERE iteration={it}")[0][0]
        proposed = dict(metrics_rows(rd, f"SELECT key, value FROM scalars WHERE iteration={it}"))["tasks/proposed"]
        assert n_tasks == proposed > 0  # every proposal is recorded with its verdict
    # Accepted tasks are in the pool, within the band, once each.
    pool = [json.loads(line) for line in rd.pool.read_text().splitlines()] if rd.pool.exists() else []
    cfg = rd.load_config()
    assert len({question_key(t["question"]) for t in pool}) == len(pool)
    for t in pool:
        assert cfg.verifier.band_low <= t["p_hat"] <= cfg.verifier.band_high
        assert 1 <= t["iteration"] <= iterations
    accepted = metrics_rows(rd, "SELECT COUNT(*) FROM tasks WHERE accepted=1")[0][0]
    assert accepted == len(pool)


def replay_ids(rd: RunDir) -> list[tuple[str, int]]:
    from selfplay.data.replay import ReplayBuffer

    buf = ReplayBuffer(rd.replay, rd.load_config().replay)
    try:
        return [(t.traj_id, int(t.meta.get("iteration", 0))) for t in buf.trajectories()]
    finally:
        buf.close()


def test_debug_run_two_iterations_survives_a_killed_actor(tmp_path):
    """Two iterations of the debug config; the rollout actor is SIGKILLed mid-iteration and the run
    completes anyway, with the restart logged and counted. Ray runs as a user gets it: token auth on by
    default (the suite's other runs disable it, tests/conftest.py), its token in a temporary $HOME."""
    rd = RunDir(tmp_path / "run")
    home = tmp_path / "home"
    home.mkdir()
    proc = selfplay("run", DEBUG, f"run_dir={rd.root}", *TINY, "eval.every=2", "eval.limit=2",
                    "replay.self_imitation_share=0.5", "replay.self_imitation_min_advantage=0.01",
                    # groups of 4 on 2 tasks: some practice group gets mixed rewards, so the executor's
                    # update is a real one (a group of equal rewards has zero advantage: no gradient)
                    "executor.group_size=4", "executor.tasks_per_iteration=2",
                    env_update={"RAY_AUTH_MODE": None, "RAY_AUTH_TOKEN": None, "RAY_AUTH_TOKEN_PATH": None,
                                "HOME": str(home)})
    wait_for(lambda: any(e.get("event") == "stage" and e["iteration"] == 1 and e["stage"] == "solve"
                         for e in rd.read_events()), 300, "iteration 1 to start solving", proc)
    pid = next(e["pid"] for e in rd.read_events() if e.get("event") == "actor_start" and e["actor"] == "rollout")
    os.kill(pid, signal.SIGKILL)
    out = finish(proc)
    assert proc.returncode == 0, out
    assert (home / ".ray" / "auth_token").read_text().strip()  # Ray made a token: auth was on
    check_run_outputs(rd, 2)
    starts = [e for e in rd.read_events() if e.get("event") == "actor_start" and e["actor"] == "rollout"]
    assert len(starts) >= 2  # restarted
    restarts = metrics_rows(rd, "SELECT MAX(value) FROM scalars WHERE key='faults/actor_restarts'")[0][0]
    assert restarts >= 1
    check_both_roles_trained(rd, 2)
    ids = replay_ids(rd)
    assert ids and len({i for i, _ in ids}) == len(ids)
    check_self_imitation(rd)
    check_dashboard_on_real_run(rd)
    # In-training evaluation ran at iteration 2 on the generated benchmark and left its files.
    evals = dict(metrics_rows(rd, "SELECT key, value FROM scalars WHERE iteration=2 AND key LIKE 'eval/%'"))
    assert 0.0 <= evals["eval/generated/pass@1"] <= 1.0, evals
    assert (rd.root / "eval" / "iter-00002").is_dir()


def check_both_roles_trained(rd: RunDir, iterations: int) -> None:
    """Each role took one learner step per iteration (its scalars logged), the executor's on a real gradient at
    least once, and both published their last version to the rollout engine; both roles' samples are in replay."""
    from selfplay.data.replay import ReplayBuffer

    published = json.loads((rd.adapters / "published.json").read_text())
    versions = rd.state()["versions"]
    for role in ("proposer", "executor"):
        assert versions[role] == iterations and published[role]["version"] == iterations, (role, published)
        steps = dict(metrics_rows(rd, f"SELECT iteration, value FROM scalars WHERE key='learner/{role}/policy_version'"))
        assert steps == {it: float(it) for it in range(1, iterations + 1)}, (role, steps)
        seqs = dict(metrics_rows(rd, f"SELECT iteration, value FROM scalars WHERE key='learner/{role}/seqs'"))
        assert all(v > 0 for v in seqs.values()), (role, seqs)
    grads = metrics_rows(rd, "SELECT MAX(value) FROM scalars WHERE key='learner/executor/grad_norm'")[0][0]
    assert grads > 0, "the executor never got a non-zero gradient (all its groups had equal rewards)"
    with ReplayBuffer(rd.replay, rd.load_config().replay) as buf:
        assert {t.role for t in buf.trajectories() if buf.is_consumed(t.traj_id)} == {"proposer", "executor"}


def check_self_imitation(rd: RunDir) -> None:
    """The learner's advantages came back into the buffer, and iteration 2 replayed the good ones."""
    from selfplay.data.replay import ReplayBuffer

    with ReplayBuffer(rd.replay, rd.load_config().replay) as buf:
        trained = [t for t in buf.trajectories() if buf.is_consumed(t.traj_id)]
    assert any(t.advantage != 0.0 for t in trained), "no advantage was written back"
    good = [t for t in trained if t.role == "proposer" and t.meta.get("iteration") == 1 and t.advantage >= 0.01]
    replayed = dict(metrics_rows(rd, "SELECT iteration, value FROM scalars WHERE key='replay/replayed_total'"))
    assert good and replayed[2] > 0, (len(good), replayed)


def check_dashboard_on_real_run(rd: RunDir) -> None:
    """The dashboard's API on the store this real run wrote agrees with the store itself."""
    from fastapi.testclient import TestClient

    from selfplay.dashboard.app import create_app

    client = TestClient(create_app([rd.root]), base_url="http://127.0.0.1")
    (run,) = client.get("/api/runs").json()
    cfg = rd.load_config()
    assert (run["config"]["band_low"], run["config"]["band_high"]) == (cfg.verifier.band_low, cfg.verifier.band_high)
    series = client.get(f"/api/runs/{run['id']}/scalars").json()
    assert series["tasks/proposed"]["x"] == [1, 2]
    diff = client.get(f"/api/runs/{run['id']}/difficulty").json()
    for p in diff["per_iteration"]:
        n = metrics_rows(rd, f"SELECT COUNT(*) FROM tasks WHERE iteration={p['iteration']}")[0][0]
        scored = metrics_rows(rd, f"SELECT COUNT(*) FROM tasks WHERE iteration={p['iteration']} AND p_hat IS NOT NULL")[0][0]
        assert p["tasks"] == n and p["tasks"] - p["unscored"] == scored
    rows = client.get(f"/api/runs/{run['id']}/tasks", params={"limit": 500}).json()
    assert rows["total"] == metrics_rows(rd, "SELECT COUNT(*) FROM tasks")[0][0]
    with_trajs = metrics_rows(rd, "SELECT task_id FROM trajectories LIMIT 1")
    if with_trajs:
        detail = client.get(f"/api/runs/{run['id']}/tasks/{with_trajs[0][0]}").json()
        assert detail["trajectories"]


# Seed reproducibility, SIGKILL/SIGTERM/SIGINT and resume: tests/test_resume.py.
