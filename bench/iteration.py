"""Wall-time split of debug iterations: generate, tools, verify, learn, weight sync, orchestration overhead.

Runs `configs/debug.yaml` (sizes overridable) through the real driver with Ray and reads the stage timings
the loop logs. Orchestration overhead = iteration wall time minus the time the rollout, verifier and
learner actors spent working (so it is Ray calls, serialisation and the driver's own bookkeeping).
Target: under 10% of the iteration.

    .venv/bin/python bench/iteration.py [key=value ...]
"""
from __future__ import annotations

import sqlite3
import sys
import tempfile
from pathlib import Path

from selfplay.config import load_config
from selfplay.run.driver import Driver
from selfplay.run.rundir import RunDir

REPO = Path(__file__).resolve().parents[1]
STAGES = ["propose", "solve", "verify", "practice", "learn_proposer", "learn_executor", "weight_sync", "tools",
          "orchestration"]


def main(overrides: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(REPO / "configs" / "debug.yaml", [f"run_dir={tmp}/run", "eval.every=0", *overrides])
        rd = RunDir.create(cfg)
        assert Driver(rd).run() == 0
        con = sqlite3.connect(rd.metrics)
        rows = con.execute("SELECT iteration, key, value FROM scalars WHERE key LIKE 'time/%'").fetchall()
    by_it: dict[int, dict[str, float]] = {}
    for it, key, value in rows:
        by_it.setdefault(it, {})[key[5:]] = value
    print(f"\n{'iteration':>9} {'total s':>8} " + " ".join(f"{s:>14}" for s in STAGES))
    for it, t in sorted(by_it.items()):
        total = t["total"]
        cells = " ".join(f"{t.get(s, 0.0):7.1f} ({100 * t.get(s, 0.0) / total:3.0f}%)" for s in STAGES)
        print(f"{it:>9} {total:8.1f} {cells}")
    share = max(t.get("orchestration_share", 0.0) for t in by_it.values())
    print(f"\norchestration overhead: at most {100 * share:.1f}% of an iteration (target < 10%): "
          f"{'PASS' if share < 0.10 else 'FAIL'}")
    print("(tools run inside solve/practice: its column is a part of theirs, not an extra stage)")


if __name__ == "__main__":
    main(sys.argv[1:])
