"""Two hf rollout replicas on a real local Ray behind the driver's router (selfplay/run/cluster/fleet.py): requests
spread over both with each task whole on one replica; a new adapter reaches both through the object store
and the fleet checks each serves it before sampling; a replica killed mid-call has its share re-sent and
comes back (restarted by Ray) serving the current adapter."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from selfplay.config import load_config
from selfplay.run.rundir import RunDir

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
QUESTIONS = [f"What is {a} + {b}?" for a, b in [(2, 3), (7, 5), (11, 4), (9, 9), (6, 1), (8, 3)]]


@pytest.fixture(scope="module")
def fleet_run(tmp_path_factory):
    import ray

    from selfplay.run.cluster.actors import Actors

    run = tmp_path_factory.mktemp("fleet") / "run"
    cfg = load_config(REPO / "configs" / "debug.yaml",
                      ["engine.backend=hf", "engine.replicas=2", f"run_dir={run}", "executor.max_turns=1",
                       "executor.max_tokens_per_turn=48", "ray.max_actor_restarts=2"])
    rd = RunDir.create(cfg)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    actors = Actors.start(cfg, rd)
    try:
        yield cfg, rd, actors
    finally:
        actors.stop()
        ray.shutdown()


def _events(rd, kind):
    return [e for e in rd.read_events() if e.get("event") == kind]


def test_requests_spread_and_each_task_stays_whole(fleet_run):
    import ray

    cfg, rd, actors = fleet_run
    fleet = actors.rollout
    ids = [f"t{i}" for i in range(len(QUESTIONS))]
    ray.get([h.busy_seconds.remote() for h in fleet.handles])  # reset
    groups = ray.get(fleet.solve.remote(QUESTIONS, ids, 2))
    assert [[r.task_id for r in g] for g in groups] == [[i, i] for i in ids]  # request order, whole groups
    busy = ray.get([h.busy_seconds.remote() for h in fleet.handles])
    assert all(b > 0 for b in busy), busy  # both replicas sampled
    placed = {i: fleet.router.affinity[i] for i in ids}
    assert set(placed.values()) == {0, 1}
    again = ray.get(fleet.solve.remote(QUESTIONS[:2], ids[:2], 3))
    assert [len(g) for g in again] == [3, 3]
    assert {i: fleet.router.affinity[i] for i in ids[:2]} == {i: placed[i] for i in ids[:2]}  # sticky


def test_adapter_reaches_every_replica_through_the_object_store(fleet_run, tmp_path):
    import ray

    from selfplay.types import AdapterUpdate

    cfg, rd, actors = fleet_run
    exported = ray.get(actors.learner.export.remote("executor", str(tmp_path / "v0")))
    assert exported.files and "adapter_config.json" in exported.files  # shipped as bytes (several replicas)
    # a path no replica can read: they must load what travelled
    update = AdapterUpdate("executor", str(tmp_path / "not-on-this-node"), 1, files=exported.files)
    ray.get(actors.rollout.update_weights.remote(update))
    assert [v.get("executor") for v in ray.get(actors.rollout.versions.remote())] == [1, 1]
    assert set(actors.rollout.check_versions()) == {0, 1}


def test_stale_replica_is_repaired_before_sampling(fleet_run):
    import ray

    from selfplay.run.cluster.fleet import StaleReplica

    cfg, rd, actors = fleet_run
    fleet = actors.rollout
    fleet.expected["executor"] = 1
    assert all(v.get("executor") == 1 for v in ray.get(fleet.versions.remote()))
    # replica 1 silently serves an older version: restart it (it comes back with no adapter at all)
    ray.kill(fleet.handles[1], no_restart=False)
    ray.get(fleet.solve.remote(QUESTIONS[:4], [f"s{i}" for i in range(4)], 1))
    while 1 not in fleet.router.live:  # its restart is noticed at the start of a later call
        ray.get(fleet.solve.remote(QUESTIONS[:2], ["w0", "w1"], 1))
    stale = _events(rd, "replica_stale")
    assert stale and stale[-1]["replica"] == 1 and stale[-1]["expected"] == {"executor": 1}
    assert [v.get("executor") for v in ray.get(fleet.versions.remote())] == [1, 1]
    # an expectation no update can meet is an error, not a silent sample from the old policy
    fleet.expected["executor"] = 99
    with pytest.raises(StaleReplica, match="rollout replica 0"):
        ray.get(fleet.solve.remote(QUESTIONS[:1], ["x"], 1))
    fleet.expected["executor"] = 1


def test_replica_killed_mid_call_has_its_requests_resent_and_comes_back(fleet_run):
    import ray

    cfg, rd, actors = fleet_run
    fleet = actors.rollout
    fleet.scalars()  # reset counters
    ids = [f"k{i}" for i in range(len(QUESTIONS))]
    box = {}

    def call():
        box["groups"] = ray.get(fleet.solve.remote(QUESTIONS, ids, 4))

    t = threading.Thread(target=call)
    t.start()
    while fleet.router.load[1] == 0 and t.is_alive():  # replica 1 has its share in hand
        time.sleep(0.01)
    ray.kill(fleet.handles[1], no_restart=False)
    t.join()
    groups = box["groups"]
    assert [[r.task_id for r in g] for g in groups] == [[i] * 4 for i in ids]  # nothing lost, order kept
    assert _events(rd, "replica_lost")[-1]["replica"] == 1
    scalars = fleet.scalars()
    assert scalars["rollout/resent_requests"] >= 1
    # the next call brings it back (Ray restarted it) with the current adapter, and it serves again
    while 1 not in fleet.router.live:
        ray.get(fleet.solve.remote(QUESTIONS[:2], ["b0", "b1"], 1))
    assert _events(rd, "replica_back")[-1]["replica"] == 1
    assert [v.get("executor") for v in ray.get(fleet.versions.remote())] == [1, 1]
    ray.get([h.busy_seconds.remote() for h in fleet.handles])
    ray.get(fleet.solve.remote(QUESTIONS, [f"n{i}" for i in range(len(QUESTIONS))], 2))
    assert all(b > 0 for b in ray.get([h.busy_seconds.remote() for h in fleet.handles]))


def test_every_actor_proves_it_sees_the_run_directory(fleet_run, tmp_path):
    import ray

    from selfplay.run.cluster.actors import RunDirNotShared, check_run_dir

    cfg, rd, actors = fleet_run
    check_run_dir({"rollout-0": actors.rollout.handles[0], "sandbox": actors.sandbox}, rd)  # passes
    assert not list((rd.root / "probes").iterdir())  # probes cleaned up
    elsewhere = RunDir(tmp_path / "only-on-the-driver")  # a directory the actor's node does not have
    with pytest.raises(RunDirNotShared, match=rf"actor rollout-0 on node {ray.util.get_node_ip_address()}"):
        check_run_dir({"rollout-0": actors.rollout.handles[0]}, elsewhere)


def test_evaluation_is_spread_over_the_replicas(fleet_run, tmp_path):
    """The loop's evaluation (eval.limit 6 items) with two replicas: each scores a share of the items, and the
    answers file and scalars cover every item exactly once, in benchmark order."""
    import ray

    from selfplay.evaluation.benchmarks import load_benchmark
    from selfplay.evaluation.evaluate import read_answers

    cfg, rd, actors = fleet_run
    fleet = actors.rollout
    scalars = ray.get(fleet.evaluate.remote(3, str(tmp_path / "eval")))
    assert 0.0 <= scalars["eval/generated/pass@1"] <= 1.0 and "eval/generated/answered" in scalars
    records = read_answers(tmp_path / "eval" / "iter-00003" / "answers.parquet")
    items = load_benchmark(cfg.eval.benchmark, limit=cfg.eval.limit).items
    assert len(items) == 6
    assert [r["question_id"] for r in records] == [it.id for it in items for _ in range(cfg.eval.samples)]
    assert sorted({r["replica"] for r in records}) == [0, 1]  # both replicas scored a share
