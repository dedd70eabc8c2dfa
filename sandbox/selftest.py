"""End-to-end self-test of a pool: what a tool call needs, checked by running it, before anything relies on it.

    checks = self_test(pool)           # list[SelfTestCheck]
    if not all(c.ok for c in checks):
        raise SandboxSelfTestFailed(failures(checks))

A run does this when its sandbox actor starts, before any model loads; `python -m sandbox doctor` prints the
same checks. A check passes only on the exact outcome it expects: a call that ended in `sandbox_error` never
passes anything.
"""
from __future__ import annotations

from dataclasses import dataclass

from sandbox.types import ExecResult, ExecStatus

DOCTOR_HINT = "run `python -m sandbox doctor` to see which mechanism fails on this host"


class SandboxSelfTestFailed(RuntimeError):
    """The sandbox cannot run an ordinary tool call here; the message names the failing checks and fixes."""


@dataclass(frozen=True)
class SelfTestCheck:
    name: str
    ok: bool
    detail: str  # the outcome, e.g. "ok in 4 ms" or "memory_limit: MemoryError"
    fix: str = ""  # what to do about it (empty when ok)


def _outcome(r: ExecResult) -> str:
    last = (r.stderr.strip().splitlines() or [""])[-1][:200]
    return f"{r.status.value} in {1000 * r.duration_s:.0f} ms" + (f": {last}" if last else "")


def _fix(r: ExecResult, otherwise: str) -> str:
    if r.status is ExecStatus.SANDBOX_ERROR:
        return f"the sandbox itself failed; {DOCTOR_HINT}"
    if r.status is ExecStatus.MEMORY_LIMIT:
        return "raise sandbox.memory_mb (numpy and sympy need ~300 MB of address space)"
    if r.status is ExecStatus.TIMEOUT:
        return "raise sandbox.timeout_s / sandbox.cpu_time_s, or give the machine fewer concurrent jobs"
    return otherwise


# (name, code, keyword arguments, expected status, expected stdout, fix when the outcome is something else)
CHECKS = (
    ("print", "print(6 * 7)", {}, ExecStatus.OK, "42\n", DOCTOR_HINT),
    ("numpy+sympy import",
     "import numpy, sympy\nprint(int(numpy.arange(4).sum()), sympy.factorint(2**8 + 1))", {}, ExecStatus.OK,
     "6 {257: 1}\n", "install numpy and sympy in the environment the run uses (`make install`), and keep them in "
                     "sandbox.preimport"),
    ("file write and read",
     "open('out.txt', 'w').write(open('in.txt').read()[::-1])\nprint(open('out.txt').read())",
     {"files": {"in.txt": "cba"}}, ExecStatus.OK, "abc\n",
     f"the call's scratch dir is not writable; {DOCTOR_HINT}"),
    ("timeout", "while True:\n    pass", {"timeout_s": 0.5}, ExecStatus.TIMEOUT, None,
     f"a runaway call was not stopped at its wall clock; {DOCTOR_HINT}"),
)


def self_test(pool) -> list[SelfTestCheck]:
    """Run each check through `pool` (a SandboxPool); never raises for a failed check."""
    out = []
    for name, code, kwargs, status, stdout, fix in CHECKS:
        r = pool.run(code, **kwargs)
        ok = r.status is status and (stdout is None or r.stdout == stdout)
        detail = _outcome(r)
        if not ok and r.status is status:
            detail += f"; printed {r.stdout[:80]!r}"
        out.append(SelfTestCheck(name, ok, detail, "" if ok else _fix(r, fix)))
    return out


def failures(checks: list[SelfTestCheck]) -> str:
    """One line naming every failed check, its outcome and its fix ('' when all passed)."""
    bad = [c for c in checks if not c.ok]
    if not bad:
        return ""
    return "sandbox self-test failed: " + "; ".join(f"{c.name}: {c.detail} (fix: {c.fix})" for c in bad)
