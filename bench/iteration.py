"""Wall-time split of debug iterations: generate, tools, verify, learn, weight sync, orchestration overhead.

Runs `configs/debug.yaml` (sizes overridable) through the real driver with Ray and reads the stage timings
the loop logs. Orchestration overhead = iteration wall time minus the time the rollout, verifier and
learner actors spent working (so it is Ray calls, serialisation and the driver's own bookkeeping).
Target: under 10% of the iteration.

    .venv/bin/python bench/iteration.py [key=value ...]
    .venv/bin/python bench/iteration.py --pipelines [key=value ...]   # iterations/hour, sync vs async

`--pipelines` runs the same config twice in this process, `loop.pipeline=sync` then `loop.pipeline=async
replay.max_staleness=1`, and prints iterations per hour of each (iteration wall time, vLLM's start-up
excluded; both runs train on every rollout, the async one in the next iteration or the final drain), the
ratio, and the busy and overlap seconds that explain it.
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
    by_it = {it: {k[5:]: v for k, v in s.items() if k.startswith("time/")}
             for it, s in run_scalars(overrides).items()}
    print(f"\n{'iteration':>9} {'total s':>8} " + " ".join(f"{s:>14}" for s in STAGES))
    for it, t in sorted(by_it.items()):
        total = t["total"]
        cells = " ".join(f"{t.get(s, 0.0):7.1f} ({100 * t.get(s, 0.0) / total:3.0f}%)" for s in STAGES)
        print(f"{it:>9} {total:8.1f} {cells}")
    share = max(t.get("orchestration_share", 0.0) for t in by_it.values())
    print(f"\norchestration overhead: at most {100 * share:.1f}% of an iteration (target < 10%): "
          f"{'PASS' if share < 0.10 else 'FAIL'}")
    print("(tools run inside solve/practice: its column is a part of theirs, not an extra stage)")


def run_scalars(overrides: list[str]) -> dict[int, dict[str, float]]:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(REPO / "configs" / "debug.yaml", [f"run_dir={tmp}/run", "eval.every=0", *overrides])
        rd = RunDir.create(cfg)
        assert Driver(rd).run() == 0
        con = sqlite3.connect(rd.metrics)
        rows = con.execute("SELECT iteration, key, value FROM scalars").fetchall()
    by_it: dict[int, dict[str, float]] = {}
    for it, key, value in rows:
        by_it.setdefault(it, {})[key] = value
    return by_it


def ci95(xs: list[float]) -> tuple[float, float]:
    import statistics

    t = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45}
    m = statistics.mean(xs)
    return m, (t.get(len(xs) - 1, 1.96) * statistics.stdev(xs) / len(xs) ** 0.5) if len(xs) > 1 else float("nan")


def pipelines(overrides: list[str]) -> None:
    modes = {"sync": ["loop.pipeline=sync"], "async": ["loop.pipeline=async", "replay.max_staleness=1"]}
    runs = {name: run_scalars([*extra, *overrides]) for name, extra in modes.items()}
    print("\n| pipeline | iterations | wall s (sum) | iterations/hour | per-iteration rate, mean +- 95% CI "
          "| rollout busy s | learner busy s | overlap s |")
    print("|---|---|---|---|---|---|---|---|")
    rate = {}
    for name, by_it in runs.items():
        totals = [t["time/total"] for _, t in sorted(by_it.items())]
        rate[name] = 3600 * len(totals) / sum(totals)
        m, ci = ci95([3600 / x for x in totals])
        busy = {k: sum(t.get(f"time/{k}", 0.0) for t in by_it.values())
                for k in ("busy/rollout", "busy/learner", "overlap")}
        print(f"| {name} | {len(totals)} | {sum(totals):.0f} | {rate[name]:.1f} | {m:.1f} +- {ci:.1f} "
              f"| {busy['busy/rollout']:.0f} | {busy['busy/learner']:.0f} | {busy['overlap']:.0f} |")
    print(f"\nasync / sync iterations per hour: {rate['async'] / rate['sync']:.2f}x")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--pipelines"]:
        pipelines(sys.argv[2:])
    else:
        main(sys.argv[1:])
