"""Rollout throughput: generated tokens/s of each engine backend vs a naive `model.generate` loop.

Two workloads on the embedded model, all measured in this one run so the ratios share the machine's
load: (1) single-turn sampling at several batch sizes; (2) a multi-turn tool rollout where every
turn appends the sampled tokens plus a fixed tool observation and continues from the exact token
sequence (where vLLM's prefix cache should pay off; the hf backend re-prefills the whole history).
The naive baseline is one `model.generate` call per prompt (per turn), the way a first script would.

A third workload, `--schedules`, compares the executor's two multi-turn schedules on vLLM with real tool
calls in the real sandbox: round-based (every conversation waits at each turn for the slowest generation and
the slowest tool call) against per-conversation (engine -> sandbox -> engine on its own, tool calls
overlapping generation; roles/conversations.py). Every first turn opens a python block, so every
conversation calls the tool; each call sleeps in the sandbox for a latency drawn from a fixed mix (most
calls fast, some taking seconds, like tests, web requests or solvers). Both schedules sample the same
tokens from the same seeds, so their throughput ratio is their wall-time ratio.

    .venv/bin/python bench/rollout.py                     # hf and vllm, batches 1 8 32 64
    .venv/bin/python bench/rollout.py --backends hf --batch-sizes 1 8 --max-tokens 32
    .venv/bin/python bench/rollout.py --schedules --repeats 4 --max-tokens 48   # round-based vs per-conversation
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

# bench/sandbox.py would shadow the `sandbox` package, here and (Ray hands the driver's script directory to its
# workers while it is on sys.path) in the actors: this script imports from the repository, not from bench/
_HERE = os.path.dirname(os.path.realpath(__file__))
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != _HERE]

from selfplay.config import EngineConfig, ModelConfig  # noqa: E402
from selfplay.types import SamplingParams  # noqa: E402

OBSERVATION = "<|im_start|>user\n```output\n42\n```\nContinue.<|im_end|>\n<|im_start|>assistant\n"


def chat_prompts(tokenizer, n: int) -> list[str]:
    tasks = [f"Compute {a} * {b} with Python and explain the steps." for a, b in zip(range(11, 11 + n), range(37, 37 + n))]
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
        for t in tasks
    ]


def naive_single(model, tokenizer, prompts: list[str], max_tokens: int, temperature: float) -> tuple[int, float]:
    """One model.generate per prompt: (generated tokens, seconds)."""
    import torch

    tokens, start = 0, time.perf_counter()
    for p in prompts:
        ids = tokenizer(p, add_special_tokens=False, return_tensors="pt").input_ids.to(model.device)
        with torch.inference_mode():
            out = model.generate(ids, do_sample=True, temperature=temperature, max_new_tokens=max_tokens,
                                 pad_token_id=tokenizer.pad_token_id)
        tokens += out.shape[1] - ids.shape[1]
    return tokens, time.perf_counter() - start


def naive_multi_turn(model, tokenizer, prompts, turns, max_tokens, temperature) -> tuple[int, float]:
    import torch

    obs = tokenizer(OBSERVATION, add_special_tokens=False).input_ids
    tokens, start = 0, time.perf_counter()
    for p in prompts:
        ids = tokenizer(p, add_special_tokens=False).input_ids
        for _ in range(turns):
            with torch.inference_mode():
                out = model.generate(torch.tensor([ids], device=model.device), do_sample=True, temperature=temperature,
                                     max_new_tokens=max_tokens, pad_token_id=tokenizer.pad_token_id)
            new = out[0, len(ids):].tolist()
            tokens += len(new)
            ids = ids + new + obs
    return tokens, time.perf_counter() - start


def engine_single(engine, prompts, max_tokens, temperature) -> tuple[int, float]:
    start = time.perf_counter()
    outs = engine.generate(prompts, SamplingParams(temperature=temperature, max_tokens=max_tokens))
    return sum(len(c.token_ids) for o in outs for c in o.outputs), time.perf_counter() - start


def engine_multi_turn(engine, prompts, turns, max_tokens, temperature) -> tuple[int, float]:
    """All conversations advance together, one generate call per turn, continuing exact token ids."""
    obs = engine.tokenizer(OBSERVATION, add_special_tokens=False).input_ids
    histories = [engine.tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    tokens, start = 0, time.perf_counter()
    for _ in range(turns):
        outs = engine.generate(histories, SamplingParams(temperature=temperature, max_tokens=max_tokens))
        for k, o in enumerate(outs):
            new = o.outputs[0].token_ids
            tokens += len(new)
            histories[k] = histories[k] + new + obs
    return tokens, time.perf_counter() - start


# Tool latency mix, seconds (a call's latency is picked by a hash of its code, the same on both schedules):
# 60% fast (50 ms), 20% 0.5 s, 10% 2 s, 10% 4 s; Agent0's sandbox allows 10 s per call.
LATENCIES = [0.05] * 6 + [0.5] * 2 + [2.0, 4.0]
SCHEDULE_QUESTIONS = [f"Compute {a} * {b} + {c} with Python, then give the result in \\boxed{{}}."
                      for a, b, c in zip(range(12, 60, 3), range(31, 90, 4), range(5, 50, 3))]


def slow_tool(pool):
    """The real sandbox, each program preceded by a sleep from LATENCIES (a tool that takes time)."""
    import hashlib

    def run_many(codes, **kwargs):
        delays = [LATENCIES[int(hashlib.sha1(c.encode()).hexdigest(), 16) % len(LATENCIES)] for c in codes]
        return pool.run_many([f"import time\ntime.sleep({d})\n{c}" for d, c in zip(delays, codes)], **kwargs)

    return run_many


def schedules(args) -> dict[str, list]:
    """Generated (model-written) tokens per second of each schedule: one short warm-up of each, then
    `args.repeats` adjacent pairs (order alternating, same seed within a pair, a new seed per pair)."""
    from roles.executor import Executor
    from sandbox import Limits, SandboxPool
    from selfplay.config import ExecutorConfig
    from selfplay.engines import make_engine

    engine = make_engine(ModelConfig(max_model_len=2048),
                         EngineConfig(backend="vllm", max_batch_size=64, kv_cache_space_gib=2.0), seed=0)
    questions = SCHEDULE_QUESTIONS[: args.tasks]
    out: dict[str, list] = {"rounds": [], "conversations": [], "runs": []}
    with SandboxPool(Limits(timeout_s=10, cpu_time_s=10), workers=args.tool_workers) as pool:
        tool = slow_tool(pool)

        def run(schedule: str, qs: list[str], samples: int, seed: int) -> dict:
            cfg = ExecutorConfig(samples_per_task=samples, max_turns=args.turns, temperature=0.8,
                                 max_tokens_per_turn=args.max_tokens, schedule=schedule,
                                 max_concurrent_tools=args.tool_workers)
            executor = Executor(engine, tool, cfg, max_model_len=2048, tool_timeout_s=10)
            load, start = os.getloadavg()[0], time.perf_counter()
            groups = executor.rollout(qs, prefill="```python\n", seed=seed)
            sec = time.perf_counter() - start
            rs = [r for g in groups for r in g]
            row = {"schedule": schedule, "seed": seed, "seconds": sec, "load": load,
                   "tokens": sum(sum(r.loss_mask) for r in rs), "calls": sum(r.n_tool_calls for r in rs),
                   "tool_s": sum(c.duration_s for r in rs for c in r.tool_calls),
                   "completions": [r.completion_ids for r in rs]}
            print(f"{schedule:>13} seed {seed}: {row['tokens']} tokens, {row['calls']} tool calls "
                  f"({row['tool_s']:.0f} s of tools), {sec:.1f} s = {row['tokens'] / sec:.1f} tok/s, "
                  f"load {load:.1f}", flush=True)
            return row

        for schedule in ("rounds", "conversations"):  # warm-up: engine graphs, prefix cache, sandbox workers
            run(schedule, questions[:1], 2, 999)
        for rep in range(args.repeats):
            pair = {}
            for schedule in ("rounds", "conversations") if rep % 2 == 0 else ("conversations", "rounds"):
                pair[schedule] = run(schedule, questions, args.samples, 1000 + rep)
                out[schedule].append(pair[schedule]["tokens"] / pair[schedule]["seconds"])
            same = pair["rounds"].pop("completions") == pair["conversations"].pop("completions")
            out["runs"].append({**pair, "same_tokens": same})
            print(f"  pair {rep}: both schedules sampled the same tokens: {same}", flush=True)
    engine.close()
    return out


def ci95(xs: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval."""
    import statistics

    t = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}
    m = statistics.mean(xs)
    if len(xs) < 2:
        return m, float("nan")
    return m, t.get(len(xs) - 1, 1.96) * statistics.stdev(xs) / len(xs) ** 0.5


def report_schedules(args, rates: dict[str, list]) -> None:
    (r, r_ci), (c, c_ci) = ci95(rates["rounds"]), ci95(rates["conversations"])
    ratios = [b / a for a, b in zip(rates["rounds"], rates["conversations"])]  # paired: same seeds, adjacent runs
    q, q_ci = ci95(ratios)
    runs = rates["runs"]
    loads = [p[s]["load"] for p in runs for s in ("rounds", "conversations")]
    wall = {s: ci95([p[s]["seconds"] for p in runs]) for s in ("rounds", "conversations")}
    tools = {s: ci95([p[s]["tool_s"] for p in runs]) for s in ("rounds", "conversations")}
    print(f"\nMulti-turn executor rollouts on vLLM, {args.tasks} tasks x {args.samples} samples, up to "
          f"{args.turns} tool calls, {args.max_tokens} tokens per turn, tool latency mix {sorted(set(LATENCIES))} s "
          f"({args.tool_workers} sandbox workers); {len(ratios)} paired runs, mean +- 95% CI, load average "
          f"{min(loads):.1f}-{max(loads):.1f}; same tokens on both schedules in "
          f"{sum(p['same_tokens'] for p in runs)}/{len(runs)} pairs")
    print("| schedule | generated tok/s | wall s | tool-call s (sum) | ratio |\n|---|---|---|---|---|")
    print(f"| round-based | {r:.1f} +- {r_ci:.1f} | {wall['rounds'][0]:.1f} +- {wall['rounds'][1]:.1f} "
          f"| {tools['rounds'][0]:.0f} | 1.00 |")
    print(f"| per-conversation | {c:.1f} +- {c_ci:.1f} | {wall['conversations'][0]:.1f} +- "
          f"{wall['conversations'][1]:.1f} | {tools['conversations'][0]:.0f} | {q:.2f} +- {q_ci:.2f} |")
    print("per-pair ratios: " + ", ".join(f"{x:.2f}" for x in ratios))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", nargs="+", default=["hf", "vllm"], choices=["hf", "vllm"])
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8, 32, 64])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--naive-prompts", type=int, default=8, help="prompts in the naive single-turn loop")
    ap.add_argument("--conversations", type=int, default=16)
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--naive-conversations", type=int, default=4)
    ap.add_argument("--json", help="also write the numbers here")
    ap.add_argument("--schedules", action="store_true", help="only round-based vs per-conversation (vLLM)")
    ap.add_argument("--tasks", type=int, default=6)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tool-workers", type=int, default=8)
    args = ap.parse_args()
    if args.schedules:
        rates = schedules(args)
        report_schedules(args, rates)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "schedules": rates}, f, indent=2)
        return

    from selfplay.engines import make_engine
    from selfplay.models import load_causal_lm, load_tokenizer, resolve_model_path

    model_cfg = ModelConfig(max_model_len=2048)
    path = resolve_model_path(model_cfg.name_or_path)
    tokenizer = load_tokenizer(path)
    prompts = chat_prompts(tokenizer, max(max(args.batch_sizes), args.conversations, args.naive_prompts))
    results: dict[str, dict[str, float]] = {}

    model = load_causal_lm(path, "auto").eval()
    naive_single(model, tokenizer, prompts[:1], 8, args.temperature)  # warm-up
    tok, sec = naive_single(model, tokenizer, prompts[: args.naive_prompts], args.max_tokens, args.temperature)
    results["naive"] = {"single": tok / sec}
    tok, sec = naive_multi_turn(model, tokenizer, prompts[: args.naive_conversations], args.turns, args.max_tokens,
                                args.temperature)
    results["naive"]["multi_turn"] = tok / sec
    print(f"naive loop: {results['naive']['single']:.1f} tok/s single-turn, "
          f"{results['naive']['multi_turn']:.1f} tok/s multi-turn", flush=True)
    del model

    for backend in args.backends:
        start = time.perf_counter()
        engine = make_engine(model_cfg, EngineConfig(backend=backend, max_batch_size=max(args.batch_sizes),
                                                     kv_cache_space_gib=2.0), seed=0)
        row = {"startup_s": time.perf_counter() - start}
        engine_single(engine, prompts[:2], 8, args.temperature)  # warm-up
        for b in args.batch_sizes:
            tok, sec = engine_single(engine, prompts[:b], args.max_tokens, args.temperature)
            row[f"b{b}"] = tok / sec
            print(f"{backend} batch {b}: {tok} tokens in {sec:.1f} s = {tok / sec:.1f} tok/s", flush=True)
        tok, sec = engine_multi_turn(engine, prompts[: args.conversations], args.turns, args.max_tokens,
                                     args.temperature)
        row["multi_turn"] = tok / sec
        print(f"{backend} multi-turn: {tok} tokens in {sec:.1f} s = {tok / sec:.1f} tok/s", flush=True)
        engine.close()
        results[backend] = row

    base, base_mt = results["naive"]["single"], results["naive"]["multi_turn"]
    cols = [f"b{b}" for b in args.batch_sizes]
    print(f"\nGenerated tokens/s (x = ratio vs the naive loop: {base:.1f} tok/s single-turn, "
          f"{base_mt:.1f} tok/s multi-turn); max_tokens={args.max_tokens}, T={args.temperature}")
    print("| backend | startup s | " + " | ".join(f"batch {b}" for b in args.batch_sizes)
          + f" | multi-turn ({args.conversations} conv x {args.turns} turns) |")
    print("|---" * (len(cols) + 3) + "|")
    for backend in args.backends:
        r = results[backend]
        cells = [f"{r[c]:.1f} ({r[c] / base:.1f}x)" for c in cols]
        print(f"| {backend} | {r['startup_s']:.0f} | " + " | ".join(cells)
              + f" | {r['multi_turn']:.1f} ({r['multi_turn'] / base_mt:.1f}x) |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":  # vLLM spawns its engine processes: the entry point must be guarded
    main()
