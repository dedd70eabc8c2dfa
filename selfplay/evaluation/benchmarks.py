"""Benchmarks: load any question/answer (or HumanEval-style code) set through a declared field mapping,
plus a seeded benchmark the project generates itself with exact answers.

Field mappings are explicit because every hub set names its columns differently (gsm8k `question`/`answer`
with a "#### 42" tail, MATH-500 `problem`/`answer`, HumanEval `prompt`/`test`/`entry_point`); a wrong guess
would silently score against the wrong column; users of self-play repos report evaluation bugs (R-Zero #31).
"""
from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal

Check = Literal["math", "code"]
CANONICAL_FIELDS = ("id", "question", "answer", "prompt", "tests", "entry_point")
REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {"math": ("question", "answer"), "code": ("prompt", "tests", "entry_point")}
LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
GENERATED = "generated"
GENERATED_SIZE = 200  # `--benchmark generated` = the first 200 items of seed 0; `--limit` takes a prefix


class BenchmarkError(ValueError):
    """A benchmark that cannot be loaded; the message says what to do instead."""


@dataclass(frozen=True)
class BenchmarkSpec:
    """A known benchmark: where it lives and which of its columns mean what."""

    name: str
    check: Check
    fields: dict[str, str]  # canonical name -> the set's column
    hub_id: str | None = None
    hub_config: str | None = None
    split: str = "test"
    answer_regex: str | None = None  # group 1 is the final answer inside the answer column


KNOWN: dict[str, BenchmarkSpec] = {
    s.name: s
    for s in (
        # gsm8k answers end with "#### <number>" (openai/grade-school-math README).
        BenchmarkSpec("gsm8k", "math", {"question": "question", "answer": "answer"}, "openai/gsm8k", "main",
                      answer_regex=r"####\s*(.+?)\s*$"),
        BenchmarkSpec("math500", "math", {"id": "unique_id", "question": "problem", "answer": "answer"},
                      "HuggingFaceH4/MATH-500"),
        BenchmarkSpec("aime24", "math", {"id": "id", "question": "problem", "answer": "answer"},
                      "HuggingFaceH4/aime_2024", split="train"),
        BenchmarkSpec("humaneval", "code",
                      {"id": "task_id", "prompt": "prompt", "tests": "test", "entry_point": "entry_point"},
                      "openai/openai_humaneval"),
    )
}


@dataclass
class BenchmarkItem:
    id: str
    check: Check
    question: str  # what the executor is asked
    answer: str | None = None  # math: gold answer
    prompt: str | None = None  # code: function signature + docstring to complete
    tests: str | None = None  # code: defines check(candidate)
    entry_point: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. category / level of generated items


@dataclass
class Benchmark:
    name: str
    check: Check
    items: list[BenchmarkItem]
    source: str  # hub id, file path, or "generated(seed=0)"


def parse_fields(spec: str | dict[str, str] | None) -> dict[str, str] | None:
    """`question=problem,answer=solution` -> {"question": "problem", "answer": "solution"}."""
    if spec is None or isinstance(spec, dict):
        return spec
    if spec in KNOWN:
        return dict(KNOWN[spec].fields)
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, sep, col = (s.strip() for s in part.partition("="))
        if not sep or not key or not col:
            raise BenchmarkError(f"--fields entry {part!r} must look like name=column (e.g. question=problem)")
        if key not in CANONICAL_FIELDS:
            raise BenchmarkError(f"--fields: unknown name {key!r}; known: {', '.join(CANONICAL_FIELDS)}")
        out[key] = col
    if not out:
        raise BenchmarkError(f"--fields {spec!r} declares no field")
    return out


def _check_of(fields: dict[str, str]) -> Check:
    return "code" if "tests" in fields else "math"


def _guess_fields(columns: list[str], source: str) -> dict[str, str]:
    cols = set(columns)
    if {"prompt", "entry_point"} <= cols and ({"test"} & cols or {"tests"} & cols):
        found = {"prompt": "prompt", "entry_point": "entry_point", "tests": "tests" if "tests" in cols else "test"}
    elif {"question", "answer"} <= cols:
        found = {"question": "question", "answer": "answer"}
    else:
        raise BenchmarkError(
            f"{source}: cannot tell which columns hold the question and answer (columns: {', '.join(columns)}); "
            "declare them, e.g. --fields question=problem,answer=solution (code: prompt=...,tests=...,entry_point=...)"
        )
    for idc in ("id", "task_id", "unique_id"):
        if idc in cols:
            found["id"] = idc
            break
    return found


def extract_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (balanced braces), for gold answers written as MATH-style solutions."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j].strip()
    return None


def _gold(raw: Any, regex: str | None, where: str) -> str:
    text = str(raw).strip()
    if regex:
        m = re.search(regex, text, flags=re.S)
        if not m:
            raise BenchmarkError(f"{where}: answer {text[-80:]!r} does not match the declared pattern {regex!r}")
        return m.group(1).strip()
    return extract_boxed(text) or text


def code_question(prompt: str) -> str:
    """What the executor is asked for a HumanEval-style item: the full function in a final python block."""
    return (
        "Complete the following Python function. Reply with the complete function (signature included) in a "
        "final ```python code block; do not call it or add tests.\n\n```python\n" + prompt.rstrip() + "\n```"
    )


def items_from_rows(rows: Iterable[dict[str, Any]], fields: dict[str, str], source: str,
                    answer_regex: str | None = None) -> list[BenchmarkItem]:
    check = _check_of(fields)
    missing = [k for k in REQUIRED_FIELDS[check] if k not in fields]
    if missing:
        raise BenchmarkError(f"{source}: a {check} benchmark needs fields {', '.join(missing)} declared")
    items: list[BenchmarkItem] = []
    mapped = set(fields.values())
    for i, row in enumerate(rows):
        absent = [c for c in fields.values() if c not in row]
        if absent:
            raise BenchmarkError(f"{source}: row {i} has no column {', '.join(absent)} (columns: {', '.join(row)})")
        get = {k: row[c] for k, c in fields.items()}
        item_id = str(get.get("id", i))
        meta = {k: v for k, v in row.items() if k not in mapped and isinstance(v, (str, int, float, bool))}
        if check == "math":
            items.append(BenchmarkItem(item_id, "math", str(get["question"]),
                                       answer=_gold(get["answer"], answer_regex, f"{source} row {i}"), meta=meta))
        else:
            prompt = str(get["prompt"])
            items.append(BenchmarkItem(item_id, "code", code_question(prompt), prompt=prompt, tests=str(get["tests"]),
                                       entry_point=str(get["entry_point"]).strip(), meta=meta))
    if len({it.id for it in items}) != len(items):
        raise BenchmarkError(f"{source}: question ids are not unique (declare an id field, or drop it)")
    return items


def _load_rows(path: Path, split: str | None) -> tuple[list[dict[str, Any]], list[str]]:
    import datasets

    kind = LOCAL_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise BenchmarkError(f"{path}: unsupported file type; use one of {', '.join(LOCAL_SUFFIXES)}")
    try:
        ds = datasets.load_dataset(kind, data_files=str(path), split=split or "train")
    except Exception as e:  # malformed JSON lines, bad parquet: say which file
        raise BenchmarkError(f"{path}: cannot read as {kind}: {e}") from None
    return ds.to_list(), list(ds.column_names)


def _load_hub(hub_id: str, config: str | None, split: str, name: str, fields: str) -> list[dict[str, Any]]:
    import datasets

    try:
        ds = datasets.load_dataset(hub_id, config, split=split)
    except Exception as e:
        cfg = f", {config!r}" if config else ""
        raise BenchmarkError(
            f"cannot load benchmark {name!r} from the hub ({hub_id}): {type(e).__name__}: {str(e)[:200]}\n"
            f"Offline? On a machine with network run\n"
            f"  python -c \"import datasets; datasets.load_dataset({hub_id!r}{cfg}, "
            f"split={split!r}).to_json('{name.replace('/', '_')}.jsonl')\"\n"
            f"then pass --benchmark {name.replace('/', '_')}.jsonl --fields {fields}"
        ) from None
    return ds.to_list()


def _load_saved(path: Path, split: str | None) -> tuple[list[dict[str, Any]], list[str]]:
    """A `datasets` dataset written by `save_to_disk` (a Dataset, or a DatasetDict and a split)."""
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise BenchmarkError(f"{path}: a directory, but not a dataset saved by datasets' save_to_disk: {e}") from None
    if isinstance(ds, datasets.DatasetDict):
        if (split or "train") not in ds:
            raise BenchmarkError(f"{path}: no split {split or 'train'!r} (splits: {', '.join(ds)})")
        ds = ds[split or "train"]
    return ds.to_list(), list(ds.column_names)


# a hub dataset id as `datasets` takes it: owner/name, or a bare name with no file suffix
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def load_benchmark(name_or_path: str, fields: str | dict[str, str] | None = None, split: str | None = None,
                   limit: int | None = None) -> Benchmark:
    """A known name (gsm8k, math500, aime24, humaneval, generated), or a local JSONL/JSON/Parquet/CSV file.

    `fields` maps canonical names to columns (`question=problem,answer=solution`) or names a known benchmark
    whose mapping (and answer pattern) applies to a local copy of it. Gold answers holding a \\boxed{} are
    reduced to its content.
    """
    if limit is not None and limit < 1:
        raise BenchmarkError(f"limit must be >= 1, got {limit}")
    regex = KNOWN[fields].answer_regex if isinstance(fields, str) and fields in KNOWN else None
    declared = parse_fields(fields)
    path = Path(name_or_path)
    if name_or_path == GENERATED:
        rows = generate_benchmark(limit or GENERATED_SIZE, seed=0)
        items = items_from_rows(rows, declared or {"id": "id", "question": "question", "answer": "answer"},
                                GENERATED)
        return Benchmark(GENERATED, "math", items, "generated(seed=0)")
    if name_or_path in KNOWN and not path.exists():
        spec = KNOWN[name_or_path]
        rows = _load_hub(spec.hub_id, spec.hub_config, split or spec.split, spec.name, spec.name)
        items = items_from_rows(rows, declared or spec.fields, spec.hub_id or spec.name, regex or spec.answer_regex)
        return Benchmark(spec.name, spec.check, items[:limit] if limit else items, spec.hub_id or spec.name)
    if path.is_dir():
        rows, columns = _load_saved(path, split)
    elif path.exists():
        rows, columns = _load_rows(path, split)
    elif HUB_ID.fullmatch(name_or_path) and path.suffix.lower() not in LOCAL_SUFFIXES:
        if not declared:
            raise BenchmarkError(f"hub dataset {name_or_path!r}: declare its columns with fields "
                                 f"(question=...,answer=...)")
        rows = _load_hub(name_or_path, None, split or "train", name_or_path,
                         ",".join(f"{k}={v}" for k, v in declared.items()))
        items = items_from_rows(rows, declared, name_or_path, regex)
        return Benchmark(name_or_path, _check_of(declared), items[:limit] if limit else items, name_or_path)
    else:
        raise BenchmarkError(
            f"benchmark {name_or_path!r} is neither a known name ({', '.join([*KNOWN, GENERATED])}), an existing "
            f"file or saved dataset, nor a hub id (owner/name)"
        )
    if not rows:
        raise BenchmarkError(f"{path}: no rows")
    mapping = declared or _guess_fields(columns, str(path))
    items = items_from_rows(rows, mapping, str(path), regex)
    return Benchmark(path.stem, _check_of(mapping), items[:limit] if limit else items, str(path))


# ---------------------------------------------------------------- code checking (HumanEval harness layout)

_PY_BLOCK = re.compile(r"```(?:python|py)[ \t]*\n(.*?)```", re.S)


def extract_code(text: str) -> str | None:
    """The last ```python block of a reply (the executor's final answer for a code item)."""
    blocks = _PY_BLOCK.findall(text)
    return blocks[-1] if blocks else None


def code_check_program(item: BenchmarkItem, code: str) -> str:
    """prompt + completion + tests + check(entry_point), as HumanEval's harness assembles it.

    A reply that restates the whole function redefines the prompt's stub (the stub, a docstring-only body,
    stays valid Python and keeps the prompt's imports); a bare body continues the prompt's signature.
    """
    if item.check != "code" or item.prompt is None or item.tests is None or not item.entry_point:
        raise BenchmarkError(f"item {item.id} is not a code item")
    defines = re.search(rf"^(async\s+)?def\s+{re.escape(item.entry_point)}\s*\(", code, flags=re.M) is not None
    body = item.prompt + ("\n\n" + code if defines else code)
    return f"{body}\n\n{item.tests}\n\ncheck({item.entry_point})\n"


# ---------------------------------------------------------------- the generated benchmark

CATEGORIES = ("arithmetic", "modular", "counting", "algebra", "range_sum", "prime_count")
LEVELS = (1, 2, 3, 4)  # 1: one step, for small models; 4: hopeless by hand, quick in Python


def _signed(coef: int, var: str, first: bool = False) -> str:
    """3x, -x, + 2y, - y: a readable linear term."""
    mag = "" if abs(coef) == 1 and var else str(abs(coef))
    sign = ("-" if coef < 0 else "") if first else (" - " if coef < 0 else " + ")
    return f"{sign}{mag}{var}"


def _linear(coefs: list[tuple[int, str]]) -> str:
    terms = [(c, v) for c, v in coefs if c != 0] or [(0, "")]
    return "".join(_signed(c, v, first=i == 0) for i, (c, v) in enumerate(terms))


def _arithmetic(rng: random.Random, level: int) -> tuple[str, int]:
    hi, ops = {1: (10, 1), 2: (20, 2), 3: (100, 4), 4: (999, 6)}[level]

    def expr(n_ops: int) -> tuple[str, int]:
        if n_ops == 0:
            v = rng.randint(1, hi)
            return str(v), v
        left_ops = rng.randint(0, n_ops - 1)
        (ls, lv), (rs, rv) = expr(left_ops), expr(n_ops - 1 - left_ops)
        op = rng.choice("+-*")
        ls = f"({ls})" if left_ops and op == "*" else ls
        rs = f"({rs})" if n_ops - 1 - left_ops and op in "-*" else rs
        return f"{ls} {op} {rs}", {"+": lv + rv, "-": lv - rv, "*": lv * rv}[op]

    s, v = expr(ops)
    return f"Compute the value of {s}.", v


def _modular(rng: random.Random, level: int) -> tuple[str, int]:
    m = rng.randint(3, {1: 9, 2: 13, 3: 97, 4: 997}[level])
    if level == 1:
        a = rng.randint(10, 60)
        return f"What is the remainder when {a} is divided by {m}?", a % m
    if level == 2:
        a, b, c = rng.randint(10, 999), rng.randint(2, 99), rng.randint(0, 99)
        return f"What is the remainder when {a} * {b} + {c} is divided by {m}?", (a * b + c) % m
    base, exp = rng.randint(2, 50), rng.randint(10, 200) if level == 3 else rng.randint(1000, 20000)
    return f"What is the remainder when {base}^{exp} is divided by {m}?", pow(base, exp, m)


def _inclusion(lo: int, hi: int, divs: list[int]) -> int:
    """Integers in [lo, hi] divisible by at least one of divs (inclusion-exclusion)."""
    total = 0
    for mask in range(1, 1 << len(divs)):
        chosen = [d for i, d in enumerate(divs) if mask >> i & 1]
        lcm = math.lcm(*chosen)
        total += (-1) ** (len(chosen) + 1) * (hi // lcm - (lo - 1) // lcm)
    return total


def _counting(rng: random.Random, level: int) -> tuple[str, int]:
    span = {1: 30, 2: 100, 3: 10_000, 4: 200_000}[level]
    lo = 1 if level == 1 else rng.randint(1, span // 2)
    hi = lo + rng.randint(span // 4, span)
    p, q = rng.sample([2, 3, 4, 5, 6, 7, 9, 11, 13], 2)
    while p % q == 0 or q % p == 0:  # "by 4 or by 2" is a one-divisor question in disguise
        p, q = rng.sample([2, 3, 4, 5, 6, 7, 9, 11, 13], 2)
    form = "one" if level == 1 else rng.choice(("one", "or") if level == 2 else ("or", "but_not"))
    where = f"from {lo} to {hi} inclusive"
    if form == "one":
        return f"How many integers {where} are divisible by {p}?", _inclusion(lo, hi, [p])
    if form == "or":
        return f"How many integers {where} are divisible by {p} or by {q}?", _inclusion(lo, hi, [p, q])
    both = math.lcm(p, q)
    n = _inclusion(lo, hi, [p]) - _inclusion(lo, hi, [both])
    return f"How many integers {where} are divisible by {p} but not by {q}?", n


def _algebra(rng: random.Random, level: int) -> tuple[str, int]:
    x = rng.randint(-20, 20)
    nz = [c for c in range(-9, 10) if c]
    if level == 1:
        x, b = rng.randint(1, 12), rng.randint(1, 12)
        return f"Solve for x: x + {b} = {x + b}.", x
    if level == 2:
        a, b = rng.choice(nz), rng.randint(-30, 30)
        return f"Solve for x: {_linear([(a, 'x'), (b, '')])} = {a * x + b}.", x
    if level == 3:
        a = rng.choice(nz)
        c = rng.choice([v for v in nz if v != a])
        b = rng.randint(-30, 30)
        d = a * x + b - c * x
        return f"Solve for x: {_linear([(a, 'x'), (b, '')])} = {_linear([(c, 'x'), (d, '')])}.", x
    y = rng.randint(-20, 20)
    while True:
        a, b, c, d = (rng.choice(nz) for _ in range(4))
        if a * d - b * c:
            break
    e1, e2 = f"{_linear([(a, 'x'), (b, 'y')])} = {a * x + b * y}", f"{_linear([(c, 'x'), (d, 'y')])} = {c * x + d * y}"
    return f"Solve the system {e1} and {e2}. What is x + y?", x + y


def _digit_sum(n: int) -> int:
    return sum(map(int, str(n)))


def _range_sum(rng: random.Random, level: int) -> tuple[str, int]:
    n_max = {1: rng.randint(5, 30), 2: 1_000, 3: 20_000, 4: 100_000}[level]
    if level == 1:
        return f"What is the sum of the integers n with 1 <= n <= {n_max}?", n_max * (n_max + 1) // 2
    power = 1 if level < 4 else 2
    a, b = rng.sample([3, 4, 5, 6, 7, 8, 9, 11], 2)
    form = rng.choice(("div_not", "digit_sum", "remainder"))
    if form == "div_not":
        cond, pred = f"divisible by {a} but not by {b}", (lambda n: n % a == 0 and n % b != 0)
    elif form == "digit_sum":
        cond, pred = f"whose digit sum is divisible by {a}", (lambda n: _digit_sum(n) % a == 0)
    else:
        r = rng.randrange(b)
        cond, pred = f"that leave remainder {r} when divided by {b}", (lambda n: n % b == r)
    what = "the integers" if power == 1 else "the squares of the integers"
    total = sum(n**power for n in range(1, n_max + 1) if pred(n))
    return f"What is the sum of {what} n with 1 <= n <= {n_max} {cond}?", total


def _primes_upto(n: int) -> bytearray:
    sieve = bytearray([1]) * (n + 1)
    sieve[: min(2, n + 1)] = bytes(min(2, n + 1))
    for p in range(2, math.isqrt(n) + 1):
        if sieve[p]:
            sieve[p * p :: p] = bytes(len(range(p * p, n + 1, p)))
    return sieve


def _prime_count(rng: random.Random, level: int) -> tuple[str, int]:
    hi = rng.randint(*{1: (10, 30), 2: (30, 100), 3: (1_000, 20_000), 4: (100_000, 1_000_000)}[level])
    lo = 1 if level == 1 else rng.randint(1, hi // 2)
    sieve = _primes_upto(hi)
    return f"How many prime numbers are there between {lo} and {hi} inclusive?", sum(sieve[lo:])


_GENERATORS: dict[str, Callable[[random.Random, int], tuple[str, int]]] = {
    "arithmetic": _arithmetic, "modular": _modular, "counting": _counting,
    "algebra": _algebra, "range_sum": _range_sum, "prime_count": _prime_count,
}


def generate_benchmark(n: int, seed: int = 0, kinds: Iterable[str] | None = None,
                       levels: Iterable[int] | None = None) -> list[dict[str, Any]]:
    """n items cycling through kinds x levels, each from its own seeded RNG, so any prefix is balanced and
    `generate_benchmark(50, s) == generate_benchmark(200, s)[:50]`. Answers are exact integers (as strings).

    range_sum and prime_count are hard by hand and a few lines of Python: the tool's effect shows there.
    """
    kinds = list(kinds or CATEGORIES)
    levels = list(levels or LEVELS)
    bad = [k for k in kinds if k not in _GENERATORS] + [str(lv) for lv in levels if lv not in LEVELS]
    if bad:
        raise BenchmarkError(f"unknown kinds/levels {bad}; kinds: {', '.join(CATEGORIES)}; levels: {LEVELS}")
    if n < 0:
        raise BenchmarkError(f"n must be >= 0, got {n}")
    items: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i in range(n):
        kind, level = kinds[i % len(kinds)], levels[(i // len(kinds)) % len(levels)]
        for attempt in range(100):  # small levels can repeat a question: draw again
            question, answer = _GENERATORS[kind](random.Random(f"{seed}:{i}:{attempt}"), level)
            if question not in seen:
                break
        seen.add(question)
        items.append({"id": f"gen-{seed}-{i:05d}", "category": kind, "level": level,
                      "question": question, "answer": str(answer)})
    return items


def save_jsonl(rows: Iterable[dict[str, Any]], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path
