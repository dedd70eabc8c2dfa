"""Learner throughput against TRL's GRPOTrainer doing the same GRPO step, measured in the same run.

Same model, prompts, completion lengths, LoRA (r, alpha, all-linear), loss settings (token-mean / TRL "dapo",
eps 0.2 / 0.28, KL beta, no dual clip, no IS correction), lr, grad clipping, dtype and gradient
checkpointing on both sides. Two comparisons:

1. update: a fixed batch of completions (random token ids, lengths drawn once). TRL receives them through its
   `rollout_func` hook; its step is timed from `on_step_begin` to `on_step_end` (rollout_func call,
   decoding, reward call, padding, reference log-probs, forward, backward, clipping, AdamW, scheduler).
   Ours: `Learner.train_step` on the same token ids (advantages, reference log-probs, forward, backward,
   clipping, AdamW, scheduler).
2. rollout+update: TRL's own generation (transformers `generate`) plus its step, against our hf engine
   (`engine.update_weights(learner.export(...))` + `engine.generate`) plus `train_step`. Completion lengths
   differ between the two (sampling), so the comparison is tokens per second.

Each of our steps runs inside TRL's `on_step_end` callback, so the two alternate step by step and see the same
machine load; the first `--warmup` steps of each are dropped; medians (of step time and of per-step tokens/s) are
reported, since other processes on a shared machine can stall any single step.

    python bench/learner.py                      # CPU, embedded SmolLM2-135M
    python bench/learner.py --device cuda --model-config qwen2.5-0.5b-like   # random-weight 0.5B, bf16
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

# Qwen2.5 shapes (config.json of Qwen/Qwen2.5-0.5B and -1.5B); weights are random, for throughput only.
MODEL_CONFIGS = {
    "qwen2.5-0.5b-like": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                              num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2.5-1.5b-like": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                              num_key_value_heads=2, tie_word_embeddings=True),
}
PROMPTS = ["Name a color.", "What is 17 times 3?", "Write a haiku about rivers.", "Give me a prime number.",
           "Explain recursion in one sentence.", "What is the capital of France?", "Say hello in Spanish.",
           "List three fruits."]


def model_path(kind: str, workdir: Path) -> str:
    """The embedded model, or a Qwen2.5-shaped model with random weights saved next to the embedded tokenizer."""
    from selfplay.models import load_tokenizer, resolve_model_path

    if kind == "embedded":
        return resolve_model_path()
    from transformers import AutoModelForCausalLM, Qwen2Config

    out = workdir / kind
    if not (out / "config.json").exists():
        cfg = Qwen2Config(vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
                          **MODEL_CONFIGS[kind])
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
        load_tokenizer(resolve_model_path()).save_pretrained(out)
    return str(out)


def fixed_batch(tok, n_prompts: int, group: int, max_len: int, seed: int):
    """Chat-templated prompt ids, and `group` random completions per prompt with lengths in [max_len/2, max_len]."""
    rng = random.Random(seed)
    prompts, completions, rewards = [], {}, {}
    for p in PROMPTS[:n_prompts]:
        text = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        prompts.append(text)
        completions[text] = [[rng.randrange(100, tok.vocab_size) for _ in range(rng.randint(max_len // 2, max_len))]
                             for _ in range(group)]
        rewards[text] = [float(rng.random() < 0.5) for _ in range(group)]
    return prompts, completions, rewards


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--model-config", default="embedded", choices=["embedded", *MODEL_CONFIGS])
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--generations", type=int, default=4)
    ap.add_argument("--completion-len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per comparison (after warmup)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--beta", type=float, default=0.01, help="KL coefficient (both sides)")
    ap.add_argument("--parts", default="update,rollout", help="comma list of: update, rollout")
    ap.add_argument("--gradient-checkpointing", default="auto", choices=["auto", "on", "off"],
                    help="both sides (auto: on for cuda, off for cpu)")
    ap.add_argument("--micro-batch-tokens", type=int, default=4096, help="ours (TRL scores the whole batch at once)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    if args.device == "cuda" and not torch.cuda.is_available():
        print("SKIP: --device cuda needs a CUDA GPU, and torch.cuda.is_available() is False on this machine. "
              "Run this on a GPU node (the code path is complete); the CPU comparison is the default.")
        return
    if args.device == "cpu" and args.model_config != "embedded":
        print(f"note: {args.model_config} on CPU is slow; consider --device cuda")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import logging

    import transformers

    transformers.logging.set_verbosity_error()
    logging.getLogger("selfplay").setLevel(logging.WARNING)

    workdir = Path(tempfile.mkdtemp(prefix="bench-learner-"))
    path = model_path(args.model_config, workdir)
    results = {"device": args.device, "model": args.model_config, "prompts": args.prompts,
               "generations": args.generations, "completion_len": args.completion_len, "torch_threads":
               torch.get_num_threads(), "gradient_checkpointing": args.gradient_checkpointing,
               "micro_batch_tokens": args.micro_batch_tokens, "loadavg_start": os.getloadavg()[0]}
    parts = set(args.parts.split(","))
    if "update" in parts:
        results["update"] = run_comparison(args, path, workdir, rollout=False)
    if "rollout" in parts:
        results["rollout_update"] = run_comparison(args, path, workdir, rollout=True)
    results["loadavg_end"] = os.getloadavg()[0]
    print(json.dumps(results, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


class PeakRSS:
    """Peak resident memory of this process inside a window, sampled every 5 ms by a thread (ru_maxrss only
    knows the process's all-time peak, and both sides run in this one process). `start()` opens a window;
    `stop()` returns (peak RSS, rise over the RSS at start) in GB."""

    def __init__(self) -> None:
        import threading

        self.page = os.sysconf("SC_PAGE_SIZE")
        self.base = self.peak = self.now()
        threading.Thread(target=self._run, daemon=True).start()

    def now(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _run(self) -> None:
        while True:
            self.peak = max(self.peak, self.now())
            time.sleep(0.005)

    def start(self) -> None:
        self.base = self.peak = self.now()

    def stop(self) -> tuple[float, float]:
        peak = max(self.peak, self.now())
        return peak / 2**30, (peak - self.base) / 2**30


def run_comparison(args, path: str, workdir: Path, rollout: bool) -> dict:
    from datasets import Dataset
    from peft import LoraConfig as PeftLoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from selfplay.config import EngineConfig, LearnerConfig, LoraConfig, ModelConfig
    from selfplay.learner.learner import Learner
    from selfplay.models import load_causal_lm, load_tokenizer
    from selfplay.types import SamplingParams, Trajectory

    cuda = args.device == "cuda"
    ckpt = args.gradient_checkpointing == "on" or (args.gradient_checkpointing == "auto" and cuda)
    tok = load_tokenizer(path)
    prompts, completions, rewards = fixed_batch(tok, args.prompts, args.generations, args.completion_len, seed=0)
    prompt_ids = {p: tok(p, add_special_tokens=False)["input_ids"] for p in prompts}
    G, steps = args.generations, args.warmup + args.steps
    model_cfg = ModelConfig(name_or_path=path, dtype="auto", max_model_len=2048)
    lcfg = LearnerConfig(lr=1e-5, kl_coef=args.beta, kl_ratio_correction=True, eps_low=0.2, eps_high=0.28,
                         dual_clip_c=None, tis_cap=None, micro_batch_tokens=args.micro_batch_tokens,
                         gradient_checkpointing="on" if ckpt else "off",
                         loss_agg="token-mean", advantage="grpo", adpo=False, max_grad_norm=1.0,
                         lora=LoraConfig(r=16, alpha=32, target_modules="all-linear"))
    learner = Learner(model_cfg, lcfg, roles=("executor",), seed=0, device=args.device)
    engine = None
    if rollout:
        from selfplay.engines import make_engine

        engine = make_engine(model_cfg, EngineConfig(backend="hf", max_batch_size=64), seed=0)

    def ours_step() -> tuple[float, int]:
        t0 = time.perf_counter()
        if engine is None:
            trajs = [Trajectory(role="executor", task_id=p, group_id=p, prompt_ids=prompt_ids[p], completion_ids=c,
                                loss_mask=[1] * len(c), behaviour_logprobs=[0.0] * len(c), reward=r)
                     for p in prompts for c, r in zip(completions[p], rewards[p])]
        else:
            engine.update_weights(learner.export("executor", workdir / "adapter"))
            outs = engine.generate([prompt_ids[p] for p in prompts],
                                   SamplingParams(n=G, temperature=1.0, max_tokens=args.completion_len),
                                   adapter="executor")
            trajs = [Trajectory(role="executor", task_id=o.request_id, group_id=o.request_id,
                                prompt_ids=o.prompt_token_ids, completion_ids=c.token_ids,
                                loss_mask=[1] * len(c.token_ids),
                                behaviour_logprobs=c.logprobs or [0.0] * len(c.token_ids),
                                reward=float(len(c.token_ids) % 2), meta={"temperature": 1.0})
                     for o in outs for c in o.outputs]
        m = learner.train_step("executor", trajs)
        return time.perf_counter() - t0, int(m["tokens"])

    # ---- TRL: same model, LoRA, loss, batch
    def rollout_func(batch_prompts, trainer):
        # one call per step; the trainer hands each prompt G times (its RepeatSampler)
        seen: dict[str, int] = {}
        pids, cids = [], []
        for p in batch_prompts:
            k = seen.get(p, 0)
            seen[p] = k + 1
            pids.append(prompt_ids[p])
            cids.append(completions[p][k % G])
        return {"prompt_ids": pids, "completion_ids": cids, "logprobs": None}

    reward_lookup = {tuple(c): r for p in prompts for c, r in zip(completions[p], rewards[p])}

    def reward_fn(completions, completion_ids, **kw):
        if rollout:
            return [float(len(c) % 2) for c in completion_ids]
        return [reward_lookup[tuple(c)] for c in completion_ids]

    trl_model = load_causal_lm(path, "auto", args.device)
    targs = GRPOConfig(
        output_dir=str(workdir / "trl"), per_device_train_batch_size=len(prompts) * G, num_generations=G,
        gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1, max_steps=steps,
        max_completion_length=args.completion_len, temperature=1.0, top_p=1.0, beta=args.beta, epsilon=0.2,
        epsilon_high=0.28, loss_type="dapo", scale_rewards="group", learning_rate=1e-5, max_grad_norm=1.0,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, use_cpu=not cuda, bf16=cuda,
        gradient_checkpointing=ckpt, logging_steps=10_000, report_to="none", save_strategy="no",
        disable_tqdm=True, seed=0, dataloader_num_workers=0)
    peft_cfg = PeftLoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                              task_type="CAUSAL_LM")
    times: dict[str, list[float]] = {"trl_s": [], "ours_s": []}
    tokens: dict[str, list[int]] = {"trl": [], "ours": []}
    rss: dict[str, list[tuple[float, float]]] = {"trl": [], "ours": []}
    meter = PeakRSS()

    class Interleave(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            meter.start()
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            times["trl_s"].append(time.perf_counter() - self.t0)
            rss["trl"].append(meter.stop())
            lengths = trainer._metrics["train"]["completions/mean_length"]
            tokens["trl"].append(int(round(lengths[-1] * len(prompts) * G)))
            meter.start()
            dt, n = ours_step()
            rss["ours"].append(meter.stop())
            times["ours_s"].append(dt)
            tokens["ours"].append(n)

    dataset = Dataset.from_dict({"prompt": prompts})  # every step samples each prompt once, G times
    trainer = GRPOTrainer(model=trl_model, reward_funcs=reward_fn, args=targs, train_dataset=dataset,
                          processing_class=tok, peft_config=peft_cfg, callbacks=[Interleave()],
                          rollout_func=None if rollout else rollout_func)
    trainer.train()

    w = args.warmup
    out = {}
    for side in ("trl", "ours"):
        t, n = times[f"{side}_s"][w:], tokens[side][w:]
        out[side] = {"step_s_median": statistics.median(t), "tokens_per_step": statistics.mean(n),
                     "tokens_per_s": statistics.median(k / s for k, s in zip(n, t)),
                     "step_s_all": [round(s, 3) for s in t],
                     # process RSS (both models live in it) at the step's peak, and the rise the step caused
                     "peak_rss_gb_max": max(p for p, _ in rss[side][w:]),
                     "rss_rise_gb_median": statistics.median(r for _, r in rss[side][w:])}
    out["speedup_tokens_per_s"] = out["ours"]["tokens_per_s"] / out["trl"]["tokens_per_s"]
    label = "rollout+update" if rollout else "update"
    print(f"[{label}] ours {out['ours']['tokens_per_s']:.1f} tok/s ({out['ours']['step_s_median']:.2f} s/step), "
          f"TRL {out['trl']['tokens_per_s']:.1f} tok/s ({out['trl']['step_s_median']:.2f} s/step): "
          f"ratio {out['speedup_tokens_per_s']:.2f}x; peak RSS per step ours {out['ours']['peak_rss_gb_max']:.2f} GB "
          f"(+{out['ours']['rss_rise_gb_median']:.2f}), TRL {out['trl']['peak_rss_gb_max']:.2f} GB "
          f"(+{out['trl']['rss_rise_gb_median']:.2f})", flush=True)
    return out


if __name__ == "__main__":
    main()
