"""The CLI's error policy, as a user meets it: after validation an error is one to three lines, exits
non-zero within seconds, names the problem and the fix, and shows a traceback only with --verbose or
SELFPLAY_DEBUG=1. Each case runs the real `selfplay` command in a subprocess; none starts Ray."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from selfplay.cli import short_error
from selfplay.config import ConfigError, load_config
from selfplay.run import preflight
from selfplay.run.preflight import PreflightError

REPO = Path(__file__).resolve().parents[1]
DEBUG = str(REPO / "configs" / "debug.yaml")


def selfplay(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "SELFPLAY_DEBUG"}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "selfplay", *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_short(res: subprocess.CompletedProcess, *needles: str) -> list[str]:
    lines = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.strip()]
    assert res.returncode != 0, res.stdout + res.stderr
    assert 1 <= len(lines) <= 3, "\n".join(lines)
    assert lines[0].startswith("error: "), lines
    assert "Traceback" not in res.stderr
    for n in needles:
        assert n in res.stdout + res.stderr, (n, lines)
    return lines


CASES = {
    "missing model path": (["run", DEBUG, "model.name_or_path=/nonexistent/model"],
                           ["/nonexistent/model", "no such directory", "embedded"]),
    "config is a directory": (["run", "configs"], ["configs is a directory", "configs/debug.yaml"]),
    "unknown key": (["run", DEBUG, "learner.lrr=1e-5"], ["learner.lrr", "did you mean learner.lr?"]),
    "model dir without config.json": (["run", DEBUG, f"model.name_or_path={REPO / 'configs'}"], ["config.json"]),
    "dashboard on a directory without runs": (["dashboard", "configs"], ["no run in configs", "selfplay run"]),
    "status of a non-run": (["status", "configs"], ["not a run directory"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_errors_after_validation_are_short(case, tmp_path):
    args, needles = CASES[case]
    assert_short(selfplay(*args, env={"HF_HUB_OFFLINE": "1"}), *needles)


def test_unreachable_cluster_fails_before_ray_in_seconds():
    port = closed_port()
    res = selfplay("submit", DEBUG, "--address", f"http://127.0.0.1:{port}")
    assert_short(res, f"127.0.0.1:{port}", "cannot reach the Ray dashboard")
    res = selfplay("run", DEBUG, f"ray.address=127.0.0.1:{port}")
    assert_short(res, "cannot reach the Ray cluster (ray.address)")
    for cmd in ("logs", "stop"):
        assert_short(selfplay(cmd, "raysubmit_123", "--address", f"http://127.0.0.1:{port}"), "cannot reach")


def test_uncached_hub_id_offline_names_the_download(tmp_path):
    res = selfplay("run", DEBUG, "model.name_or_path=nobody-here/no-model",
                   env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")})
    assert_short(res, "nobody-here/no-model", "hf download")


def test_cached_hub_id_passes_preflight(tmp_path, monkeypatch):
    """A hub id already in the local cache (the layout huggingface_hub writes) is accepted offline."""
    snap = tmp_path / "hub" / "models--some-org--tiny" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (tmp_path / "hub" / "models--some-org--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--some-org--tiny" / "refs" / "main").write_text("abc123")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    preflight.check_model("some-org/tiny")  # no error
    with pytest.raises(PreflightError, match="not in the local hub cache"):
        preflight.check_model("some-org/other")


def test_verbose_shows_the_traceback():
    res = selfplay("--verbose", "run", "configs")
    assert res.returncode == 2 and "Traceback" in res.stderr and "ConfigError" in res.stderr
    res = selfplay("run", "configs", "--verbose")  # anywhere on the line
    assert "Traceback" in res.stderr
    res = selfplay("run", "configs", env={"SELFPLAY_DEBUG": "1"})
    assert "Traceback" in res.stderr


def test_resume_refuses_changes_that_alter_the_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    from selfplay.config import dump_config

    (run / "config.yaml").write_text(dump_config(load_config(DEBUG, [f"run_dir={run}"])))
    (run / "state.json").write_text(json.dumps({"status": "finished", "iteration": 2}))
    assert_short(selfplay("resume", str(run), "learner.lr=1"), "resume cannot change learner.lr")
    assert_short(selfplay("resume", str(run), "loop.iterations=1"), "below the 2 iterations already done")
    assert load_config(run / "config.yaml").loop.iterations == 2  # nothing written


def test_short_error_unwraps_a_ray_task_error():
    """An actor's exception arrives wrapped in Ray's RayTaskError, whose text is a remote traceback:
    the user gets the actor's own exception line."""
    from ray.exceptions import RayTaskError

    try:
        raise OSError("model weights not found in /data/m")
    except OSError as cause:
        wrapped = RayTaskError("LearnerActor.__init__", "Traceback (most recent call last):\n  File x\n"
                               "OSError: model weights not found in /data/m", cause)
    text = short_error(wrapped)
    lines = text.splitlines()
    assert lines[0] == "error: OSError: model weights not found in /data/m"
    assert len(lines) <= 3 and "--verbose" in text
    assert short_error(ConfigError("a: b")) == "error: a: b"


def test_status_is_a_short_summary_and_json_on_request(tmp_path):
    from selfplay.dashboard.demo import write_demo_run
    from selfplay.run.rundir import RunDir

    run = tmp_path / "demo"
    write_demo_run(run, iterations=3)
    RunDir(run).write_state(status="finished", iteration=3)
    res = selfplay("status", str(run))
    lines = res.stdout.splitlines()
    assert res.returncode == 0 and 2 <= len(lines) <= 6, res.stdout
    assert lines[0].startswith(f"{run}: finished, iteration 3/3 committed, updated ")
    assert lines[1].strip().startswith("it    2") and "accepted" in lines[1]  # the last logged iteration
    assert f"selfplay dashboard {run}" in res.stdout and f"selfplay resume {run} loop.iterations=6" in res.stdout
    raw = json.loads(selfplay("status", str(run), "--json").stdout)
    assert raw["status"] == "finished" and raw["last_logged_iteration"] == 2 and "tasks/proposed" in raw["scalars"]


def test_dashboard_takes_a_directory_of_runs_and_refuses_one_without(tmp_path):
    from selfplay.dashboard.demo import write_demo_run
    from selfplay.dashboard.runs import NoRunFound, find_runs

    write_demo_run(tmp_path / "runs" / "a", iterations=1)
    write_demo_run(tmp_path / "runs" / "b", iterations=1)
    (tmp_path / "runs" / "notes").mkdir()
    assert find_runs([tmp_path / "runs"]) == [(tmp_path / "runs" / n).resolve() for n in ("a", "b")]
    assert find_runs([tmp_path / "runs" / "a"]) == [(tmp_path / "runs" / "a").resolve()]
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(NoRunFound, match=r"no run in .*empty .*looked for config.yaml.*empty/sub"):
        find_runs([tmp_path / "empty"])


def test_status_of_a_running_run_names_its_stage(tmp_path):
    """A live driver (this test's own pid) in the middle of iteration 4's practice stage."""
    from selfplay.dashboard.demo import write_demo_run
    from selfplay.run.rundir import RunDir

    run = tmp_path / "live"
    write_demo_run(run, iterations=3)
    rd = RunDir(run)
    rd.write_state(status="running", iteration=3, pid=os.getpid())
    rd.event("driver_start", pid=os.getpid())
    rd.event("stage", iteration=4, stage="propose", phase="start")
    rd.event("stage", iteration=4, stage="propose", phase="end")
    rd.event("stage", iteration=4, stage="practice", phase="start")
    res = selfplay("status", str(run))
    assert "running, iteration 3/3 committed" in res.stdout
    assert "now: iteration 4, practice (since " in res.stdout
    rd.event("stage", iteration=4, stage="practice", phase="end")
    assert "now:" not in selfplay("status", str(run)).stdout


def test_dashboard_on_a_port_in_use_says_so_and_names_a_free_one(tmp_path):
    """Before: the URL was printed as if served, then uvicorn's `ERROR: [Errno 98]` log line and exit 3."""
    from selfplay.dashboard.demo import write_demo_run

    write_demo_run(tmp_path / "demo", iterations=1)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        res = selfplay("dashboard", str(tmp_path / "demo"), "--port", str(port), timeout=30)
    lines = assert_short(res, f"port {port} on 127.0.0.1 is in use", "pass --port ")
    assert len(lines) == 1 and "http://" not in res.stdout + res.stderr
    free = int(lines[0].split("pass --port ")[1].split()[0])
    with socket.socket() as s:
        s.bind(("127.0.0.1", free))  # the port it names is free


def test_run_into_a_directory_that_holds_a_run_points_at_resume(tmp_path):
    from selfplay.dashboard.demo import write_demo_run

    run = tmp_path / "old"
    write_demo_run(run, iterations=1)
    before = sorted(p.name for p in run.iterdir())
    res = selfplay("run", DEBUG, f"run_dir={run}", env={"HF_HUB_OFFLINE": "1"})
    assert_short(res, f"run_dir {run} already holds a run", f"selfplay resume {run}")
    assert sorted(p.name for p in run.iterdir()) == before  # nothing written into it


def test_help_tells_a_user_where_to_start_not_how_the_module_is_built():
    res = selfplay("--help")
    assert res.returncode == 0
    text = " ".join(res.stdout.split())
    assert "selfplay run configs/debug.yaml" in text and "selfplay status RUN" in text
    assert "App.__call__" not in text and "Heavy imports" not in text  # the module docstring, for developers
