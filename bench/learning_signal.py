"""The "Learning signal" table of BENCHMARKS.md: per-iteration rates of a run, read from its metrics store.

    python bench/learning_signal.py runs/after-selfplay [more run dirs]

Prints one markdown table per run (proposer parse rate, accepted rate, proposer reward, executor format rate,
executor accuracy against the pseudo-labels), exactly the keys the loop logs; nothing is recomputed.
"""
from __future__ import annotations

import sqlite3
import sys
from pathlib import Path

COLUMNS = [("proposer parse rate", "proposer/parse_rate"), ("accepted rate", "tasks/accepted_rate"),
           ("proposer reward", "proposer/reward_mean"), ("executor format rate", "executor/format_rate"),
           ("executor accuracy vs pseudo-label", "executor/accuracy")]


def table(run_dir: Path) -> str:
    con = sqlite3.connect(f"file:{run_dir / 'metrics.sqlite'}?mode=ro", uri=True)
    try:
        rows: dict[int, dict[str, float]] = {}
        for it, key, value in con.execute("SELECT iteration, key, value FROM scalars"):
            rows.setdefault(it, {})[key] = value
    finally:
        con.close()
    lines = ["| iteration | " + " | ".join(name for name, _ in COLUMNS) + " |",
             "|---" * (len(COLUMNS) + 1) + "|"]
    for it in sorted(rows):
        cells = [rows[it].get(key) for _, key in COLUMNS]
        lines.append(f"| {it} | " + " | ".join("-" if v is None else f"{v:+.2f}" if key == "proposer/reward_mean"
                                              else f"{v:.2f}" for v, (_, key) in zip(cells, COLUMNS)) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    for arg in argv:
        run_dir = Path(arg)
        if not (run_dir / "metrics.sqlite").exists():
            print(f"error: {run_dir} has no metrics.sqlite (not a run directory)", file=sys.stderr)
            return 2
        print(f"{run_dir}:\n\n{table(run_dir)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
