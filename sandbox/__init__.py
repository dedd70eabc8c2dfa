"""Sandboxed Python tool runtime: run untrusted snippets fast, each in a fresh isolated process.

    from sandbox import run, SandboxPool, Limits
    run("print(2 + 2)").stdout                      # '4\\n', on a lazily created process-wide pool
    with SandboxPool(Limits(timeout_s=5), workers=4, min_isolation="full") as pool:
        results = pool.run_many(["import sympy; print(sympy.factorint(2**64 - 1))", "while True: pass"])

`python -m sandbox doctor` prints which isolation mechanisms work on this host. Design: docs/sandbox.md.
Standalone: imports nothing from selfplay. Names are loaded lazily, so the template process (which imports
`sandbox.jail.zygote`) does not pay for the pool's asyncio/threading machinery in memory and fork time.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "SandboxPool": "sandbox.host.pool", "run": "sandbox.host.pool", "run_many": "sandbox.host.pool", "arun": "sandbox.host.pool",
    "arun_many": "sandbox.host.pool", "default_pool": "sandbox.host.pool",
    "ISOLATION_LEVELS": "sandbox.types", "ExecResult": "sandbox.types", "ExecStatus": "sandbox.types",
    "IsolationError": "sandbox.types", "IsolationReport": "sandbox.types", "Limits": "sandbox.types",
    "Mechanism": "sandbox.types", "SandboxClosedError": "sandbox.types",
    "self_test": "sandbox.selftest", "failures": "sandbox.selftest", "SelfTestCheck": "sandbox.selftest",
    "SandboxSelfTestFailed": "sandbox.selftest",
}
__all__ = ["ISOLATION_LEVELS", "ExecResult", "ExecStatus", "IsolationError", "IsolationReport", "Limits", "Mechanism",
           "SandboxClosedError", "SandboxPool", "SandboxSelfTestFailed", "SelfTestCheck", "arun", "arun_many",
           "default_pool", "failures", "run", "run_many", "self_test"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'sandbox' has no attribute {name!r}")
