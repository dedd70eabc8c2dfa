"""Back to the last commit: the rollback a resume does, and the learner-group restart that reuses it.

`rollback` is the one place that undoes an uncommitted iteration (driver.py's commit protocol): the pool
forgets tasks admitted after the committed iteration, the replay buffer drops what later policies generated
and forgets their consumption, `published.json` points at the committed adapters again, and the metrics store
drops later rows. `selfplay resume` calls it before starting the actors; a learner-group restart calls it
between stopping the old actors and starting new ones.

Learner ranks (`learner.world_size` > 1) share a torch.distributed group that a restarted process cannot
rejoin, so Ray never restarts one (actors.py creates them with `max_restarts=0`). When an iteration fails and
a rank is dead, `dead_ranks` names it, and the driver restarts the whole run's actors (all of them, through
`Actors.start`, the path a resume takes: every rank loads the committed checkpoint, every rollout replica the
committed adapters) and runs the rolled-back iteration again, at most `ray.max_learner_restarts` times.
"""
from __future__ import annotations

import re
import time
from typing import Any

import ray

from selfplay.run.cluster.placement import actor_name
from selfplay.run.rundir import RunDir, rollback_published


class LearnerRestartsExhausted(RuntimeError):
    """A learner rank died once more than `ray.max_learner_restarts` allows; the message is one line."""


def rollback(rd: RunDir, pool: Any, replay: Any, store: Any) -> dict:
    """Undo everything written after the last committed iteration (state.json); returns what was dropped."""
    state = rd.state()
    done = int(state.get("iteration", 0))
    versions = state.get("versions") or {"proposer": 0, "executor": 0}
    replay_dropped: dict = {role: replay.truncate_after(int(v), role=role) for role, v in versions.items()}
    replay_dropped["iterations"] = replay.drop_where(lambda t: int(t.meta.get("iteration", 0)) > done)
    pool_dropped = pool.truncate_after(done)
    rollback_published(rd.adapters, state.get("versions") or {})  # before a rollout worker loads them
    metrics_dropped = store.truncate_after(done)
    return {"iteration": done, "pool_dropped": pool_dropped, "replay": replay_dropped, "metrics": metrics_dropped}


def dead_ranks(learner: Any, rd: RunDir, error: BaseException, wait_s: float = 30.0) -> list[dict]:
    """The learner ranks found dead after `error` (a Ray error out of an iteration), each as {rank, actor, pid,
    node} from its last `actor_start` event, with `why` (Ray's account of the death) and `log` (the rank's
    output file, which holds a crash's last words); [] when the error is something else or every rank answers.

    A dead rank's ping fails at once; a live one answers when its current call ends (a survivor's collective
    fails when its peer's sockets close), so `wait_s` only bounds a survivor that hangs."""
    ranks = getattr(learner, "ranks", None)
    if not ranks or not isinstance(error, ray.exceptions.RayError):
        return []
    pings = [r.pid.remote() for r in ranks]
    ray.wait(pings, num_returns=len(pings), timeout=wait_s)
    starts = {e["actor"]: e for e in rd.read_events() if e.get("event") == "actor_start"}
    dead = []
    for i, ref in enumerate(pings):
        try:
            ray.get(ref, timeout=0)
        except ray.exceptions.RayActorError as e:
            name = actor_name("learner", i, len(ranks))
            last = starts.get(name, {})
            dead.append({"rank": i, "actor": name, "pid": last.get("pid"), "node": last.get("node"),
                         "why": exit_detail(e), "log": str(rd.logs / f"{name}.log")})
        except Exception:  # still busy (ray.exceptions.GetTimeoutError) or another failure: not known dead
            pass
    return dead


def wait_gone(handles: list[Any], rd: RunDir, wait_s: float = 60.0) -> list[int]:
    """After `Actors.stop`: wait (at most `wait_s`) until Ray reports every actor dead and the processes of
    those on this node have exited, so the actors started next find their memory, ports and devices free
    (`ray.kill` returns before the kill is done). Returns this node's pids still alive at the deadline."""
    end = time.monotonic() + wait_s
    pings = [h.pid.remote() for h in handles]
    ray.wait(pings, num_returns=len(pings), timeout=wait_s)
    node = ray.util.get_node_ip_address()
    starts: dict[str, dict] = {}  # the stopped actors' processes: the starts since this driver life's last
    for e in rd.read_events():    # actor start-up (a driver start or a group restart), the last per name
        if e.get("event") in ("driver_start", "learner_restart"):
            starts = {}
        elif e.get("event") == "actor_start":
            starts[e["actor"]] = e
    pids = [int(e["pid"]) for e in starts.values() if e.get("node") == node and e.get("pid")]
    left = pids
    while left and time.monotonic() < end:
        left = [pid for pid in left if _alive(pid)]
        if left:
            time.sleep(0.05)
    return left


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def exit_detail(error: BaseException, limit: int = 160) -> str:
    """Ray's words on how an actor's process ended ("Worker exit type: ... Worker exit detail: ..."), short."""
    text = " ".join(str(error).split())
    m = re.search(r"Worker exit type: (\w+)\.? Worker exit detail: (.*?)(?: Some common causes|$)", text)
    why = f"{m.group(1)}: {m.group(2)}" if m else text
    return why if len(why) <= limit else why[:limit - 3] + "..."


def describe(dead: list[dict], iteration: int, committed: int) -> str:
    """One console line for a group restart (why each rank died and where its output is, when known)."""
    who = ", ".join(f"rank {d['rank']} (pid {d['pid']} on {d['node']}"
                    + (f"; {d['why']}; its log: {d['log']}" if d.get("why") else "") + ")" for d in dead)
    return (f"learner {who} died during iteration {iteration}: restarting the learner group from the "
            f"checkpoint of iteration {committed}; iteration {iteration} runs again")
