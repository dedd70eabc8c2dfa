"""The results table in the Agent0 layout (docs/anchors.md): Base, Base w/ tool, + self-play, and the
reference-reward (RLVR) control beside it, one column per benchmark, every cell pass@1 with its Wilson 95%
interval, and the trained rows' paired difference against Base w/ tool with its bootstrap 95% interval.

`bench/agent0_table.py` runs the evaluations and calls `format_table`; a cell whose evaluation was not run
reads "not run".
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from selfplay.evaluation.compare import compare_results

NOT_RUN = "not run"


@dataclass(frozen=True)
class Row:
    name: str  # "Base", "Base w/ tool", "+ self-play", "reference reward (RLVR)"
    tools: bool
    adapter: str | None = None  # run dir / checkpoint of a trained executor; None = the base model
    baseline: str | None = None  # the row a paired difference is taken against


ROWS = (Row("Base", tools=False), Row("Base w/ tool", tools=True),
        Row("+ self-play", tools=True, baseline="Base w/ tool"),
        Row("reference reward (RLVR)", tools=True, baseline="Base w/ tool"))


def cell_dir(out: str | Path, row: str, bench: str) -> Path:
    slug = row.lower().replace("+", "plus").replace("/", "").replace("(", "").replace(")", "")
    return Path(out) / "-".join(slug.split()) / bench


def _pass_at_1(results_dir: Path) -> str:
    m = json.loads((results_dir / "results.json").read_text())["metrics"]
    return f"{m['pass@1']:.3f} [{m['pass@1_ci95_lo']:.3f}, {m['pass@1_ci95_hi']:.3f}]"


def format_table(out: str | Path, benches: list[str], rows: tuple[Row, ...] = ROWS) -> str:
    """Markdown: one row per `rows`, one column per benchmark, from `out/<row>/<bench>/results.json`;
    missing evaluations read "not run". Trained rows add "Δ vs <baseline>" lines with paired intervals."""
    head = "| Model | " + " | ".join(benches) + " |\n|---|" + "---|" * len(benches)
    lines = [head]
    for row in rows:
        cells = []
        for bench in benches:
            d = cell_dir(out, row.name, bench)
            cells.append(_pass_at_1(d) if (d / "results.json").exists() else NOT_RUN)
        lines.append(f"| {row.name} | " + " | ".join(cells) + " |")
        if row.baseline is None:
            continue
        deltas = []
        for bench in benches:
            a, b = cell_dir(out, row.baseline, bench), cell_dir(out, row.name, bench)
            if not ((a / "results.json").exists() and (b / "results.json").exists()):
                deltas.append(NOT_RUN)
                continue
            c = compare_results(a, b)
            deltas.append(f"{c.diff:+.3f} [{c.ci95_lo:+.3f}, {c.ci95_hi:+.3f}]")
        lines.append(f"| Δ {row.name} vs {row.baseline} (paired) | " + " | ".join(deltas) + " |")
    return "\n".join(lines) + "\n\npass@1 [Wilson 95% interval]; Δ: B - A on the same items [paired bootstrap 95%].\n"
