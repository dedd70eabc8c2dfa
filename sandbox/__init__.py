"""Sandboxed Python tool runtime: run untrusted snippets fast, each in a fresh isolated process.

    from sandbox import run, SandboxPool, Limits
    run("print(2 + 2)").stdout                      # '4\\n', on a lazily created process-wide pool
    with SandboxPool(Limits(timeout_s=5), workers=4, min_isolation="full") as pool:
        results = pool.run_many(["import sympy; print(sympy.factorint(2**64 - 1))", "while True: pass"])

`python -m sandbox doctor` prints which isolation mechanisms work on this host. Design: docs/sandbox.md.
Standalone: imports nothing from selfplay.
"""
from sandbox.pool import SandboxPool, arun, arun_many, default_pool, run, run_many
from sandbox.types import (ISOLATION_LEVELS, ExecResult, ExecStatus, IsolationError, IsolationReport, Limits,
                           Mechanism, SandboxClosedError)

__all__ = [
    "ISOLATION_LEVELS", "ExecResult", "ExecStatus", "IsolationError", "IsolationReport", "Limits", "Mechanism",
    "SandboxClosedError", "SandboxPool", "arun", "arun_many", "default_pool", "run", "run_many",
]
