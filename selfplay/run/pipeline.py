"""`loop.pipeline: async`: the rollout side produces iteration i while the learner trains on iteration i-1.

One asynchronous iteration i:

1. launch: the learner's steps on what earlier iterations committed to the replay buffer (iteration i-1's
   rollouts) are submitted to the learner actor, each role's adapter export chained right behind its steps;
   nothing waits for them;
2. rollout: propose, solve + vote, reward + admit, practice, exactly as in the synchronous loop, on the
   engine's current adapters. Between these stages a finished role's new adapter is pushed to the engine
   (the rollout worker takes it between two of its calls: nothing is drained, no stage waits for the learner);
3. join: wait for the learner's steps, push what is left. The last iteration also trains on its own
   rollouts (a drain), so a finished run has trained on everything it generated.

Staleness bound: a sample generated on policy version v is trained at version v + (steps in flight when
it was generated) at most, one iteration of steps. Before each rollout stage the loop joins a role whose
steps in flight exceed `replay.max_staleness` (then the pipeline runs synchronously for it), and the replay
buffer drops (or down-weights) anything older at sampling time; truncated IS against the behaviour
logprobs and PPO clipping correct what remains (docs/pipeline.md). Like prime-rl's `max_off_policy_steps`
and TRL AsyncGRPO's `max_staleness`; verl's fully-async trainer and AReaL measure the gains.

Commit and resume stay exact: the driver commits an iteration after the join, so the checkpoint holds every
step on iteration i-1's rollouts and the replay buffer holds iteration i's rollouts, not yet consumed. A
resume (or a kill anywhere in iteration i+1) rolls the buffer back to that commit (consumption by later
steps forgotten, later rollouts dropped), and the next iteration's launch trains on iteration i's rollouts
again: committed before the checkpoint, trained once, never lost, never twice.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import ray

from selfplay.learner.batches import summarise_steps
from selfplay.run.loop import (Context, IterationResult, admit, check_sandbox, close_timeline, learn, practice,
                               propose, reward_proposals, run_probes, solve_and_vote, stage, timed, _summarise)
from selfplay.run.rundir import record_published

ROLES = ("proposer", "executor")


@dataclass
class InFlight:
    """A role's learner call(s) submitted and not yet joined."""

    futures: list
    export: Any  # ObjectRef of the adapter export queued behind the steps
    staleness: list[int] = field(default_factory=list)  # per trained sample: versions behind the policy it updates
    requested: int = 1  # optimizer steps asked of the `train_batch` call


def overlap_seconds(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Seconds during which some span of `a` and some span of `b` were both open (each list's spans are
    merged first, so overlapping calls of one actor do not count twice)."""
    def merged(spans):
        out: list[list[float]] = []
        for s, e in sorted(spans):
            if out and s <= out[-1][1]:
                out[-1][1] = max(out[-1][1], e)
            else:
                out.append([s, e])
        return out

    total, ma, mb = 0.0, merged(a), merged(b)
    i = j = 0
    while i < len(ma) and j < len(mb):
        total += max(0.0, min(ma[i][1], mb[j][1]) - max(ma[i][0], mb[j][0]))
        if ma[i][1] < mb[j][1]:
            i += 1
        else:
            j += 1
    return total


def staleness_stats(values: list[int]) -> dict[str, float]:
    if not values:
        return {}
    return {"staleness_mean": sum(values) / len(values), "staleness_max": float(max(values))}


def launch(ctx: Context, role: str, updates: int) -> None:
    """Submit the role's update on the replay buffer's ready groups (marked consumed now) and the export."""
    if role in ctx.inflight:
        raise RuntimeError(f"{role}: learner steps already in flight")
    start = ctx.versions[role]
    pending = learn(ctx, role, updates)  # one learner call running `updates` mini-batch steps (loop.Learning)
    if pending.future is None:
        return
    futures, ids, requested = [pending.future], pending.ids, pending.requested
    born = {t.traj_id: t.policy_version for t in ctx.replay.trajectories(role)}
    staleness = [start - born[i] for i in ids if i in born]
    out_dir = ctx.rd.adapters / role / f"v{start + requested:06d}"  # the version it should reach
    export = ctx.actors.learner.export.remote(role, str(out_dir))
    if role == "executor" and ctx.cfg.loop.weight_sync == "between_requests":  # loaded inside a rollout call
        ray.get(ctx.actors.rollout.expect.remote([export]))
    ctx.inflight[role] = InFlight(futures, export, staleness, requested)


def publish(ctx: Context, role: str, scalars: dict[str, float]) -> None:
    """Wait for the role's steps (if still running), keep their metrics and advantages, push the adapter."""
    job = ctx.inflight.pop(role)
    with timed(scalars, f"learn_{role}"):
        results = ray.get(job.futures)
        update = ray.get(job.export)
    steps, advantages = results[0]
    metrics = summarise_steps(steps, job.requested)
    for k, v in metrics.items():
        scalars[f"learner/{role}/{k}"] = float(v)
    scalars.update({f"learner/{role}/{k}": v for k, v in staleness_stats(job.staleness).items()})
    ctx.replay.set_advantages(advantages)
    with timed(scalars, "weight_sync"):
        ray.get(ctx.actors.rollout.update_weights.remote(update))
    if hasattr(update, "path"):
        record_published(ctx.rd.adapters, role, update.path, update.version)
    ctx.versions[role] = int(update.version)


def publish_ready(ctx: Context, scalars: dict[str, float]) -> None:
    """Between rollout stages: push every role whose steps have finished; join any role whose steps in
    flight would leave the next rollouts more than `replay.max_staleness` versions behind."""
    for role in list(ctx.inflight):
        job = ctx.inflight[role]
        done, _ = ray.wait([job.export], timeout=0)
        if done or job.requested > ctx.cfg.replay.max_staleness:
            publish(ctx, role, scalars)


def join(ctx: Context, scalars: dict[str, float]) -> None:
    for role in ROLES:
        if role in ctx.inflight:
            publish(ctx, role, scalars)


def launch_all(ctx: Context) -> None:
    updates = {"proposer": ctx.cfg.loop.proposer_updates, "executor": ctx.cfg.loop.executor_updates}
    for role in ROLES:
        launch(ctx, role, updates[role])


def run_async_iteration(ctx: Context, iteration: int) -> IterationResult:
    cfg, out = ctx.cfg, IterationResult()
    s = out.scalars
    t0 = time.perf_counter()
    if ctx.inflight:
        raise RuntimeError("learner steps of an earlier iteration are still in flight")
    launch_all(ctx)  # iteration i-1's rollouts (or, after a resume, the committed iteration's)

    publish_ready(ctx, s)
    proposer_version = ctx.versions["proposer"]  # what `propose` samples with (pushes happen between stages)
    with stage(ctx, iteration, "propose"), timed(s, "propose"):
        proposals = propose(ctx, iteration)
    publish_ready(ctx, s)
    with stage(ctx, iteration, "solve"):
        rollouts, votes = solve_and_vote(ctx, iteration, proposals, s)
        probe_rollouts = run_probes(ctx, iteration, s)
        check_sandbox(ctx, list(rollouts.values()) + [probe_rollouts])
    with stage(ctx, iteration, "reward"), timed(s, "reward"):
        rewards = reward_proposals(ctx, proposals, rollouts, votes)
        proposer_trajs = []
        for p, r in zip(proposals, rewards):
            t = p.to_trajectory(r, policy_version=proposer_version)
            t.meta.update(iteration=iteration, temperature=cfg.proposer.temperature)
            proposer_trajs.append(t)
        admitted, reasons = admit(ctx, iteration, proposals, votes)
    publish_ready(ctx, s)
    with stage(ctx, iteration, "practice"):
        executor_trajs, practice_rollouts = practice(ctx, iteration, s)
        check_sandbox(ctx, list(rollouts.values()) + [practice_rollouts])
    # Both roles' rollouts enter the buffer together, after the last rollout stage: a stop or a kill before
    # this point leaves nothing of the iteration behind
    ctx.replay.add(proposer_trajs)
    ctx.replay.add(executor_trajs)
    with stage(ctx, iteration, "learn_proposer"):
        if "proposer" in ctx.inflight:
            publish(ctx, "proposer", s)
    with stage(ctx, iteration, "learn_executor"):
        if "executor" in ctx.inflight:
            publish(ctx, "executor", s)
        if iteration == cfg.loop.iterations:  # drain: the run's last rollouts are trained too
            launch_all(ctx)
            join(ctx, s)

    _summarise(ctx, iteration, out, proposals, rewards, rollouts, votes, admitted, reasons, practice_rollouts,
               executor_trajs)
    s["time/tools"] = sum(c.duration_s for g in rollouts.values() for r in g for c in r.tool_calls) + sum(
        c.duration_s for r in practice_rollouts for c in r.tool_calls)
    a = ctx.actors
    if cfg.loop.weight_sync == "between_requests":
        s["rollout/swaps_in_call"] = float(ray.get(a.rollout.swaps.remote()))
    s["time/overlap"] = overlap_seconds(*ray.get([a.rollout.busy_spans.remote(), a.learner.busy_spans.remote()]))
    close_timeline(ctx, s, t0)
    for k in ("time/orchestration", "time/orchestration_share"):  # wall time minus busy time: not with overlap
        s.pop(k, None)
    return out
