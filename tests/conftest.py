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

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def _children_tree(pid: int) -> set[int]:
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        try:
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        for k in map(int, kids):
            if k not in out:
                out.add(k)
                todo.append(k)
    return out


@pytest.fixture(scope="module", autouse=True)
def _no_processes_left_behind(request):
    """Warn (in pytest's summary) about processes a test module started and left running below pytest."""
    before = _children_tree(os.getpid())
    yield
    deadline = time.monotonic() + 10
    while (left := _children_tree(os.getpid()) - before) and time.monotonic() < deadline:
        time.sleep(0.5)
    if left:
        names = []
        for pid in sorted(left):
            try:
                names.append(f"{pid}:{Path(f'/proc/{pid}/comm').read_text().strip()}")
            except OSError:
                pass
        if names:
            warnings.warn(f"{request.module.__name__} left processes running: {', '.join(names)}", stacklevel=1)
