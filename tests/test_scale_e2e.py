"""End to end with everything scaled out on a real local Ray: one debug iteration with two learner ranks
(gloo) and two hf rollout replicas behind the router, through the CLI as a user runs it. Also measures
the actors' summed resident memory while it runs (several model processes must fit a 24 GiB machine).
The same run checks that the loop runs every requested update (loop.proposer_updates=2 on 4 proposer
groups: 2 optimizer steps, each split over the ranks, version 2 published, the replay buffer consumed)."""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from selfplay.data.replay import ReplayBuffer
from selfplay.run.rundir import RunDir

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
SCALED = ["learner.world_size=2", "engine.replicas=2", "engine.backend=hf", "loop.iterations=1",
          "proposer.candidates_per_iteration=4", "proposer.group_size=2", "proposer.max_tokens=96",
          "executor.samples_per_task=3", "executor.group_size=2", "executor.tasks_per_iteration=2",
          "executor.max_turns=2", "executor.max_tokens_per_turn=80", "eval.every=0",
          "verifier.band_low=0.0", "verifier.band_high=1.0", "learner.micro_batch_tokens=512",
          "loop.proposer_updates=2"]


def _actor_rss() -> int:
    import psutil

    total = 0
    for p in psutil.process_iter(["cmdline", "memory_info"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if cmd.startswith("ray::") and "Actor" in cmd and p.info["memory_info"] is not None:
            total += p.info["memory_info"].rss
    return total


def test_one_iteration_with_two_ranks_and_two_replicas(tmp_path):
    rd = RunDir(tmp_path / "run")
    peak, done = [0], threading.Event()

    def watch():
        while not done.wait(0.5):
            peak[0] = max(peak[0], _actor_rss())

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", "selfplay", "run", str(REPO / "configs" / "debug.yaml"),
                           f"run_dir={rd.root}", *SCALED], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=1200)
    done.set()
    t.join()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    state = rd.state()
    assert state["status"] == "finished" and state["iteration"] == 1
    started = {e["actor"] for e in rd.read_events() if e.get("event") == "actor_start"}
    assert {"learner-0", "learner-1", "rollout-0", "rollout-1"} <= started, started
    con = sqlite3.connect(f"file:{rd.metrics}?mode=ro", uri=True)
    scalars = dict(con.execute("SELECT key, value FROM scalars WHERE iteration=1").fetchall())
    con.close()
    assert scalars["rollout/replicas_live"] == 2
    assert scalars["learner/proposer/ranks"] == 2  # the proposer's step ran on both ranks
    # every requested update ran: 2 optimizer steps on the proposer's batch, the version counts them
    assert scalars["learner/proposer/steps"] == scalars["learner/proposer/steps_requested"] == 2.0, scalars
    assert scalars["learner/proposer/policy_version"] == 2
    assert 0.0 <= scalars["proposer/reward/agreement_gate"] <= 1.0
    published = json.loads((rd.adapters / "published.json").read_text())
    assert published["proposer"]["version"] == 2 and (rd.adapters / "proposer" / "v000002").is_dir()
    ckpt = json.loads((Path(state["checkpoint"]) / "state.json").read_text())
    assert ckpt["policy_version"]["proposer"] == 2  # rank 0's checkpoint
    with ReplayBuffer(rd.replay, rd.load_config().replay) as buf:
        proposer = buf.trajectories("proposer")
        assert proposer and all(buf.is_consumed(t.traj_id) for t in proposer)
    print(f"peak RSS of all actors together: {peak[0] / 2**30:.2f} GiB")
    assert 0 < peak[0] < 20 * 2**30
