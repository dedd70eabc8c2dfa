"""Benchmarks: the generated set's answers checked by independent computations parsed from the question
text (sympy, numpy, brute force), plus loading through declared field mappings."""
from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np
import pytest
import sympy
from sympy.parsing.sympy_parser import implicit_multiplication_application, parse_expr, standard_transformations

from selfplay.evaluation.benchmarks import (
    CATEGORIES,
    LEVELS,
    BenchmarkError,
    BenchmarkItem,
    code_check_program,
    extract_code,
    generate_benchmark,
    load_benchmark,
    parse_fields,
    save_jsonl,
)

TRANSFORMS = standard_transformations + (implicit_multiplication_application,)


def independent_answer(category: str, question: str) -> int:
    """Recompute the answer from the question's words alone, by a different method than the generator."""
    if category == "arithmetic":
        expr = re.fullmatch(r"Compute the value of (.+)\.", question).group(1)
        return int(sympy.sympify(expr))
    if category == "modular":
        expr, m = re.fullmatch(r"What is the remainder when (.+) is divided by (\d+)\?", question).groups()
        return int(sympy.sympify(expr.replace("^", "**"))) % int(m)  # the full integer, then reduce
    if category == "counting":
        lo, hi, p, how, q = re.fullmatch(
            r"How many integers from (\d+) to (\d+) inclusive are divisible by (\d+)(?: (or|but not) by (\d+))?\?",
            question).groups()
        lo, hi, p = int(lo), int(hi), int(p)
        if how is None:
            pred = lambda n: n % p == 0  # noqa: E731
        elif how == "or":
            pred = lambda n: n % p == 0 or n % int(q) == 0  # noqa: E731
        else:
            pred = lambda n: n % p == 0 and n % int(q) != 0  # noqa: E731
        return sum(1 for n in range(lo, hi + 1) if pred(n))
    if category == "algebra":
        x, y = sympy.symbols("x y")
        m = re.fullmatch(r"Solve for x: (.+) = (.+)\.", question)
        if m:
            eq = sympy.Eq(parse_expr(m.group(1), transformations=TRANSFORMS),
                          parse_expr(m.group(2), transformations=TRANSFORMS))
            (sol,) = sympy.solve(eq, x)
            return int(sol)
        e1, e2 = re.fullmatch(r"Solve the system (.+) and (.+)\. What is x \+ y\?", question).groups()
        eqs = [sympy.Eq(*(parse_expr(side, transformations=TRANSFORMS) for side in e.split(" = "))) for e in (e1, e2)]
        sol = sympy.solve(eqs, [x, y], dict=True)
        assert len(sol) == 1
        return int(sol[0][x] + sol[0][y])
    if category == "range_sum":
        what, n_max, cond = re.fullmatch(
            r"What is the sum of (the integers|the squares of the integers) n with 1 <= n <= (\d+)(?: (.+))?\?",
            question).groups()
        n = np.arange(1, int(n_max) + 1, dtype=np.int64)
        if cond is None:
            mask = n > 0
        elif m := re.fullmatch(r"divisible by (\d+) but not by (\d+)", cond):
            mask = (n % int(m.group(1)) == 0) & (n % int(m.group(2)) != 0)
        elif m := re.fullmatch(r"whose digit sum is divisible by (\d+)", cond):
            digits = sum((n // 10**k) % 10 for k in range(7))
            mask = digits % int(m.group(1)) == 0
        else:
            r, b = re.fullmatch(r"that leave remainder (\d+) when divided by (\d+)", cond).groups()
            mask = n % int(b) == int(r)
        power = 2 if "squares" in what else 1
        return int((n[mask] ** power).sum())
    if category == "prime_count":
        lo, hi = re.fullmatch(r"How many prime numbers are there between (\d+) and (\d+) inclusive\?", question).groups()
        return int(sympy.primepi(int(hi)) - sympy.primepi(int(lo) - 1))
    raise AssertionError(f"no independent check for {category}")


@pytest.fixture(scope="module")
def generated():
    return generate_benchmark(120, seed=7)


def test_generated_answers_match_independent_computation(generated):
    for row in generated:
        assert row["answer"] == str(independent_answer(row["category"], row["question"])), row


def test_generated_covers_every_category_and_level_and_is_unique(generated):
    pairs = Counter((r["category"], r["level"]) for r in generated)
    assert set(pairs) == {(c, lv) for c in CATEGORIES for lv in LEVELS}
    assert len({r["question"] for r in generated}) == len(generated)
    assert len({r["id"] for r in generated}) == len(generated)


def test_generated_is_seeded_and_prefix_stable(generated):
    assert generate_benchmark(120, seed=7) == generated
    assert generate_benchmark(20, seed=7) == generated[:20]
    other = generate_benchmark(20, seed=8)
    assert [r["question"] for r in other] != [r["question"] for r in generated[:20]]


def test_generated_kinds_and_levels_filter():
    rows = generate_benchmark(12, seed=1, kinds=["prime_count", "algebra"], levels=[3])
    assert {r["category"] for r in rows} == {"prime_count", "algebra"}
    assert {r["level"] for r in rows} == {3}
    for row in rows:
        assert row["answer"] == str(independent_answer(row["category"], row["question"]))
    with pytest.raises(BenchmarkError, match="unknown kinds"):
        generate_benchmark(3, kinds=["calculus"])


def test_generated_jsonl_round_trip(tmp_path, generated):
    path = save_jsonl(generated[:10], tmp_path / "gen.jsonl")
    bench = load_benchmark(str(path))
    assert bench.check == "math" and len(bench.items) == 10
    assert [it.id for it in bench.items] == [r["id"] for r in generated[:10]]
    assert [it.answer for it in bench.items] == [r["answer"] for r in generated[:10]]
    assert bench.items[0].meta == {"category": generated[0]["category"], "level": generated[0]["level"]}
    assert len(load_benchmark(str(path), limit=3).items) == 3


def test_generated_name_loads_a_prefix_of_seed_zero():
    bench = load_benchmark("generated", limit=8)
    assert [it.question for it in bench.items] == [r["question"] for r in generate_benchmark(8, seed=0)]


def test_declared_fields_on_parquet_with_boxed_solutions(tmp_path):
    import datasets

    rows = [{"problem": "What is 2+3?", "solution": "We add: $2+3=\\boxed{5}$.", "uid": "a"},
            {"problem": "Half of 1?", "solution": "It is \\boxed{\\frac{1}{2}}", "uid": "b"}]
    path = tmp_path / "set.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    bench = load_benchmark(str(path), fields="question=problem,answer=solution,id=uid")
    assert [(it.id, it.question, it.answer) for it in bench.items] == [
        ("a", "What is 2+3?", "5"), ("b", "Half of 1?", "\\frac{1}{2}")]
    with pytest.raises(BenchmarkError, match="cannot tell which columns"):
        load_benchmark(str(path))  # no question/answer columns and nothing declared
    with pytest.raises(BenchmarkError, match="no column statement"):
        load_benchmark(str(path), fields="question=statement,answer=solution")


def test_known_mapping_applies_to_a_local_copy(tmp_path):
    path = tmp_path / "gsm8k.jsonl"
    path.write_text(json.dumps({"question": "Tom has 3 apples and buys 4. How many?",
                                "answer": "3 + 4 = <<3+4=7>>7\n#### 7"}) + "\n")
    (item,) = load_benchmark(str(path), fields="gsm8k").items
    assert item.answer == "7"


def test_parse_fields_errors():
    assert parse_fields("question=problem, answer=solution") == {"question": "problem", "answer": "solution"}
    with pytest.raises(BenchmarkError, match="name=column"):
        parse_fields("question")
    with pytest.raises(BenchmarkError, match="unknown name 'body'"):
        parse_fields("body=text")


def test_unknown_name_and_bad_file(tmp_path):
    with pytest.raises(BenchmarkError, match="neither a known name"):
        load_benchmark("no-such-bench")
    bad = tmp_path / "broken.jsonl"
    bad.write_text("{not json\n")
    with pytest.raises(BenchmarkError, match="broken.jsonl"):
        load_benchmark(str(bad))


def test_hub_benchmark_offline_gives_clear_error(monkeypatch):
    import datasets
    import huggingface_hub.constants

    # No network here; offline mode makes the real hub call fail at once instead of after retries.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(BenchmarkError, match=r"(?s)openai/gsm8k.*--fields gsm8k"):
        load_benchmark("gsm8k")


def test_code_benchmark_file_and_program_assembly(tmp_path):
    row = {"task_id": "T/0", "prompt": "def add(a, b):\n    \"\"\"Sum of a and b.\"\"\"\n",
           "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n", "entry_point": "add"}
    path = tmp_path / "he.jsonl"
    path.write_text(json.dumps(row) + "\n")
    (item,) = load_benchmark(str(path)).items
    assert item.check == "code" and item.id == "T/0" and item.entry_point == "add"
    assert "def add(a, b)" in item.question
    full = code_check_program(item, "def add(a, b):\n    return a + b\n")
    body = code_check_program(item, "    return a + b\n")
    for program in (full, body):
        scope: dict = {}
        exec(compile(program, "<check>", "exec"), scope)  # raises if the assembly is not valid, passing code
    wrong = code_check_program(item, "def add(a, b):\n    return a - b\n")
    with pytest.raises(AssertionError):
        exec(compile(wrong, "<check>", "exec"), {})
    with pytest.raises(BenchmarkError, match="not a code item"):
        code_check_program(BenchmarkItem("m", "math", "q", answer="1"), "x")


def test_extract_code_takes_last_python_block():
    text = ("```python\nprint(1)\n```\n```output\n1\n```\nSo:\n```python\ndef f():\n    return 2\n```\n")
    assert extract_code(text) == "def f():\n    return 2\n"
    assert extract_code("no code here") is None


def test_a_saved_datasets_dataset_and_a_hub_id_are_sources(tmp_path, monkeypatch):
    """A `datasets` dataset (save_to_disk: a Dataset, or a DatasetDict and its split) loads through the same
    field mapping as a file, for `selfplay eval` and `reference.source` alike; any hub id (owner/name) goes to
    `datasets.load_dataset` and, offline, fails naming the id and the command that makes a local copy."""
    import datasets
    import huggingface_hub.constants

    from selfplay.config import load_config
    from selfplay.evaluation.reference import reference_items

    rows = [{"problem": f"What is {i} + {i}?", "solution": f"\\boxed{{{2 * i}}}", "uid": f"q{i}"} for i in range(6)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "plain"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:4]),
                          "test": datasets.Dataset.from_list(rows[4:])}).save_to_disk(str(tmp_path / "dict"))
    fields = "id=uid,question=problem,answer=solution"
    bench = load_benchmark(str(tmp_path / "plain"), fields=fields)
    assert [(it.id, it.answer) for it in bench.items] == [(f"q{i}", str(2 * i)) for i in range(6)]
    assert [it.id for it in load_benchmark(str(tmp_path / "dict"), fields=fields, split="test").items] == ["q4", "q5"]
    with pytest.raises(BenchmarkError, match="no split 'validation'"):
        load_benchmark(str(tmp_path / "dict"), fields=fields, split="validation")
    (tmp_path / "junk").mkdir()
    with pytest.raises(BenchmarkError, match="save_to_disk"):
        load_benchmark(str(tmp_path / "junk"), fields=fields)
    cfg = load_config(None, ["loop.mode=reference", f"reference.source={tmp_path / 'dict'}",
                             f"reference.fields={fields}"])
    assert [it.question for it in reference_items(cfg.reference)] == [r["problem"] for r in rows[:4]]

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(BenchmarkError, match="declare its columns"):
        load_benchmark("someone/arith-set")
    with pytest.raises(BenchmarkError, match=r"(?s)someone/arith-set.*--fields question=q,answer=a"):
        load_benchmark("someone/arith-set", fields="question=q,answer=a")
