"""Cluster jobs through Ray's Job Submission SDK: ship the working directory, run `selfplay run` on the head.

The config is validated locally first, so a typo fails on the laptop, not an hour later in a queue.
Ray >= 2.60 guards the job API of a token-auth cluster (the default for new clusters) with a bearer
token. We send it ourselves, read from where Ray keeps it ($RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH,
~/.ray/auth_token), instead of relying on Ray's process-wide auth mode, which is fixed when Ray is
first imported and leaks into every Ray process this one starts afterwards.
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


def auth_token() -> str | None:
    """The cluster token this user holds, or None (also when RAY_AUTH_MODE=disabled says not to use one)."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or "~/.ray/auth_token").expanduser()
    return path.read_text().strip() if path.is_file() else None


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    token = auth_token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    return JobSubmissionClient(address, headers=headers)


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
