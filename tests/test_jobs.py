"""Cluster path: a real Ray head (`ray start --head`), `selfplay submit` ships a tiny run to it, the job must
reach SUCCEEDED and leave a finished run directory; then the head, and only it, is stopped."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sandbox.linux import descendants
from selfplay.run import jobs
from selfplay.run.rundir import RunDir

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# every port a head opens, so a second head (another test run, a user's cluster) never collides with this one
PORT_FLAGS = ("--port", "--dashboard-port", "--ray-client-server-port", "--node-manager-port",
              "--object-manager-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
              "--runtime-env-agent-port", "--metrics-export-port")


def free_ports(n: int) -> list[int]:
    """`n` distinct ports the kernel has free now (bound together, so none repeats)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def stop_tree(proc: subprocess.Popen, grace_s: float = 30) -> None:
    """Stop `proc` and every process below it: SIGTERM to `proc` (`ray start --block` then stops what it
    started, in about 3 s; a SIGTERM to each process instead leaves GCS and raylet waiting for each other), then
    SIGKILL to the whole tree after `grace_s`. Only these: never `ray stop`, which stops every Ray on the
    machine (a user's running job included)."""
    tree = {proc.pid, *descendants(proc.pid)}
    for sig, targets in ((signal.SIGTERM, {proc.pid}), (signal.SIGKILL, tree)):
        for pid in targets:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() and
                                                  "Z" not in _state(pid) for pid in tree):
            proc.poll()
            time.sleep(0.2)
    proc.wait(timeout=30)
    left = [pid for pid in tree if Path(f"/proc/{pid}").exists() and _state(pid) != "Z"]
    assert not left, f"the test head left processes running: {left}"


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A head of its own (`ray start --head --block`, free ports, its own temp dir) with token auth on, as Ray
    >= 2.60 starts new clusters; the token lives in a file only the head's environment and
    `RAY_AUTH_TOKEN_PATH` point to (never the user's ~/.ray). Torn down by stopping its process tree."""
    ray = shutil.which("ray", path=str(BIN)) or shutil.which("ray")
    assert ray, "ray CLI not found beside the interpreter"
    token_path = tmp_path_factory.mktemp("ray-auth") / "auth_token"
    token_path.write_text(secrets.token_hex(16))
    temp_dir = tmp_path_factory.mktemp("ray")
    ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS) + 2)))
    lo = free_ports(1)[0]
    # The job's `python` must be this environment's: put it first on the head's PATH.
    env = dict(os.environ, PATH=f"{BIN}:{os.environ.get('PATH', '')}", RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN_PATH=str(token_path))
    # its output to a file: a pipe nobody reads fills up, and the head then blocks on its way out
    head_log = temp_dir / "head.log"
    with head_log.open("w") as out:
        head = subprocess.Popen(
            [ray, "start", "--head", "--block", "--num-cpus=2", "--dashboard-host=127.0.0.1",
             "--disable-usage-stats", f"--temp-dir={temp_dir}", *(f"{flag}={port}" for flag, port in ports.items()),
             f"--min-worker-port={lo}", f"--max-worker-port={lo + 50}"],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    address = f"http://127.0.0.1:{ports['--dashboard-port']}"
    try:
        deadline = time.monotonic() + 180
        while not _answers(address):
            assert head.poll() is None, head_log.read_text()
            assert time.monotonic() < deadline, "the test head's job API never answered"
            time.sleep(1)
        yield address, token_path
    finally:
        stop_tree(head)


def _answers(address: str) -> bool:
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(f"{address}/api/version", timeout=2)
        return True
    except urllib.error.HTTPError:
        return True  # it answered (401 without the token)
    except OSError:
        return False


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
@pytest.mark.skipif(any(c.isspace() for c in sys.executable),
                    reason="Ray starts runtime_env workers with `bash -c` and an unquoted Python path, so a job's "
                           "workers cannot start from a venv whose path has a space (README, cluster section)")
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
