"""The rollout router (selfplay/rollout/router.py) as a plain class: load balance, task affinity, dead
replicas; and the placement plan (selfplay/run/cluster/placement.py) that `selfplay plan` and `Actors.start` share."""
from __future__ import annotations

import pytest

from selfplay.config import load_config
from selfplay.rollout.router import NoReplicaAlive, Router
from selfplay.run.cluster.placement import bundles, fit, plan


def test_batch_is_split_by_work_not_by_count():
    r = Router(2)
    # one big request and three small ones: the big one alone on a replica balances the work
    plan_ = r.assign(["a", "b", "c", "d"], [6, 2, 2, 2])
    assert plan_ == {0: [0], 1: [1, 2, 3]}
    assert r.load == [6, 6]


def test_whole_task_goes_to_one_replica_and_sticks_across_calls():
    r = Router(3)
    first = r.assign([f"t{i}" for i in range(6)], [4] * 6)
    assert sorted(i for ix in first.values() for i in ix) == list(range(6))
    assert all(len(ix) == 2 for ix in first.values())  # 6 equal tasks on 3 replicas: 2 each
    for rep, ix in first.items():
        r.done(rep, 4 * len(ix))
    second = r.assign([f"t{i}" for i in range(6)], [8] * 6)  # the same tasks again (practice after voting)
    assert second == first
    assert r.sticky_hits == 6


def test_affinity_yields_to_load_beyond_slack():
    r = Router(2, slack=1.0)
    assert r.route("hot", 1) == 0
    r.load[0] = 10  # replica 0 is swamped
    assert r.route("hot", 1) == 1  # the task moves rather than queue behind 10 requests
    assert r.affinity["hot"] == 1


def test_dead_replica_gets_nothing_and_loses_its_affinity():
    r = Router(2)
    r.assign(["a", "b"], [1, 1])
    dead = r.affinity["a"]
    r.mark_dead(dead)
    assert "a" not in r.affinity
    assert set(r.assign(["a", "b", "c"], [1, 1, 1])) == {1 - dead}
    r.mark_dead(1 - dead)
    with pytest.raises(NoReplicaAlive):
        r.route("x")
    r.mark_alive(dead)
    assert r.route("x") == dead


def test_split_spreads_interchangeable_requests():
    r = Router(2)
    assert r.split(5, cost_each=2) == [(0, 3), (1, 2)]
    assert Router(1).split(3) == [(0, 3)]


def test_one_replica_one_rank_plan_keeps_the_two_bundles_of_before():
    cfg = load_config(None, ["ray.colocate=false", "ray.gpus={learner: 1, rollout: 1}"])
    slots = plan(cfg)
    assert [s.actor for s in slots] == ["learner", "rollout", "sandbox", "verifier"]
    assert bundles(slots) == [{"CPU": 1, "GPU": 1}, {"CPU": 1, "GPU": 1}]


def test_plan_gives_each_rank_and_tp_replica_its_bundle_and_names_what_is_missing():
    cfg = load_config(None, ["ray.colocate=false", "ray.gpus={learner: 1}", "learner.world_size=4",
                             "engine.replicas=2", "engine.backend=vllm", "engine.tensor_parallel_size=2"])
    slots = plan(cfg)
    assert [s.actor for s in slots][:6] == ["learner-0", "learner-1", "learner-2", "learner-3",
                                           "rollout-0", "rollout-1"]
    assert [b["GPU"] for b in bundles(slots)] == [1, 1, 1, 1, 2, 2]
    where, problems = fit(slots, [{"CPU": 16, "GPU": 8}])
    assert problems == [] and where[:6] == [0] * 6
    where, problems = fit(slots, [{"CPU": 16, "GPU": 4}, {"CPU": 16, "GPU": 3}])
    assert len(problems) == 1 and "rollout-1 needs 2 GPU" in problems[0] and "cluster: 7" in problems[0]
    _, problems = fit(slots, [{"CPU": 3, "GPU": 8}])
    assert problems and all("CPU" in p for p in problems)


def _plan_cli(*args: str):
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    return subprocess.run([sys.executable, "-m", "selfplay", "plan", *args], cwd=repo, capture_output=True,
                          text=True, timeout=120)


def test_selfplay_plan_fills_one_node_and_refuses_a_smaller_one():
    ok = _plan_cli("configs/cluster_qwen3_8b.yaml", "--node", "8:64")
    assert ok.returncode == 0, ok.stderr
    lines = ok.stdout.splitlines()
    assert sum(line.startswith("learner-") for line in lines) == 4
    assert sum(line.startswith("rollout-") for line in lines) == 2
    assert "total reserved: 6 CPU, 8 GPU" in ok.stdout
    short = _plan_cli("configs/cluster_qwen3_8b.yaml", "--node", "4:64")
    assert short.returncode == 1
    assert "cannot hold this run" in short.stderr and "rollout-0 needs 2 GPU" in short.stderr
    assert "DOES NOT FIT" in short.stdout


def test_two_node_config_needs_both_nodes():
    both = _plan_cli("configs/cluster_qwen3_8b_2node.yaml", "--node", "8:64", "--node", "8:64")
    assert both.returncode == 0, both.stderr
    assert "total reserved: 12 CPU, 16 GPU" in both.stdout
    nodes = {line.split()[4] for line in both.stdout.splitlines() if line.startswith(("learner-", "rollout-"))}
    assert len(nodes) == 2
    assert _plan_cli("configs/cluster_qwen3_8b_2node.yaml", "--node", "8:64").returncode == 1
