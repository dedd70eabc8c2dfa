"""Which run directories the dashboard may read, addressed by id.

Security model: the directories named on the command line are resolved once at start and mapped to short
ids. The API takes an id and looks it up in that map; it never turns request text into a path, so `..`,
absolute paths, encoded slashes or symlinked names in a URL cannot reach another directory. A file inside
a run dir (metrics.sqlite, config.yaml, state.json, events.jsonl) is read only if its real path stays
inside the run's real path, so a symlink planted in a run dir cannot point the dashboard elsewhere.
"""
from __future__ import annotations

import json
import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from selfplay.config import VerifierConfig
from selfplay.telemetry.metrics import connect_readonly

RUN_FILES = ("metrics.sqlite", "config.yaml", "state.json", "events.jsonl")


class RunNotFound(LookupError):
    pass


class NoRunFound(ValueError):
    """A directory given to the dashboard holds no run (nor do its subdirectories)."""


def is_run(d: Path) -> bool:
    return (d / "config.yaml").is_file() and ((d / "state.json").is_file() or (d / "metrics.sqlite").is_file())


def find_runs(paths: list[Path]) -> list[Path]:
    """Each path that is a run directory, or else the run directories directly inside it (`runs/`). A path
    with neither is refused, naming the directories looked at, instead of serving an empty page."""
    found: list[Path] = []
    for p in paths:
        p = Path(p).expanduser()
        if not p.is_dir():
            raise NoRunFound(f"{p} is not a directory; pass a run directory written by `selfplay run` (runs/NAME)")
        if is_run(p):
            found.append(p.resolve())
            continue
        subs = sorted(d for d in p.iterdir() if d.is_dir())
        runs = [d.resolve() for d in subs if is_run(d)]
        if not runs:
            looked = [str(p)] + [str(d) for d in subs[:5]] + ([f"... {len(subs) - 5} more"] if len(subs) > 5 else [])
            raise NoRunFound(f"no run in {p} (looked for config.yaml with state.json or metrics.sqlite in: "
                             f"{', '.join(looked)}); pass a directory written by `selfplay run`, e.g. runs/NAME")
        found += runs
    return found


@dataclass(frozen=True)
class Run:
    id: str
    root: Path  # resolved

    def file(self, name: str) -> Path | None:
        """The run's file `name` (one of RUN_FILES) if it exists and really lies inside the run dir."""
        if name not in RUN_FILES:
            raise ValueError(f"not a run file: {name!r}")
        path = self.root / name
        if not path.exists():
            return None
        real = path.resolve()
        if not real.is_relative_to(self.root) or not real.is_file():
            raise PermissionError(f"{name} of run {self.id} points outside its run directory")
        return real

    def connect(self) -> sqlite3.Connection | None:
        """A read-only connection to the metrics store, or None while the run has not written one."""
        path = self.file("metrics.sqlite")
        return None if path is None else connect_readonly(path)

    def config(self) -> dict[str, Any]:
        """The parts of config.yaml the dashboard shows; a missing or broken file gives the defaults."""
        path, data = self.file("config.yaml"), {}
        if path is not None:
            try:
                loaded = yaml.safe_load(path.read_text())
                data = loaded if isinstance(loaded, dict) else {}
            except (OSError, yaml.YAMLError):
                data = {}
        section = lambda name: data.get(name) if isinstance(data.get(name), dict) else {}  # noqa: E731
        defaults = VerifierConfig()
        verifier, executor, loop, model = section("verifier"), section("executor"), section("loop"), section("model")
        learner, ev, sandbox = section("learner"), section("eval"), section("sandbox")
        return {
            # what empty charts are explained by (KL off, no evaluation configured, ...)
            "kl_coef": learner.get("kl_coef"), "eval_benchmark": ev.get("benchmark"), "eval_every": ev.get("every"),
            "max_error_rate": sandbox.get("max_error_rate"), "use_tools": executor.get("use_tools"),
            "name": data.get("name"),
            "band_low": _number(verifier.get("band_low"), defaults.band_low),
            "band_high": _number(verifier.get("band_high"), defaults.band_high),
            "samples_per_task": executor.get("samples_per_task"),
            "iterations": loop.get("iterations"),
            "model": model.get("name_or_path"),
        }

    def state(self) -> dict[str, Any]:
        path = self.file("state.json")
        if path is None:
            return {}
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
        return {k: data.get(k) for k in ("status", "iteration", "updated_at")} if isinstance(data, dict) else {}

    def events(self, limit: int) -> list[dict[str, Any]]:
        """The newest `limit` events of events.jsonl (faults, restarts, resumes), oldest first; unreadable lines
        and the loop's `stage` progress markers (many per iteration) skipped."""
        path = self.file("events.jsonl")
        if path is None:
            return []
        out: list[dict[str, Any]] = []
        for line in reversed(path.read_text(errors="replace").splitlines()):
            if len(out) >= limit:
                break
            try:
                event = json.loads(line)
            except ValueError:
                continue  # a line cut by a kill
            if isinstance(event, dict) and event.get("event") != "stage":
                out.append(event)
        return out[::-1]


def _number(value: Any, default: float) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "run"


class RunRegistry:
    """id -> Run for the directories given at start; nothing else is reachable."""

    def __init__(self, run_dirs: list[Path]):
        if not run_dirs:
            raise ValueError("the dashboard needs at least one run directory")
        self.runs: dict[str, Run] = {}
        for d in run_dirs:
            root = Path(d).expanduser().resolve()
            if not root.is_dir():
                raise NotADirectoryError(f"not a run directory: {d}")
            if any(r.root == root for r in self.runs.values()):
                continue
            base, n = _slug(root.name), 1
            run_id = base
            while run_id in self.runs:
                n += 1
                run_id = f"{base}-{n}"
            self.runs[run_id] = Run(run_id, root)

    def get(self, run_id: str) -> Run:
        run = self.runs.get(run_id)
        if run is None:
            raise RunNotFound(run_id)
        return run
