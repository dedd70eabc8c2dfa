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
