"""One co-evolution iteration, Agent0-style (docs/anchors.md), each step its own function:

1. propose:        the proposer samples candidate tasks (groups of `proposer.group_size` per prompt);
2. solve + verify: the executor answers each parseable candidate k times with tools; majority vote -> p_hat;
3. reward:         proposer rewards (uncertainty + tool use - repetition) -> proposer trajectories;
4. admit:          candidates inside the difficulty band enter the task pool with their pseudo-labels;
5. practice:       the executor samples groups on pool tasks, rewarded against the pseudo-labels;
6. learn/publish:  GRPO/ADPO updates from the replay buffer; new adapters reach the rollout engine.

Steps talk to Ray actor handles (selfplay/run/cluster/actors.py); the math lives in roles/ and selfplay/learner/losses.py.
"""
from __future__ import annotations

import logging
import os
import random
import signal
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import ray

from roles.proposer_reward import score_batch
from selfplay.config import RunConfig
from selfplay.telemetry.metrics import TaskRecord, TrajectoryRecord
from selfplay.data.replay import ReplayBuffer
from selfplay.learner.batches import summarise_steps
from selfplay.run.rundir import record_published
from selfplay.run.rundir import RunDir
from selfplay.data.task_pool import PoolTask, TaskPool
from selfplay.types import Trajectory

log = logging.getLogger(__name__)
SANDBOX_STATUSES = ("ok", "error", "timeout", "memory_limit", "output_limit", "killed", "sandbox_error")


@dataclass
class Context:
    """What the steps share: config, run dir, actor handles, stores, the learner's policy versions."""

    cfg: RunConfig
    rd: RunDir
    actors: Any
    pool: TaskPool
    replay: ReplayBuffer
    versions: dict[str, int]
    stop_requested: Any = lambda: False  # callable: the driver's signal flag
    on_stage: Any = lambda stage: None  # callable: the driver's progress display
    known: Any = None  # KnownTasks (selfplay/evaluation/reference.py): reference-mode tasks and the probes
    inflight: dict = field(default_factory=dict)  # async pipeline (pipeline.py): learner steps in flight per role


class Scalars(dict):
    """An iteration's scalars, plus the stack of open `timed` stages that keeps `time/stage/*` disjoint."""

    def __init__(self) -> None:
        super().__init__()
        self.open: list[list] = []  # [stage, started_at] of the stages entered and not yet left


@dataclass
class IterationResult:
    scalars: dict[str, float] = field(default_factory=Scalars)
    tasks: list[TaskRecord] = field(default_factory=list)
    trajectories: list[TrajectoryRecord] = field(default_factory=list)


class StopRequested(Exception):
    """Raised at a safe point between steps after SIGINT/SIGTERM; the iteration is not committed."""


@contextmanager
def timed(scalars: dict[str, float], stage: str) -> Iterator[None]:
    """`time/<stage>`: seconds inside the block (nested blocks included). On a `Scalars`, also
    `time/stage/<stage>`: seconds exclusively in it (a nested stage pauses the one around it), so the
    stages are disjoint and, with `time/stage/other`, sum to the iteration's wall time."""
    t0 = time.perf_counter()
    stack = getattr(scalars, "open", None)
    if stack:
        outer = stack[-1]
        scalars[f"time/stage/{outer[0]}"] = scalars.get(f"time/stage/{outer[0]}", 0.0) + t0 - outer[1]
    if stack is not None:
        stack.append([stage, t0])
    try:
        yield
    finally:
        now = time.perf_counter()
        scalars[f"time/{stage}"] = scalars.get(f"time/{stage}", 0.0) + now - t0
        if stack is not None:
            _, since = stack.pop()
            scalars[f"time/stage/{stage}"] = scalars.get(f"time/stage/{stage}", 0.0) + now - since
            if stack:
                stack[-1][1] = now  # the outer stage resumes


def _seed(cfg: RunConfig, iteration: int, stage: int) -> int:
    return (cfg.seed * 1_000_003 + iteration * 101 + stage) % (2**31)


def _safe_point(ctx: Context, next_stage: str) -> None:
    """A safe point between steps: honour a stop request, else announce the next step."""
    if ctx.stop_requested():
        raise StopRequested()
    ctx.on_stage(next_stage)


@contextmanager
def stage(ctx: Context, iteration: int, name: str, safe_point: bool = True) -> Iterator[None]:
    """One top-level step of an iteration: a safe point (unless `safe_point=False`: the driver's evaluate and
    commit finish an iteration whose work is done), then `stage` events around it in events.jsonl
    ({"event": "stage", "iteration", "stage", "phase": "start"|"end"}); "end" only when the step returned.
    Tools and tests read them to see where a run is (tests kill the driver at exact boundaries)."""
    if safe_point:
        _safe_point(ctx, name)
    else:
        ctx.on_stage(name)
    ctx.rd.event("stage", iteration=iteration, stage=name, phase="start")
    pause_point(iteration)
    yield
    ctx.rd.event("stage", iteration=iteration, stage=name, phase="end")
    pause_point(iteration)


PAUSE_ENV = "SELFPLAY_PAUSE_AT_ITERATION"


def pause_point(iteration: int) -> None:
    """With `SELFPLAY_PAUSE_AT_ITERATION=N` (comma-separated list), the driver stops itself (SIGSTOP) right
    after writing each stage event of iteration N, and goes on when sent SIGCONT. A crash test freezes the
    run there, copies the run directory and sends SIGKILL, SIGTERM or SIGINT exactly at the boundary
    (tests/test_resume.py) instead of some milliseconds later. Unset (always, outside tests): nothing."""
    wanted = os.environ.get(PAUSE_ENV)
    if wanted and str(iteration) in wanted.split(","):
        os.kill(os.getpid(), signal.SIGSTOP)


# ---------------------------------------------------------------------------------------------- steps
def propose(ctx: Context, iteration: int) -> list:
    """Step 1: candidate tasks, conditioned on a few earlier pool tasks."""
    rng = random.Random(_seed(ctx.cfg, iteration, 1))
    examples = [t.question for t in ctx.pool.sample(8, rng)]
    return ray.get(ctx.actors.rollout.propose.remote(ctx.cfg.proposer.candidates_per_iteration, examples,
                                                     _seed(ctx.cfg, iteration, 2)))


def solve_and_vote(ctx: Context, iteration: int, proposals: list, scalars: dict[str, float]) -> tuple[dict, dict]:
    """Step 2: k executor answers per parseable candidate, then the verifier's vote on each."""
    ok = [p for p in proposals if p.task.ok]
    if not ok:
        return {}, {}
    with timed(scalars, "solve"):
        groups = ray.get(ctx.actors.rollout.solve.remote([p.task.question for p in ok], [p.task_id for p in ok],
                                                         ctx.cfg.executor.samples_per_task, _seed(ctx.cfg, iteration, 4)))
    with timed(scalars, "verify"):
        votes = ray.get(ctx.actors.verifier.vote_many.remote([[r.model_text for r in g] for g in groups]))
    return {p.task_id: g for p, g in zip(ok, groups)}, {p.task_id: v for p, v in zip(ok, votes)}


def reward_proposals(ctx: Context, proposals: list, rollouts: dict, votes: dict) -> list:
    """Step 3: Agent0 proposer rewards; returns one ProposerReward per proposal."""
    questions = [p.task.question if p.task.ok else None for p in proposals]
    p_hats = [votes[p.task_id].p_hat if p.task_id in votes else None for p in proposals]
    tools = [[r.n_tool_calls for r in rollouts.get(p.task_id, [])] for p in proposals]
    agrees: list[bool | None] = [None] * len(proposals)
    if ctx.cfg.proposer.require_agreement:  # Agent0's gate: is the majority answer the proposer's own?
        pairs = [(i, p.task.answer, votes[p.task_id].label) for i, p in enumerate(proposals)
                 if p.task.ok and p.task.answer and p.task_id in votes and votes[p.task_id].label is not None]
        if pairs:
            same = ray.get(ctx.actors.verifier.same_many.remote([a for _, a, _ in pairs], [b for *_, b in pairs]))
            for (i, _, _), ok in zip(pairs, same):
                agrees[i] = ok
    return score_batch(questions, p_hats, tools, ctx.cfg.proposer, agrees)


def admit(ctx: Context, iteration: int, proposals: list, votes: dict) -> tuple[list[PoolTask], dict[str, str]]:
    """Step 4: in-band candidates with a pseudo-label enter the pool; returns them and each reject reason."""
    candidates, reasons = [], {}
    for p in proposals:
        vote = votes.get(p.task_id)
        if not p.task.ok:
            reasons[p.task_id] = f"parse:{p.task.reason}"
        elif vote is None or vote.label is None:
            reasons[p.task_id] = "no_majority_answer"
        elif not vote.in_band:
            reasons[p.task_id] = "too_easy" if vote.p_hat > ctx.cfg.verifier.band_high else "too_hard"
        elif p.task.question in ctx.pool:
            reasons[p.task_id] = "duplicate"
        else:
            candidates.append(PoolTask(p.task_id, p.task.question, vote.label, vote.p_hat, iteration,
                                       {"tie": vote.tie, "k": vote.k}))
    return ctx.pool.add(candidates), reasons


def practice(ctx: Context, iteration: int, scalars: dict[str, float],
             tasks: list[PoolTask] | None = None) -> tuple[list[Trajectory], list]:
    """Step 5: executor groups on pool tasks (this iteration's first), rewarded against the pseudo-labels;
    or on the given `tasks` (reference mode: their labels are the true answers)."""
    cfg = ctx.cfg
    if tasks is None:
        rng = random.Random(_seed(cfg, iteration, 3))
        fresh = [t for t in ctx.pool.tasks if t.iteration == iteration][: cfg.executor.tasks_per_iteration]
        older = [t for t in ctx.pool.tasks if t.iteration != iteration]
        tasks = fresh + rng.sample(older, min(len(older), cfg.executor.tasks_per_iteration - len(fresh)))
    if not tasks:
        return [], []
    with timed(scalars, "practice"):
        groups = ray.get(ctx.actors.rollout.solve.remote([t.question for t in tasks], [t.task_id for t in tasks],
                                                         cfg.executor.group_size, _seed(cfg, iteration, 5)))
    flat = [r for g in groups for r in g]
    refs = [t.pseudo_label for t, g in zip(tasks, groups) for _ in g]
    with timed(scalars, "verify"):
        verdicts = ray.get(ctx.actors.verifier.match_many.remote([r.model_text for r in flat], refs))
    vc = cfg.verifier
    trajs, rollouts = [], []
    by_id = {t.task_id: t for t in tasks}
    for r, verdict in zip(flat, verdicts):
        reward = vc.format_penalty if verdict is None else vc.correct_reward if verdict else vc.wrong_reward
        t = r.to_trajectory(reward, p_hat=by_id[r.task_id].p_hat, policy_version=ctx.versions["executor"],
                            group_id=f"{iteration}:{r.task_id}")
        t.meta.update(iteration=iteration, correct=verdict, temperature=cfg.executor.temperature,
                      top_p=cfg.executor.top_p)
        trajs.append(t)
        rollouts.append(r)
    answered = [v for v in verdicts if v is not None]
    scalars["executor/accuracy"] = sum(bool(v) for v in verdicts) / len(verdicts)
    scalars["executor/reward_mean"] = sum(t.reward for t in trajs) / len(trajs)
    scalars["executor/format_rate"] = len(answered) / len(verdicts)
    scalars["executor/tasks"] = float(len(tasks))
    return trajs, rollouts


@dataclass
class Learning:
    """A role's update in flight: the learner call (None when there was nothing to train on), the ids it
    trains on, and the optimizer steps the config asked for."""

    role: str
    future: Any
    ids: list[str]
    requested: int


def learn(ctx: Context, role: str, updates: int) -> Learning:
    """Step 6a: one iteration's worth of replay groups for `role`, trained by the learner as `updates`
    mini-batches of whole groups, one optimizer step each, for `learner.ppo_epochs` passes (verl's batch
    semantics: the steps after the first train on data their policy did not sample, so the clip acts).
    Returns the pending call: the caller overlaps it with other work."""
    cfg = ctx.cfg
    requested = updates * cfg.learner.ppo_epochs
    if updates == 0:
        return Learning(role, None, [], 0)
    groups = cfg.proposer.candidates_per_iteration if role == "proposer" else cfg.executor.tasks_per_iteration
    batch = ctx.replay.sample(role, max_groups=groups, current_version=ctx.versions[role])
    if not len(batch):
        return Learning(role, None, [], requested)
    # self-imitation replays keep their stored advantage; fresh groups get theirs computed by the learner
    future = ctx.actors.learner.train_batch.remote(role, batch.trajectories, batch.weights, batch.replayed, updates)
    n_groups = len({t.group_id for t in batch.trajectories})
    ctx.replay.mark_consumed(batch.ids, ctx.versions[role] + min(updates, n_groups) * cfg.learner.ppo_epochs)
    return Learning(role, future, batch.ids, requested)


def finish_learning(ctx: Context, pending: Learning, scalars: dict[str, float]) -> None:
    """Step 6b: wait for the role's updates, publish its new adapter to the rollout engine."""
    role = pending.role
    if pending.future is None:
        if pending.requested:  # asked for steps, had no data: say so (learner/<role>/steps = 0)
            scalars[f"learner/{role}/steps"] = 0.0
            scalars[f"learner/{role}/steps_requested"] = float(pending.requested)
        return
    with timed(scalars, f"learn_{role}"):
        steps, advantages = ray.get(pending.future)
    summary = summarise_steps(steps, pending.requested)
    if summary["steps"] < pending.requested:
        log.warning("learner/%s: %d of %d requested optimizer steps ran (the batch had fewer groups than "
                    "loop.%s_updates, or no trained tokens)", role, summary["steps"], pending.requested, role)
    for k, v in summary.items():
        scalars[f"learner/{role}/{k}"] = float(v)
    # stored advantages are what self-imitation ranks by (replay.self_imitation_min_advantage)
    ctx.replay.set_advantages(advantages)
    ctx.versions.update(ray.get(ctx.actors.learner.versions.remote()))
    with timed(scalars, "weight_sync"):
        out_dir = ctx.rd.adapters / role / f"v{ctx.versions[role]:06d}"
        update = ray.get(ctx.actors.learner.export.remote(role, str(out_dir)))
        ray.get(ctx.actors.rollout.update_weights.remote(update))
        if hasattr(update, "path"):
            record_published(ctx.rd.adapters, role, update.path, update.version)


# ------------------------------------------------------------------------------------------ iteration
def run_iteration(ctx: Context, iteration: int) -> IterationResult:
    cfg, out = ctx.cfg, IterationResult()
    s = out.scalars
    t0 = time.perf_counter()

    with stage(ctx, iteration, "propose"), timed(s, "propose"):
        proposals = propose(ctx, iteration)
    with stage(ctx, iteration, "solve"):
        rollouts, votes = solve_and_vote(ctx, iteration, proposals, s)
        probe_rollouts = run_probes(ctx, iteration, s)
        check_sandbox(ctx, list(rollouts.values()) + [probe_rollouts])
    with stage(ctx, iteration, "reward"):
        with timed(s, "reward"):
            rewards = reward_proposals(ctx, proposals, rollouts, votes)
            proposer_trajs = []
            for p, r in zip(proposals, rewards):
                t = p.to_trajectory(r, policy_version=ctx.versions["proposer"])
                t.meta.update(iteration=iteration, temperature=cfg.proposer.temperature, top_p=cfg.proposer.top_p)
                proposer_trajs.append(t)
            ctx.replay.add(proposer_trajs)
            admitted, reasons = admit(ctx, iteration, proposals, votes)
        # The proposer's update touches only its adapter: it runs on the learner while the executor practises.
        proposer_learning = learn(ctx, "proposer", cfg.loop.proposer_updates)
    if not cfg.loop.overlap:
        with stage(ctx, iteration, "learn_proposer"):
            finish_learning(ctx, proposer_learning, s)
    with stage(ctx, iteration, "practice"):
        executor_trajs, practice_rollouts = practice(ctx, iteration, s)
        check_sandbox(ctx, list(rollouts.values()) + [practice_rollouts])
        ctx.replay.add(executor_trajs)
    if cfg.loop.overlap:
        with stage(ctx, iteration, "learn_proposer"):
            finish_learning(ctx, proposer_learning, s)
    with stage(ctx, iteration, "learn_executor"):
        finish_learning(ctx, learn(ctx, "executor", cfg.loop.executor_updates), s)

    _summarise(ctx, iteration, out, proposals, rewards, rollouts, votes, admitted, reasons, practice_rollouts,
               executor_trajs)
    s["time/tools"] = sum(c.duration_s for g in rollouts.values() for r in g for c in r.tool_calls) + sum(
        c.duration_s for r in practice_rollouts for c in r.tool_calls)
    close_timeline(ctx, s, t0)
    return out


def close_timeline(ctx: Context, s: dict[str, float], t0: float) -> None:
    """Busy seconds per actor since the last iteration: they overlap each other (and the driver's stages), so
    they are reported beside the stage split, never stacked with it. Orchestration = wall time no actor
    spent working (Ray calls, serialisation, driver bookkeeping); only meaningful when nothing overlaps."""
    cfg = ctx.cfg
    a = ctx.actors
    busy = dict(zip(("rollout", "verifier", "learner", "sandbox"),
                    ray.get([x.busy_seconds.remote() for x in (a.rollout, a.verifier, a.learner, a.sandbox)])))
    for name, sec in busy.items():
        s[f"time/busy/{name}"] = sec
    s.update(getattr(a.rollout, "scalars", dict)())  # rollout/* fleet health (several replicas only)
    finish_timeline(s, t0)
    if not cfg.loop.overlap:
        # the sandbox works inside rollout calls: not added again
        s["time/orchestration"] = max(0.0, s["time/total"] - sum(v for k, v in busy.items() if k != "sandbox"))
        s["time/orchestration_share"] = s["time/orchestration"] / s["time/total"]


def run_probes(ctx: Context, iteration: int, scalars: dict[str, float]) -> list:
    """`verifier.probes` known-answer tasks through solve-and-vote like proposed tasks, then the majority
    label checked against the truth (pseudo-label accuracy, selfplay/evaluation/reference.py). Their cost is
    `time/stage/probes`; they never reach the pool, the proposer's reward or the replay buffer."""
    from selfplay.evaluation.reference import ProbeOutcome, label_correct, pick, probe_metrics

    vc = ctx.cfg.verifier
    if not vc.probes or ctx.known is None or not ctx.known.probes:
        return []
    items = pick(ctx.known.probes, vc.probes, _seed(ctx.cfg, iteration, 4))
    k = ctx.cfg.executor.samples_per_task
    with timed(scalars, "probes"):
        groups = ray.get(ctx.actors.rollout.solve.remote([it.question for it in items],
                                                         [f"probe:{it.id}" for it in items], k,
                                                         _seed(ctx.cfg, iteration, 6)))
        texts = [[r.model_text for r in g] for g in groups]
        votes, verdicts = ray.get([ctx.actors.verifier.vote_many.remote(texts), ctx.actors.verifier.match_many.remote(
            [t for g in texts for t in g], [it.answer for it, g in zip(items, texts) for _ in g])])
    outcomes, i = [], 0
    for vote, g in zip(votes, groups):
        correct = verdicts[i: i + len(g)]
        i += len(g)
        outcomes.append(ProbeOutcome(vote.p_hat, label_correct(vote.agrees, correct), sum(bool(c) for c in correct),
                                     len(g)))
    scalars.update(probe_metrics(outcomes, vc.band_low, vc.band_high))
    return [r for g in groups for r in g]


def finish_timeline(s: dict[str, float], t0: float) -> None:
    """`time/total` and `time/stage/other`, the wall time in no named stage: the stages then sum to the total."""
    s["time/total"] = time.perf_counter() - t0
    named = sum(v for k, v in s.items() if k.startswith("time/stage/") and k != "time/stage/other")
    s["time/stage/other"] = max(0.0, s["time/total"] - named)


class SandboxUnhealthy(RuntimeError):
    """Too many tool calls failed inside the sandbox itself: the executor has no working tool."""


def _check_sandbox_actor(ctx: Context) -> None:
    """A dead sandbox actor breaks the tool even when this iteration's answers made no call."""
    actors = getattr(ctx, "actors", None)  # None: the health arithmetic alone (unit tests)
    if actors is None:
        return
    try:
        ray.get(actors.sandbox.pid.remote())
    except ray.exceptions.RayActorError as e:
        ctx.rd.event("sandbox_unhealthy", calls=0, errors=0, last_error=f"sandbox actor died: {type(e).__name__}")
        raise SandboxUnhealthy("sandbox broken: the sandbox actor died and was not restarted "
                               "(ray.max_actor_restarts); the executor has no working tool. Its log: "
                               "RUN/logs/sandbox.log; `python -m sandbox doctor` checks the sandbox itself.") from None


def check_sandbox(ctx: Context, groups) -> None:
    """Stop the run before it trains on a broken tool: more than `sandbox.max_error_rate` of this iteration's
    calls (at least `sandbox.min_calls_for_error_rate`) ended in `sandbox_error`."""
    _check_sandbox_actor(ctx)
    calls = [c for group in groups for r in group for c in r.tool_calls]
    failed = [c for c in calls if c.status == "sandbox_error"]
    sc = ctx.cfg.sandbox
    if len(calls) >= sc.min_calls_for_error_rate and len(failed) / len(calls) > sc.max_error_rate:
        detail = " ".join(failed[-1].observation.replace("```output", "").replace("```", "").split())[:300]
        msg = (f"sandbox broken: {len(failed)} of {len(calls)} tool calls failed inside the sandbox "
               f"(> sandbox.max_error_rate={sc.max_error_rate}); last error: {detail}. "
               f"Run `python -m sandbox doctor` to see which mechanism fails.")
        ctx.rd.event("sandbox_unhealthy", calls=len(calls), errors=len(failed), last_error=detail)
        raise SandboxUnhealthy(msg)



def executor_scalars(s: dict[str, float], rollouts: list) -> None:
    """The executor's tool health and answer rates over an iteration's rollouts (self-play and reference mode)."""
    statuses = Counter(st for r in rollouts for st in r.statuses)
    for st in SANDBOX_STATUSES:
        s[f"sandbox/status/{st}"] = float(statuses.get(st, 0))
    calls = sum(statuses.values())
    s["sandbox/calls"] = float(calls)
    s["sandbox/error_rate"] = statuses.get("sandbox_error", 0) / calls if calls else 0.0
    if rollouts:
        s["executor/tool_calls_mean"] = sum(r.n_tool_calls for r in rollouts) / len(rollouts)
        s["parse_failures/executor"] = float(sum(bool(r.malformed) for r in rollouts))
        s["executor/answer_rate"] = sum(r.answer is not None for r in rollouts) / len(rollouts)

def _summarise(ctx, iteration, out, proposals, rewards, rollouts, votes, admitted, reasons, practice_rollouts,
               executor_trajs) -> None:
    s = out.scalars
    n = max(1, len(proposals))
    parsed = [p for p in proposals if p.task.ok]
    s["tasks/proposed"] = float(len(proposals))
    s["proposer/parse_rate"] = len(parsed) / n
    s["parse_failures/proposer"] = float(len(proposals) - len(parsed))
    s["tasks/accepted"] = float(len(admitted))
    s["tasks/accepted_rate"] = len(admitted) / n
    s["pool/size"] = float(len(ctx.pool))
    s["proposer/reward_mean"] = sum(r.total for r in rewards) / n
    ok_rewards = [r for r in rewards if r.format_ok]
    for part in ("uncertainty", "tool", "repetition"):
        s[f"proposer/reward/{part}"] = sum(getattr(r, part) for r in ok_rewards) / max(1, len(ok_rewards))
    s["proposer/reward/agreement_gate"] = sum(r.gated for r in rewards) / n  # share the Agent0 gate zeroed
    all_rollouts = [r for g in rollouts.values() for r in g] + list(practice_rollouts)
    executor_scalars(s, all_rollouts)
    tokens = sum(len(r.completion_ids) for r in all_rollouts) + sum(len(p.completion_ids) for p in proposals)
    gen_time = sum(s.get(f"time/{k}", 0.0) for k in ("propose", "solve", "practice"))
    s["throughput/tokens_per_s"] = tokens / gen_time if gen_time else 0.0
    s["throughput/tokens"] = float(tokens)  # generated this iteration; the dashboard's tokens x-axis sums them
    s["replay/size"] = float(len(ctx.replay))
    s["replay/replayed_total"] = float(ctx.replay.counters["replayed"])  # self-imitation replays so far
    admitted_ids = {t.task_id for t in admitted}
    for p, r in zip(proposals, rewards):
        vote = votes.get(p.task_id)
        group = rollouts.get(p.task_id, [])
        agreement: dict[str, int] = {}
        if vote is not None:
            for a in vote.answers:
                if a is not None:
                    agreement[a.text] = agreement.get(a.text, 0) + 1
        out.tasks.append(TaskRecord(
            task_id=p.task_id, iteration=iteration, question=p.task.question or p.text,
            pseudo_label=vote.label if vote else None, p_hat=vote.p_hat if vote else None,
            proposer_reward=r.total,
            reward_components={"uncertainty": r.uncertainty, "tool": r.tool, "repetition": r.repetition,
                               "format_ok": r.format_ok, "gated": r.gated},
            agreement=agreement, n_samples=len(group),
            mean_tool_calls=(sum(x.n_tool_calls for x in group) / len(group)) if group else None,
            accepted=p.task_id in admitted_ids, reject_reason=reasons.get(p.task_id),
        ))
        for x in group[: ctx.cfg.metrics.verification_samples_per_task]:  # bounded: the store stays small
            correct = None if vote is None or vote.label is None else (x.answer is not None and bool(
                vote.agrees[x.sample_index]))
            out.trajectories.append(_record(x, iteration, correct, None))
    keep = ctx.cfg.metrics.trajectories_per_iteration
    for t, x in list(zip(executor_trajs, practice_rollouts))[:keep]:
        out.trajectories.append(_record(x, iteration, t.meta.get("correct"), t.reward, traj_id=t.traj_id))


def _record(r, iteration: int, correct, reward, traj_id: str | None = None) -> TrajectoryRecord:
    return TrajectoryRecord(
        traj_id=traj_id or f"{r.task_id}:{r.sample_index}:{iteration}", task_id=r.task_id, iteration=iteration,
        role="executor", text=r.text, reward=reward, correct=correct, n_tool_calls=r.n_tool_calls,
        sandbox_statuses=list(r.statuses), finish_reason=r.finish, answer=r.answer,
    )
