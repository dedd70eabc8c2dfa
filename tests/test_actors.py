"""Resource placement of the Ray actors (a real local Ray, the real actors on the embedded model).

Split placement (`ray.colocate: false`, the cluster layout) reserves a placement group with one bundle for
the learner and one for the rollout worker; the actors must really run inside their bundles, and stopping
them must give the reservation back.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from selfplay.config import load_config
from selfplay.run.rundir import RunDir

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def _placement(actor) -> tuple[str | None, int | None]:
    """(placement group id, its bundle count) of the group the actor process runs in, asked of the actor."""
    import ray

    def ask(_self):
        ctx = ray.get_runtime_context()
        pg = ctx.get_placement_group_id()
        group = ray.util.get_current_placement_group()
        return pg, (None if group is None else group.bundle_count)

    return ray.get(actor.__ray_call__.remote(ask))


def test_split_placement_puts_learner_and_rollout_in_their_bundles(tmp_path):
    import ray

    from selfplay.run.cluster.actors import Actors

    cfg = load_config(REPO / "configs" / "debug.yaml",
                      ["ray.colocate=false", "engine.backend=hf", f"run_dir={tmp_path / 'run'}"])
    rd = RunDir(Path(cfg.run_dir))
    rd.root.mkdir(parents=True)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        actors = Actors.start(cfg, rd)
        pg = actors.placement_group
        assert pg is not None
        assert ray.available_resources().get("CPU", 0) == 0  # both bundles hold their CPU
        for actor in (actors.learner, actors.rollout.handles[0]):
            pg_id, bundles = _placement(actor)
            assert pg_id == pg.id.hex() and bundles == 2
        for actor in (actors.sandbox, actors.verifier):  # not placed: they need no reserved resources
            assert _placement(actor)[0] is None
        table = ray.util.placement_group_table(pg)
        assert table["state"] == "CREATED" and len(table["bundles"]) == 2
        actors.stop()
        assert ray.util.placement_group_table(pg)["state"] == "REMOVED"
    finally:
        ray.shutdown()


def test_an_actor_that_dies_while_the_run_starts_is_named(tmp_path):
    """An actor that fails between its creation and the first iteration (here: a model directory with no
    model in it, which only the model-loading actors notice) stops the start with one error naming that actor
    and its log, and the actors already up are stopped (was: Ray's ActorDiedError, naming nobody)."""
    import ray

    from selfplay.run.cluster.actors import Actors, ActorStartError

    (tmp_path / "no-model").mkdir()
    cfg = load_config(REPO / "configs" / "debug.yaml",
                      ["engine.backend=hf", f"run_dir={tmp_path / 'run'}", f"model.name_or_path={tmp_path / 'no-model'}"])
    rd = RunDir(Path(cfg.run_dir))
    rd.root.mkdir(parents=True)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        import os
        import time

        with pytest.raises(ActorStartError, match=r"the learner actor died while the run was starting \(its log: "
                                                  r".*logs/learner\.log\): ValueError: Unrecognized model in "):
            Actors.start(cfg, rd)
        up = {e["actor"]: e["pid"] for e in rd.read_events() if e.get("event") == "actor_start"}
        assert {"sandbox", "verifier"} <= set(up), up

        def alive(pid: int) -> bool:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return False
            return True

        deadline = time.monotonic() + 60  # ray.kill is asynchronous: the processes go within seconds
        while any(alive(up[a]) for a in ("sandbox", "verifier")) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not [a for a in ("sandbox", "verifier") if alive(up[a])]  # the actors already up are stopped
    finally:
        ray.shutdown()
