"""One iteration of the reference-reward control (`loop.mode: reference`, RLVR): the proposer is off, the
executor practises on tasks with known answers (`reference` section) and is rewarded against the truth,
through the same rollout engine, sandbox, verifier, replay buffer and learner as self-play.

Steps (with the same stage events as self-play): `solve` runs only the verifier's probes (pseudo-label
accuracy, comparable with a self-play run's), `practice` draws `executor.tasks_per_iteration` training tasks
and samples `executor.group_size` answers each, `learn_executor` takes the GRPO steps and publishes.
"""
from __future__ import annotations

import random
import time

from selfplay.data.task_pool import PoolTask
from selfplay.run.loop import (Context, IterationResult, _record, _seed, check_sandbox,
                               close_timeline, executor_scalars, finish_learning, learn, practice, run_probes,
                               stage)


def reference_tasks(ctx: Context, iteration: int) -> list[PoolTask]:
    """This iteration's training tasks: a seeded draw from the training side (probes are never drawn); the
    label is the true answer and p_hat is unknown (so ADPO's ambiguity scaling does not apply)."""
    train = ctx.known.train
    n = min(ctx.cfg.executor.tasks_per_iteration, len(train))
    chosen = random.Random(_seed(ctx.cfg, iteration, 3)).sample(train, n)
    return [PoolTask(f"ref:{it.id}", it.question, str(it.answer), None, iteration,  # type: ignore[arg-type]
                     {"source": ctx.known.source}) for it in chosen]


def run_reference_iteration(ctx: Context, iteration: int) -> IterationResult:
    out = IterationResult()
    s = out.scalars
    t0 = time.perf_counter()
    with stage(ctx, iteration, "solve"):
        probe_rollouts = run_probes(ctx, iteration, s)
        check_sandbox(ctx, [probe_rollouts])
    with stage(ctx, iteration, "practice"):
        trajs, rollouts = practice(ctx, iteration, s, tasks=reference_tasks(ctx, iteration))
        check_sandbox(ctx, [rollouts])
        ctx.replay.add(trajs)
    with stage(ctx, iteration, "learn_executor"):
        finish_learning(ctx, learn(ctx, "executor", ctx.cfg.loop.executor_updates), s)

    s["reference/train_tasks"] = float(len(ctx.known.train))
    executor_scalars(s, rollouts)
    if rollouts:
        gen_time = s.get("time/practice", 0.0)
        s["throughput/tokens_per_s"] = sum(len(r.completion_ids) for r in rollouts) / gen_time if gen_time else 0.0
    s["replay/size"] = float(len(ctx.replay))
    s["time/tools"] = sum(c.duration_s for r in rollouts for c in r.tool_calls)
    for t, x in list(zip(trajs, rollouts))[: ctx.cfg.metrics.trajectories_per_iteration]:
        out.trajectories.append(_record(x, iteration, t.meta.get("correct"), t.reward, traj_id=t.traj_id))
    close_timeline(ctx, s, t0)
    return out
