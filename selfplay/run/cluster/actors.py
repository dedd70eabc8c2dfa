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
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from selfplay.config import RunConfig
from selfplay.run.console import redirect_output, relay_warnings_from
from selfplay.run.cluster.placement import actor_name
from selfplay.run.rundir import RunDir

log = logging.getLogger(__name__)
ACTOR_NAMES = ("sandbox", "verifier", "learner", "rollout")


def busy(method):
    """Accumulate the seconds an actor spends inside `method`; `busy_seconds()` reads and resets them. The
    driver subtracts them from an iteration's wall time to measure orchestration overhead."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        t0, wall = time.perf_counter(), time.time()
        try:
            return method(self, *args, **kwargs)
        finally:
            self.__dict__.setdefault("_busy", {})
            self._busy[method.__name__] = self._busy.get(method.__name__, 0.0) + time.perf_counter() - t0
            spans = self.__dict__.setdefault("_spans", [])
            spans.append((wall, time.time()))
            del spans[:-4096]  # bounded when nobody reads them (the synchronous loop does not)

    return wrapper


class _Busy:
    def busy_seconds(self) -> float:
        total = sum(self.__dict__.get("_busy", {}).values())
        self._busy = {}
        return total

    def busy_spans(self) -> list[tuple[float, float]]:
        """(start, end) wall-clock times of the busy calls since the last read: the async pipeline measures
        how long the learner and the rollout worker worked at the same time (`time/overlap`)."""
        spans, self._spans = self.__dict__.get("_spans", []), []
        return spans

    def probe(self, root: str, name: str) -> tuple[str, str | None]:
        """Write `root/probes/<name>` for the driver to read back: (this node's address, error or None)."""
        node = ray.util.get_node_ip_address()
        try:
            (Path(root) / "probes").mkdir(exist_ok=True)
            (Path(root) / "probes" / name).write_text(node)
        except OSError as e:
            return node, f"{type(e).__name__}: {e}"
        return node, None


class ActorStartError(RuntimeError):
    """An actor died between its creation and the first iteration (killed, out of memory, a crash at import)."""


class RunDirNotShared(RuntimeError):
    """An actor's node cannot see the run directory the driver uses."""


def check_run_dir(handles: dict[str, Any], rd: RunDir) -> None:
    """Every actor writes a probe file into the run directory and the driver reads each back: on a cluster
    without shared storage this fails at start, naming the node, instead of losing checkpoints later."""
    import uuid

    token = uuid.uuid4().hex[:8]
    answers = dict(zip(handles, ray.get([h.probe.remote(str(rd.root), f"{n}.{token}") for n, h in handles.items()])))
    for name, (node, error) in answers.items():
        f = rd.root / "probes" / f"{name}.{token}"
        if error or not f.exists():
            why = error or "its probe file does not reach the driver's copy"
            raise RunDirNotShared(f"actor {name} on node {node} cannot use run_dir {rd.root} ({why}): put run_dir on "
                                  f"storage every node mounts (driver node: {ray.util.get_node_ip_address()})")
        f.unlink()


def _own_log(rd: RunDir, name: str) -> None:
    """Inside an actor process: its stdout/stderr (and its children's: vLLM's engine core, C++ libraries)
    go to <run_dir>/logs/<name>.log instead of Ray's session directory or the driver's console."""
    if ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None:
        try:
            redirect_output(rd.logs / f"{name}.log")
            relay_warnings_from(name, rd.event)  # our own warnings also reach the driver's console
        except OSError:  # this node cannot see the run directory: the driver's probe (check_run_dir) says so
            pass


def _started(rd: RunDir, name: str) -> None:
    try:
        rd.event("actor_start", actor=name, pid=os.getpid(), node=ray.util.get_node_ip_address())
    except OSError:  # this node cannot see the run directory: the driver's probe (check_run_dir) says so
        pass


def ship_adapter_files(cfg: RunConfig) -> bool:
    """Adapters travel as bytes through Ray's object store when rollouts may run on other nodes (split
    placement) or on several replicas; colocated single-replica runs load the learner's directory as before."""
    return not cfg.ray.colocate or cfg.engine.replicas > 1


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

    @busy
    def same_many(self, a: list[str], b: list[str]) -> list[bool]:
        """Equivalence of answer pairs (the Agent0 agreement gate: proposer's answer vs the majority's)."""
        return [self.verifier.same(x, y) for x, y in zip(a, b)]

    def pid(self) -> int:
        return os.getpid()


class LearnerActor(_Busy):
    def __init__(self, cfg: RunConfig, rd: RunDir, name: str = "learner"):
        _own_log(rd, name)
        import torch

        from selfplay.learner.learner import Learner

        torch.set_num_threads(_threads(cfg))
        self.ship_files = ship_adapter_files(cfg)
        self.learner = Learner(cfg.model, cfg.learner, seed=cfg.seed)
        self.sharded = cfg.learner.strategy == "fsdp2" and cfg.learner.world_size > 1
        self.checkpoint = rd.state().get("checkpoint")
        if self.checkpoint and not self.sharded:  # a restart, or a resumed run: continue from the last commit
            self.learner.load_checkpoint(self.checkpoint)
        _started(rd, name)

    @busy
    def train_step(self, role: str, trajectories: list, weights: list[float] | None = None,
                   keep_advantage: list[bool] | None = None) -> tuple[dict[str, float], dict[str, float]]:
        """Metrics, and the advantages the step used (traj_id -> value) for the replay buffer to keep."""
        metrics = self.learner.train_step(role, trajectories, weights, keep_advantage=keep_advantage)
        return metrics, dict(self.learner.last_advantages)

    # ---------------------------------------------------------------- data-parallel ranks (run/ranks.py)
    def rendezvous(self) -> tuple[str, int]:
        from selfplay.learner.distributed import free_port

        return ray.util.get_node_ip_address(), free_port()

    def join(self, rank: int, world_size: int, address: str, port: int) -> None:
        import torch
        import torch.distributed as dist

        from selfplay.learner.distributed import init_group

        self.learner.dist = init_group(rank, world_size, address, port, sharded=self.sharded)
        with torch.no_grad():
            for params in self.learner._params.values():
                for p in params:
                    dist.broadcast(p.data, src=0)
        if self.sharded:  # fsdp2: shard, then every rank loads the committed checkpoint (a collective)
            self.learner.shard()
            if self.checkpoint:
                self.learner.load_checkpoint(self.checkpoint)

    @busy
    def train_shard(self, role: str, trajectories: list, weights: list[float] | None,
                    keep_advantage: list[bool] | None, steps: int) -> tuple[dict[str, float], dict[str, float]]:
        """This rank's share of a step; with nothing to train, it still takes part in the collectives."""
        if not self.sharded and not any(m for t in trajectories for m in t.loss_mask):
            self.learner.dist.idle_steps(self.learner, role, steps)
            return {}, {}
        metrics = self.learner.train_step(role, trajectories, weights, keep_advantage=keep_advantage)
        return metrics, dict(self.learner.last_advantages)

    @busy
    def train_parts(self, role: str, trajectories: list, weights: list[float] | None,
                    keep_advantage: list[bool] | None, parts: list[list[int]]
                    ) -> tuple[list[dict[str, float]], dict[str, float]]:
        """This rank's share of every mini-batch of a batch (run/ranks.py); with nothing at all to train on,
        it still takes part in every step's collectives."""
        if not trajectories and not self.sharded:  # fsdp2 ranks run every forward point (learner/fsdp.py)
            for _ in range(self.learner.cfg.ppo_epochs * len(parts)):
                self.learner.dist.idle_steps(self.learner, role, 1)
            return [], {}
        steps = self.learner.train_batch(role, trajectories, weights, keep_advantage=keep_advantage, parts=parts)
        return steps, dict(self.learner.last_advantages)

    @busy
    def train_batch(self, role: str, trajectories: list, weights: list[float] | None = None,
                    keep_advantage: list[bool] | None = None, updates: int = 1
                    ) -> tuple[list[dict[str, float]], dict[str, float]]:
        """Per-step metrics of `updates` mini-batch steps on the batch, and the advantages they used."""
        steps = self.learner.train_batch(role, trajectories, weights, keep_advantage=keep_advantage, updates=updates)
        return steps, dict(self.learner.last_advantages)

    @busy
    def export(self, role: str, out_dir: str):
        update = self.learner.export(role, out_dir)
        lead = self.learner.dist is None or self.learner.dist.rank == 0  # fsdp2: only rank 0 wrote the files
        if self.ship_files and lead and hasattr(update, "path"):  # replicas on other nodes read it from the object store
            from pathlib import Path

            update.files = {f.name: f.read_bytes() for f in Path(update.path).iterdir() if f.is_file()}
        return update

    def save_checkpoint(self, root: str) -> str:
        return str(self.learner.save_checkpoint(root))

    def versions(self) -> dict[str, int]:
        return dict(self.learner.policy_version)

    def pid(self) -> int:
        return os.getpid()


class RolloutActor(_Busy):
    def __init__(self, cfg: RunConfig, rd: RunDir, sandbox: Any, name: str = "rollout"):
        _own_log(rd, name)
        from selfplay.rollout.worker import RolloutWorker

        def run_many(codes: list[str], **kwargs: Any) -> list:
            return ray.get(sandbox.run_many.remote(codes, **kwargs))

        from selfplay.run.rundir import published_adapters
        from selfplay.types import AdapterUpdate

        adapters = [AdapterUpdate(role, info["path"], info["version"])
                    for role, info in published_adapters(rd.adapters).items()]
        self.worker = RolloutWorker(cfg, run_many, initial_adapters=adapters, threads=_threads(cfg))
        self._exports: list = []  # learner exports in flight (ObjectRefs), taken inside calls when they finish
        if cfg.loop.weight_sync == "between_requests":
            self.worker.take_updates_between_requests(self._finished_exports)
        _started(rd, name)

    def expect(self, refs: list) -> None:
        """The driver hands over the learner's export ObjectRefs (in a list: Ray would wait for bare ones) at
        launch; the engine loads each inside a rollout call once it is ready. The driver still pushes it later
        (update_weights), which keeps its bookkeeping where it was; the worker skips the reload then. The refs
        replace those of the last launch: by now the driver has pushed that update, and a kept ref would pin the
        old adapter's bytes in the object store."""
        self._exports = list(refs)

    def swaps(self) -> int:
        n, self.worker.swaps_in_call = self.worker.swaps_in_call, 0
        return n

    def _finished_exports(self) -> list:
        if not self._exports:
            return []
        from selfplay.rollout.worker import local_adapter

        ready, self._exports = ray.wait(self._exports, num_returns=len(self._exports), timeout=0)
        out = []
        for ref in ready:
            try:
                out.append(local_adapter(ray.get(ref)))
            except Exception as e:  # a failed export is the driver's to report (its publish raises it), not ours
                log.warning("learner export failed; the rollout keeps its adapter: %s", e)
        return out

    @busy
    def propose(self, count: int, pool_questions: list[str], seed: int) -> list:
        return self.worker.propose(count, pool_questions, seed)

    @busy
    def solve(self, questions: list[str], task_ids: list[str], n: int, seed: int | None = None) -> list:
        return self.worker.solve(questions, task_ids, n, seed)

    @busy
    def update_weights(self, update: Any) -> dict[str, int]:
        from selfplay.rollout.worker import local_adapter

        return self.worker.update_weights(local_adapter(update))

    def versions(self) -> dict[str, int]:
        return self.worker.versions()

    def evaluate(self, iteration: int, out_dir: str) -> dict[str, float]:
        return self.worker.evaluate(iteration, out_dir)

    def eval_shard(self, iteration: int, index: int, count: int) -> tuple[list[dict], str | None]:
        return self.worker.eval_shard(iteration, index, count)

    def eval_summary(self, records: list[dict], iteration: int, out_dir: str, adapter: str | None,
                     started: float) -> dict[str, float]:
        return self.worker.eval_summary(records, iteration, out_dir, adapter, started)

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
    rollout: Any  # the RolloutFleet (selfplay/run/cluster/fleet.py): one replica or many behind the router
    placement_group: Any = None

    @classmethod
    def start(cls, cfg: RunConfig, rd: RunDir) -> "Actors":
        """Create the actors where selfplay/run/cluster/placement.py says: colocated (debug, one GPU) or one
        placement-group bundle per learner rank and rollout replica (cluster)."""
        import torch

        from selfplay.run.cluster.fleet import RolloutFleet
        from selfplay.run.cluster.placement import bundles, plan

        slots = plan(cfg, cuda=torch.cuda.is_available())
        retry = dict(max_restarts=cfg.ray.max_actor_restarts, max_task_retries=cfg.ray.max_task_retries)
        pg = None
        if not cfg.ray.colocate:
            from ray.util.placement_group import placement_group

            pg = placement_group(bundles(slots), strategy="PACK")
            ray.get(pg.ready())
        by_name = {s.actor: s for s in slots}

        # OMP_WAIT_POLICY=PASSIVE (spinning OpenMP threads make torch ~13x slower when actors share a CPU) is
        # set by `import selfplay`, which every actor process runs before torch. Not through a runtime_env:
        # Ray then starts workers through a shell that splits a venv path with a space in it (workers die).
        def remote(klass: type, slot: str | None, **opts: Any):
            opts = {"num_cpus": 0, **retry, **opts}
            if slot:
                s = by_name[slot]
                opts["num_gpus"] = s.gpus
                if s.bundle is not None:
                    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

                    opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                        pg, placement_group_bundle_index=s.bundle)
            return ray.remote(klass).options(**opts)

        # threaded: the per-conversation rollout schedule sends the tool calls of many conversations at once
        sandbox = remote(SandboxActor, None, max_concurrency=max(2, cfg.executor.max_concurrent_tools)).remote(cfg, rd)
        verifier = remote(VerifierActor, None).remote(cfg, rd)
        try:
            check_sandbox_tool(sandbox)  # before any model loads: a run never trains on a broken tool
        except BaseException:
            ray.kill(verifier, no_restart=True)
            raise
        n = cfg.learner.world_size
        if n == 1:
            learner = remote(LearnerActor, "learner").remote(cfg, rd)
        else:
            from selfplay.run.cluster.ranks import LearnerGroup

            names = [actor_name("learner", i, n) for i in range(n)]
            # a restarted rank cannot rejoin the process group: the driver restarts the group instead
            # (selfplay/run/recovery.py), so Ray neither restarts a rank nor retries its call
            once = dict(max_restarts=0, max_task_retries=0)
            learner = LearnerGroup.form([remote(LearnerActor, nm, **once).remote(cfg, rd, nm) for nm in names],
                                        cfg.learner.ppo_epochs, cfg.learner.strategy == "fsdp2")
        m = cfg.engine.replicas
        # several replicas: a call on a dead one fails at once and the fleet re-sends it to the others
        extra = {} if m == 1 else {"max_task_retries": 0}

        def make_replica(i: int):
            name = actor_name("rollout", i, m)
            return remote(RolloutActor, name, **extra).remote(cfg, rd, sandbox, name)

        fleet = RolloutFleet(make_replica, m, group_size=cfg.proposer.group_size,
                             on_event=lambda kind, **f: rd.event(kind, **f))
        actors = cls(sandbox, verifier, learner, fleet, pg)
        ranks = learner.ranks if n > 1 else [learner]
        every = {"sandbox": sandbox, "verifier": verifier,
                 **{actor_name("learner", i, n): h for i, h in enumerate(ranks)},
                 **{actor_name("rollout", i, m): h for i, h in enumerate(fleet.handles)}}
        pids = {name: h.pid.remote() for name, h in every.items()}
        for name, ref in pids.items():  # surface start-up errors now, naming the actor that failed
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError as e:
                actors.stop()
                # the exception its constructor raised is the last line naming one (else Ray's own)
                named = [ln.strip() for ln in str(e).splitlines() if re.match(r"\s*[\w.]+(Error|Exception): ", ln)]
                why = (named[-1] if named else type(e).__name__)[:240]
                raise ActorStartError(f"the {name} actor died while the run was starting (its log: "
                                      f"{rd.logs / f'{name}.log'}): {why}") from None
        check_run_dir(every, rd)
        return actors

    def handles(self) -> list[Any]:
        """Every actor handle: learner ranks, rollout replicas, verifier, sandbox."""
        return [*getattr(self.learner, "ranks", [self.learner]), *self.rollout.handles, self.verifier, self.sandbox]

    def stop(self) -> None:
        self.rollout.kill()
        if hasattr(self.learner, "kill"):
            self.learner.kill()
        for a in (self.learner, self.verifier, self.sandbox):
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # already gone
                pass
        if self.placement_group is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.placement_group)


def restart_counts(rd: RunDir) -> dict[str, int]:
    """Starts beyond the first, per actor name, over this run's whole history (resumes start actors anew
    and are not counted: the driver records a `driver_start` event that resets the baseline; nor the fresh
    actors of a learner-group restart, after its `learner_restart` event: that restart is counted apart)."""
    counts: dict[str, int] = {}
    seen: dict[str, int] = {}
    for e in rd.read_events():
        if e.get("event") in ("driver_start", "learner_restart"):
            seen = {}
        elif e.get("event") == "actor_start":
            name = e["actor"]
            if seen.get(name):
                counts[name] = counts.get(name, 0) + 1
            seen[name] = seen.get(name, 0) + 1
    return counts


