"""Cluster path: a real Ray head (`ray start --head`), `selfplay submit` ships a tiny run to it, the job must
reach SUCCEEDED and leave a finished run directory; then the head is stopped."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from selfplay.run import jobs
from selfplay.run.rundir import RunDir

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PORT = 8299  # dashboard / job API port of the test head (not the default, to stay out of a user's way)
GCS_PORT = 6399


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A head with token auth on, as Ray >= 2.60 starts new clusters; the token lives in a file only the
    head's environment and `RAY_AUTH_TOKEN_PATH` point to (never the user's ~/.ray)."""
    ray = shutil.which("ray", path=str(BIN)) or shutil.which("ray")
    assert ray, "ray CLI not found beside the interpreter"
    token_path = tmp_path_factory.mktemp("ray-auth") / "auth_token"
    token_path.write_text(secrets.token_hex(16))
    # The job's `python` must be this environment's: put it first on the head's PATH.
    env = dict(os.environ, PATH=f"{BIN}:{os.environ.get('PATH', '')}", RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN_PATH=str(token_path))
    subprocess.run([ray, "stop", "--force"], env=env, capture_output=True)
    start = subprocess.run(
        [ray, "start", "--head", f"--port={GCS_PORT}", "--num-cpus=2", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={PORT}", "--disable-usage-stats"],
        env=env, capture_output=True, text=True, timeout=180,
    )
    assert start.returncode == 0, start.stdout + start.stderr
    try:
        yield f"http://127.0.0.1:{PORT}", token_path
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_bad_config_fails_before_submitting(tmp_path):
    with pytest.raises(Exception, match="learner.lr"):
        jobs.submit(str(REPO / "configs/debug.yaml"), "http://127.0.0.1:1", ["learner.lr=-1"], str(REPO))


def test_auth_token_is_found_where_ray_keeps_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    assert jobs.auth_token() is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    assert jobs.auth_token() == "from-home"
    (tmp_path / "elsewhere").write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "elsewhere"))
    assert jobs.auth_token() == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert jobs.auth_token() == "from-env"
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # the user said no: send nothing
    assert jobs.auth_token() is None


@pytest.mark.slow
def test_submit_tiny_run_to_ray_head(ray_head, tmp_path, monkeypatch):
    ray_head, token_path = ray_head
    with pytest.raises(Exception, match="(?i)auth"):  # the head really wants the token ...
        jobs.status("nope", ray_head)
    # ... which the client finds where Ray keeps it, in the CLI and in this process alike
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token_path))
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    run_dir = tmp_path / "job-run"
    cli = [sys.executable, "-m", "selfplay"]
    overrides = [
        f"run_dir={run_dir}", "loop.iterations=1", "eval.every=0",
        "proposer.candidates_per_iteration=2", "proposer.group_size=2", "proposer.max_tokens=96",
        "executor.samples_per_task=2", "executor.group_size=2", "executor.tasks_per_iteration=1",
        "executor.max_turns=1", "executor.max_tokens_per_turn=64",
    ]
    sub = subprocess.run([*cli, "submit", "configs/debug.yaml", "--address", ray_head, *overrides],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert sub.returncode == 0, sub.stderr
    job_id = sub.stdout.strip().splitlines()[-1]
    assert job_id
    final = jobs.wait(job_id, ray_head, timeout_s=900)
    logs = subprocess.run([*cli, "logs", job_id, "--address", ray_head], cwd=REPO, capture_output=True, text=True)
    assert final == "SUCCEEDED", logs.stdout[-5000:]
    rd = RunDir(run_dir)
    assert rd.state()["status"] == "finished" and rd.state()["iteration"] == 1
    status = subprocess.run([*cli, "status", str(run_dir), "--json"], cwd=REPO, capture_output=True, text=True)
    assert json.loads(status.stdout)["last_logged_iteration"] == 1
    # stop on a finished job is harmless and says so
    stop = subprocess.run([*cli, "stop", job_id, "--address", ray_head], cwd=REPO, capture_output=True, text=True)
    assert stop.returncode == 0 and "not running" in stop.stdout
