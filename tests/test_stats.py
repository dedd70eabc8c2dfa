"""Intervals and paired comparisons (selfplay/evaluation/stats.py, compare.py): values worked out by hand
or from published tables, and `selfplay eval --compare` on hand-made answers files."""
from __future__ import annotations

import json

import pytest

from selfplay.evaluation.evaluate import compute_metrics, write_answers
from selfplay.evaluation.stats import (compare_paired, mcnemar_exact_p, paired_bootstrap_interval, per_item_scores,
                                       wilson_interval)


def test_wilson_interval_matches_published_values():
    # Brown, Cai & DasGupta (2001) / any textbook: x = 0, n = 10 -> [0, 0.2775]; x = 5, n = 10 -> [0.2366, 0.7634]
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson_interval(5, 10)
    assert (lo, hi) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    # 81 of 263 (Wilson's own worked example in many references): [0.2553, 0.3662]
    assert wilson_interval(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)
    # the interval never leaves [0, 1] and is symmetric under x -> n - x
    lo, hi = wilson_interval(10, 10)
    assert hi == 1.0 and lo == pytest.approx(1 - wilson_interval(0, 10)[1])
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def test_mcnemar_exact():
    # 6 discordant items all for B: 2 * (1/2)^6 = 0.03125
    assert mcnemar_exact_p(0, 6) == pytest.approx(0.03125)
    # 1 vs 5: 2 * (1 + 6) / 64 = 0.21875
    assert mcnemar_exact_p(5, 1) == pytest.approx(0.21875)
    assert mcnemar_exact_p(3, 3) == 1.0 and mcnemar_exact_p(0, 0) == 1.0


def test_paired_bootstrap_interval():
    assert paired_bootstrap_interval([0.0] * 50) == (0.0, 0.0)
    # 30 of 200 items gained, none lost: the mean gain 0.15 and an interval well above zero
    lo, hi = paired_bootstrap_interval([1.0] * 30 + [0.0] * 170, resamples=2000)
    assert 0.09 < lo < 0.15 < hi < 0.21
    # 10 gained, 10 lost: centred on zero, includes it
    lo, hi = paired_bootstrap_interval([1.0] * 10 + [-1.0] * 10 + [0.0] * 180, resamples=2000)
    assert lo < 0 < hi
    with pytest.raises(ValueError):
        paired_bootstrap_interval([])


def test_compare_paired_uses_only_common_items_and_pairs_them():
    a = {f"q{i}": 0.0 for i in range(40)} | {"only_a": 1.0}
    b = {f"q{i}": (1.0 if i < 8 else 0.0) for i in range(40)} | {"only_b": 1.0}
    c = compare_paired(a, b, resamples=2000)
    assert c.n_items == 40 and c.only_in_a == 1 and c.only_in_b == 1
    assert c.diff == pytest.approx(0.2) and c.b_better == 8 and c.a_better == 0
    assert c.excludes_zero and c.mcnemar_p == pytest.approx(2 / 2**8)
    # pairing: the same rates with the gains spread as swaps (8 won, 8 lost) show no difference
    b2 = {f"q{i}": (1.0 if i < 8 else 0.0) for i in range(40)}
    a2 = {f"q{i}": (1.0 if 8 <= i < 16 else 0.0) for i in range(40)}
    c2 = compare_paired(a2, b2, resamples=2000)
    assert c2.diff == 0 and not c2.excludes_zero and c2.mcnemar_p == 1.0
    # fractional scores (k > 1 samples): no McNemar
    assert compare_paired({"x": 0.5}, {"x": 1.0}).mcnemar_p is None
    with pytest.raises(ValueError, match="share no item"):
        compare_paired({"x": 1.0}, {"y": 1.0})


def test_per_item_scores_and_metrics_intervals():
    rows = [{"question_id": "a", "sample_index": i, "answer": "1", "correct": i < 3, "tool_calls": 0, "text": ""}
            for i in range(4)] + [{"question_id": "b", "sample_index": 0, "answer": None, "correct": False,
                                   "tool_calls": 0, "text": ""}]
    assert per_item_scores(rows) == {"a": 0.75, "b": 0.0}
    one = [{"question_id": str(i), "sample_index": 0, "answer": "1", "correct": i < 5, "tool_calls": 0, "text": ""}
           for i in range(10)]
    m = compute_metrics(one)
    assert m["pass@1"] == 0.5
    assert (m["pass@1_ci95_lo"], m["pass@1_ci95_hi"]) == pytest.approx((0.2366, 0.7634), abs=1e-4)


def _eval_dir(root, name, correct_ids, n=60):
    d = root / name
    rows = [{"question_id": f"gen-{i}", "sample_index": 0, "answer": "1", "correct": i in correct_ids,
             "tool_calls": 0, "text": ""} for i in range(n)]
    write_answers(rows, d / "answers.parquet")
    (d / "results.json").write_text(json.dumps({"metrics": compute_metrics(rows), "answers_file": "answers.parquet"}))
    return d


def _app():
    import typer

    from selfplay.evaluation.evaluate import eval_command

    app = typer.Typer()
    app.command("eval")(eval_command)
    app.command("noop")(lambda: None)
    return app


def test_eval_compare_cli_prints_the_paired_difference(tmp_path):
    from typer.testing import CliRunner

    a = _eval_dir(tmp_path, "base", set(range(5)))
    b = _eval_dir(tmp_path, "trained", set(range(20)))  # 15 more items right, none lost
    res = CliRunner().invoke(_app(), ["eval", "--compare", str(a), str(b / "results.json")])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout.strip().splitlines()[-1])
    assert doc["n_items"] == 60 and doc["diff"] == pytest.approx(0.25) and doc["excludes_zero"]
    assert doc["b_better"] == 15 and doc["a_better"] == 0
    assert "B is higher" in res.stdout
    # reversed: B lower
    res = CliRunner().invoke(_app(), ["eval", "--compare", str(b), str(a)])
    assert json.loads(res.stdout.strip().splitlines()[-1])["diff"] == pytest.approx(-0.25)
    # a missing evaluation: one line, exit 2
    res = CliRunner().invoke(_app(), ["eval", "--compare", str(a), str(tmp_path / "nope")])
    assert res.exit_code == 2 and "no answers file" in res.output
    # without --compare, --model is required
    res = CliRunner().invoke(_app(), ["eval", "--benchmark", "generated"])
    assert res.exit_code == 2 and "--model is required" in res.output


def test_agent0_table_cells_intervals_paired_deltas_and_not_run(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from selfplay.evaluation.table import cell_dir, format_table

    out = tmp_path / "table"
    for row, right in (("Base", set(range(3))), ("Base w/ tool", set(range(5))), ("+ self-play", set(range(20)))):
        d = cell_dir(out, row, "gsm8k")
        _eval_dir(d.parent, d.name, right)
    text = format_table(out, ["gsm8k", "math500"])
    lines = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("|")}
    assert "0.083 [0.036, 0.181]" in lines["Base w/ tool"]  # 5/60 with its Wilson interval
    assert lines["Base w/ tool"].endswith("| not run |")  # math500 never evaluated
    assert "+0.250 [" in lines["Δ + self-play vs Base w/ tool (paired)"]
    assert lines["reference reward (RLVR)"].count("not run") == 2
    # the bench script prints the same table without running a model
    repo = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, str(repo / "bench" / "agent0_table.py"), "--out", str(out), "--benchmark",
                          "gsm8k", "--benchmark", "math500", "--table-only"], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == text.strip(), res.stderr
