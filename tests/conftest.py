"""Suite-wide settings that keep test modules from leaking into each other.

Ray >= 2.60 turns token auth on for the first local `ray.init()` of a process and writes the choice into
`os.environ`, so one module's cluster would change how every later cluster (and `ray start`) of the run
behaves. Local test clusters therefore run with auth disabled; tests/test_jobs.py starts its head with token
auth on purpose and checks the client sends the token. Set RAY_AUTH_MODE yourself to override.
Processes a module leaves running below pytest are named in a warning, since they skew later modules.
"""
from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

import pytest

from sandbox.linux import descendants

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


# Started once per process and meant to live as long as it (multiprocessing's resource tracker, which
# vLLM's spawned engine starts; wandb's service): not a leak.
_PER_PROCESS_SERVICES = ("multiprocessing.resource_tracker", "wandb-core")


def _cmdline(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None


def _leaked(before: set[int]) -> dict[int, str]:
    new = {pid: _cmdline(pid) for pid in set(descendants(os.getpid())) - before}
    return {pid: c for pid, c in new.items() if c and not any(s in c for s in _PER_PROCESS_SERVICES)}


@pytest.fixture(scope="module", autouse=True)
def _no_processes_left_behind(request):
    """Warn (in pytest's summary) about processes a test module started and left running below pytest."""
    before = set(descendants(os.getpid()))
    yield
    deadline = time.monotonic() + 10
    while (left := _leaked(before)) and time.monotonic() < deadline:
        time.sleep(0.5)
    if left:
        names = ", ".join(f"{pid}:{c[:120]}" for pid, c in sorted(left.items()))
        warnings.warn(f"{request.module.__name__} left processes running: {names}", stacklevel=1)
