"""`python -m sandbox doctor`: what isolation this host really gives, checked by running code, not guessed.

Starts a one-worker pool (whose template probes every mechanism in a throw-away child), prints each
mechanism as on/off with its detail or the reason it is off, then runs the self-test (what a tool call needs:
`sandbox.selftest`) and a few hostile checks through the sandbox. Exit status 1 when the pool does not start,
the level is below --min-isolation, or any end-to-end check failed; a call that ended in `sandbox_error`
never passes a check.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

from sandbox.host.pool import SandboxPool
from sandbox.selftest import self_test
from sandbox.types import ISOLATION_LEVELS, ExecStatus, IsolationReport, Limits, level_rank

# (name, code, predicate on the result that means "contained")
CHECKS = (
    ("runs code", "print(6 * 7)", lambda r: r.status is ExecStatus.OK and r.stdout.strip() == "42"),
    ("no network", "try:\n    import socket\n    socket.create_connection(('1.1.1.1', 53), timeout=2)\n"
                   "    print('CONNECTED')\nexcept Exception as e:\n    print('blocked', type(e).__name__)",
     lambda r: "CONNECTED" not in r.stdout),
    ("no /etc/shadow", "try:\n    print(len(open('/etc/shadow').read()))\nexcept OSError as e:\n"
                       "    print('blocked', e.errno)", lambda r: r.stdout.startswith("blocked")),
    ("no caller env", "import os; print(sorted(os.environ))",
     lambda r: r.status is ExecStatus.OK and "SANDBOX_DOCTOR_CANARY" not in r.stdout),
    ("wall clock kill", "while True: pass", lambda r: r.status is ExecStatus.TIMEOUT),
)


def passed(contained, r) -> bool:
    """A containment check passes only for a call that really ran: `sandbox_error` proves nothing."""
    return r.status is not ExecStatus.SANDBOX_ERROR and bool(contained(r))


def check(pool: SandboxPool) -> list[tuple[str, bool, str]]:
    """The self-test (what a tool call needs), then the containment checks. A call that ended in
    `sandbox_error` passes nothing: the code did not run, so it proved nothing."""
    out = [(c.name, c.ok, c.detail + (f" -- fix: {c.fix}" if c.fix else "")) for c in self_test(pool)]
    os.environ["SANDBOX_DOCTOR_CANARY"] = "1"  # set after the pool started: must not matter either way
    for name, code, contained in CHECKS:
        t = time.perf_counter()
        r = pool.run(code, timeout_s=1.0 if name == "wall clock kill" else 10.0)
        ok = passed(contained, r)
        detail = f"{r.status.value} in {1000 * (time.perf_counter() - t):.0f} ms"
        if r.status is ExecStatus.SANDBOX_ERROR:
            detail += ": " + " ".join(r.stderr.split())[:200]
        out.append((name, ok, detail))
    os.environ.pop("SANDBOX_DOCTOR_CANARY", None)
    return out


def render(report: IsolationReport, checks: list[tuple[str, bool, str]]) -> str:
    lines = [f"sandbox doctor: {platform.system()} {platform.release()}, Python {platform.python_version()}, "
             f"uid {os.geteuid()}",
             f"isolation level: {report.level}   (levels, weakest first: {', '.join(ISOLATION_LEVELS)})"]
    for name, mech in report.mechanisms.items():
        lines.append(f"  [{'on ' if mech.active else 'off'}] {name:<14} {mech.detail}")
    lines.append(f"preimported: {', '.join(report.preimported) or '-'}")
    for name, err in report.preimport_failed.items():
        lines.append(f"  preimport FAILED {name}: {err}")
    lines.append("end-to-end checks (each a real call through the sandbox):")
    for name, ok, detail in checks:
        lines.append(f"  [{'ok' if ok else 'FAIL'}] {name:<20} {detail}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sandbox doctor", description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--min-isolation", choices=ISOLATION_LEVELS, default="rlimits",
                        help="exit 1 when the host gives less than this")
    parser.add_argument("--timeout-s", type=float, default=None, help="check with this wall clock per call")
    parser.add_argument("--memory-mb", type=int, default=None, help="check with this memory limit per call")
    args = parser.parse_args(argv)
    given = {k: v for k, v in (("timeout_s", args.timeout_s), ("memory_mb", args.memory_mb)) if v is not None}
    try:
        pool = SandboxPool(Limits(**given), workers=1)
    except Exception as e:  # noqa: BLE001 - no pool at all: that is the finding
        print(f"sandbox doctor: the pool did not start: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    with pool:
        report = pool.report
        checks = check(pool)
    failed = [name for name, ok, _ in checks if not ok]
    below = level_rank(report.level) < level_rank(args.min_isolation)
    if args.json:
        print(json.dumps({"level": report.level,
                          "mechanisms": {n: {"active": m.active, "detail": m.detail}
                                         for n, m in report.mechanisms.items()},
                          "preimported": list(report.preimported), "preimport_failed": report.preimport_failed,
                          "checks": {n: {"contained": ok, "detail": d} for n, ok, d in checks}}, indent=2))
    else:
        print(render(report, checks))
        if below:
            print(f"\nbelow --min-isolation {args.min_isolation}", file=sys.stderr)
        if failed:
            print(f"\nFAILED: {', '.join(failed)}", file=sys.stderr)
    return 1 if below or failed else 0
