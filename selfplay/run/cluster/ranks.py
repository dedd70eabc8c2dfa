"""The learner ranks as one handle: `learner.world_size` LearnerActors in a torch.distributed group
(selfplay/learner/distributed.py has the math), driven like the single learner actor.

`LearnerGroup` keeps the actor-call shape (`group.train_step.remote(...)` returns one ObjectRef), so the
loop overlaps learning with rollouts exactly as with one learner: the batch is split into token-balanced
shares of whole groups, each rank trains its share, and a zero-CPU Ray task merges the ranks' metrics and
advantages into the reference the caller waits on. Weights are identical on every rank after a step, so
export, checkpoints and versions come from rank 0; at start every rank loads the run's last committed
checkpoint (a resume restores every rank) and rank 0's trainable weights are broadcast once.
"""
from __future__ import annotations

from typing import Any, Callable

import ray

from selfplay.learner.batches import split_groups
from selfplay.learner.distributed import merge_metrics, shard_groups


@ray.remote(num_cpus=0)
def _merge(*results: tuple[dict, dict]) -> tuple[dict, dict]:
    advantages: dict[str, float] = {}
    for _, adv in results:
        advantages.update(adv)
    return merge_metrics([m for m, _ in results]), advantages


@ray.remote(num_cpus=0)
def _merge_steps(*results: tuple[list[dict], dict]) -> tuple[list[dict], dict]:
    """Every rank's per-step metrics merged step by step (all ranks took the same steps), and the advantages."""
    advantages: dict[str, float] = {}
    for _, adv in results:
        advantages.update(adv)
    n = max(len(steps) for steps, _ in results)
    merged = [merge_metrics([steps[j] for steps, _ in results if j < len(steps)]) for j in range(n)]
    return [m or {"skipped": 1.0} for m in merged], advantages


@ray.remote(num_cpus=0)
def _max(*values: float) -> float:
    return max(values)


@ray.remote(num_cpus=0)
def _first(*values: Any) -> Any:
    return values[0]


class _Call:
    def __init__(self, fn: Callable[..., Any]):
        self.remote = fn


class LearnerGroup:
    def __init__(self, ranks: list[Any], ppo_epochs: int = 1, sharded: bool = False):
        self.ranks = ranks
        self.ppo_epochs = ppo_epochs
        lead = ranks[0]
        # fsdp2 (`sharded`): gathering the full weights is a collective, so every rank exports and saves
        # (rank 0 writes); the caller gets rank 0's answer once all ranks are done
        on = (lambda f: _first.remote(*[f(r) for r in ranks])) if sharded else (lambda f: f(lead))
        self.train_step = _Call(self._train_step)
        self.train_batch = _Call(self._train_batch)
        self.export = _Call(lambda role, out_dir: on(lambda r: r.export.remote(role, out_dir)))
        self.save_checkpoint = _Call(lambda root: on(lambda r: r.save_checkpoint.remote(root)))
        self.versions = _Call(lambda: lead.versions.remote())
        self.pid = _Call(lambda: lead.pid.remote())
        self.busy_seconds = _Call(lambda: _max.remote(*[r.busy_seconds.remote() for r in ranks]))
        self.busy_spans = _Call(lambda: lead.busy_spans.remote())  # ranks step in lockstep: rank 0's spans

    @classmethod
    def form(cls, ranks: list[Any], ppo_epochs: int = 1, sharded: bool = False) -> "LearnerGroup":
        """Rendezvous at rank 0's node, every rank joins, rank 0's trainable weights reach all (fsdp2: and
        the model is sharded, then every rank loads the committed checkpoint)."""
        address, port = ray.get(ranks[0].rendezvous.remote())
        ray.get([r.join.remote(i, len(ranks), address, port) for i, r in enumerate(ranks)])
        return cls(ranks, ppo_epochs, sharded)

    def _train_step(self, role: str, trajectories: list, weights: list[float] | None = None,
                    keep_advantage: list[bool] | None = None):
        shards = shard_groups(trajectories, len(self.ranks))
        refs = []
        for rank, ix in zip(self.ranks, shards):
            refs.append(rank.train_shard.remote(
                role, [trajectories[i] for i in ix], None if weights is None else [weights[i] for i in ix],
                None if keep_advantage is None else [keep_advantage[i] for i in ix], self.ppo_epochs))
        return _merge.remote(*refs)

    def _train_batch(self, role: str, trajectories: list, weights: list[float] | None = None,
                     keep_advantage: list[bool] | None = None, updates: int = 1):
        """`updates` mini-batches of whole groups (Learner.train_batch), each sharded over the ranks; every
        rank gets its share of every mini-batch (maybe empty), so all ranks take the same optimizer steps."""
        parts = split_groups(trajectories, updates)
        per_rank: list[list[list[int]]] = [[[] for _ in parts] for _ in self.ranks]
        for j, part in enumerate(parts):
            for r, ix in enumerate(shard_groups([trajectories[i] for i in part], len(self.ranks))):
                per_rank[r][j] = [part[i] for i in ix]
        refs = []
        for rank, rparts in zip(self.ranks, per_rank):
            rows = [i for p in rparts for i in p]
            local, k = [], 0
            for p in rparts:
                local.append(list(range(k, k + len(p))))
                k += len(p)
            refs.append(rank.train_parts.remote(
                role, [trajectories[i] for i in rows], None if weights is None else [weights[i] for i in rows],
                None if keep_advantage is None else [keep_advantage[i] for i in rows], local))
        return _merge_steps.remote(*refs)

    def kill(self) -> None:
        for r in self.ranks:
            try:
                ray.kill(r, no_restart=True)
            except Exception:  # already gone
                pass
