"""Ray actor shells: each wraps a plain class (RolloutWorker, Learner, Verifier, SandboxPool) with nothing but
placement, restart policy and a start-up record.

Restarts: every actor is created with `max_restarts` / `max_task_retries` from the config, so Ray restarts
one that dies (killed, out of memory) and retries the call that was in flight. Each start appends an
`actor_start` event to the run's events.jsonl; the driver counts restarts from them (metric
`faults/actor_restarts`). A restarted learner reloads the run's last committed checkpoint; a restarted
rollout worker reloads the last published adapters.
"""
from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass
from typing import Any

import ray

from selfplay.config import RunConfig
from selfplay.run.console import redirect_output
from selfplay.run.rundir import RunDir

ACTOR_NAMES = ("sandbox", "verifier", "learner", "rollout")


def busy(method):
    """Accumulate the seconds an actor spends inside `method`; `busy_seconds()` reads and resets them. The
    driver subtracts them from an iteration's wall time to measure orchestration overhead."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return method(self, *args, **kwargs)
        finally:
            self.__dict__.setdefault("_busy", {})
            self._busy[method.__name__] = self._busy.get(method.__name__, 0.0) + time.perf_counter() - t0

    return wrapper


class _Busy:
    def busy_seconds(self) -> float:
        total = sum(self.__dict__.get("_busy", {}).values())
        self._busy = {}
        return total


def _own_log(rd: RunDir, name: str) -> None:
    """Inside an actor process: its stdout/stderr (and its children's: vLLM's engine core, C++ libraries)
    go to <run_dir>/logs/<name>.log instead of Ray's session directory or the driver's console."""
    if ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None:
        redirect_output(rd.logs / f"{name}.log")


def _started(rd: RunDir, name: str) -> None:
    rd.event("actor_start", actor=name, pid=os.getpid(), node=ray.util.get_node_ip_address())


def _threads(cfg: RunConfig) -> int:
    return cfg.ray.num_cpus or os.cpu_count() or 1


class SandboxActor(_Busy):
    def __init__(self, cfg: RunConfig, rd: RunDir):
        _own_log(rd, "sandbox")
        from sandbox import SandboxPool

        self.pool = SandboxPool.from_config(cfg.sandbox)
        _started(rd, "sandbox")

    @busy
    def run_many(self, codes: list[str], **kwargs: Any) -> list:
        return self.pool.run_many(codes, **kwargs)

    def self_test(self) -> list:
        """`sandbox.self_test` on this actor's pool: print, numpy+sympy, a file written and read, a timeout."""
        from sandbox import self_test

        return self_test(self.pool)

    def pid(self) -> int:
        return os.getpid()


class VerifierActor(_Busy):
    def __init__(self, cfg: RunConfig, rd: RunDir):
        _own_log(rd, "verifier")
        from roles.verifier import Verifier

        self.verifier = Verifier(cfg.verifier)
        _started(rd, "verifier")

    @busy
    def vote_many(self, groups: list[list[str | None]]) -> list:
        return [self.verifier.vote(texts) for texts in groups]

    @busy
    def match_many(self, texts: list[str | None], references: list[str]) -> list[bool | None]:
        """Per completion: True/False against its reference, None when it has no final answer."""
        return [None if self.verifier.extract(t) is None else self.verifier.matches(t, ref)
                for t, ref in zip(texts, references)]

    def pid(self) -> int:
        return os.getpid()


class LearnerActor(_Busy):
    def __init__(self, cfg: RunConfig, rd: RunDir):
        _own_log(rd, "learner")
        import torch

        from selfplay.learner.learner import Learner

        torch.set_num_threads(_threads(cfg))
        self.learner = Learner(cfg.model, cfg.learner, seed=cfg.seed)
        ckpt = rd.state().get("checkpoint")
        if ckpt:  # a restart, or a resumed run: continue from the last committed iteration
            self.learner.load_checkpoint(ckpt)
        _started(rd, "learner")

    @busy
    def train_step(self, role: str, trajectories: list, weights: list[float] | None = None,
                   keep_advantage: list[bool] | None = None) -> tuple[dict[str, float], dict[str, float]]:
        """Metrics, and the advantages the step used (traj_id -> value) for the replay buffer to keep."""
        metrics = self.learner.train_step(role, trajectories, weights, keep_advantage=keep_advantage)
        return metrics, dict(self.learner.last_advantages)

    @busy
    def export(self, role: str, out_dir: str):
        return self.learner.export(role, out_dir)

    def save_checkpoint(self, root: str) -> str:
        return str(self.learner.save_checkpoint(root))

    def versions(self) -> dict[str, int]:
        return dict(self.learner.policy_version)

    def pid(self) -> int:
        return os.getpid()


class RolloutActor(_Busy):
    def __init__(self, cfg: RunConfig, rd: RunDir, sandbox: Any):
        _own_log(rd, "rollout")
        from selfplay.rollout.worker import RolloutWorker

        def run_many(codes: list[str], **kwargs: Any) -> list:
            return ray.get(sandbox.run_many.remote(codes, **kwargs))

        from selfplay.run.rundir import published_adapters
        from selfplay.types import AdapterUpdate

        adapters = [AdapterUpdate(role, info["path"], info["version"])
                    for role, info in published_adapters(rd.adapters).items()]
        self.worker = RolloutWorker(cfg, run_many, initial_adapters=adapters, threads=_threads(cfg))
        _started(rd, "rollout")

    @busy
    def propose(self, count: int, pool_questions: list[str], seed: int) -> list:
        return self.worker.propose(count, pool_questions, seed)

    @busy
    def solve(self, questions: list[str], task_ids: list[str], n: int) -> list:
        return self.worker.solve(questions, task_ids, n)

    @busy
    def update_weights(self, update: Any) -> dict[str, int]:
        return self.worker.update_weights(update)

    def evaluate(self, iteration: int, out_dir: str) -> dict[str, float]:
        return self.worker.evaluate(iteration, out_dir)

    def pid(self) -> int:
        return os.getpid()


def check_sandbox_tool(sandbox: Any) -> None:
    """Raise `SandboxSelfTestFailed` (one line: the failing checks and their fixes) unless the sandbox actor's
    pool passes its self-test; the actor is stopped then."""
    from sandbox import SandboxSelfTestFailed, failures

    message = failures(ray.get(sandbox.self_test.remote()))
    if message:
        ray.kill(sandbox, no_restart=True)
        raise SandboxSelfTestFailed(message)


@dataclass
class Actors:
    sandbox: Any
    verifier: Any
    learner: Any
    rollout: Any
    placement_group: Any = None

    @classmethod
    def start(cls, cfg: RunConfig, rd: RunDir) -> "Actors":
        """Create the actors. Colocated (debug, one GPU): all share the node, fractional GPUs from
        `ray.gpus`. Split (cluster): a placement group with one bundle for the learner and one for rollouts."""
        import torch

        gpus = dict(cfg.ray.gpus)
        if not gpus and cfg.ray.colocate and torch.cuda.is_available():
            gpus = {"learner": 0.5, "rollout": 0.5}  # one GPU shared by training and generation
        retry = dict(max_restarts=cfg.ray.max_actor_restarts, max_task_retries=cfg.ray.max_task_retries)
        pg, sched = None, {}
        if not cfg.ray.colocate:
            from ray.util.placement_group import placement_group
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            pg = placement_group([{"CPU": 1, "GPU": gpus.get("learner", 0)},
                                  {"CPU": 1, "GPU": gpus.get("rollout", 0)}], strategy="PACK")
            ray.get(pg.ready())
            sched = {role: PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i)
                     for i, role in enumerate(("learner", "rollout"))}

        # Spinning OpenMP threads make torch ~13x slower when two actors share a CPU (docs/bench-rollout.md).
        env = {"runtime_env": {"env_vars": {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}}}

        def remote(klass: type, role: str | None, **opts: Any):
            opts = {"num_cpus": 0, **retry, **env, **opts}
            if role:
                opts["num_gpus"] = gpus.get(role, 0)
                if role in sched:
                    opts["scheduling_strategy"] = sched[role]
            return ray.remote(klass).options(**opts)

        sandbox = remote(SandboxActor, None).remote(cfg, rd)
        verifier = remote(VerifierActor, None).remote(cfg, rd)
        try:
            check_sandbox_tool(sandbox)  # before any model loads: a run never trains on a broken tool
        except BaseException:
            ray.kill(verifier, no_restart=True)
            raise
        learner = remote(LearnerActor, "learner").remote(cfg, rd)
        rollout = remote(RolloutActor, "rollout").remote(cfg, rd, sandbox)
        actors = cls(sandbox, verifier, learner, rollout, pg)
        ray.get([a.pid.remote() for a in (sandbox, verifier, learner, rollout)])  # surface start-up errors now
        return actors

    def stop(self) -> None:
        for a in (self.rollout, self.learner, self.verifier, self.sandbox):
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # already gone
                pass
        if self.placement_group is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.placement_group)


def restart_counts(rd: RunDir) -> dict[str, int]:
    """Starts beyond the first, per actor name, over this run's whole history (resumes start actors anew
    and are not counted: the driver records a `driver_start` event that resets the baseline)."""
    counts: dict[str, int] = {}
    seen: dict[str, int] = {}
    for e in rd.read_events():
        if e.get("event") == "driver_start":
            seen = {}
        elif e.get("event") == "actor_start":
            name = e["actor"]
            if seen.get(name):
                counts[name] = counts.get(name, 0) + 1
            seen[name] = seen.get(name, 0) + 1
    return counts


