"""Replay buffer: persistence (across a real SIGKILL), staleness, self-imitation, eviction, whole groups."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from selfplay.config import ReplayConfig
from selfplay.data.replay import ReplayBuffer
from selfplay.types import Trajectory

ROOT = Path(__file__).resolve().parents[1]


def group(gid: str, n: int = 4, *, version: int = 0, role: str = "executor", advantages=None, size=None):
    advantages = advantages or [float(j) - (n - 1) / 2 for j in range(n)]
    meta = {"group_size": size if size is not None else n, "note": ["x", 1]}
    return [Trajectory(role=role, task_id=f"task-{gid}", group_id=gid, prompt_ids=[1, 2, 3],
                       completion_ids=[4, 5, 6, 7], loss_mask=[1, 1, 0, 1], behaviour_logprobs=[-0.1, -2.5, 0.0, -1e-9],
                       reward=float(j), advantage=advantages[j], policy_version=version,
                       p_hat=None if j % 2 else 0.7, text=f"completion {j}", meta=meta, traj_id=f"{gid}-{j}")
            for j in range(n)]


def rcfg(**kw) -> ReplayConfig:
    kw.setdefault("fsync", False)  # the kill test below keeps fsync on; elsewhere it only costs time
    return ReplayConfig(**kw)


def test_roundtrip_restores_every_field(tmp_path):
    trajs = group("g0") + group("g1", version=3, role="proposer")
    with ReplayBuffer(tmp_path, rcfg()) as buf:
        assert buf.add(trajs) == 8
    with ReplayBuffer(tmp_path, rcfg()) as buf:
        assert len(buf) == 8
        loaded = buf.sample("executor", 5, 0).trajectories + buf.sample("proposer", 5, 3).trajectories
    assert sorted(loaded, key=lambda t: t.traj_id) == sorted(trajs, key=lambda t: t.traj_id)


def test_duplicates_are_skipped_in_memory_and_on_reload(tmp_path):
    with ReplayBuffer(tmp_path, rcfg()) as buf:
        assert buf.add(group("g0")) == 4
        assert buf.add(group("g0") + group("g1")) == 4
    # a second copy of the same log file (e.g. a retried upload) must not duplicate anything
    first = sorted(tmp_path.glob("*.add.parquet"))[0]
    shutil.copy(first, tmp_path / "000000000099.add.parquet")
    with ReplayBuffer(tmp_path, rcfg()) as buf:
        assert len(buf) == 8
        assert buf.add(group("g1")) == 0
        assert buf.stats()["duplicates"] >= 4


def test_one_owner_per_directory(tmp_path):
    buf = ReplayBuffer(tmp_path, rcfg())
    with pytest.raises(RuntimeError, match="in use"):
        ReplayBuffer(tmp_path, rcfg())
    buf.close()
    ReplayBuffer(tmp_path, rcfg()).close()


def test_fifo_whole_groups_and_completeness(tmp_path):
    with ReplayBuffer(tmp_path, rcfg()) as buf:
        buf.add(group("old"))
        partial = group("late", size=4)
        buf.add(partial[:3])  # a group still being produced is not sampled
        buf.add(group("new"))
        b = buf.sample("executor", 5, 0)
        assert [t.group_id for t in b.trajectories] == ["old"] * 4 + ["new"] * 4
        assert buf.sample("executor", 1, 0).ids == [f"old-{j}" for j in range(4)]
        buf.add(partial[3:])
        assert {t.group_id for t in buf.sample("executor", 5, 0).trajectories} == {"old", "late", "new"}
        assert buf.sample("proposer", 5, 0).trajectories == []
        with pytest.raises(ValueError):
            buf.sample("executor", 0, 0)


def test_consumption_persists_across_restart(tmp_path):
    with ReplayBuffer(tmp_path, rcfg()) as buf:
        for g in ("a", "b", "c"):
            buf.add(group(g))
        batch = buf.sample("executor", 2, 0)
        assert buf.mark_consumed(batch.ids, version=1) == 8
        assert buf.mark_consumed(batch.ids, version=1) == 0  # idempotent
    with ReplayBuffer(tmp_path, rcfg()) as buf:
        assert all(buf.is_consumed(i) for i in batch.ids)
        assert {t.group_id for t in buf.sample("executor", 5, 0).trajectories} == {"c"}


def test_stale_groups_dropped_and_drop_persists(tmp_path):
    with ReplayBuffer(tmp_path, rcfg(max_staleness=1, stale_mode="drop")) as buf:
        for v in range(3):
            buf.add(group(f"v{v}", version=v))
        b = buf.sample("executor", 5, current_version=2)
        assert [t.group_id for t in b.trajectories] == ["v1"] * 4 + ["v2"] * 4
        assert b.weights == [1.0] * 8 and b.dropped_stale == 4
    with ReplayBuffer(tmp_path, rcfg(max_staleness=1)) as buf:
        assert "v0-0" not in buf and buf.stats()["dropped_stale"] == 4


def test_stale_groups_downweighted(tmp_path):
    with ReplayBuffer(tmp_path, rcfg(max_staleness=1, stale_mode="downweight", stale_decay=0.5)) as buf:
        for v in range(4):
            buf.add(group(f"v{v}", n=2, version=v))
        b = buf.sample("executor", 10, current_version=4)
        by_group = dict(zip([t.group_id for t in b.trajectories], b.weights))
        # staleness 4,3,2,1 with max 1 -> 0.5^3, 0.5^2, 0.5^1, 1
        assert by_group == {"v0": 0.125, "v1": 0.25, "v2": 0.5, "v3": 1.0}
        assert b.dropped_stale == 0


def test_self_imitation_share(tmp_path):
    cfg = rcfg(self_imitation_share=0.5, self_imitation_min_advantage=0.5)
    with ReplayBuffer(tmp_path, cfg) as buf:
        buf.add(group("done1", advantages=[1.5, -1.0, 0.6, -1.1]))
        buf.add(group("done2", advantages=[2.0, -1.0, -1.0, 0.0]))
        buf.add(group("done3", advantages=[-1.0, -1.0, -1.0, 0.2]))  # nothing above the threshold
        buf.mark_consumed(buf.sample("executor", 3, 0).ids, version=1)
        for g in ("f1", "f2", "f3"):
            buf.add(group(g, version=1))
        b = buf.sample("executor", 4, current_version=1)
        fresh = [t for t, r in zip(b.trajectories, b.replayed) if not r]
        replay = [t for t, r in zip(b.trajectories, b.replayed) if r]
        assert {t.group_id for t in fresh} == {"f1", "f2"}  # 4 groups x share 0.5 -> 2 fresh
        assert sorted(t.traj_id for t in replay) == ["done1-0", "done1-2", "done2-0"]
        assert all(t.advantage >= 0.5 for t in replay)
        # both replayed once: 2 groups x 0.5 -> one replay group, the higher advantage wins the tie ...
        b2 = buf.sample("executor", 2, current_version=1)
        assert [t.traj_id for t, r in zip(b2.trajectories, b2.replayed) if r] == ["done2-0"]
        # ... and the least-replayed group goes next
        b3 = buf.sample("executor", 2, current_version=1)
        assert sorted(t.traj_id for t, r in zip(b3.trajectories, b3.replayed) if r) == ["done1-0", "done1-2"]
        assert buf.stats()["replayed"] == 6


def test_stored_advantages_drive_self_imitation_and_survive_reload(tmp_path):
    """Producers add trajectories with advantage 0; the learner's computed advantages come back through
    set_advantages, and only then can self-imitation find the good ones, also after a restart."""
    cfg = rcfg(self_imitation_share=0.5, self_imitation_min_advantage=0.5, compact_every=1000)
    with ReplayBuffer(tmp_path, cfg) as buf:
        buf.add(group("done", advantages=[0.0] * 4))
        ids = buf.sample("executor", 1, 0).ids
        buf.mark_consumed(ids, version=1)
        buf.add(group("fresh", version=1))
        assert not any(buf.sample("executor", 2, 1).replayed)  # nothing known to be good yet
        assert buf.set_advantages({"done-0": 1.2, "done-1": -0.4, "done-3": 0.7, "evicted-9": 3.0}) == 3
    with ReplayBuffer(tmp_path, cfg) as buf:  # from the log
        assert {t.traj_id: t.advantage for t in buf.trajectories()}["done-3"] == 0.7
        b = buf.sample("executor", 2, 1)
        assert sorted(t.traj_id for t, r in zip(b.trajectories, b.replayed) if r) == ["done-0", "done-3"]
        buf.compact()
    with ReplayBuffer(tmp_path, cfg) as buf:  # from a snapshot
        assert {t.traj_id: t.advantage for t in buf.trajectories()}["done-0"] == 1.2


def test_self_imitation_falls_back_to_fresh_when_nothing_to_replay(tmp_path):
    with ReplayBuffer(tmp_path, rcfg(self_imitation_share=0.5)) as buf:
        for g in ("a", "b", "c", "d"):
            buf.add(group(g))
        b = buf.sample("executor", 4, 0)
        assert not any(b.replayed) and len({t.group_id for t in b.trajectories}) == 4


def test_eviction_consumed_oldest_first_then_unconsumed(tmp_path):
    with ReplayBuffer(tmp_path, rcfg(capacity=12)) as buf:
        for g in ("a", "b", "c"):
            buf.add(group(g))
        buf.mark_consumed([f"b-{j}" for j in range(4)], version=1)
        buf.add(group("d"))  # 16 > 12: evict the consumed group b, not the older unconsumed a
        assert "b-0" not in buf and "a-0" in buf and len(buf) == 12
        buf.add(group("e"))  # nothing consumed left: the oldest unconsumed group goes
        assert "a-0" not in buf and len(buf) == 12
        s = buf.stats()
        assert (s["evicted_consumed"], s["evicted_unconsumed"]) == (4, 4)
    with ReplayBuffer(tmp_path, rcfg(capacity=12)) as buf:
        assert len(buf) == 12 and "a-0" not in buf and "b-0" not in buf
    with ReplayBuffer(tmp_path, rcfg(capacity=8)) as buf:  # a smaller capacity applies on load
        assert len(buf) == 8 and "c-0" not in buf


def test_truncate_after_rolls_back_versions_and_consumption(tmp_path):
    with ReplayBuffer(tmp_path, rcfg(max_staleness=10)) as buf:
        buf.add(group("v0", version=0))
        buf.mark_consumed(buf.sample("executor", 1, 0).ids, version=1)
        buf.add(group("v1", version=1))
        buf.mark_consumed(buf.sample("executor", 1, 1).ids, version=2)
        buf.set_advantages({"v0-0": 0.5, "v1-0": 0.25})  # v0 trained by the kept step 0->1, v1 by the lost one
        buf.add(group("v2", version=2))
        buf.add(group("p2", version=2, role="proposer"))
        # the checkpoint is at version 1: the step 1->2 was lost, samples of policy 2 belong to no checkpoint
        assert buf.truncate_after(1, role="executor") == {"dropped": 4, "unconsumed": 4}
        buf.add(group("v2b", version=2))  # regenerated after the resume: must survive reload
    with ReplayBuffer(tmp_path, rcfg(max_staleness=10)) as buf:
        assert "v2-0" not in buf and "v2b-0" in buf and "p2-0" in buf
        assert buf.is_consumed("v0-0") and not buf.is_consumed("v1-0")
        advantage = {t.traj_id: t.advantage for t in buf.trajectories()}
        assert (advantage["v0-0"], advantage["v1-0"]) == (0.5, 0.0)  # the lost step's advantage is forgotten
        assert [t.group_id for t in buf.sample("executor", 5, 2).trajectories][::4] == ["v1", "v2b"]


def test_compaction_bounds_files_and_keeps_state(tmp_path):
    cfg = rcfg(compact_every=4, capacity=40)
    with ReplayBuffer(tmp_path, cfg) as buf:
        for i in range(30):
            buf.add(group(f"g{i}", n=2))
            if i % 3 == 0:
                buf.mark_consumed([f"g{i}-0", f"g{i}-1"], version=i)
        before = {i: buf.is_consumed(i) for i in [f"g{k}-{j}" for k in range(30) for j in range(2)] if i in buf}
        stats = buf.stats()
        assert stats["files"] <= 4
    (tmp_path / ".000000000999.add.parquet.tmp").write_bytes(b"half a file")
    shutil.copy(sorted(tmp_path.glob("*.snapshot.parquet"))[-1], tmp_path / "000000000000.add.parquet")
    with ReplayBuffer(tmp_path, cfg) as buf:
        after = {i: buf.is_consumed(i) for i in before}
        assert after == before and len(buf) == len(before) == 40
        assert buf.stats()["added"] == stats["added"] == 60
    assert not list(tmp_path.glob("*.tmp")) and not (tmp_path / "000000000000.add.parquet").exists()


def test_unreadable_log_file_is_a_clear_error(tmp_path):
    with ReplayBuffer(tmp_path, rcfg()) as buf:
        buf.add(group("a"))
    (tmp_path / "000000000007.add.parquet").write_bytes(b"not parquet")
    with pytest.raises(RuntimeError, match="000000000007.add.parquet"):
        ReplayBuffer(tmp_path, rcfg())


def test_add_rejects_non_trajectories(tmp_path):
    with ReplayBuffer(tmp_path, rcfg()) as buf, pytest.raises(TypeError, match="Trajectory"):
        buf.add([{"traj_id": "x"}])


CHILD = textwrap.dedent("""
    import sys
    from selfplay.config import ReplayConfig
    from selfplay.data.replay import ReplayBuffer
    from selfplay.types import Trajectory

    directory, start = sys.argv[1], int(sys.argv[2])
    buf = ReplayBuffer(directory, ReplayConfig(capacity=100000, compact_every=3, fsync=True))
    i = start
    while True:
        trajs = [Trajectory(role="executor", task_id=f"t{i}", group_id=f"g{i}", prompt_ids=[1, 2],
                            completion_ids=[3, 4, 5], loss_mask=[1, 0, 1], behaviour_logprobs=[-0.5, 0.0, -1.25],
                            reward=float(j), traj_id=f"{i}-{j}", meta={"group_size": 4}) for j in range(4)]
        buf.add(trajs)
        print(f"added {i}", flush=True)
        if i - start >= 2:
            buf.mark_consumed([f"{i - 2}-{j}" for j in range(4)], version=i)
            print(f"consumed {i - 2}", flush=True)
        i += 1
""")


def run_and_kill(directory: Path, start: int, after_lines: int) -> tuple[set[int], set[int]]:
    """Run a writer process, SIGKILL it mid-stream; return the groups it confirmed added / consumed."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(directory), str(start)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    lines = []
    try:
        while len(lines) < after_lines:
            line = proc.stdout.readline()
            if not line:
                raise AssertionError(f"writer died early: {proc.stderr.read()}")
            lines.append(line)
        os.kill(proc.pid, signal.SIGKILL)
        lines += proc.stdout.readlines()  # everything it confirmed before dying
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    added = {int(x.split()[1]) for x in lines if x.startswith("added")}
    consumed = {int(x.split()[1]) for x in lines if x.startswith("consumed")}
    return added, consumed


def test_sigkill_loses_nothing_written_and_duplicates_nothing(tmp_path):
    start, confirmed_added, confirmed_consumed = 0, set(), set()
    for after_lines in (9, 16, 23):  # three kills at different points of the append/mark/compact cycle
        added, consumed = run_and_kill(tmp_path, start, after_lines)
        confirmed_added |= added
        confirmed_consumed |= consumed
        with ReplayBuffer(tmp_path, ReplayConfig(capacity=100000)) as buf:
            present = {int(t.split("-")[0]) for t in buf._entries}  # noqa: SLF001 - checking the exact content
            assert confirmed_added <= present, "a confirmed append was lost"
            assert present == set(range(max(present) + 1)), "groups are a gapless prefix of what was written"
            assert len(buf) == 4 * len(present), "every group is whole and nothing is duplicated"
            for g in confirmed_consumed:
                assert all(buf.is_consumed(f"{g}-{j}") for j in range(4)), f"consumption of group {g} lost"
            assert buf.stats()["added"] == len(buf)
            start = max(present) + 1  # resume where the log ends, as a restarted producer would


def test_drop_where_forgets_an_uncommitted_iteration_durably(tmp_path):
    with ReplayBuffer(tmp_path, rcfg()) as buf:
        for it, gid in ((1, "a"), (2, "b")):
            g = group(gid)
            for t in g:
                t.meta["iteration"] = it
            buf.add(g)
        assert buf.drop_where(lambda t: t.meta["iteration"] > 1) == 4
        assert {t.group_id for t in buf.trajectories()} == {"a"}
    with ReplayBuffer(tmp_path, rcfg()) as again:
        assert {t.group_id for t in again.trajectories()} == {"a"}
        assert len(again.trajectories(role="proposer")) == 0
