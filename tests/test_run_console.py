"""The run console's plumbing without Ray: our lines reach driver.log with timestamps; an actor's warnings
travel through events.jsonl to the driver's console, a few per message, complete lines only."""
from __future__ import annotations

import json
import logging

from selfplay.run.console import EventWarningHandler, RunConsole, WarningRelay, relay_warnings_from
from selfplay.run.rundir import RunDir


def test_actor_warnings_reach_the_console_a_few_per_message(tmp_path, capsys):
    rd = RunDir(tmp_path)
    console = RunConsole(rd.logs)
    relay = WarningRelay(rd.events, console)
    handler = relay_warnings_from("rollout", rd.event)  # what an actor installs
    try:
        log = logging.getLogger("sandbox.pool")
        for _ in range(5):
            log.warning("sandbox mechanism %s inactive: %s", "seccomp", "no libseccomp")
        logging.getLogger("roles.executor").error("sandbox.run_many failed for %d programs", 3)
        logging.getLogger("transformers").warning("not ours: never relayed")
        logging.getLogger("roles.templates").info("info is not relayed")
    finally:
        for name in ("selfplay", "roles", "sandbox"):
            logging.getLogger(name).removeHandler(handler)
    assert relay.poll() == 4
    assert relay.poll() == 0  # each event once
    console.close()
    log_text = (rd.logs / "driver.log").read_text()
    lines = [ln.split(" ", 2)[2] for ln in log_text.splitlines()]  # drop the date and time
    assert lines == [
        "warning: rollout: sandbox mechanism seccomp inactive: no libseccomp",
        "warning: rollout: sandbox mechanism seccomp inactive: no libseccomp",
        "warning: rollout: sandbox mechanism seccomp inactive: no libseccomp (further ones only in logs/rollout.log)",
        "error: rollout: sandbox.run_many failed for 3 programs",
    ]
    assert "warning: rollout: sandbox mechanism seccomp" in capsys.readouterr().err


def test_relay_reads_complete_lines_only(tmp_path):
    rd = RunDir(tmp_path)
    rd.logs.mkdir(parents=True)
    console = RunConsole(rd.logs)
    relay = WarningRelay(rd.events, console)
    line = json.dumps({"event": "warning", "actor": "learner", "level": "warning", "message": "slow step"})
    with open(rd.events, "a") as f:
        f.write(line[:20])  # an actor mid-write
    assert relay.poll() == 0
    with open(rd.events, "a") as f:
        f.write(line[20:] + "\n")
    assert relay.poll() == 1
    console.close()
    assert "warning: learner: slow step" in (rd.logs / "driver.log").read_text()


def test_handler_counts_per_template(tmp_path):
    events = []
    h = EventWarningHandler(lambda kind, **f: events.append(f), "verifier", per_template=2)
    for i in range(4):
        h.emit(logging.LogRecord("roles.equivalence", logging.WARNING, __file__, 1, "timed out on %r", (i,), None))
    assert [e["message"] for e in events] == ["timed out on 0", "timed out on 1 (further ones only in logs/verifier.log)"]


LIVE_SCRIPT = """
import sys, time, warnings
from pathlib import Path
from selfplay.run.console import RunConsole, progress_display

console = RunConsole(Path(sys.argv[1]), capture_libraries=True)
console.print("run directory: demo")
progress = progress_display(console.rich)
bar = progress.add_task("iterations", total=2, completed=0, stage="starting the actors", since=time.monotonic())
if console.interactive:
    progress.start()
time.sleep(1.2)
print("a library's print"); warnings.warn("a library's warning")  # Python-level writes while the line is live
for it in (1, 2):
    for name in ("propose", "solve"):
        progress.update(bar, stage=f"iteration {it} · {name}", since=time.monotonic() - 61)
        time.sleep(0.6)
    console.print(f"it {it:4d} summary")
    progress.update(bar, completed=it, stage="")
progress.stop()
console.print("done")
console.close()
"""


def test_live_line_on_a_terminal_shows_the_stage_and_leaves_no_trace(tmp_path):
    """On a terminal: one live line with the iteration, the stage and its time, redrawn in place under our
    lines and gone at the end; a library's print or warning during it goes to libraries.log, not the
    screen (rich's Live takes over sys.stdout/sys.stderr unless told not to)."""
    import os
    import sys
    from pathlib import Path

    from terminal import run_on_terminal

    script = tmp_path / "live.py"
    script.write_text(LIVE_SCRIPT)
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
    shown = run_on_terminal([sys.executable, str(script), str(tmp_path / "logs")], cwd=tmp_path, env=env, timeout=60)
    assert shown.returncode == 0
    live = shown.lines_with("iterations")
    assert any("0/2" in ln and "starting the actors 0:0" in ln for ln in live), live
    for stage in ("iteration 1 · propose 1:0", "iteration 1 · solve 1:0", "iteration 2 · solve 1:0"):
        assert any(stage in ln for ln in live), (stage, live)
    assert any("1/2" in ln for ln in live)
    assert shown.final == ["run directory: demo", "it    1 summary", "it    2 summary", "done"]
    assert not any("library" in ln for frame in shown.frames for ln in frame)
    libraries = (tmp_path / "logs" / "libraries.log").read_text()
    assert "a library's print" in libraries and "a library's warning" in libraries
    assert "iterations" not in (tmp_path / "logs" / "driver.log").read_text()  # the live line is screen-only
