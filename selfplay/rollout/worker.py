"""The rollout side of a run as one plain class: an engine, the proposer and the executor on top of it.

Both roles share the engine's base model, each through its own LoRA adapter ("proposer", "executor"); the
learner publishes new adapters and pushes them here. A restarted worker (Ray restarts actors that die) is
given the last published adapters (`initial_adapters`, read from the run directory by its actor shell), so it
resumes the same policy.
"""
from __future__ import annotations

import os
import random
from typing import Any, Callable, Sequence

from roles.executor import Executor, Rollout
from roles.proposer import Proposal, Proposer
from selfplay.config import RunConfig
from selfplay.types import AdapterUpdate, WeightUpdate


class RolloutWorker:
    def __init__(self, cfg: RunConfig, run_many: Callable[..., list] | Any,
                 initial_adapters: Sequence[AdapterUpdate] = (), threads: int | None = None):
        if threads:
            import torch

            torch.set_num_threads(threads)
        from selfplay.engines import make_engine

        self.cfg = cfg
        self._verifier = None  # created on the first evaluation
        self.engine = make_engine(cfg.model, cfg.engine, seed=cfg.seed)
        self.proposer = Proposer(self.engine, cfg.proposer)
        self.executor = Executor(self.engine, run_many, cfg.executor, max_model_len=cfg.model.max_model_len,
                                 tool_timeout_s=cfg.sandbox.timeout_s)
        for update in initial_adapters:
            self.engine.update_weights(update)
        self._incoming: Callable[[], list[WeightUpdate]] | None = None
        self._early: dict[str, int] = {}  # role -> version loaded inside a call, before the driver's push
        self.swaps_in_call = 0

    def take_updates_between_requests(self, incoming: Callable[[], list[WeightUpdate]]) -> None:
        """`loop.weight_sync=between_requests`: during a per-conversation rollout the thread driving the engine
        calls `incoming()` before each request and engine step and loads any newer executor adapter it returns;
        requests submitted after that use it, requests in flight finish on the old one (the engine keeps it
        loaded until they do), and each rollout records the oldest version it sampled with. Only the executor's
        adapter: it is the one a rollout call samples with (the proposer's samples in `propose`, one call)."""
        self._incoming = incoming
        self.executor.between_requests = self._swap
        self.executor.role_adapter = "executor"

    def _swap(self) -> None:
        for update in self._incoming() if self._incoming is not None else ():
            if not isinstance(update, AdapterUpdate) or update.name != "executor":
                continue
            if update.version > self.engine.adapter_versions.get(update.name, -1):
                self.engine.update_weights(update)
                self._early[update.name] = update.version
                self.swaps_in_call += 1

    def _adapter(self, role: str) -> str | None:
        """The role's adapter once the learner has published one; the base model before that."""
        return role if role in self.engine.adapter_versions else None

    def propose(self, count: int, pool_questions: Sequence[str], seed: int) -> list[Proposal]:
        self.engine.reseed(seed)
        return self.proposer.propose(count, pool_questions, adapter=self._adapter("proposer"),
                                     rng=random.Random(seed))

    def solve(self, questions: Sequence[str], task_ids: Sequence[str], n: int,
              seed: int | None = None) -> list[list[Rollout]]:
        """`n` rollouts per question; with `seed`, what is sampled depends on it and the inputs only, not on
        earlier calls (every request seeded from it; the engine's own source restarted from it too)."""
        if seed is not None:
            self.engine.reseed(seed)
        return self.executor.rollout(questions, n=n, task_ids=task_ids, adapter=self._adapter("executor"), seed=seed)

    def evaluate(self, iteration: int, out_dir: str | None = None) -> dict[str, float]:
        """Held-out evaluation of the executor's current adapter (`eval` section), on this worker's engine."""
        from selfplay.evaluation.evaluate import evaluate_during_training

        self.engine.reseed((self.cfg.seed * 1_000_003 + iteration * 101 + 7) % 2**31)
        return evaluate_during_training(self.engine, self.executor, self.verifier(), self.cfg.eval,
                                        iteration=iteration, out_dir=out_dir)

    def eval_shard(self, iteration: int, index: int, count: int) -> tuple[list[dict], str | None]:
        """This replica's share of an evaluation spread over `count` replicas (records, adapter)."""
        from selfplay.evaluation.evaluate import eval_shard

        self.engine.reseed((self.cfg.seed * 1_000_003 + iteration * 101 + 7 + 7919 * index) % 2**31)
        return eval_shard(self.engine, self.executor, self.verifier(), self.cfg.eval, index=index, count=count)

    def eval_summary(self, records: list[dict], iteration: int, out_dir: str | None, adapter: str | None,
                     started: float) -> dict[str, float]:
        """The scalars of every replica's records (`eval_shard`), written under `out_dir`."""
        from selfplay.evaluation.evaluate import eval_summary

        return eval_summary(records, self.cfg.eval, self.verifier(), adapter, iteration, out_dir, started)

    def verifier(self) -> Any:
        """The verifier evaluation scores with (created on first use)."""
        if self._verifier is None:
            from roles.verifier import Verifier

            self._verifier = Verifier(self.cfg.verifier)
        return self._verifier

    def update_weights(self, update: WeightUpdate) -> dict[str, int]:
        name = getattr(update, "name", None)
        if name is not None and self._early.get(name) == update.version == self.engine.adapter_versions.get(name):
            del self._early[name]  # the driver's push of what a call already loaded: nothing to reload
            return self.engine.adapter_versions
        self._early.pop(name, None)
        self.engine.update_weights(update)
        return self.engine.adapter_versions

    def versions(self) -> dict[str, int]:
        return self.engine.adapter_versions

    def pid(self) -> int:
        return os.getpid()

    def close(self) -> None:
        if self._verifier is not None:
            self._verifier.close()
        self.engine.close()


def local_adapter(update: Any) -> Any:
    """An adapter that travelled through Ray's object store (`files`) is written to this node's disk and
    loaded from there: a replica on another node never needs the learner's path."""
    if not isinstance(update, AdapterUpdate) or not update.files:
        return update
    import tempfile
    from pathlib import Path

    root = Path(tempfile.gettempdir()) / f"selfplay-adapters-{os.getpid()}" / f"{update.name}-v{update.version:06d}"
    root.mkdir(parents=True, exist_ok=True)
    for name, data in update.files.items():
        (root / name).write_bytes(data)
    # keep this version and the one before it (versions may step by more than one; requests still in flight
    # on the previous one may need its files: loop.weight_sync=between_requests)
    for old in sorted(p for p in root.parent.glob(f"{update.name}-v*") if p.name < root.name)[:-1]:
        import shutil

        shutil.rmtree(old, ignore_errors=True)
    return AdapterUpdate(update.name, str(root), update.version)
