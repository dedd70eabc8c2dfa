"""Resume "with no duplicate and no gap" (README): the driver stopped at every stage boundary of an iteration,
by SIGKILL, SIGTERM and SIGINT, in both pipelines.

Exact timing, no sleeps: with `SELFPLAY_PAUSE_AT_ITERATION=N` the driver stops itself (SIGSTOP) after each
stage event of iteration N (loop.py `pause_point`); the test freezes all it started (its group: GCS, raylet;
the actors, each in a group of its own) and then copies the run directory (what a SIGKILL there leaves:
`_real_sigkill_leaves_the_snapshot` checks it with a real one), sends SIGTERM to the driver (`selfplay stop`)
or SIGINT to the group (Ctrl-C), and lets it go on, or kills it. So one life yields the SIGKILL state of every
boundary; each is restored and resumed with the CLI (`_kill_states_resume_to_the_commit`): the resume event's
dropped counts must equal what the state holds past the commit, and the resume (SIGKILLed after its rollback)
must leave the committed state exactly. A resume from the committed state reaches the uninterrupted result
(the chains below), so each SIGKILL state does too.

SIGTERM and SIGINT run one handler (`test_sigterm_and_sigint_reach_the_same_handler_state`); Ctrl-C's SIGINT to
the group also reaches Ray's GCS and raylet, which block it (`_sigint_blocked`, on the live run). The stop comes
at the next safe point; each boundary of the synchronous loop still gets a real graceful signal (alternating,
two in one life where the run goes on to the commit), and each stop must leave exactly what the uninterrupted
run had at that safe point. The asynchronous chain: Ctrl-C at practice, a real SIGKILL; when a finished
learner step reaches the engine depends on timing there, so its second iteration is checked by invariants.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import sqlite3
import time
from collections import Counter
from pathlib import Path

import pytest

from sandbox.linux import descendants
from selfplay.run.loop import PAUSE_ENV
from selfplay.run.rundir import RunDir, published_adapters
from test_pipeline import _check_async_run
from test_selfplay_e2e import DEBUG, TINY, finish, selfplay

SMALL = [*TINY, "verifier.probes=0"]  # probes: their own seeded solve, not needed here
SYNC = (DEBUG, *SMALL, "loop.iterations=3")
ASYNC = (DEBUG, *SMALL, "loop.iterations=2", "loop.pipeline=async", "replay.max_staleness=1")
STAGES = {"sync": ["propose", "solve", "reward", "learn_proposer", "practice", "learn_executor", "log_metrics",
                   "commit"],
          "async": ["propose", "solve", "reward", "practice", "learn_proposer", "learn_executor", "log_metrics",
                    "commit"]}
# wall-clock and speed scalars differ between any two runs; everything else must match exactly
VOLATILE = ("time/", "throughput/", "learner/proposer/time_s", "learner/executor/time_s",
            "learner/proposer/tokens_per_s", "learner/executor/tokens_per_s")


# ------------------------------------------------------------------------------------------ unit level
def test_sigterm_and_sigint_reach_the_same_handler_state(tmp_path):
    """Both signals run one handler: the same stop flag and a `signal` event naming the signal; the third
    leaves at once (KeyboardInterrupt). The chains below send each at real boundaries."""
    from selfplay.config import load_config
    from selfplay.run.driver import Driver

    rd = RunDir.create(load_config(DEBUG, [f"run_dir={tmp_path / 'run'}"]))
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    states = {}
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            driver = Driver(rd)
            driver._install_signals()
            assert signal.getsignal(signal.SIGINT) == signal.getsignal(signal.SIGTERM) == driver._on_signal
            os.kill(os.getpid(), sig)
            states[sig.name] = (driver._stop, driver._signals, rd.read_events()[-1]["signal"])
            os.kill(os.getpid(), sig)
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), sig)
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
    assert states == {"SIGTERM": (True, 1, "SIGTERM"), "SIGINT": (True, 1, "SIGINT")}


def test_pause_point_stops_the_driver_at_each_stage_event_of_the_chosen_iteration(tmp_path):
    """`SELFPLAY_PAUSE_AT_ITERATION=2`: a SIGSTOP right after each stage event of iteration 2, none elsewhere."""
    import subprocess
    import sys

    code = ("import sys, types; from pathlib import Path; from selfplay.run.loop import stage; "
            "from selfplay.run.rundir import RunDir; ctx = types.SimpleNamespace(rd=RunDir(Path(sys.argv[1])), "
            "stop_requested=lambda: False, on_stage=lambda s: None)\n"
            "for it in (1, 2, 3):\n    with stage(ctx, it, 'propose'): pass")
    rd = RunDir(tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], env={**os.environ, PAUSE_ENV: "2"})
    paused, seen = [], 0
    try:
        while proc.poll() is None:
            if _state(proc.pid) == "T":
                events = rd.read_events()
                if len(events) > seen:  # a new pause (not the last one, before SIGCONT took)
                    seen = len(events)
                    paused.append((events[-1]["iteration"], events[-1]["phase"]))
                os.kill(proc.pid, signal.SIGCONT)
            time.sleep(0.005)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.wait() == 0
    assert paused == [(2, "start"), (2, "end")]
    assert len(rd.read_events()) == 6


# ------------------------------------------------------------------------------------------ harness
class Life:
    """One `selfplay` process in its own session (the group Ctrl-C and `kill -9 -PID` reach: the driver, Ray's
    GCS and raylet; Ray starts each actor in a group of its own)."""

    def __init__(self, rd: RunDir, *args: str, pause: str | None = None):
        self.rd, self.seen, self.frozen = rd, _stage_count(rd), []
        self.offset = rd.events.stat().st_size if rd.events.exists() else 0  # where this life's events start
        self.proc = selfplay(*args, env_update={PAUSE_ENV: pause}, start_new_session=True)
        self.pid = self.proc.pid

    def next_pause(self, timeout: float = 900) -> dict | None:
        """Wait until the driver stops itself at its next stage event, then freeze everything it started (its
        group, the actors, their children); returns that event, or None when the process ended instead."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                return None
            if _state(self.pid) == "T" and (n := _stage_count(self.rd)) > self.seen:
                self.seen = n
                os.killpg(self.pid, signal.SIGSTOP)
                for _ in range(2):  # a second sweep catches a process forked during the first
                    self.frozen = descendants(self.pid)
                    _signal_all(self.frozen, signal.SIGSTOP)
                return [e for e in self.rd.read_events() if e.get("event") == "stage"][-1]
            assert time.monotonic() < deadline, "no pause"
            time.sleep(0.005)

    def go_on(self, sig: signal.Signals | None = None) -> None:
        """Send `sig` (none: just go on) to the frozen run and let everything go on from where it stands."""
        if sig == signal.SIGTERM:
            os.kill(self.pid, sig)  # `selfplay stop` / `ray job stop`: the driver only
        elif sig is not None:
            os.killpg(self.pid, sig)  # Ctrl-C, or `kill -9 -PID` (the actors then find their raylet gone)
        _signal_all(self.frozen, signal.SIGCONT)
        if sig != signal.SIGKILL:
            os.killpg(self.pid, signal.SIGCONT)

    def wait_event(self, kind: str, timeout: float = 300) -> None:
        """Wait for this life's first `kind` event."""
        deadline = time.monotonic() + timeout
        while True:
            with open(self.rd.events, "rb") as f:
                f.seek(self.offset)
                if f'"event": "{kind}"'.encode() in f.read():
                    return
            assert self.proc.poll() is None, f"ended before its {kind} event:\n{self.proc.stdout.read()}"
            assert time.monotonic() < deadline, f"no {kind} event"
            time.sleep(0.01)

    def end(self) -> tuple[int, str]:
        out = finish(self.proc)
        return self.proc.returncode, out

    def kill(self) -> None:
        """SIGKILL everything the life started (a failed assertion must not leave a run behind)."""
        if self.proc.poll() is None:
            left = descendants(self.pid)
            os.killpg(self.pid, signal.SIGKILL)
            _signal_all(left, signal.SIGKILL)
            self.proc.wait()


def _signal_all(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "?"


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _stage_count(rd: RunDir) -> int:
    return sum(e.get("event") == "stage" for e in rd.read_events())


def _sigint_blocked(pgid: int) -> dict[str, bool]:
    """Whether each process of the driver's group but the driver (Ray's raylet, GCS, actors) blocks or ignores
    SIGINT: then Ctrl-C to the group reaches only the driver's handler, the path SIGTERM to the driver takes."""
    bit, out = 1 << (signal.SIGINT - 1), {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == pgid:
            continue
        try:
            if os.getpgid(int(d.name)) != pgid:
                continue
            fields = dict(line.split(":\t", 1) for line in (d / "status").read_text().splitlines() if ":\t" in line)
        except (OSError, ValueError):
            continue
        out[f'{fields["Name"].strip()}:{d.name}'] = bool((int(fields["SigBlk"], 16) | int(fields["SigIgn"], 16)) & bit)
    return out


def _tree(root: Path, skip: tuple = ()) -> dict[str, str]:
    """Every file of a run directory (but those under `skip`) and a digest of its bytes."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and not rel.startswith(skip):
            out[rel] = hashlib.sha1(p.read_bytes()).hexdigest()
    return out


def _restore(snap: Path, root: Path) -> None:
    shutil.rmtree(root)
    shutil.copytree(snap, root, symlinks=True)


def _contents(rd: RunDir) -> dict:
    """Everything a run keeps, without run-specific ids (task ids are uuids) or wall-clock values."""
    from selfplay.data.replay import ReplayBuffer

    con = sqlite3.connect(f"file:{rd.metrics}?mode=ro", uri=True)
    try:
        scalars = sorted((it, k, v) for it, k, v in con.execute("SELECT iteration, key, value FROM scalars")
                         if not k.startswith(VOLATILE))
        tasks = sorted(con.execute("SELECT iteration, question, pseudo_label, p_hat, proposer_reward, accepted, "
                                   "reject_reason, n_samples FROM tasks").fetchall(), key=repr)
        trajs = sorted(con.execute("SELECT iteration, text, reward, correct, answer FROM trajectories").fetchall(),
                       key=repr)
        rows = {t: sorted(i for (i,) in con.execute(f"SELECT iteration FROM {t}")) for t in ("scalars", "tasks",
                                                                                           "trajectories")}
    finally:
        con.close()
    pool = [(t["question"], t["pseudo_label"], t["p_hat"], t["iteration"])
            for t in map(json.loads, rd.pool.read_text().splitlines())] if rd.pool.exists() else []
    with ReplayBuffer(rd.replay, rd.load_config().replay) as buf:
        replay = sorted(((t.role, int(t.meta.get("iteration", 0)), tuple(t.prompt_ids), tuple(t.completion_ids),
                          t.reward, t.policy_version, buf.consumed_at(t.traj_id), round(t.advantage, 6))
                         for t in buf.trajectories()), key=repr)
    state = rd.state()
    published = {r: i["version"] for r, i in published_adapters(rd.adapters).items()}
    return {"scalars": scalars, "tasks": tasks, "trajectories": trajs, "pool": pool, "replay": replay, "rows": rows,
            "committed": (state.get("iteration", 0), state.get("versions")), "published": published}


def _diff(got: dict, want: dict) -> dict:
    """The parts of two `_contents` that differ. Scalars match to 1e-6 relative: a resumed learner's float32
    reductions may end one ulp off (learner/proposer/grad_norm 0.29045808 vs 0.29045811 seen); the rest exactly."""
    def close(a, b):
        return a[:2] == b[:2] and (a[2] == b[2] or (a[2] is not None and b[2] is not None
                                                    and math.isclose(a[2], b[2], rel_tol=1e-6)))
    out = {k: (got[k], want[k]) for k in got if k != "scalars" and got[k] != want[k]}
    if len(got["scalars"]) != len(want["scalars"]) or not all(map(close, got["scalars"], want["scalars"])):
        out["scalars"] = [(a, b) for a, b in zip(got["scalars"], want["scalars"]) if not close(a, b)] or "count"
    return out


def _left_over(c: dict) -> dict:
    """What a run's contents hold past its commit: what a resume must drop, as its `resume` event counts it."""
    it, versions = c["committed"]
    versions = versions or {"proposer": 0, "executor": 0}
    rows = c["replay"]  # (role, iteration, prompt, completion, reward, policy_version, consumed_at, advantage)
    return {"pool": sum(p[3] > it for p in c["pool"]),
            "replay": {**{role: {"dropped": sum(r[0] == role and r[5] > v for r in rows),
                                 "unconsumed": sum(r[0] == role and r[5] <= v and r[6] is not None and r[6] > v
                                                   for r in rows)} for role, v in versions.items()},
                       # rows of later iterations that the version rollback kept
                       "iterations": sum(r[1] > it and r[5] <= versions[r[0]] for r in rows)},
            "metrics": {t: sum(i > it for i in its) for t, its in c["rows"].items()}}


def _resume_event_matches(rd: RunDir, before: dict, where: str) -> None:
    event = [e for e in rd.read_events() if e.get("event") == "resume"][-1]
    left = _left_over(before)
    assert event["iteration"] == before["committed"][0], (where, event)
    assert {"pool": event["pool_dropped"], "replay": event["replay"], "metrics": event["metrics"]} == left, \
        (where, event, left)


# ------------------------------------------------------------------------------------------ phases
def _reference(root: Path, args: tuple, snaps: Path, blocked: dict) -> dict[tuple, Path]:
    """The uninterrupted run, paused at each stage event of iterations 1 and 2: each pause's copy is the
    state a SIGKILL there leaves. Returns {(iteration, stage, phase): copy}; fills `blocked` (_sigint_blocked)."""
    rd = RunDir(root)
    life = Life(rd, "run", *args, f"run_dir={root}", pause="1,2")
    out = {}
    try:
        seen = []
        while (e := life.next_pause()) is not None:
            key = (e["iteration"], e["stage"], e["phase"])
            seen.append(key)
            if e["iteration"] == 2 or key == (1, "commit", "end"):
                if key == (2, "propose", "start"):
                    blocked.update(_sigint_blocked(life.pid))
                out[key] = snaps / "-".join(map(str, key))
                shutil.copytree(root, out[key], symlinks=True)
            life.go_on()
        code, text = life.end()
    finally:
        life.kill()
    assert code == 0, text
    return out


def _boundaries(pipeline: str, snaps: dict) -> list[tuple]:
    """The issue's boundaries of iteration 2 (each stage's start, the commit's end), which must be every one."""
    got = [k for k in snaps if k[0] == 2]
    events = [(2, s, p) for s in STAGES[pipeline] for p in ("start", "end")]
    assert got == events, got  # a stage added to the loop shows up here and needs its expectations
    return [(2, s, "start") for s in STAGES[pipeline]] + [(2, "commit", "end")]


def _kill_states_resume_to_the_commit(root: Path, snaps: dict, pipeline: str) -> None:
    """SIGKILL at every boundary: the copy is restored, resumed, and the resume (SIGKILLed after its rollback)
    must leave the committed state exactly, having counted what it dropped."""
    committed = {1: _contents(RunDir(snaps[(1, "commit", "end")]))}
    done = {}
    for key in _boundaries(pipeline, snaps) + [k for k in snaps if k[0] == 2 and k[2] == "end"]:
        tree = json.dumps(_tree(snaps[key], skip=("events.jsonl", "logs")))
        if tree in done:  # the same files as another boundary (an end and the next start): same rollback
            continue
        _restore(snaps[key], root)
        before = _contents(RunDir(snaps[key]))
        rd = RunDir(root)
        life = Life(rd, "resume", str(root))
        try:
            life.wait_event("resume")
        finally:
            life.kill()
        _resume_event_matches(rd, before, f"SIGKILL at {key}")
        want = dict(committed.get(before["committed"][0], before))
        got = _contents(rd)
        # published adapters: a resume forgets those published after the commit (and pushes the committed ones
        # again once its actors run), so what is left is at or below the committed versions
        versions = got["committed"][1] or {}
        assert all(v <= versions.get(r, 0) for r, v in got.pop("published").items()), key
        want.pop("published")
        assert not _diff(got, want), (key, _diff(got, want))
        done[tree] = key
    assert any(_left_over(_contents(RunDir(snaps[k])))["pool"] for k in done.values())  # the kills did drop
    assert any(_left_over(_contents(RunDir(snaps[k])))["replay"]["iterations"] for k in done.values())
    assert any(_left_over(_contents(RunDir(snaps[k])))["metrics"]["scalars"] for k in done.values())


def _uninterrupted_and_kill_states(tmp_path: Path, args: tuple, pipeline: str) -> tuple:
    """Both matrices' first phases: the uninterrupted run (paused and copied at every boundary, then moved to
    `uninterrupted/`) and the SIGKILL state of every boundary resumed to the commit. Returns (the empty run
    directory the chains use, the copies, the uninterrupted run's directory, its contents, _sigint_blocked)."""
    root, blocked = tmp_path / "run", {}
    snaps = _reference(root, args, tmp_path / "snaps", blocked)
    final = tmp_path / "uninterrupted"
    shutil.move(root, final)
    root.mkdir()
    _kill_states_resume_to_the_commit(root, snaps, pipeline)
    return root, snaps, final, _contents(RunDir(final)), blocked


def _stop_life(root: Path, plan: dict, pause: str, snaps: dict | None = None) -> tuple[int, str, dict]:
    """Resume, send plan[(iteration, stage, phase)] at those boundaries, let it run to its end. With `snaps`,
    copy the run directory at each pause into it. Returns (exit code, output, contents before the resume)."""
    rd = RunDir(root)
    before = _contents(rd)
    life = Life(rd, "resume", str(root), pause=pause)
    try:
        life.wait_event("resume")
        _resume_event_matches(rd, before, f"resume before {plan}")
        seen = []
        while (e := life.next_pause()) is not None:
            key = (e["iteration"], e["stage"], e["phase"])
            seen.append(key)
            if snaps is not None:
                snaps[key] = root.parent / ("life-" + "-".join(map(str, key)))
                shutil.copytree(root, snaps[key], symlinks=True)
            life.go_on(plan.get(key))
        code, out = life.end()
    finally:
        life.kill()
    signals = [e["signal"] for e in rd.read_events() if e.get("event") == "signal"]
    assert signals[len(signals) - len(plan):] == [s.name for s in plan.values()], \
        (signals, f"exit {code}", "pauses seen:", seen, out[-3000:])
    return code, out, before


# ------------------------------------------------------------------------------------------ the tests
T, I = signal.SIGTERM, signal.SIGINT
# Passed in full 2026-12-03 (18.4 min at load 2-16, beside the rest of the suite).
# synchronous loop: one graceful signal at each boundary, alternating; the first five stop at the next safe
# point (the stage under way finishes), the rest run to the commit (no safe point after `learn_executor`'s)
SYNC_STOPS = [  # (plan, the reference's copy the stop must leave, expected state)
    ({(2, "propose", "start"): T}, (2, "propose", "end"), "stopped"),
    ({(2, "solve", "start"): I}, (2, "solve", "end"), "stopped"),
    ({(2, "reward", "start"): T}, (2, "reward", "end"), "stopped"),
    ({(2, "learn_proposer", "start"): I}, (2, "learn_proposer", "end"), "stopped"),
    ({(2, "practice", "start"): T}, (2, "practice", "end"), "stopped"),
    ({(2, "learn_executor", "start"): I, (2, "commit", "start"): T}, (2, "commit", "end"), "stopped"),
    ({(3, "log_metrics", "start"): I, (3, "commit", "end"): T}, None, "finished"),  # the last iteration
]


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_sync_stopped_at_every_boundary_by_each_signal_resumes_to_the_uninterrupted_run(tmp_path):
    root, snaps, final, want_final, blocked = _uninterrupted_and_kill_states(tmp_path, SYNC, "sync")
    _restore(snaps[(2, "propose", "start")], root)  # a SIGKILL state: the chain starts with its resume
    for plan, expected, status in SYNC_STOPS:
        pause = str(next(iter(plan))[0])
        code, out, _ = _stop_life(root, plan, pause)
        rd = RunDir(root)
        assert rd.state()["status"] == status, (plan, rd.state(), out)
        assert code == (130 if status == "stopped" else 0), (plan, out)
        want = _contents(RunDir(snaps[expected])) if expected else want_final
        got = _contents(rd)
        assert not _diff(got, want), (plan, _diff(got, want))
    again = selfplay("resume", str(root))
    assert "already finished" in finish(again) and again.returncode == 0
    assert {it for it, _, _ in want_final["scalars"]} == {1, 2, 3}  # no gap, no duplicate: 3 iterations, once
    assert {(r[0], r[1]) for r in want_final["replay"]} >= {("proposer", i) for i in (1, 2, 3)}
    assert any(r[0] == "executor" for r in want_final["replay"])  # both roles trained
    assert any(n.startswith("raylet") for n in blocked) and all(blocked.values()), blocked


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_async_stopped_at_every_boundary_resumes_without_losing_or_repeating(tmp_path):
    root, snaps, final, want_final, blocked = _uninterrupted_and_kill_states(tmp_path, ASYNC, "async")
    # the chain: a SIGKILL mid-overlap (learner steps on iteration 1 in flight, iteration 2 rolling out) ...
    _restore(snaps[(2, "solve", "start")], root)
    # ... Ctrl-C at practice: the stop comes at learn_proposer's safe point, after both roles' rollouts of
    # iteration 2 entered the replay buffer (the resume must drop them and forget their consumption)
    life_snaps: dict = {}
    code, out, _ = _stop_life(root, {(2, "practice", "start"): I}, "2", life_snaps)
    rd = RunDir(root)
    assert code == 130 and rd.state()["status"] == "stopped" and rd.state()["iteration"] == 1, out
    at_practice_end, got = _contents(RunDir(life_snaps[(2, "practice", "end")])), _contents(rd)
    for part in ("pool", "scalars", "tasks", "trajectories", "published", "committed"):
        assert got[part] == at_practice_end[part], part
    cfg = rd.load_config()
    added = sorted((Counter(got["replay"]) - Counter(at_practice_end["replay"])).elements(), key=repr)
    practised = min(cfg.executor.tasks_per_iteration, len(at_practice_end["pool"]))
    assert [r[:2] for r in added] == [("executor", 2)] * cfg.executor.group_size * practised + \
        [("proposer", 2)] * cfg.proposer.candidates_per_iteration * cfg.proposer.group_size, added
    assert sum(Counter(at_practice_end["replay"]).values()) == len(got["replay"]) - len(added)  # nothing lost
    # ... a real SIGKILL at learn_proposer, which leaves what the frozen copy holds ...
    _real_sigkill_leaves_the_snapshot(root, (2, "learn_proposer", "start"))
    # ... and a resume that finishes the run
    code, out, _ = _stop_life(root, {}, "")
    assert code == 0 and RunDir(root).state()["status"] == "finished", out
    got = _contents(RunDir(root))
    assert got["committed"] == want_final["committed"]  # every step ran once: versions count them
    for part in ("pool", "tasks", "trajectories", "scalars"):  # iteration 1: value for value
        assert [r for r in got[part] if r[-1 if part == "pool" else 0] == 1] == \
            [r for r in want_final[part] if r[-1 if part == "pool" else 0] == 1], part
    for rd in (RunDir(root), RunDir(final)):  # no duplicate, no gap: every rollout trained exactly once, ...
        _check_async_run(rd, iterations=2)
    for c in (got, want_final):
        assert sorted({s[0] for s in c["scalars"]}) == [1, 2]
        assert len(c["tasks"]) == 2 * cfg.proposer.candidates_per_iteration * cfg.proposer.group_size  # once each
    assert len(got["replay"]) == len(want_final["replay"])
    assert any(n.startswith("raylet") for n in blocked) and all(blocked.values()), blocked


def _real_sigkill_leaves_the_snapshot(root: Path, at: tuple) -> None:
    """Resume, freeze at `at`, copy, SIGKILL the group: the run's data then is exactly the copy's, file for file
    (console logs and events aside: an actor may log its raylet's death)."""
    rd = RunDir(root)
    life = Life(rd, "resume", str(root), pause=str(at[0]))
    try:
        while (e := life.next_pause()) is not None:
            if (e["iteration"], e["stage"], e["phase"]) == at:
                frozen, rest = _tree(root, skip=("logs", "events.jsonl")), list(life.frozen)
                actors = [p for p in rest if _comm(p).startswith("ray::")]
                life.go_on(signal.SIGKILL)  # the group dies; the actors go on until they find their raylet gone
                life.proc.wait()
                deadline = time.monotonic() + 120
                while any(_state(p) not in ("?", "Z") for p in actors):
                    assert time.monotonic() < deadline, "actors outlived their raylet"
                    time.sleep(0.05)
                _signal_all([p for p in rest if _state(p) not in ("?", "Z")], signal.SIGKILL)  # sandbox helpers
                break
            life.go_on()
        else:
            raise AssertionError(f"never paused at {at}")
    finally:
        life.kill()
    assert life.proc.returncode == -signal.SIGKILL
    assert _tree(root, skip=("logs", "events.jsonl")) == frozen
    assert rd.state()["status"] == "running" and rd.state()["iteration"] == 1
