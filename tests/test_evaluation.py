"""Evaluation: metrics on hand-made answer files (expected values worked out by hand in comments), result
files, and real evaluations of the embedded model through the real engine, executor, verifier and sandbox."""
from __future__ import annotations

import math

import pytest

from selfplay.evaluation.evaluate import compute_metrics, majority_index, pass_at_k, read_answers, write_answers


def rec(qid, idx, answer, correct, tools=0, **extra):
    return {"question_id": qid, "sample_index": idx, "answer": answer, "correct": correct, "tool_calls": tools,
            "text": f"... \\boxed{{{answer}}}", **extra}


# Three items, four samples each.
# q1: answers 5,5,7,None; gold 5 -> 2/4 correct; majority 5 (2 votes) -> maj correct.
# q2: answers 3,4,4,4;   gold 3 -> 1/4 correct; majority 4 -> maj wrong.
# q3: answers 9,8,9,8;   gold 8 -> 2/4 correct; tie 9 vs 8, 9 seen first -> maj wrong.
HAND = [
    rec("q1", 0, "5", True, 1), rec("q1", 1, "5", True, 2), rec("q1", 2, "7", False, 0), rec("q1", 3, None, False, 0),
    rec("q2", 0, "3", True, 3), rec("q2", 1, "4", False, 0), rec("q2", 2, "4", False, 1), rec("q2", 3, "4", False, 0),
    rec("q3", 3, "8", True, 0), rec("q3", 1, "8", True, 0), rec("q3", 0, "9", False, 4), rec("q3", 2, "9", False, 1),
]


def test_pass_at_k_matches_the_combinatorial_definition():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                expected = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(expected)
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)


def test_majority_index_ties_and_missing():
    assert majority_index(["9", "8", "9", "8"]) == 0
    assert majority_index([None, "2", " 2", "3"]) == 1
    assert majority_index([None, None]) is None
    # a custom equivalence merges "0.5" and "1/2" into one class that outvotes "3"
    same = lambda a, b: eval(a) == eval(b)  # noqa: E731
    assert majority_index(["3", "0.5", "1/2"], same) == 1


def test_metrics_on_a_hand_made_answers_file(tmp_path):
    path = write_answers(HAND, tmp_path / "answers.parquet")
    rows = read_answers(path)
    assert len(rows) == 12 and set(rows[0]) >= {"question_id", "sample_index", "answer", "correct", "tool_calls", "text"}
    m = compute_metrics(rows)
    # pass@1 = mean(2/4, 1/4, 2/4) = 5/12
    assert m["pass@1"] == pytest.approx(5 / 12)
    # pass@4 with n = k = 4: 1 whenever an item has any correct sample -> 1
    assert m["pass@4"] == pytest.approx(1.0)
    # maj@4: only q1's majority is right -> 1/3
    assert m["maj@4"] == pytest.approx(1 / 3)
    # tool calls: (1+2+0+0) + (3+0+1+0) + (0+0+4+1) = 12 over 12 samples
    assert m["tool_calls_mean"] == pytest.approx(1.0)
    # one sample (q1 #3) without an answer
    assert m["answered"] == pytest.approx(11 / 12)
    assert m["n_items"] == 3 and m["n_samples"] == 12


def test_pass_at_2_and_categories():
    rows = [rec("a", i, str(i), i == 0, category="x", level=1) for i in range(4)]  # 1 of 4 correct
    rows += [rec("b", i, "1", False, category="y", level=1) for i in range(4)]
    rows += [rec("c", i, "1", True, category="y", level=2) for i in range(4)]  # 4 of 4
    m = compute_metrics(rows)
    # pass@4: a = 1, b = 0, c = 1 -> 2/3. pass@1 per category: x = 1/4, y = mean(0, 1) = 1/2;
    # per level: level1 = mean(1/4, 0) = 1/8, level2 = 1
    assert m["pass@4"] == pytest.approx(2 / 3)
    assert m["pass@1/x"] == pytest.approx(0.25) and m["pass@1/y"] == pytest.approx(0.5)
    assert m["pass@1/level1"] == pytest.approx(0.125) and m["pass@1/level2"] == 1.0
    # pass@2 from the estimator on a (n=4, c=1): 1 - C(3,2)/C(4,2) = 1 - 3/6 = 0.5
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)


def test_single_sample_and_code_metrics():
    rows = [rec("a", 0, "def f(): ...", True, 2), rec("b", 0, None, False, 0)]
    m = compute_metrics(rows, check="code")
    assert m["pass@1"] == 0.5 and m["tool_calls_mean"] == 1.0
    assert not any(k.startswith("maj@") for k in m)  # majority vote over programs is not defined
    assert compute_metrics(rows)["maj@1"] == 0.5
    with pytest.raises(ValueError):
        compute_metrics([])


# ---------------------------------------------------------------- real components

import json  # noqa: E402

from adapters import random_lora  # noqa: E402
from selfplay.evaluation.benchmarks import BenchmarkItem, code_question  # noqa: E402
from selfplay.config import EvalConfig, load_config  # noqa: E402
from selfplay.evaluation.evaluate import evaluate, evaluate_during_training, score_rollouts  # noqa: E402

# Small budgets: these tests check the pipeline end to end, not the model's skill.
SMALL = ["executor.max_tokens_per_turn=48", "executor.max_turns=2", "sandbox.workers=2"]


@pytest.fixture(scope="module")
def pool():
    from sandbox import Limits, SandboxPool

    with SandboxPool(Limits(timeout_s=5), workers=2) as p:
        yield p


@pytest.fixture(scope="module")
def verifier():
    from roles.verifier import Verifier

    with Verifier() as v:
        yield v


def reply(text: str, index: int = 0, tool_calls: int = 0):
    """A finished executor rollout whose model wrote `text` (the real Rollout type, filled by hand)."""
    from roles.executor import Rollout, ToolCall

    r = Rollout("t", "q", index, prompt_ids=[1], text=text, model_text=text, finish="eos")
    r.tool_calls = [ToolCall("print(1)", "ok", "```output\n1\n```")] * tool_calls
    return r


def test_code_item_correct_passes_and_wrong_fails_in_the_sandbox(pool, verifier):
    prompt = 'def is_prime(n):\n    """True when n is a prime number."""\n'
    tests = ("def check(candidate):\n    assert candidate(2) and candidate(13) and candidate(97)\n"
             "    assert not candidate(1) and not candidate(15) and not candidate(91)\n")
    item = BenchmarkItem("P/0", "code", code_question(prompt), prompt=prompt, tests=tests, entry_point="is_prime")
    right = "```python\ndef is_prime(n):\n    return n > 1 and all(n % d for d in range(2, int(n ** 0.5) + 1))\n```"
    wrong = "```python\ndef is_prime(n):\n    return n % 2 == 1\n```"  # 1, 15 and 91 are odd
    body = "```python\n    return n > 1 and all(n % d for d in range(2, n))\n```"  # continues the signature
    hang = "```python\ndef is_prime(n):\n    while True:\n        pass\n```"
    groups = [[reply(right, 0, 1), reply(wrong, 1), reply(body, 2), reply(hang, 3), reply("no code", 4)]]
    records = score_rollouts([item], groups, verifier, pool.run_many)
    assert [r["correct"] for r in records] == [True, False, True, False, False]
    assert records[4]["answer"] is None and records[0]["tool_calls"] == 1


def test_broken_sandbox_scores_code_wrong_without_crashing(verifier):
    from sandbox import Limits, SandboxPool

    item = BenchmarkItem("P/1", "code", "q", prompt="def f():\n", tests="def check(c):\n    assert c() == 1\n",
                         entry_point="f")
    closed = SandboxPool(Limits(timeout_s=5), workers=1)
    closed.close()  # run_many now raises SandboxClosedError
    records = score_rollouts([item], [[reply("```python\ndef f():\n    return 1\n```")]], verifier, closed.run_many)
    assert records[0]["correct"] is False and records[0]["answer"] is not None


def test_math_items_scored_by_verifier_equivalence(verifier, pool):
    item = BenchmarkItem("m", "math", "Half of one?", answer="\\frac{1}{2}")
    groups = [[reply("So \\boxed{0.5}", 0), reply("\\boxed{1/2}", 1), reply("\\boxed{3}", 2), reply("", 3)]]
    records = score_rollouts([item], groups, verifier, pool.run_many)
    assert [r["correct"] for r in records] == [True, True, False, False]
    assert records[3]["answer"] is None


@pytest.fixture(scope="module")
def adapter_checkpoint(tmp_path_factory):
    """A training checkpoint root laid out as the learner writes it: two steps, `latest` naming the newer;
    each step holds both roles' adapters. Evaluation must take the newer step's executor adapter."""
    from selfplay.learner.checkpoint import write_latest

    root = tmp_path_factory.mktemp("ckpt")
    for step, seed in (("step-00000002", 1), ("step-00000004", 2)):
        (root / step).mkdir()
        (root / step / "state.json").write_text("{}")
        random_lora(root / step / "adapters" / "executor", seed, r=4, std=0.2)
        random_lora(root / step / "adapters" / "proposer", seed + 10, r=4, std=0.2)
    write_latest(root, "step-00000004")
    return root


def test_adapter_path_resolves_a_checkpoint_root_to_the_latest_executor_adapter(adapter_checkpoint):
    from selfplay.evaluation.evaluate import _resolve_adapter

    newest = adapter_checkpoint / "step-00000004" / "adapters" / "executor"
    older = adapter_checkpoint / "step-00000002" / "adapters" / "executor"
    assert _resolve_adapter(adapter_checkpoint) == newest  # the root: the step `latest` names
    assert _resolve_adapter(adapter_checkpoint / "step-00000002") == older  # one step: its executor
    assert _resolve_adapter(newest) == newest  # an adapter directory as is
    (adapter_checkpoint.parent / "empty").mkdir(exist_ok=True)
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        _resolve_adapter(adapter_checkpoint.parent / "empty")


def check_outputs(out_dir, tools: bool, n_items: int, benchmark: str = "generated"):
    results = json.loads((out_dir / "results.json").read_text())
    assert set(results) >= {"config", "metrics", "started_at", "finished_at", "duration_s", "versions"}
    assert results["config"]["tools"] is tools and results["config"]["benchmark"] == benchmark
    m = results["metrics"]
    for name in ("pass@1", "maj@1", "answered"):
        assert 0.0 <= m[name] <= 1.0
    assert m["n_items"] == n_items and m["tool_calls_mean"] >= 0
    rows = read_answers(out_dir / "answers.parquet")
    assert len(rows) == n_items and {r["question_id"] for r in rows} == {f"gen-0-{i:05d}" for i in range(n_items)}
    assert all(isinstance(r["text"], str) and isinstance(r["correct"], bool) for r in rows)
    # the saved answers reproduce the reported scores
    assert compute_metrics(rows) == pytest.approx(m)
    return results, rows


@pytest.mark.slow
def test_real_evaluation_with_tools_and_adapter(tmp_path, adapter_checkpoint):
    """`--adapter CHECKPOINT_ROOT` (as BENCHMARKS.md runs it) evaluates the latest executor adapter: its
    answers differ from the base model's on the same items and settings."""
    cfg = load_config(None, SMALL)
    report = evaluate("embedded", "generated", adapter=adapter_checkpoint, tools=True, limit=2,
                      out=tmp_path / "tools", run_cfg=cfg, progress=False)
    results, rows = check_outputs(tmp_path / "tools", tools=True, n_items=2)
    assert results["config"]["adapter"] == str(adapter_checkpoint / "step-00000004" / "adapters" / "executor")
    assert results["config"]["temperature"] == 0.0  # greedy for one sample
    assert report.metrics == results["metrics"]
    evaluate("embedded", "generated", tools=True, limit=2, out=tmp_path / "base", run_cfg=cfg, progress=False)
    _, base = check_outputs(tmp_path / "base", tools=True, n_items=2)
    by_id = lambda rs: {r["question_id"]: r["text"] for r in rs}  # noqa: E731
    assert by_id(rows) != by_id(base)  # greedy both times: only the adapter can make them differ


@pytest.mark.slow
def test_real_evaluation_without_tools_through_the_cli(tmp_path):
    import typer
    from typer.testing import CliRunner

    from selfplay.evaluation.evaluate import eval_command

    app = typer.Typer()
    app.command("eval")(eval_command)
    app.command("noop")(lambda: None)  # two commands: typer keeps "eval" as a subcommand name
    from selfplay.evaluation.benchmarks import generate_benchmark, save_jsonl

    bench = save_jsonl(generate_benchmark(2, seed=0), tmp_path / "two.jsonl")  # a file: read through `datasets`
    args = ["eval", "--model", "embedded", "--benchmark", str(bench), "--no-tools",
            "--out", str(tmp_path / "nt")] + [a for s in SMALL for a in ("--set", s)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    # our lines only: neither datasets' nor transformers' progress bars
    assert not [w for w in ("Generating train split", "Loading weights", "it/s]") if w in res.output], res.output
    results, rows = check_outputs(tmp_path / "nt", tools=False, n_items=2, benchmark="two")
    assert results["metrics"]["tool_calls_mean"] == 0 and all(r["tool_calls"] == 0 for r in rows)
    assert results["config"]["max_turns"] == 1


def test_cli_reports_bad_benchmark_cleanly(tmp_path):
    import typer
    from typer.testing import CliRunner

    from selfplay.evaluation.evaluate import eval_command

    app = typer.Typer()
    app.command("eval")(eval_command)
    app.command("noop")(lambda: None)
    res = CliRunner().invoke(app, ["eval", "--model", "embedded", "--benchmark", str(tmp_path / "missing.jsonl")])
    assert res.exit_code == 2 and "neither a known name" in res.output


@pytest.mark.slow
def test_evaluate_during_training_returns_named_scalars(tmp_path, pool, verifier):
    from roles.executor import Executor
    from selfplay.config import EngineConfig, ExecutorConfig, ModelConfig
    from selfplay.engines import make_engine

    engine = make_engine(ModelConfig(), EngineConfig(backend="hf"))
    try:
        executor = Executor(engine, pool, ExecutorConfig(max_tokens_per_turn=48, max_turns=2))
        cfg = EvalConfig(benchmark="generated", every=1, limit=2, tools=False)
        scalars = evaluate_during_training(engine, executor, verifier, cfg, iteration=3, out_dir=tmp_path)
    finally:
        engine.close()
    assert set(scalars) == {"eval/generated/pass@1", "eval/generated/maj@k", "eval/generated/tool_calls_mean",
                            "eval/generated/answered", "eval/generated/pass@1_ci95_lo",
                            "eval/generated/pass@1_ci95_hi"}
    assert scalars["eval/generated/pass@1_ci95_lo"] <= scalars["eval/generated/pass@1"] <= \
        scalars["eval/generated/pass@1_ci95_hi"]
    assert 0 <= scalars["eval/generated/pass@1"] <= 1 and scalars["eval/generated/tool_calls_mean"] == 0
    assert len(read_answers(tmp_path / "iter-00003" / "answers.parquet")) == 2
