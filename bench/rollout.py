"""Rollout throughput: generated tokens/s of each engine backend vs a naive `model.generate` loop.

Two workloads on the embedded model, all measured in this one run so the ratios share the machine's
load: (1) single-turn sampling at several batch sizes; (2) a multi-turn tool rollout where every
turn appends the sampled tokens plus a fixed tool observation and continues from the exact token
sequence (where vLLM's prefix cache should pay off; the hf backend re-prefills the whole history).
The naive baseline is one `model.generate` call per prompt (per turn), the way a first script would.

    .venv/bin/python bench/rollout.py                     # hf and vllm, batches 1 8 32 64
    .venv/bin/python bench/rollout.py --backends hf --batch-sizes 1 8 --max-tokens 32
"""
from __future__ import annotations

import argparse
import json
import time

from selfplay.config import EngineConfig, ModelConfig
from selfplay.types import SamplingParams

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
    args = ap.parse_args()

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
