"""`selfplay eval --compare A B`: did B score higher than A on the same items, beyond the noise?

Reads the two evaluations' per-sample answers files (what `selfplay eval` and the loop's periodic
evaluation write) and compares them item by item (selfplay/evaluation/stats.py): B - A in pass@1 with a
paired bootstrap 95% interval, the items each side won, and McNemar's exact p-value for one-sample runs.
"""
from __future__ import annotations

import json
from pathlib import Path

from selfplay.evaluation.stats import PairedComparison, compare_paired, per_item_scores


def answers_file(path: str | Path) -> Path:
    """An evaluation's answers.parquet from its directory, its results.json, or the parquet itself."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json" if (path / "results.json").exists() else path / "answers.parquet"
    if path.suffix == ".json":
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such results file")
        name = json.loads(path.read_text()).get("answers_file", "answers.parquet")
        path = path.parent / name
    if not path.exists():
        raise FileNotFoundError(f"{path}: no answers file (pass an evaluation directory or its results.json)")
    return path


def compare_results(a: str | Path, b: str | Path, resamples: int = 10_000, seed: int = 0) -> PairedComparison:
    from selfplay.evaluation.evaluate import read_answers

    return compare_paired(per_item_scores(read_answers(answers_file(a))),
                          per_item_scores(read_answers(answers_file(b))), resamples=resamples, seed=seed)


def format_comparison(c: PairedComparison, a_name: str = "A", b_name: str = "B") -> str:
    verdict = ("B is higher (95% interval excludes 0)" if c.ci95_lo > 0 else
               "B is lower (95% interval excludes 0)" if c.ci95_hi < 0 else
               "no difference shown (95% interval includes 0)")
    lines = [f"A: {a_name}", f"B: {b_name}",
             f"items compared: {c.n_items}" + (f" (only in A: {c.only_in_a}, only in B: {c.only_in_b})"
                                               if c.only_in_a or c.only_in_b else ""),
             f"pass@1 A = {c.a_mean:.4f}, B = {c.b_mean:.4f}",
             f"B - A = {c.diff:+.4f}, paired bootstrap 95% interval [{c.ci95_lo:+.4f}, {c.ci95_hi:+.4f}]",
             f"items B scored higher: {c.b_better}, A higher: {c.a_better}"]
    if c.mcnemar_p is not None:
        lines.append(f"McNemar exact p = {c.mcnemar_p:.4g}")
    lines.append(verdict)
    return "\n".join(lines)


def compare_command(a: Path, b: Path) -> int:
    """Print the comparison (and its JSON on the last line); exit status 0, or 2 on unreadable input."""
    import sys

    try:
        c = compare_results(a, b)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_comparison(c, str(a), str(b)))
    print(json.dumps(c.to_dict()))
    return 0
