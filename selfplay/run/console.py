"""The run's console: our own lines on the terminal and in `logs/driver.log`; everything else in files.

What a user sees during `selfplay run`: the run directory, where the libraries' output goes, a progress
display per stage (on a terminal), one summary line per iteration, our warnings and errors, and at the end
where the results are. Everything written to the process's stdout/stderr by others (Ray's start-up and
core-worker messages, vLLM, transformers, C++ libraries' own stderr) goes to `logs/libraries.log`: file
descriptors 1 and 2 are pointed at that file while the run lasts, and our console writes to a duplicate of
the original stderr. Each actor points its own descriptors at `logs/<actor>.log` (`redirect_output`).
"""
from __future__ import annotations

import io
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn, TimeElapsedColumn
from rich.text import Text

log = logging.getLogger("selfplay")


def redirect_output(log_file: Path) -> None:
    """Point this process's stdout and stderr (the descriptors, so child processes and C++ code follow)
    at `log_file`, appending. Used by each actor for its own log file."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


class _Tee(io.TextIOBase):
    """A text stream that writes to the terminal and, without colour codes, to driver.log."""

    def __init__(self, terminal: Any, log_path: Path):
        self.terminal = terminal
        self.log = open(log_path, "a", buffering=1)

    def write(self, text: str) -> int:
        self.terminal.write(text)
        self.terminal.flush()
        return len(text)

    def flush(self) -> None:
        self.terminal.flush()

    def isatty(self) -> bool:
        return self.terminal.isatty()

    def fileno(self) -> int:
        return self.terminal.fileno()


class RunConsole:
    """Our lines: to the terminal (stderr as it was when the run began) and to logs/driver.log."""

    def __init__(self, logs_dir: Path, capture_libraries: bool = False):
        logs_dir.mkdir(parents=True, exist_ok=True)
        self.logs_dir = logs_dir
        self.driver_log = logs_dir / "driver.log"
        self._saved: list[int] = []
        terminal: Any = sys.stderr
        if capture_libraries:
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            self._saved = [os.dup(1), os.dup(2)]
            terminal = os.fdopen(os.dup(self._saved[1]), "w", buffering=1)
            redirect_output(logs_dir / "libraries.log")
        self.tee = _Tee(terminal, self.driver_log)
        self.rich = Console(file=self.tee, highlight=False, soft_wrap=True)
        self.interactive = terminal.isatty()

    # what the exporters and the driver call
    def print(self, msg: Any = "", style: str | None = None) -> None:
        text = msg if isinstance(msg, Text) else Text(str(msg), style=style or "")
        self.rich.print(text)
        self._log(text.plain)

    def warn(self, msg: str) -> None:
        self.print(f"warning: {msg}", style="yellow")

    def error(self, msg: str) -> None:
        self.print(f"error: {msg}", style="bold red")

    def note(self, msg: str) -> None:
        """driver.log only (stage boundaries, timings): the terminal shows them as the progress display."""
        self._log(msg)

    def _log(self, plain: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        for line in plain.splitlines() or [""]:
            self.tee.log.write(f"{stamp} {line}\n")

    def close(self) -> None:
        """Give the process its descriptors back (an error after the run prints on the terminal again)."""
        if self._saved:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except (OSError, ValueError):
                    pass
            os.dup2(self._saved[0], 1)
            os.dup2(self._saved[1], 2)
            for fd in self._saved:
                os.close(fd)
            self._saved = []
        self.tee.log.close()


class StageColumn(ProgressColumn):
    """What the run does now and for how long: `iteration 2 · solve 0:12` (the task's `stage` and `since`
    fields; `since` is a time.monotonic() stamp). The bar's own elapsed time is the whole run's."""

    def render(self, task: Task) -> Text:
        what, since = task.fields.get("stage") or "", task.fields.get("since")
        if not what:
            return Text("")
        secs = max(0, int(time.monotonic() - since)) if since is not None else 0
        return Text(f"{what} {secs // 60}:{secs % 60:02d}", style="cyan")


def progress_display(console: Console) -> Progress:
    """The live line under the console's lines while a run goes (terminals only; transient: it leaves
    nothing behind). It never takes over sys.stdout/sys.stderr: Python-level writes of the libraries
    (print, warnings) must keep going to the descriptors, that is to logs/libraries.log, not the screen."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(bar_width=24), MofNCompleteColumn(),
                    TimeElapsedColumn(), StageColumn(), console=console, transient=True,
                    redirect_stdout=False, redirect_stderr=False)


class ConsoleLogHandler(logging.Handler):
    """The `selfplay` logger during a run: INFO to driver.log only, WARNING and above to the console too;
    a traceback (log.exception) goes to driver.log, the terminal gets its one-line message."""

    def __init__(self, console: RunConsole):
        super().__init__(logging.INFO)
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
            if record.levelno >= logging.WARNING:
                if record.exc_info and record.exc_info[1] is not None:
                    first = (str(record.exc_info[1]).strip().splitlines() or [""])[-1][:200]
                    msg = f"{msg}: {type(record.exc_info[1]).__name__}: {first} (traceback: {self.console.driver_log})"
                (self.console.error if record.levelno >= logging.ERROR else self.console.warn)(msg)
            else:
                self.console.note(f"{record.levelname} {record.name}: {msg}")
            if record.exc_info:
                self.console.note(logging.Formatter().formatException(record.exc_info))
        except Exception:  # logging must never take the run down
            self.handleError(record)


# ------------------------------------------------------------------------------- actors' warnings
OUR_LOGGERS = ("selfplay", "roles", "sandbox")


class EventWarningHandler(logging.Handler):
    """In an actor: warnings of our own loggers become `warning` events in the run's events.jsonl, which
    the driver's console relays (`WarningRelay`). Each message template is relayed `per_template` times;
    the full stream stays in the actor's own log file."""

    def __init__(self, emit_event: Any, actor: str, per_template: int = 3):
        super().__init__(logging.WARNING)
        self.emit_event, self.actor, self.per_template = emit_event, actor, per_template
        self.seen: dict[tuple[str, str], int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        try:
            key = (record.name, str(record.msg))
            n = self.seen[key] = self.seen.get(key, 0) + 1
            if n > self.per_template:
                return
            msg = " ".join(record.getMessage().split())[:400]
            if n == self.per_template:
                msg += f" (further ones only in logs/{self.actor}.log)"
            self.emit_event("warning", actor=self.actor, level=record.levelname.lower(), message=msg)
        except Exception:
            self.handleError(record)


def relay_warnings_from(actor: str, emit_event: Any) -> EventWarningHandler:
    """Install the handler on our loggers in this (actor) process."""
    handler = EventWarningHandler(emit_event, actor)
    for name in OUR_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(h, EventWarningHandler) for h in logger.handlers):
            logger.addHandler(handler)
    return handler


class WarningRelay:
    """Driver side: prints the `warning` events the actors appended to events.jsonl since the last poll."""

    def __init__(self, events_file: Path, console: RunConsole):
        self.path, self.console = events_file, console
        self.offset = events_file.stat().st_size if events_file.exists() else 0

    def poll(self) -> int:
        import json

        if not self.path.exists():
            return 0
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        end = chunk.rfind(b"\n") + 1  # complete lines only: an actor may be mid-write
        self.offset += end
        shown = 0
        for line in chunk[:end].splitlines():
            try:
                e = json.loads(line)
            except ValueError:
                continue
            if isinstance(e, dict) and e.get("event") == "warning":
                say = self.console.error if e.get("level") in ("error", "critical") else self.console.warn
                say(f"{e.get('actor', '?')}: {e.get('message', '')}")
                shown += 1
        return shown
