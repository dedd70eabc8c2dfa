"""The rollout side of a run as one plain class: an engine, the proposer and the executor on top of it.

Both roles share the engine's base model, each through its own LoRA adapter ("proposer", "executor"); the
learner publishes new adapters into `adapters_dir` and pushes them here. A restarted worker (Ray restarts
actors that die) reloads the latest published adapters from that directory, so it resumes the same policy.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any, Callable, Sequence

from roles.executor import Executor, Rollout
from roles.proposer import Proposal, Proposer
from selfplay.config import RunConfig
from selfplay.types import AdapterUpdate, WeightUpdate

PUBLISHED = "published.json"


def published_adapters(adapters_dir: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """role -> {"path", "version"} of the adapters last pushed to the engines."""
    f = Path(adapters_dir) / PUBLISHED
    return json.loads(f.read_text()) if f.exists() else {}


def record_published(adapters_dir: str | os.PathLike, role: str, path: str, version: int) -> None:
    from selfplay.rundir import write_atomic

    data = published_adapters(adapters_dir)
    data[role] = {"path": str(path), "version": int(version)}
    write_atomic(Path(adapters_dir) / PUBLISHED, json.dumps(data, indent=1))


class RolloutWorker:
    def __init__(self, cfg: RunConfig, run_many: Callable[..., list] | Any, adapters_dir: str | None = None,
                 threads: int | None = None):
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
        if adapters_dir:
            for role, info in published_adapters(adapters_dir).items():
                self.engine.update_weights(AdapterUpdate(role, info["path"], info["version"]))

    def _adapter(self, role: str) -> str | None:
        """The role's adapter once the learner has published one; the base model before that."""
        return role if role in self.engine.adapter_versions else None

    def propose(self, count: int, pool_questions: Sequence[str], seed: int) -> list[Proposal]:
        return self.proposer.propose(count, pool_questions, adapter=self._adapter("proposer"),
                                     rng=random.Random(seed))

    def solve(self, questions: Sequence[str], task_ids: Sequence[str], n: int) -> list[list[Rollout]]:
        return self.executor.rollout(questions, n=n, task_ids=task_ids, adapter=self._adapter("executor"))

    def evaluate(self, iteration: int, out_dir: str | None = None) -> dict[str, float]:
        """Held-out evaluation of the executor's current adapter (`eval` section), on this worker's engine."""
        from roles.verifier import Verifier
        from selfplay.evaluation import evaluate_during_training

        if self._verifier is None:
            self._verifier = Verifier(self.cfg.verifier)
        return evaluate_during_training(self.engine, self.executor, self._verifier, self.cfg.eval,
                                        iteration=iteration, out_dir=out_dir)

    def update_weights(self, update: WeightUpdate) -> dict[str, int]:
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
