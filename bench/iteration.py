"""Wall-time split of debug iterations: generate, tools, verify, learn, weight sync, orchestration overhead.

Runs `configs/debug.yaml` (sizes overridable) through the real driver with Ray and reads the stage timings
the loop logs. Orchestration overhead = iteration wall time minus the time the rollout, verifier and
learner actors spent working (so it is Ray calls, serialisation and the driver's own bookkeeping).
Target: under 10% of the iteration.

    .venv/bin/python bench/iteration.py [key=value ...]
    .venv/bin/python bench/iteration.py --pipelines [key=value ...]   # iterations/hour, sync vs async

`--pipelines [--repeats R] [--json FILE]` runs the same config as adjacent (sync, async) pairs in this
process (`loop.pipeline=sync`, `loop.pipeline=async replay.max_staleness=1`; the order alternates between
pairs) and prints iterations per hour of each (iteration wall time from the stage events, commits included,
actor start-up excluded; both train on every rollout, the async one in the next iteration or the final
drain), the async/sync ratio per pair with a 95% interval over the pairs, the busy and overlap seconds that
explain it, and the load average around each run. `--json` appends the pairs to FILE and summarises all the
pairs it holds, so pairs from several invocations (each short enough for a shared machine) pool.
"""
from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import tempfile
from pathlib import Path

# bench/sandbox.py would shadow the `sandbox` package, here and (Ray hands the driver's script directory to its
# workers while it is on sys.path) in the actors: this script imports from the repository, not from bench/
_HERE = os.path.dirname(os.path.realpath(__file__))
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != _HERE]

from selfplay.config import load_config  # noqa: E402
from selfplay.run.driver import Driver  # noqa: E402
from selfplay.run.rundir import RunDir  # noqa: E402

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


def run_scalars(overrides: list[str], with_events: bool = False):
    """Scalars per iteration of one debug run (and, with `with_events`, its stage events)."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(REPO / "configs" / "debug.yaml", [f"run_dir={tmp}/run", "eval.every=0", *overrides])
        rd = RunDir.create(cfg)
        assert Driver(rd).run() == 0
        con = sqlite3.connect(rd.metrics)
        rows = con.execute("SELECT iteration, key, value FROM scalars").fetchall()
        events = [e for e in rd.read_events() if e.get("event") == "stage"]
    by_it: dict[int, dict[str, float]] = {}
    for it, key, value in rows:
        by_it.setdefault(it, {})[key] = value
    return (by_it, events) if with_events else by_it


def ci95(xs: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval (nan for one value)."""
    import statistics

    t = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}
    m = statistics.mean(xs)
    return m, (t.get(len(xs) - 1, 1.96) * statistics.stdev(xs) / len(xs) ** 0.5) if len(xs) > 1 else float("nan")


def iteration_walls(events: list[dict]) -> list[float]:
    """Wall seconds of each iteration, commit included: from one commit's end to the next (the first from its
    propose start). Both pipelines train on every rollout by the end (async: next iteration or final drain)."""
    first = min(e["t"] for e in events if e["stage"] == "propose" and e["phase"] == "start")
    ends = sorted((e["iteration"], e["t"]) for e in events if e["stage"] == "commit" and e["phase"] == "end")
    marks = [first] + [t for _, t in ends]
    return [b - a for a, b in zip(marks, marks[1:])]


def pipeline_run(mode: str, overrides: list[str]) -> dict:
    extra = {"sync": ["loop.pipeline=sync"], "async": ["loop.pipeline=async", "replay.max_staleness=1"]}[mode]
    load_before = os.getloadavg()[0]
    by_it, events = run_scalars([*extra, *overrides], with_events=True)
    walls = iteration_walls(events)
    run = {"mode": mode, "iterations": len(walls), "walls": walls, "wall_s": sum(walls),
           "per_hour": 3600 * len(walls) / sum(walls), "load": [load_before, os.getloadavg()[0]]}
    for k in ("busy/rollout", "busy/learner", "overlap"):
        run[k] = sum(t.get(f"time/{k}", 0.0) for t in by_it.values())
    run["staleness_max"] = max((t.get(f"learner/{r}/staleness_max", 0.0) for t in by_it.values()
                                for r in ("proposer", "executor")), default=0.0)
    print(f"{mode}: {len(walls)} iterations in {run['wall_s']:.0f} s ({' '.join(f'{w:.0f}' for w in walls)}) = "
          f"{run['per_hour']:.1f}/h; rollout busy {run['busy/rollout']:.0f} s, learner busy "
          f"{run['busy/learner']:.0f} s, overlap {run['overlap']:.0f} s; load {load_before:.1f} -> "
          f"{run['load'][1]:.1f}", flush=True)
    return run


def pipelines(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="bench/iteration.py --pipelines")
    ap.add_argument("--repeats", type=int, default=1, help="(sync, async) pairs, adjacent, order alternating")
    ap.add_argument("--json", help="append each pair here; the table summarises every pair the file holds")
    args, overrides = ap.parse_known_args(argv)
    pairs = []
    if args.json and Path(args.json).exists():
        pairs = json.loads(Path(args.json).read_text())
    for rep in range(args.repeats):
        order = ("sync", "async") if (len(pairs) + rep) % 2 == 0 else ("async", "sync")
        pair = {"overrides": overrides, **{mode: pipeline_run(mode, overrides) for mode in order}}
        pairs.append(pair)
        if args.json:
            Path(args.json).write_text(json.dumps(pairs, indent=1))
    report_pipelines(pairs)


def report_pipelines(pairs: list[dict]) -> None:
    ratios = [p["async"]["per_hour"] / p["sync"]["per_hour"] for p in pairs]
    n_it = sorted({p[m]["iterations"] for p in pairs for m in ("sync", "async")})
    loads = [x for p in pairs for m in ("sync", "async") for x in p[m]["load"]]
    print(f"\nDebug config, {n_it} iterations per run, {len(pairs)} (sync, async) pairs run back to back, "
          f"load average {min(loads):.1f}-{max(loads):.1f}; mean +- 95% CI over the pairs")
    print("| pipeline | iterations/hour | iteration wall s | rollout busy s/it | learner busy s/it | overlap s/it "
          "| staleness max | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for mode in ("sync", "async"):
        runs = [p[mode] for p in pairs]
        rate, rate_ci = ci95([r["per_hour"] for r in runs])
        wall, wall_ci = ci95([w for r in runs for w in r["walls"]])
        per_it = {k: sum(r[k] for r in runs) / sum(r["iterations"] for r in runs)
                  for k in ("busy/rollout", "busy/learner", "overlap")}
        ratio = "1.00" if mode == "sync" else "{:.2f} +- {:.2f}".format(*ci95(ratios))
        print(f"| {mode} | {rate:.1f} +- {rate_ci:.1f} | {wall:.0f} +- {wall_ci:.0f} | {per_it['busy/rollout']:.0f} "
              f"| {per_it['busy/learner']:.0f} | {per_it['overlap']:.0f} "
              f"| {max(r['staleness_max'] for r in runs):.0f} | {ratio} |")
    print("per-pair async/sync ratios: " + ", ".join(f"{r:.2f}" for r in ratios))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--pipelines"]:
        pipelines(sys.argv[2:])
    else:
        main(sys.argv[1:])
