"""Scaling efficiency of learner ranks and rollout replicas, each measured against its own baseline in the
same run, on a real local Ray.

1. learner: step time of `learner.world_size` 1 vs 2 on the same fixed batch (random-token GRPO groups);
   efficiency = (t_1 / t_2) / 2 (1.0 = perfect data-parallel scaling).
2. rollout: generated tokens/s of `engine.replicas` 1 vs 2 (hf engine, executor without tools) on the same
   questions through the driver's router; efficiency = (tps_2 / tps_1) / 2.

CPU (default): each rank / replica is pinned to its own core (`os.sched_setaffinity`) with one torch
thread, so the comparison is one core against two. Steps alternate ws1/ws2 (and 1/2 replicas) repeat by
repeat, so both see the same machine load; means with 95% t-intervals over the repeats.

    python bench/scale.py                        # CPU, embedded SmolLM2-135M
    python bench/scale.py --gpu                  # one GPU per rank / replica (needs 2 GPUs), no pinning
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}  # t(0.975, n-1)


def ci95(xs: list[float]) -> tuple[float, float, float]:
    m = statistics.fmean(xs)
    if len(xs) < 2:
        return m, m, m
    h = T95.get(len(xs) - 1, 1.96) * statistics.stdev(xs) / len(xs) ** 0.5
    return m, m - h, m + h


def fixed_batch(groups: int, per_group: int, prompt_len: int, completion_len: int, vocab: int, seed: int = 0):
    from selfplay.types import Trajectory

    rng = random.Random(seed)
    out = []
    for g in range(groups):
        prompt = [rng.randrange(10, vocab) for _ in range(prompt_len)]
        for _ in range(per_group):
            n = rng.randrange(completion_len // 2, completion_len + 1)
            out.append(Trajectory(role="executor", task_id=f"t{g}", group_id=f"g{g}", prompt_ids=prompt,
                                  completion_ids=[rng.randrange(10, vocab) for _ in range(n)], loss_mask=[1] * n,
                                  behaviour_logprobs=[0.0] * n, reward=rng.random(), meta={"temperature": 1.0}))
    return out


def pin(handle, core: int | None) -> None:
    """One torch thread, on one core (CPU runs): the actor is then exactly one core's worth of compute."""
    import ray

    def apply(_self, core=core):
        import os

        import torch

        torch.set_num_threads(1)
        if core is not None:
            os.sched_setaffinity(0, {core})
        return os.getpid()

    ray.get(handle.__ray_call__.remote(apply))


def bench_learner(cfg, rd, args) -> dict:
    import ray

    from selfplay.run.cluster.actors import LearnerActor
    from selfplay.run.cluster.ranks import LearnerGroup

    gpu = 1 if args.gpu else 0
    make = lambda name: ray.remote(LearnerActor).options(num_cpus=0, num_gpus=gpu).remote(cfg, rd, name)  # noqa: E731
    single = make("learner")
    ranks = [make(f"learner-{i}") for i in range(2)]
    for h, core in zip([single] + ranks, [0, 0, 1]):
        pin(h, None if args.gpu else core)
    group = LearnerGroup.form(ranks, cfg.learner.ppo_epochs)
    batch = fixed_batch(args.groups, args.group_size, args.prompt_len, args.completion_len, vocab=40000)
    t1, t2 = [], []
    for r in range(args.warmup + args.repeats):
        t0 = time.perf_counter()
        ray.get(single.train_step.remote("executor", batch))
        a = time.perf_counter() - t0
        t0 = time.perf_counter()
        ray.get(group.train_step.remote("executor", batch))
        b = time.perf_counter() - t0
        if r >= args.warmup:
            t1.append(a)
            t2.append(b)
    speed = [x / y for x, y in zip(t1, t2)]
    group.kill()
    ray.kill(single)
    return {"step_s_ws1": ci95(t1), "step_s_ws2": ci95(t2), "speedup": ci95(speed),
            "efficiency": ci95([s / 2 for s in speed])}


def bench_rollout(cfg, rd, args) -> dict:
    import ray

    from selfplay.run.cluster.actors import RolloutActor, SandboxActor
    from selfplay.run.cluster.fleet import RolloutFleet

    gpu = 1 if args.gpu else 0
    sandbox = ray.remote(SandboxActor).options(num_cpus=0).remote(cfg, rd)
    make = lambda name: ray.remote(RolloutActor).options(num_cpus=0, num_gpus=gpu).remote(cfg, rd, sandbox, name)  # noqa: E731
    one = RolloutFleet(lambda i: make("rollout"), 1)
    two = RolloutFleet(lambda i: make(f"rollout-{i}"), 2)
    for h, core in zip(one.handles + two.handles, [0, 0, 1]):
        pin(h, None if args.gpu else core)
    questions = [f"What is {a} * {b} + {a}?" for a, b in zip(range(3, 3 + args.questions), range(7, 7 + args.questions))]

    def tokens_per_s(fleet, r: int) -> float:
        ids = [f"r{r}q{i}" for i in range(len(questions))]
        t0 = time.perf_counter()
        groups = ray.get(fleet.solve.remote(questions, ids, args.samples))
        dt = time.perf_counter() - t0
        return sum(len(x.completion_ids) for g in groups for x in g) / dt

    s1, s2 = [], []
    for r in range(args.warmup + args.repeats):
        a, b = tokens_per_s(one, r), tokens_per_s(two, r)
        if r >= args.warmup:
            s1.append(a)
            s2.append(b)
    ratio = [b / a for a, b in zip(s1, s2)]
    one.kill()
    two.kill()
    ray.kill(sandbox)
    return {"tokens_per_s_1": ci95(s1), "tokens_per_s_2": ci95(s2), "speedup": ci95(ratio),
            "efficiency": ci95([x / 2 for x in ratio])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true", help="one GPU per rank/replica instead of one pinned core")
    p.add_argument("--model", default="embedded")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--completion-len", type=int, default=96)
    p.add_argument("--questions", type=int, default=8)
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--only", choices=["learner", "rollout"], default=None)
    args = p.parse_args()

    import ray

    from selfplay.config import load_config
    from selfplay.run.rundir import RunDir

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, [f"model.name_or_path={args.model}", "engine.backend=hf", f"run_dir={tmp}/run",
                                 "executor.use_tools=false", "executor.max_turns=1",
                                 "executor.max_tokens_per_turn=64", "executor.temperature=1.0",
                                 "learner.micro_batch_tokens=1024", "learner.kl_coef=0.0", "ray.num_cpus=1"])
        rd = RunDir.create(cfg)
        ray.init(address="local", num_cpus=4, num_gpus=2 if args.gpu else 0, include_dashboard=False,
                 log_to_driver=False)
        try:
            out = {"device": "gpu" if args.gpu else "cpu (one pinned core per rank/replica)"}
            if args.only in (None, "learner"):
                out["learner"] = bench_learner(cfg, rd, args)
            if args.only in (None, "rollout"):
                out["rollout"] = bench_rollout(cfg, rd, args)
        finally:
            ray.shutdown()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
