"""Known-answer tasks: the reference-reward (RLVR) control mode and the verifier's probes (pseudo-label
accuracy). Pure parts on hand-made inputs; one shortened reference-reward run on the real CLI, Ray,
embedded model, sandbox and learner."""
from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import get_args

import pytest

from selfplay.config import ConfigError, GeneratedKind, load_config
from selfplay.evaluation.benchmarks import CATEGORIES, BenchmarkItem, generate_benchmark, save_jsonl
from selfplay.evaluation.reference import (ProbeOutcome, is_probe, known_tasks, label_correct, probe_metrics,
                                           split_known)

REPO = Path(__file__).resolve().parents[1]


def item(q, a="1"):
    return BenchmarkItem(id=q, check="math", question=q, answer=a)


def test_config_kinds_are_the_generator_categories_and_bad_values_name_the_field():
    assert set(get_args(GeneratedKind)) == set(CATEGORIES)
    with pytest.raises(ConfigError, match="reference.kinds"):
        load_config(None, ["reference.kinds=[geometry]"])
    with pytest.raises(ConfigError, match="loop.mode"):
        load_config(None, ["loop.mode=rlhf"])
    with pytest.raises(ConfigError, match="reference.seed"):
        load_config(None, ["reference.seed=0"])  # seed 0 generates the evaluation items
    assert load_config(REPO / "configs" / "rlvr_debug.yaml").loop.mode == "reference"


def test_split_removes_evaluation_questions_and_repeats_and_keeps_probes_apart():
    items = [item(f"What is {i} + 1?") for i in range(400)] + [item("What is 3 + 1?")]
    known = split_known(items, exclude=["what is 5 +   1?", "What is 7 + 1?"], probe_share=0.2)
    questions = [it.question for it in known.train + known.probes]
    assert known.excluded == 2 and known.duplicates == 1
    assert "What is 5 + 1?" not in questions and len(questions) == len(set(questions)) == 398
    assert not {it.question for it in known.train} & {it.question for it in known.probes}
    assert 0.12 < len(known.probes) / 398 < 0.28  # about the share asked for
    # stable: the same question is a probe whatever else is in the set
    assert all(is_probe(it.question, 0.2) for it in known.probes)
    small = split_known(items[:50], [], 0.2)
    assert {it.question for it in small.probes} == {it.question for it in known.probes if it in items[:50]}


def test_known_tasks_are_disjoint_from_the_evaluation_benchmark(tmp_path):
    # the run evaluates on a file of level-1 items of seed 0; training draws seed 1 of the same kinds
    eval_rows = generate_benchmark(120, seed=0, kinds=["arithmetic", "algebra"], levels=[1])
    path = save_jsonl(eval_rows, tmp_path / "held_out.jsonl")
    cfg = load_config(None, ["loop.mode=reference", f"eval.benchmark={path}", "reference.kinds=[arithmetic,algebra]",
                             "reference.levels=[1]", "reference.size=2000"])
    known = known_tasks(cfg)
    held_out = {r["question"] for r in eval_rows} | {r["question"] for r in generate_benchmark(200, seed=0)}
    assert known.excluded > 0 and known.train and known.probes
    assert not held_out & {it.question for it in known.train + known.probes}
    assert all(it.meta["level"] == 1 for it in known.train)
    # an evaluation set that cannot be loaded (offline hub set, missing file) stops a reference run before
    # it trains on evaluation items; a self-play run's probes never train, so it does not need it
    missing = [f"eval.benchmark={tmp_path / 'gone.jsonl'}", "reference.levels=[1, 2]"]
    with pytest.raises(ValueError, match="gone.jsonl"):
        known_tasks(load_config(None, ["loop.mode=reference", *missing]))
    assert known_tasks(load_config(None, missing)).probes
    # a source with no usable task is an error naming the section
    cfg = load_config(None, ["loop.mode=reference", f"reference.source={path}", f"eval.benchmark={path}"])
    with pytest.raises(ValueError, match="reference.source"):
        known_tasks(cfg)


def test_label_correct_and_probe_metrics():
    # majority class = samples 0, 2; sample 2 matched the truth -> label right
    assert label_correct([True, False, True], [False, True, True])
    assert not label_correct([True, False, True], [False, True, False])  # only a minority sample was right
    assert not label_correct([False, False], [None, None])  # nobody answered
    outcomes = [ProbeOutcome(1.0, True, 4, 4), ProbeOutcome(0.5, True, 2, 4), ProbeOutcome(0.5, False, 0, 4),
                ProbeOutcome(0.25, False, 1, 4), ProbeOutcome(0.8, True, 3, 4)]
    m = probe_metrics(outcomes, band_low=0.3, band_high=0.8)
    assert m["verifier/probes"] == 5 and m["verifier/label_accuracy"] == pytest.approx(3 / 5)
    assert m["verifier/probe_executor_accuracy"] == pytest.approx(10 / 20)
    assert m["verifier/label_accuracy_ci95_lo"] < 0.6 < m["verifier/label_accuracy_ci95_hi"]
    # buckets: below the band [0, 0.3): the 0.25 probe; band [0.3, 0.8]: 0.5, 0.5, 0.8; above (0.8, 1]: 1.0
    assert m["verifier/label_accuracy/p_hat_0-0.3"] == 0.0
    assert m["verifier/label_accuracy/p_hat_0.3-0.8"] == pytest.approx(2 / 3)
    assert m["verifier/label_accuracy/p_hat_0.8-1"] == 1.0
    assert probe_metrics([], 0.3, 0.8) == {"verifier/probes": 0.0}


@pytest.mark.slow
def test_reference_reward_run_trains_the_executor_and_measures_probes(tmp_path):
    """A shortened reference-reward run: the proposer is off, the executor trains against true answers,
    probes give label accuracy; every number lands in the metrics store. The wall-clock budget
    (loop.time_budget_s) ends it after its first iteration, committed, of the three configured."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "selfplay", "run", str(REPO / "configs" / "rlvr_debug.yaml"), f"run_dir={run_dir}",
           "engine.backend=hf", "loop.iterations=3", "loop.time_budget_s=0.001", "executor.tasks_per_iteration=2", "executor.group_size=2",
           "executor.samples_per_task=2", "executor.max_tokens_per_turn=64", "executor.max_turns=2",
           "verifier.probes=2", "eval.every=1", "eval.limit=2", "reference.levels=[1]"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    con = sqlite3.connect(f"file:{run_dir / 'metrics.sqlite'}?mode=ro", uri=True)
    rows = con.execute("SELECT iteration, key, value FROM scalars").fetchall()
    con.close()
    by_it: dict[int, dict[str, float]] = {}
    for it, k, v in rows:
        by_it.setdefault(it, {})[k] = v
    assert sorted(by_it) == [1]  # the budget stopped it
    from selfplay.run.rundir import RunDir

    rd = RunDir(run_dir)
    assert rd.state()["status"] == "finished" and rd.state()["iteration"] == 1
    assert (run_dir / "checkpoints").is_dir() and rd.state()["checkpoint"]
    assert any(e["event"] == "time_budget_reached" for e in rd.read_events())
    known = next(e for e in rd.read_events() if e["event"] == "known_tasks")
    assert known["train"] > 0 and known["probes"] > 0 and known["excluded_eval_items"] > 0
    for it, s in by_it.items():
        assert s["verifier/probes"] == 2 and 0 <= s["verifier/label_accuracy"] <= 1
        assert s["verifier/label_accuracy_ci95_lo"] <= s["verifier/label_accuracy"] <= s["verifier/label_accuracy_ci95_hi"]
        assert 0 <= s["verifier/probe_executor_accuracy"] <= 1 and s["time/stage/probes"] > 0
        assert s["executor/reward_mean"] in (pytest.approx(v) for v in (-1, -0.5, 0, 0.5, 1))  # 4 rollouts, +-1
        assert 0 <= s["executor/accuracy"] <= 1 and s["executor/tasks"] == 2
        assert "learner/executor/loss" in s or any(k.startswith("learner/executor/") for k in s)
        assert not any(k.startswith(("proposer/", "learner/proposer/")) for k in s)  # the proposer is off
    assert "eval/generated/pass@1_ci95_hi" in by_it[1]
    # nothing entered the task pool; the replay buffer holds executor groups on reference tasks only
    assert not (run_dir / "pool.jsonl").exists() or not (run_dir / "pool.jsonl").read_text().strip()
    from selfplay.data.replay import ReplayBuffer

    cfg = load_config(run_dir / "config.yaml")
    with ReplayBuffer(run_dir / "replay", cfg.replay) as buf:
        trajs = list(buf.trajectories())
    assert trajs and all(t.role == "executor" and t.task_id.startswith("ref:") for t in trajs)
    assert all(t.reward in (1.0, -1.0) for t in trajs)
