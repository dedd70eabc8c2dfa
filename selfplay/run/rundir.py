"""The run directory: everything a run writes, in one place, so a run can be inspected, resumed and compared.

    <run_dir>/config.yaml        resolved config (resume refuses a different one)
    <run_dir>/state.json         status, last completed iteration, driver pid (written atomically)
    <run_dir>/events.jsonl       faults, restarts, resumes, signals, stage boundaries (append-only)
    <run_dir>/checkpoints/       learner checkpoints, one per completed iteration (+ `latest`)
    <run_dir>/adapters/          the adapters published to the rollout engines
    <run_dir>/pool.jsonl         accepted tasks with pseudo-labels
    <run_dir>/replay/            replay buffer (Parquet)
    <run_dir>/metrics.sqlite     metrics store (the dashboard reads it)
    <run_dir>/logs/              driver.log (the console's lines), <actor>.log, libraries.log
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selfplay.config import ConfigError, RunConfig, config_from_dict, dump_config

import yaml


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def state_file(self) -> Path:
        return self.root / "state.json"

    @property
    def events(self) -> Path:
        return self.root / "events.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def adapters(self) -> Path:
        return self.root / "adapters"

    @property
    def pool(self) -> Path:
        return self.root / "pool.jsonl"

    @property
    def replay(self) -> Path:
        return self.root / "replay"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.sqlite"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @classmethod
    def create(cls, cfg: RunConfig) -> "RunDir":
        root = Path(cfg.run_dir) if cfg.run_dir else Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        rd = cls(root.resolve())
        if rd.config.exists():
            raise ConfigError(f"run_dir {rd.root} already holds a run: use `selfplay resume {rd.root}` or another run_dir")
        for d in (rd.root, rd.checkpoints, rd.adapters, rd.logs):
            d.mkdir(parents=True, exist_ok=True)
        cfg = cfg.model_copy(update={"run_dir": str(rd.root)})
        write_atomic(rd.config, dump_config(cfg))
        rd.write_state(status="created", iteration=0)
        return rd

    def load_config(self) -> RunConfig:
        if not self.config.exists():
            raise ConfigError(f"{self.root} is not a run directory (no config.yaml)")
        return config_from_dict(yaml.safe_load(self.config.read_text()), str(self.config))

    def state(self) -> dict[str, Any]:
        try:
            return json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return {"status": "unknown", "iteration": 0}

    def write_state(self, **fields: Any) -> None:
        state = self.state() if self.state_file.exists() else {}
        state.update(fields, updated_at=time.time())
        write_atomic(self.state_file, json.dumps(state, indent=1))

    def event(self, kind: str, **fields: Any) -> None:
        with open(self.events, "a") as f:
            f.write(json.dumps({"t": time.time(), "event": kind, **fields}) + "\n")

    def read_events(self) -> list[dict[str, Any]]:
        if not self.events.exists():
            return []
        out = []
        for line in self.events.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a kill
        return out


# ------------------------------------------------------------------------------- published adapters
PUBLISHED = "published.json"


def published_adapters(adapters_dir: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """role -> {"path", "version"} of the adapters last pushed to the engines."""
    f = Path(adapters_dir) / PUBLISHED
    return json.loads(f.read_text()) if f.exists() else {}


def record_published(adapters_dir: str | os.PathLike, role: str, path: str, version: int) -> None:
    data = published_adapters(adapters_dir)
    data[role] = {"path": str(path), "version": int(version)}
    write_atomic(Path(adapters_dir) / PUBLISHED, json.dumps(data, indent=1))


def rollback_published(adapters_dir: str | os.PathLike, versions: dict[str, int]) -> list[str]:
    """Forget adapters published after the commit (`versions`: the committed policy versions), so a resumed
    rollout worker starts on the committed policy, not on a lost step's (the base model at version 0; the
    async pipeline publishes between commits). Returns the roles forgotten."""
    data = published_adapters(adapters_dir)
    lost = [role for role, info in data.items() if int(info["version"]) > int(versions.get(role, 0))]
    if lost:
        write_atomic(Path(adapters_dir) / PUBLISHED, json.dumps({r: i for r, i in data.items() if r not in lost},
                                                                indent=1))
    return lost
