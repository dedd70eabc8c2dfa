"""A synthetic run directory for trying the dashboard without training anything.

`python -m selfplay.dashboard.demo runs/demo --iterations 30 [--live 5]` writes a run whose numbers
behave like a self-play run (the executor's skill rises, the proposer's tasks get harder, p_hat is the
majority share of k samples), through the real `MetricsStore`. `--live S` then appends one iteration
every S seconds, which is how the dashboard's live view is tried and tested. It is demo data and says
so in its config name; nothing in a real run imports it.
"""
from __future__ import annotations

import argparse
import math
import random
import time
from collections import Counter
from pathlib import Path

from selfplay.config import RunConfig, dump_config
from selfplay.evaluation.stats import wilson_interval
from selfplay.telemetry.metrics import MetricsStore, TaskRecord, TrajectoryRecord

TOPICS = ["modular arithmetic", "combinatorics", "geometry", "probability", "number theory", "sequences"]
STATUSES = ["ok", "error", "timeout", "memory_limit", "output_limit", "killed", "sandbox_error"]


def write_config(run_dir: Path, samples_per_task: int = 10, iterations: int = 30) -> RunConfig:
    cfg = RunConfig(name="demo-synthetic", run_dir=str(run_dir))
    cfg.executor.samples_per_task = samples_per_task
    cfg.loop.iterations = iterations
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    return cfg


def _trajectory_text(question: str, answer: str, tools: int, statuses: list[str]) -> str:
    parts = [f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\nLet me work this out with code."]
    for i in range(tools):
        parts.append(f"```python\nfrom sympy import *\nn = {17 + i}\nprint(sum(k*k % n for k in range(1, n)))\n```")
        out = "Traceback (most recent call last):\n  ZeroDivisionError" if statuses[i] == "error" else str(100 + i)
        parts.append(f"```output\n{out}\n```")
    parts.append(f"So the answer is \\boxed{{{answer}}}.<|im_end|>")
    return "\n".join(parts)


def synthetic_iteration(it: int, cfg: RunConfig, rng: random.Random, tasks_per_it: int = 12, trajs_per_task: int = 3):
    """One iteration's (scalars, tasks, trajectories), shaped like a real run at iteration `it`."""
    k, lo, hi = cfg.executor.samples_per_task, cfg.verifier.band_low, cfg.verifier.band_high
    skill = 0.35 + 0.45 * (1 - math.exp(-it / 12))  # executor accuracy rises and saturates
    difficulty = 0.8 * (1 - math.exp(-it / 8)) - 0.1  # proposer starts too easy, learns to ask harder
    tasks, trajs, statuses_all, tool_counts = [], [], Counter(), []
    for j in range(tasks_per_it):
        task_id = f"it{it:04d}-t{j:02d}"
        topic = TOPICS[(it + j) % len(TOPICS)]
        question = f"[{topic}] Find the remainder when {3 + j}^{it + 20} is divided by {7 + (j * it) % 13}."
        if j == 0 and it % 7 == 3:
            question += " (answer as <b>integer</b> & explain)"  # markup must show as text, never render
        parseable = rng.random() > 0.06
        p_correct = min(0.98, max(0.02, skill - difficulty + 0.5 + rng.gauss(0, 0.22)))
        answers = [str(j) if rng.random() < p_correct else str(rng.randint(0, 3) + 10 * j) for _ in range(k)]
        agreement = dict(Counter(answers).most_common())
        label, top = next(iter(agreement.items()))
        p_hat = top / k if parseable else None
        accepted = p_hat is not None and lo <= p_hat <= hi
        # the reasons selfplay/run/loop.py `admit` records
        reason = None if accepted else ("parse:no_question" if p_hat is None else "too_easy" if p_hat > hi else "too_hard")
        n_tools = rng.choice([0, 1, 1, 2, 2, 3])
        unc = 0.0 if p_hat is None else 1 - 2 * abs(p_hat - 0.5)
        comp = {"uncertainty": round(unc, 3), "tool": round(0.05 * min(n_tools, 4), 3),
                "repetition": round(-rng.random() * 0.2, 3), "format_ok": parseable}
        reward = -1.0 if not parseable else max(0.0, comp["uncertainty"] + comp["tool"] + comp["repetition"])
        tasks.append(TaskRecord(task_id, it, question, label if parseable else None, p_hat, reward, comp,
                                agreement if parseable else {}, k, float(n_tools), accepted, reason))
        for s in range(trajs_per_task):
            statuses = [rng.choices(STATUSES, weights=[80, 10, 4, 1, 1, 1, 0.5])[0] for _ in range(n_tools)]
            statuses_all.update(statuses)
            tool_counts.append(n_tools)
            answer = answers[s % k]
            trajs.append(TrajectoryRecord(
                f"{task_id}-e{s}", task_id, it, "executor", _trajectory_text(question, answer, n_tools, statuses),
                1.0 if answer == label else -1.0, answer == label if parseable else None, n_tools, statuses,
                "stop" if rng.random() > 0.05 else "length", answer,
            ))
    scored = [t for t in tasks if t.p_hat is not None]
    n_acc = sum(t.accepted for t in tasks)
    scalars: dict[str, float] = {
        "proposer/reward_mean": sum(t.proposer_reward for t in tasks) / len(tasks),
        "proposer/reward/uncertainty": sum(t.reward_components["uncertainty"] for t in tasks) / len(tasks),
        "proposer/reward/tool": sum(t.reward_components["tool"] for t in tasks) / len(tasks),
        "proposer/reward/repetition": sum(t.reward_components["repetition"] for t in tasks) / len(tasks),
        "proposer/reward/agreement_gate": max(0.0, 0.3 - 0.02 * it),  # share zeroed by the Agent0 gate
        "proposer/parse_rate": len(scored) / len(tasks),
        "tasks/proposed": len(tasks), "tasks/accepted": n_acc, "tasks/accepted_rate": n_acc / len(tasks),
        "pool/size": 40 + it * 7.0,
        "executor/accuracy": min(1.0, max(0.0, skill + rng.gauss(0, 0.03))),
        "executor/format_rate": min(1.0, 0.8 + 0.01 * it),
        "executor/tool_calls_mean": sum(tool_counts) / max(1, len(tool_counts)),
        "throughput/tokens_per_s": 900 + 40 * it + rng.gauss(0, 30),
        "faults/actor_restarts": 1.0 if it == 9 else 0.0,
        "parse_failures/proposer": float(len(tasks) - len(scored)), "parse_failures/executor": float(rng.randint(0, 2)),
    }
    scalars.update({f"sandbox/status/{s}": float(statuses_all.get(s, 0)) for s in STATUSES})
    for role, h0 in (("proposer", 1.6), ("executor", 1.2)):
        scalars.update({
            f"learner/{role}/entropy": h0 * math.exp(-it / 40) + rng.gauss(0, 0.02),
            f"learner/{role}/kl": 0.002 * it + abs(rng.gauss(0, 0.002)),
            f"learner/{role}/loss": rng.gauss(0, 0.05), f"learner/{role}/clip_frac_high": 0.02 + 0.01 * rng.random(),
            f"learner/{role}/grad_norm": 0.6 + 0.3 * rng.random(),
        })
    # disjoint stages as the loop times them (time/stage/*), summing to the iteration's wall time
    stages = {"propose": 20, "solve": 45, "verify": 6, "reward": 1, "learn_proposer": 15, "practice": 30,
              "learn_executor": 30, "weight_sync": 3, "commit": 2, "probes": 3, "other": 2}
    for stage, base in stages.items():
        scalars[f"time/stage/{stage}"] = base * (1 + 0.1 * rng.random())
    scalars["time/total"] = sum(scalars[f"time/stage/{s}"] for s in stages)
    gen = sum(scalars[f"time/stage/{s}"] for s in ("propose", "solve", "practice"))
    scalars.update({"time/busy/rollout": gen * 0.97, "time/busy/verifier": scalars["time/stage/verify"] * 0.9,
                    "time/busy/learner": scalars["time/stage/learn_proposer"] + scalars["time/stage/learn_executor"],
                    "time/busy/sandbox": 0.1 * scalars["time/stage/solve"]})
    scalars["throughput/tokens"] = scalars["throughput/tokens_per_s"] * gen
    calls = sum(statuses_all.values())
    scalars["sandbox/calls"] = float(calls)
    scalars["sandbox/error_rate"] = statuses_all.get("sandbox_error", 0) / calls if calls else 0.0
    if it % 5 == 0:
        scalars["eval/gsm8k/pass@1"] = min(1.0, 0.3 + 0.35 * (1 - math.exp(-it / 15)) + rng.gauss(0, 0.01))
        scalars["eval/gsm8k/maj@k"] = min(1.0, scalars["eval/gsm8k/pass@1"] + 0.06)
        scalars["eval/math500/pass@1"] = min(1.0, 0.15 + 0.25 * (1 - math.exp(-it / 15)) + rng.gauss(0, 0.01))
        scalars["eval/gsm8k/tool_calls_mean"] = 1.2 + 0.02 * it + rng.gauss(0, 0.05)
        for bench, n in (("gsm8k", 1319), ("math500", 500)):  # Wilson 95% intervals, as evaluation logs them
            rate = scalars[f"eval/{bench}/pass@1"]
            scalars[f"eval/{bench}/pass@1_ci95_lo"], scalars[f"eval/{bench}/pass@1_ci95_hi"] = wilson_interval(
                rate * n, n)
    # known-answer probes (verifier.probes = 8): pseudo-label accuracy climbs with the executor
    probes = 8
    right = sum(rng.random() < 0.35 + 0.3 * (1 - math.exp(-it / 12)) for _ in range(probes))
    scalars["verifier/probes"] = float(probes)
    scalars["verifier/label_accuracy"] = right / probes
    scalars["verifier/label_accuracy_ci95_lo"], scalars["verifier/label_accuracy_ci95_hi"] = wilson_interval(
        right, probes)
    scalars["verifier/probe_executor_accuracy"] = max(0.0, right / probes - 0.1 * rng.random())
    return scalars, tasks, trajs


def log_iteration(store: MetricsStore, it: int, cfg: RunConfig, rng: random.Random) -> None:
    scalars, tasks, trajs = synthetic_iteration(it, cfg, rng)
    store.log_tasks(it, tasks)
    store.log_trajectories(it, trajs)
    store.log_scalars(it, scalars)


def write_demo_run(run_dir: Path, iterations: int = 30, seed: int = 0) -> RunConfig:
    cfg = write_config(run_dir, iterations=iterations)
    rng = random.Random(seed)
    with MetricsStore(run_dir / "metrics.sqlite") as store:
        for it in range(iterations):
            log_iteration(store, it, cfg, rng)
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--iterations", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--live", type=float, default=0, help="then append one iteration every LIVE seconds")
    args = ap.parse_args()
    cfg = write_demo_run(args.run_dir, args.iterations, args.seed)
    print(f"wrote {args.iterations} synthetic iterations to {args.run_dir}")
    if args.live > 0:
        rng, it = random.Random(args.seed + 1), args.iterations
        with MetricsStore(args.run_dir / "metrics.sqlite") as store:
            while True:
                time.sleep(args.live)
                log_iteration(store, it, cfg, rng)
                print(f"iteration {it}")
                it += 1


if __name__ == "__main__":
    main()
