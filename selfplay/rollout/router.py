"""Which rollout replica serves which request: least-loaded, sticky per task. A plain class (no Ray).

The unit of routing is a whole task: all samples of one task (its GRPO group, or its k votes) go to one
replica in one call, and the executor's multi-turn tool loop runs inside that replica's worker, so a
conversation never leaves the replica that started it and the engine's prefix cache sees every turn.
Across calls a task sticks to the replica that served it before (the k-sample vote and the practice group
of the same question share a prompt prefix) unless that replica is already busier than the least-loaded
one by more than `slack` requests of the same size: sticky least-loaded routing, as in SkyRL's router and
prime-rl's prefix-affinity router. Load is the work a replica holds: assigned and not yet completed, in
sampled sequences.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Sequence


class NoReplicaAlive(RuntimeError):
    """Every replica is marked dead: nothing can serve the request."""


@dataclass
class Router:
    replicas: int
    slack: float = 1.0  # how many requests' worth of extra load a sticky replica may carry
    affinity_capacity: int = 65536  # tasks remembered (least recently used forgotten first)
    load: list[float] = field(init=False)
    alive: list[bool] = field(init=False)
    affinity: "OrderedDict[str, int]" = field(init=False)
    sticky_hits: int = field(default=0, init=False)  # requests that went back to their task's replica

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {self.replicas}")
        self.load = [0.0] * self.replicas
        self.alive = [True] * self.replicas
        self.affinity = OrderedDict()

    # ------------------------------------------------------------------------------------- routing
    def _least_loaded(self) -> int:
        live = [r for r in range(self.replicas) if self.alive[r]]
        if not live:
            raise NoReplicaAlive(f"all {self.replicas} rollout replicas are down")
        return min(live, key=lambda r: (self.load[r], r))

    def route(self, key: str | None, cost: float = 1.0) -> int:
        """The replica for one request (`key`: its task id; None = no affinity), charged with `cost`."""
        best = self._least_loaded()
        r = self.affinity.get(key) if key is not None else None
        if r is not None and self.alive[r] and self.load[r] <= self.load[best] + self.slack * cost:
            self.sticky_hits += 1
        else:
            r = best
        self.load[r] += cost
        if key is not None:
            self.affinity[key] = r
            self.affinity.move_to_end(key)
            while len(self.affinity) > self.affinity_capacity:
                self.affinity.popitem(last=False)
        return r

    def assign(self, keys: Sequence[str | None], costs: Sequence[float] | None = None) -> dict[int, list[int]]:
        """Route a batch: replica -> indices of the requests it serves (in input order). Larger requests
        are placed first, so the split is balanced by work, not by count."""
        costs = [1.0] * len(keys) if costs is None else list(costs)
        if len(costs) != len(keys):
            raise ValueError(f"{len(keys)} keys but {len(costs)} costs")
        out: dict[int, list[int]] = {}
        for i in sorted(range(len(keys)), key=lambda i: (-costs[i], i)):
            out.setdefault(self.route(keys[i], costs[i]), []).append(i)
        return {r: sorted(ix) for r, ix in sorted(out.items())}

    def split(self, count: int, cost_each: float = 1.0) -> list[tuple[int, int]]:
        """`count` interchangeable requests (no affinity) as (replica, how many) chunks, by load."""
        per: dict[int, int] = {}
        for _ in range(count):
            r = self.route(None, cost_each)
            per[r] = per.get(r, 0) + 1
        return sorted(per.items())

    def done(self, replica: int, cost: float) -> None:
        """The replica finished (or lost) `cost` worth of requests."""
        self.load[replica] = max(0.0, self.load[replica] - cost)

    # ------------------------------------------------------------------------------------- health
    def mark_dead(self, replica: int) -> None:
        """Route nothing more to it, and forget which tasks it served (their prefixes died with it)."""
        self.alive[replica] = False
        self.load[replica] = 0.0
        for key in [k for k, r in self.affinity.items() if r == replica]:
            del self.affinity[key]

    def mark_alive(self, replica: int) -> None:
        self.alive[replica] = True

    @property
    def live(self) -> list[int]:
        return [r for r in range(self.replicas) if self.alive[r]]
