"""The rollout fleet: `engine.replicas` rollout actors behind the driver's router (selfplay/rollout/router.py).

What the fleet guarantees the loop, whatever the number of replicas:
- whole tasks are routed (a task's samples and its multi-turn tool loop stay on one replica), least-loaded
  with task affinity; results come back in request order;
- before every sampling call each live replica is asked which adapter versions it serves; one that lags
  the last published version is sent the update again, and if it still lags the call fails with
  `StaleReplica` (never samples from an old policy silently). Each repair is an event (`replica_stale`)
  and a counter (`rollout/stale_repairs`);
- a replica that dies mid-call (RayActorError) is marked down, its share is re-sent to the others
  (`replica_lost` event, `rollout/resent_requests`), and it is restarted: Ray restarts it when
  `ray.max_actor_restarts` allows, otherwise the fleet creates a new one; either way it gets the current
  adapters before it serves again (`replica_back` event).

With one replica the calls go to that actor unchanged (Ray's own task retries apply, as before the fleet).
The fleet's methods keep the actor-call shape `fleet.solve.remote(...)` so call sites read the same with one
replica or many; they block until the replicas answer and return a ready object reference.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Sequence

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

from selfplay.rollout.router import Router

log = logging.getLogger("selfplay")
_DEAD = (RayActorError, ActorDiedError, ActorUnavailableError)


class StaleReplica(RuntimeError):
    """A replica still serves an older adapter after the fleet re-sent the new one."""


class _Method:
    def __init__(self, fn: Callable[..., Any]):
        self._fn = fn

    def remote(self, *args: Any, **kwargs: Any):
        return ray.put(self._fn(*args, **kwargs))


def _seed_for_chunk(seed: int, chunk: int) -> int:
    return seed if chunk == 0 else (seed + chunk * 1_000_003) % 2**31


class RolloutFleet:
    def __init__(self, make_replica: Callable[[int], Any], replicas: int, group_size: int = 1,
                 on_event: Callable[..., None] = lambda kind, **f: None):
        self._make = make_replica
        self.handles = [make_replica(i) for i in range(replicas)]
        self.router = Router(replicas)
        self.group_size = group_size  # samples per proposer prompt: the cost of one propose request
        self._event = on_event
        self.expected: dict[str, int] = {}  # role -> version every replica must serve before sampling
        self.updates: dict[str, Any] = {}  # role -> the last update (an object ref), re-sent to lagging replicas
        self._revive: dict[int, Any] = {}  # replica -> pending ping of a restarting actor
        self.counters = {"resent_requests": 0.0, "stale_repairs": 0.0, "replica_restarts": 0.0}
        for name in ("propose", "solve", "update_weights", "evaluate", "busy_seconds", "busy_spans", "pid",
                     "versions", "expect", "swaps"):
            setattr(self, name, _Method(getattr(self, f"_{name}")))

    def __len__(self) -> int:
        return len(self.handles)

    # ------------------------------------------------------------------------------------- sampling
    def _propose(self, count: int, pool_questions: list[str], seed: int, *args: Any) -> list:
        if len(self.handles) == 1:
            return ray.get(self.handles[0].propose.remote(count, pool_questions, seed, *args))
        self._ready()
        chunks = self.router.split(count, cost_each=self.group_size)
        calls = [(r, "propose", (c, pool_questions, _seed_for_chunk(seed, j), *args), c * self.group_size)
                 for j, (r, c) in enumerate(chunks)]
        return [p for part in self._run(calls, key=None) for p in part]

    def _solve(self, questions: list[str], task_ids: list[str], n: int, *args: Any) -> list:
        if len(self.handles) == 1:
            return ray.get(self.handles[0].solve.remote(questions, task_ids, n, *args))
        self._ready()
        plan = self.router.assign(list(task_ids), [float(n)] * len(task_ids))
        calls, order = [], []
        for r, ix in plan.items():
            calls.append((r, "solve", ([questions[i] for i in ix], [task_ids[i] for i in ix], n, *args),
                          float(n) * len(ix)))
            order.append(ix)
        out: list = [None] * len(questions)
        for ix, groups in zip(order, self._run(calls, key=task_ids)):
            for i, g in zip(ix, groups):
                out[i] = g
        return out

    def _run(self, calls: list[tuple[int, str, tuple, float]], key: Sequence[str] | None) -> list:
        """Issue each (replica, method, args, cost), wait for all; a call whose replica died goes to another
        live replica (same arguments: a re-sent chunk keeps its seed). Results in call order."""
        results: list = [None] * len(calls)
        pending = {self._call(r, m, a): (j, r, m, a, c) for j, (r, m, a, c) in enumerate(calls)}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            j, r, m, a, c = pending.pop(ready[0])
            self.router.done(r, c)
            try:
                results[j] = ray.get(ready[0])
            except _DEAD as e:
                self._lost(r, e)
                if not self.router.live:
                    self._ready()  # waits for a replica to come back
                target = self.router.route(None, c)
                self.counters["resent_requests"] += 1
                self._event("replica_resend", replica=r, to=target, method=m)
                pending[self._call(target, m, a)] = (j, target, m, a, c)
        return results

    def _call(self, replica: int, method: str, args: tuple):
        return getattr(self.handles[replica], method).remote(*args)

    # --------------------------------------------------------------------------------------- health
    def _lost(self, replica: int, error: Exception) -> None:
        if not self.router.alive[replica]:
            return
        log.warning("rollout replica %d died (%s): re-sending its requests", replica, type(error).__name__)
        self._event("replica_lost", replica=replica, error=type(error).__name__)
        self.router.mark_dead(replica)
        self._revive[replica] = self.handles[replica].pid.remote()  # answers once Ray has restarted it

    def _ready(self) -> None:
        """Bring restarted replicas back (with current adapters), then check every live one's versions."""
        for r, ping in list(self._revive.items()):
            done, _ = ray.wait([ping], timeout=0)
            if not done:
                continue
            try:
                ray.get(ping)
            except _DEAD:  # out of Ray restarts: a fresh actor
                self.handles[r] = self._make(r)
                self._revive[r] = self.handles[r].pid.remote()
                continue
            del self._revive[r]
            self.counters["replica_restarts"] += 1
            self.router.mark_alive(r)
            self._event("replica_back", replica=r)
        if not self.router.live and self._revive:  # nothing else can serve: wait for the first one back
            ray.wait(list(self._revive.values()), num_returns=1)
            return self._ready()
        self.check_versions()
        return None

    def check_versions(self) -> dict[int, dict[str, int]]:
        """Each live replica's adapter versions; a lagging one gets the last update again, then must match."""
        live = self.router.live
        got = {}
        for r, fut in zip(live, [self.handles[r].versions.remote() for r in live]):
            try:
                got[r] = ray.get(fut)
            except _DEAD as e:  # died or restarting: it is checked again when it is back
                self._lost(r, e)
        if not got:
            return self._ready() or {}
        for r, versions in list(got.items()):
            lag = [role for role, v in self.expected.items() if versions.get(role, 0) < v]
            if not lag:
                continue
            self.counters["stale_repairs"] += 1
            self._event("replica_stale", replica=r, serves={k: versions.get(k, 0) for k in lag},
                        expected={k: self.expected[k] for k in lag})
            log.warning("rollout replica %d serves %s, expected %s: re-sending", r,
                        {k: versions.get(k, 0) for k in lag}, {k: self.expected[k] for k in lag})
            for role in lag:
                versions = ray.get(self.handles[r].update_weights.remote(self.updates[role]))
            still = {role: versions.get(role, 0) for role in lag if versions.get(role, 0) < self.expected[role]}
            if still:
                raise StaleReplica(f"rollout replica {r} serves {still} after the update was re-sent; "
                                   f"expected {dict(self.expected)}")
            got[r] = versions
        return got

    # ------------------------------------------------------------------------------------- weights
    def _update_weights(self, update: Any) -> dict[str, int]:
        if len(self.handles) == 1:
            return ray.get(self.handles[0].update_weights.remote(update))
        ref = ray.put(update)  # one copy in the object store, read by every replica (any node)
        name = getattr(update, "name", None)
        if name is not None:
            self.expected[name] = update.version
            self.updates[name] = ref
        else:  # full weights: every role changed
            for role in ("proposer", "executor"):
                self.expected[role] = update.version
                self.updates[role] = ref
        live = self.router.live
        first = None
        for r, fut in zip(live, [self.handles[r].update_weights.remote(ref) for r in live]):
            try:
                versions = ray.get(fut)
                first = first if first is not None else versions
            except _DEAD as e:
                self._lost(r, e)  # it gets the update when it is back (_ready)
        return first or {}

    # ------------------------------------------------------------------------------------- the rest
    def _expect(self, refs: list) -> None:
        """Hand the learner's export refs to every live replica (loop.weight_sync=between_requests): each
        loads a finished one inside its rollout calls; a replica lost here gets the driver's push when back."""
        for r, fut in [(r, self.handles[r].expect.remote(refs)) for r in self.router.live]:
            try:
                ray.get(fut)
            except _DEAD as e:
                self._lost(r, e)

    def _swaps(self) -> int:
        """Adapters the replicas loaded inside rollout calls since the last read."""
        return int(sum(ray.get([self.handles[r].swaps.remote() for r in self.router.live])))

    def _evaluate(self, iteration: int, out_dir: str) -> dict[str, float]:
        """One replica evaluates alone; several split the benchmark's items (every live replica a share, a lost
        replica's share re-run on the first live one), and the first live one scores all the records."""
        if len(self.handles) == 1:
            return ray.get(self.handles[0].evaluate.remote(iteration, out_dir))
        self._ready()
        live, started = list(self.router.live), time.time()
        refs = [self.handles[r].eval_shard.remote(iteration, i, len(live)) for i, r in enumerate(live)]
        records, adapters = [], set()
        for i, (r, ref) in enumerate(zip(live, refs)):
            try:
                part, adapter = ray.get(ref)
            except _DEAD as e:
                self._lost(r, e)
                if not self.router.live:
                    raise RuntimeError(f"every rollout replica died during the evaluation of iteration {iteration}")
                r = self.router.live[0]  # its share again, on a live replica
                part, adapter = ray.get(self.handles[r].eval_shard.remote(iteration, i, len(live)))
            records += [{**rec, "replica": r} for rec in part]
            adapters.add(adapter)
        if len(adapters) > 1:  # the fleet checked the versions before (_ready): a replica without the adapter
            raise RuntimeError(f"evaluation replicas scored different adapters: {sorted(map(str, adapters))}")
        return ray.get(self.handles[self.router.live[0]].eval_summary.remote(records, iteration, out_dir,
                                                                            adapters.pop(), started))

    def _busy_seconds(self) -> float:
        """Summed over live replicas (parallel replicas can add up to more than the wall time)."""
        return float(sum(ray.get([self.handles[r].busy_seconds.remote() for r in self.router.live])))

    def _busy_spans(self) -> list[tuple[float, float]]:
        """Every live replica's busy spans (time/overlap merges them: busy = any replica working)."""
        return [sp for spans in ray.get([self.handles[r].busy_spans.remote() for r in self.router.live])
                for sp in spans]

    def _pid(self) -> list[int]:
        return ray.get([h.pid.remote() for h in self.handles])

    def _versions(self) -> list[dict[str, int]]:
        return ray.get([h.versions.remote() for h in self.handles])

    def scalars(self) -> dict[str, float]:
        """Counters since the last call (then reset), as `rollout/*` metrics; empty with one replica."""
        if len(self.handles) == 1:
            return {}
        out = {f"rollout/{k}": v for k, v in self.counters.items()}
        out["rollout/replicas_live"] = float(len(self.router.live))
        out["rollout/sticky_hits"] = float(self.router.sticky_hits)
        self.counters = dict.fromkeys(self.counters, 0.0)
        self.router.sticky_hits = 0
        return out

    def kill(self) -> None:
        for h in self.handles:
            try:
                ray.kill(h, no_restart=True)
            except Exception:  # already gone
                pass


def replica_name(r: int) -> str:
    return f"rollout-{r}"
