"""The console of a real run, as a user sees it: a handful of our own lines before the first iteration's
summary (Ray's, vLLM's and the libraries' output goes to files under logs/), the same lines in
logs/driver.log, where to look at the end; then `resume RUN loop.iterations=N` extends the finished run."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from selfplay.run.rundir import RunDir
from terminal import run_on_terminal

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
DEBUG = str(REPO / "configs" / "debug.yaml")
TINY = [
    "proposer.candidates_per_iteration=2", "proposer.group_size=2", "proposer.max_tokens=64",
    "executor.samples_per_task=3", "executor.group_size=2", "executor.tasks_per_iteration=1",
    "executor.max_turns=1", "executor.max_tokens_per_turn=64", "eval.every=0", "engine.backend=hf",
]
MAX_LINES_BEFORE_SUMMARY = 20
# what Ray, vLLM and the libraries print when they reach the terminal (the issue counted 78 such lines)
NOISE = ("core_worker", "Token authentication", "Loading weights", "INFO", "(pid=", "Traceback", "it/s]",
         "WARNING", "gguf", "torch_dtype", "Ray.init")


def selfplay(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "SELFPLAY_DEBUG"}
    return subprocess.run([sys.executable, "-m", "selfplay", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)


def lines_before(out: str, prefix: str) -> list[str]:
    lines = [ln for ln in out.splitlines() if ln.strip()]
    first = next((i for i, ln in enumerate(lines) if ln.startswith(prefix)), None)
    assert first is not None, f"no line starting with {prefix!r}:\n{out}"
    return lines[:first]


def test_console_is_short_logs_go_to_files_and_resume_extends(tmp_path):
    """Also (sharing the run) the loop runs every requested update with one learner process: proposer_updates=2
    on 2 proposer groups is 2 optimizer steps, version 2 published (tests/test_scale_e2e.py: over two ranks)."""
    import json
    import sqlite3

    rd = RunDir(tmp_path / "run")
    res = selfplay("run", DEBUG, f"run_dir={rd.root}", "loop.iterations=1", *TINY, "loop.proposer_updates=2")
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    con = sqlite3.connect(f"file:{rd.metrics}?mode=ro", uri=True)
    scalars = dict(con.execute("SELECT key, value FROM scalars WHERE iteration=1").fetchall())
    con.close()
    assert scalars["learner/proposer/steps"] == scalars["learner/proposer/steps_requested"] == 2.0, scalars
    assert scalars["learner/proposer/policy_version"] == 2.0
    assert json.loads((rd.adapters / "published.json").read_text())["proposer"]["version"] == 2
    before = lines_before(out, "it    1")
    assert len(before) <= MAX_LINES_BEFORE_SUMMARY, "\n".join(before)
    assert before[0] == f"run directory: {rd.root}"
    # nothing of Ray's or the libraries' own output on the console
    for noise in ("core_worker", "Token authentication", "Loading weights", "INFO", "(pid="):
        assert noise not in out, noise
    assert f"selfplay dashboard {rd.root}" in out and "1/1 iterations committed" in out
    # the console's lines are kept, each under a timestamp, with the stage boundaries between them
    log = (rd.logs / "driver.log").read_text()
    for line in [*before, next(ln for ln in out.splitlines() if ln.startswith("it    1"))]:
        assert line in log, line
    assert "iteration 1: propose" in log
    # each actor writes its own log file; Ray's driver-side messages are in libraries.log
    for actor in ("rollout", "learner", "verifier", "sandbox"):
        assert (rd.logs / f"{actor}.log").exists(), actor
    assert (rd.logs / "libraries.log").stat().st_size > 0

    res = selfplay("resume", str(rd.root), "loop.iterations=2")
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert len(lines_before(out, "it    2")) <= MAX_LINES_BEFORE_SUMMARY
    assert rd.state()["status"] == "finished" and rd.state()["iteration"] == 2
    assert rd.load_config().loop.iterations == 2
    assert any(e.get("event") == "config_changed" for e in rd.read_events())


def test_an_error_after_ray_started_is_one_short_message(tmp_path):
    """A model directory that passes the preflight (it has a config.json) but cannot be loaded: the learner
    actor fails in its constructor. The user gets the actor's own exception in a few lines and exit 1; the
    traceback is in logs/driver.log."""
    model = tmp_path / "not-a-model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    rd = RunDir(tmp_path / "run")
    res = selfplay("run", DEBUG, f"run_dir={rd.root}", f"model.name_or_path={model}", *TINY)
    out = res.stdout + res.stderr
    assert res.returncode == 1, out
    after = lines_before(out + "\nit    end", "it    end")
    after = after[next(i for i, ln in enumerate(after) if ln.startswith("starting ")) + 1:]
    assert len(after) <= 3, out
    assert after[0].startswith(f"error: ActorStartError: the learner actor died while the run was starting (its log: "
                               f"{rd.logs / 'learner.log'}): ValueError: Unrecognized model"), out
    assert "Traceback" not in out
    assert "--verbose" in after[1] and str(rd.logs / "driver.log") in after[1]
    assert "Traceback" in (rd.logs / "driver.log").read_text()
    assert rd.state()["status"] == "failed"


def test_vllm_run_on_a_terminal_shows_a_live_line_and_a_short_console(tmp_path):
    """`make run` as a user sees it: configs/debug.yaml's vLLM backend (tiny, 1 iteration), on a terminal.
    While it goes, one live line names what it does (the actors' start, then each stage of iteration 1 with
    its time); the final screen keeps at most 20 lines before the first iteration's summary, none of Ray's
    or vLLM's, and nothing of the live line."""
    rd = RunDir(tmp_path / "run")
    tiny = [o for o in TINY if o != "engine.backend=hf"] + ["engine.backend=vllm"]
    env = {k: v for k, v in os.environ.items() if k != "SELFPLAY_DEBUG"}
    shown = run_on_terminal([sys.executable, "-m", "selfplay", "run", DEBUG, f"run_dir={rd.root}",
                             "loop.iterations=1", *tiny], cwd=REPO, env=env, cols=160, timeout=900)
    final = "\n".join(shown.final)
    assert shown.returncode == 0, final
    before = lines_before(final, "it    1")
    assert len(before) <= MAX_LINES_BEFORE_SUMMARY, final
    assert before[0].startswith("run directory: ") and any("engine vllm" in ln for ln in before), final
    seen = "\n".join(ln for frame in shown.frames for ln in frame)
    for noise in NOISE:
        assert noise not in seen, (noise, final)
    live = shown.lines_with("iterations ")
    assert any(re.search(r"0/1 .*starting the actors \d+:\d\d", ln) for ln in live), live
    stages = set(re.findall(r"0/1 .*iteration 1 · (\w+) \d+:\d\d", "\n".join(live)))
    assert {"propose", "solve"} <= stages, live  # the long stages (a stage shorter than a redraw may never show)
    # the live line leaves nothing behind ("iterations 1..1" and "1/1 iterations committed" are ours to keep)
    assert not [ln for ln in shown.final if ln.lstrip().startswith("iterations ") or "━" in ln], final
    assert f"selfplay dashboard {rd.root}" in final.replace("\n", "") and rd.state()["status"] == "finished"
    assert (rd.logs / "rollout.log").stat().st_size > 0  # vLLM's own output went to its actor's log
