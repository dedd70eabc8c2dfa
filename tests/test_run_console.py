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
