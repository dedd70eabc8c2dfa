"""Short human summaries of a run: `selfplay status` and the lines a finished run ends its console with."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from selfplay.config import RunConfig
from selfplay.telemetry.exporters import summary_line


def _ago(t: float | None, now: float | None = None) -> str:
    if not t:
        return "never"
    s = max(0.0, (now or time.time()) - float(t))
    if s < 90:
        return f"{s:.0f} s ago"
    if s < 5400:
        return f"{s / 60:.0f} min ago"
    if s < 2 * 86400:
        return f"{s / 3600:.1f} h ago"
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(float(t)))


def _alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except (TypeError, ValueError, ProcessLookupError):
        return False
    except PermissionError:  # exists, someone else's
        return True
    return True


def current_stage(events: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The stage a running driver is in: the last `stage` start event without its end."""
    for e in reversed(events):
        if e.get("event") == "driver_start":
            return None
        if e.get("event") == "stage":
            return e if e.get("phase") == "start" else None
    return None


def status_lines(out: dict[str, Any], cfg: RunConfig, shown_as: Path | str, now: float | None = None,
                 events: list[dict[str, Any]] | None = None) -> list[str]:
    """What `selfplay status` prints: status, progress, the latest iteration's summary, what to do next."""
    st = out.get("status", "unknown")
    if st == "running" and out.get("pid") and not _alive(out["pid"]):
        st = "running (driver gone: killed? resume it)"
    done = int(out.get("iteration") or 0)
    lines = [f"{shown_as}: {st}, iteration {done}/{cfg.loop.iterations} committed, "
             f"updated {_ago(out.get('updated_at'), now)}"]
    stage = current_stage(events or []) if st == "running" else None
    if stage:
        lines.append(f"  now: iteration {stage.get('iteration')}, {stage.get('stage')} (since {_ago(stage.get('t'), now)})")
    last, scalars = out.get("last_logged_iteration"), out.get("scalars") or {}
    if last is not None and scalars:
        lines.append("  " + summary_line(int(last), scalars))
    else:
        lines.append("  no iteration logged yet")
    lines += next_steps(shown_as, st, done, cfg.loop.iterations)
    return lines


def next_steps(run_dir: Path | str, status: str, done: int, iterations: int) -> list[str]:
    """Where to look next: the dashboard, and resume when the run can go on."""
    out = [f"  dashboard: selfplay dashboard {run_dir}"]
    if status.startswith(("stopped", "failed", "running (driver gone")):
        out.append(f"  continue:  selfplay resume {run_dir}")
    elif status == "finished":
        out.append(f"  extend:    selfplay resume {run_dir} loop.iterations={iterations * 2}")
    return out
