"""Cluster jobs through Ray's Job Submission SDK: ship the working directory, run `selfplay run` on the head.

The config is validated locally first, so a typo fails on the laptop, not an hour later in a queue.
Ray >= 2.60 guards the job API with a token (~/.ray/auth_token on the head); the SDK reads it when
RAY_AUTH_MODE=token, which we set whenever a token is present and the user has not chosen otherwise.
"""
from __future__ import annotations

import os
import shlex
import time
from pathlib import Path

from selfplay.config import load_config

# Never shipped to the cluster: local environments, run outputs, VCS data, caches.
SHIP_EXCLUDES = [".venv/", "runs/", ".git/", "**/__pycache__/", ".pytest_cache/", "artifacts/", "*.egg-info/"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def _client(address: str):
    # Ray reads RAY_AUTH_MODE when it is first imported: set it before the import.
    if "RAY_AUTH_MODE" not in os.environ and (
        os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
        or Path("~/.ray/auth_token").expanduser().exists()
    ):
        os.environ["RAY_AUTH_MODE"] = "token"
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


def submit(
    config: str,
    address: str,
    overrides: list[str] | None = None,
    working_dir: str = ".",
    env: dict[str, str] | None = None,
    job_id: str | None = None,
) -> str:
    overrides = list(overrides or [])
    load_config(config, overrides)  # fail here, with the field's name, before anything is shipped
    wd = Path(working_dir).resolve()
    cfg_path = Path(config).resolve()
    try:
        rel_cfg = cfg_path.relative_to(wd)
    except ValueError:
        raise ValueError(f"config {config} must live inside the shipped working directory {wd}") from None
    # The job joins the cluster it runs on; its Ray address is the cluster's, not a new local one.
    cmd = ["python", "-m", "selfplay", "run", str(rel_cfg), "ray.address=auto", *overrides]
    runtime_env = {"working_dir": str(wd), "excludes": SHIP_EXCLUDES}
    if env:
        runtime_env["env_vars"] = dict(env)
    return _client(address).submit_job(
        entrypoint=" ".join(shlex.quote(c) for c in cmd), runtime_env=runtime_env, submission_id=job_id
    )


def status(job_id: str, address: str) -> str:
    return str(_client(address).get_job_status(job_id).value)


def logs(job_id: str, address: str) -> str:
    return _client(address).get_job_logs(job_id)


def stop(job_id: str, address: str) -> bool:
    return _client(address).stop_job(job_id)


def wait(job_id: str, address: str, timeout_s: float = 600, poll_s: float = 2.0) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        st = status(job_id, address)
        if st in TERMINAL or time.monotonic() > deadline:
            return st
        time.sleep(poll_s)
