"""What a user sees on a terminal: run a command on a pseudo-terminal and replay its output through a
terminal emulator (pyte), keeping every screen it showed. Progress displays redraw their line in place
with cursor moves and erases, so counting the lines of the raw stream tells nothing; the screens do."""
from __future__ import annotations

import fcntl
import os
import pty
import select
import signal
import struct
import subprocess
import termios
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyte


@dataclass
class Screens:
    returncode: int
    frames: list[list[str]] = field(default_factory=list)  # each screen shown, lines right-stripped

    @property
    def final(self) -> list[str]:
        """The last screen's non-empty lines."""
        return [ln for ln in (self.frames[-1] if self.frames else []) if ln.strip()]

    def lines_with(self, needle: str) -> list[str]:
        """Every distinct screen line holding `needle`, in the order they first appeared."""
        seen: dict[str, None] = {}
        for frame in self.frames:
            for ln in frame:
                if needle in ln:
                    seen.setdefault(ln, None)
        return list(seen)


def run_on_terminal(argv: list[str], cwd: Path, env: dict[str, str], rows: int = 60, cols: int = 120,
                    timeout: float = 600) -> Screens:
    """Run `argv` with a pseudo-terminal (rows x cols) as its stdin, stdout and stderr; a command still
    running after `timeout` seconds is killed with its process group."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    proc = subprocess.Popen(argv, cwd=cwd, env={**env, "TERM": "xterm-256color"}, stdin=slave, stdout=slave,
                            stderr=slave, start_new_session=True)
    os.close(slave)
    screen = pyte.Screen(cols, rows)
    stream = pyte.ByteStream(screen)
    out = Screens(returncode=-1)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if not ready:
                if proc.poll() is not None:  # exited, and a process it left behind may hold the terminal
                    break
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every holder of the terminal's other side has closed it
                break
            if not data:
                break
            stream.feed(data)
            out.frames.append([ln.rstrip() for ln in screen.display])
        else:
            os.killpg(proc.pid, signal.SIGKILL)
    finally:
        os.close(master)
    out.returncode = proc.wait(timeout=60)
    return out
