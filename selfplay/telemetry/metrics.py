"""The run's metrics store: one SQLite file per run that the loop writes and the dashboard reads live.

Why SQLite in WAL mode: one writer (the loop) and any number of readers (dashboards, notebooks) work on
the same file at once without a server, and a reader never blocks the writer. Every write is an upsert
keyed by (iteration, key), task_id or traj_id, and `truncate_after` drops what a crashed run logged past
its last checkpoint, so a resumed run continues the same store with no duplicates. Each write transaction
bumps a `revision` counter the dashboard polls to notice new data cheaply.

Exporters (console, TensorBoard, wandb, mlflow: `selfplay/telemetry/exporters.py`) receive the same scalars when
passed to the store; the store is the source of truth, the exporters are views.
"""
from __future__ import annotations

import json
import logging
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

if TYPE_CHECKING:
    from selfplay.telemetry.exporters import Exporter

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS scalars (
    iteration INTEGER NOT NULL, key TEXT NOT NULL, value REAL, wall_time REAL NOT NULL,
    PRIMARY KEY (iteration, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tasks (
    task_id TEXT PRIMARY KEY, iteration INTEGER NOT NULL, question TEXT NOT NULL, pseudo_label TEXT,
    p_hat REAL, proposer_reward REAL, reward_components TEXT NOT NULL, agreement TEXT NOT NULL,
    n_samples INTEGER NOT NULL, mean_tool_calls REAL, accepted INTEGER NOT NULL, reject_reason TEXT
);
CREATE INDEX IF NOT EXISTS tasks_iteration ON tasks (iteration);
CREATE TABLE IF NOT EXISTS trajectories (
    traj_id TEXT PRIMARY KEY, task_id TEXT NOT NULL, iteration INTEGER NOT NULL, role TEXT NOT NULL,
    text TEXT NOT NULL, reward REAL, correct INTEGER, n_tool_calls INTEGER NOT NULL,
    sandbox_statuses TEXT NOT NULL, finish_reason TEXT, answer TEXT
);
CREATE INDEX IF NOT EXISTS trajectories_task ON trajectories (task_id);
CREATE INDEX IF NOT EXISTS trajectories_iteration ON trajectories (iteration);
"""


@dataclass
class TaskRecord:
    """One proposed task as the verifier judged it: its difficulty (p_hat) and why it was kept or not."""

    task_id: str
    iteration: int
    question: str
    pseudo_label: str | None = None  # the executor's majority answer
    p_hat: float | None = None  # share of the k samples that agree with the majority; None: unparseable
    proposer_reward: float | None = None
    reward_components: dict[str, Any] = field(default_factory=dict)  # uncertainty, tool, repetition, format_ok
    agreement: dict[str, int] = field(default_factory=dict)  # answer -> how many samples gave it
    n_samples: int = 0
    mean_tool_calls: float | None = None
    accepted: bool = False
    reject_reason: str | None = None


@dataclass
class TrajectoryRecord:
    """One sampled trajectory, full text included (tool calls and their outputs), for reading in the UI."""

    traj_id: str
    task_id: str
    iteration: int
    role: str
    text: str
    reward: float | None = None
    correct: bool | None = None
    n_tool_calls: int = 0
    sandbox_statuses: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    answer: str | None = None


def connect_readonly(path: str | Path) -> sqlite3.Connection:
    """Open a store for reading only (`mode=ro`): a reader can never change a run's data.

    A store whose directory cannot take the `-shm` file of WAL mode (a read-only mount of a finished run)
    is opened `immutable` instead, which is safe only because no `-wal` file means no writer is active.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no metrics store at {path}")
    uri = path.resolve().as_uri()
    try:
        conn = sqlite3.connect(f"{uri}?mode=ro", uri=True, check_same_thread=False)
        conn.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
    except sqlite3.OperationalError:
        if Path(f"{path}-wal").exists():
            raise
        conn = sqlite3.connect(f"{uri}?mode=ro&immutable=1", uri=True, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    return conn


def _as_float(key: str, value: Any) -> float:
    """Scalars must be numbers. NaN is accepted (SQLite stores it as NULL: a diverging loss is a gap in the
    chart, not a crash); a string or None is a bug in the caller and named as such."""
    if isinstance(value, bool):
        return float(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"scalar {key!r} must be a number, got {type(value).__name__} {value!r}") from None


def _check_iteration(iteration: Any) -> int:
    if isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 0:
        raise ValueError(f"iteration must be a non-negative int, got {iteration!r}")
    return iteration


class MetricsStore:
    """The writer side. One per run; not thread-safe (the loop is its only writer)."""

    def __init__(self, path: str | Path, exporters: Sequence["Exporter"] = (), readonly: bool = False):
        self.path = Path(path)
        self.exporters = list(exporters)
        self.exporter_failures: dict[str, int] = {}
        if readonly:  # `selfplay status` and notebooks: read a live run without any chance of writing
            self._conn = connect_readonly(self.path)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(self.path, timeout=30.0)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across app crashes
        with self._conn:
            self._conn.executescript(_SCHEMA)
            found = self._conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            if found is not None and int(found[0]) != SCHEMA_VERSION:
                raise RuntimeError(f"{self.path}: schema version {found[0]}, this selfplay writes {SCHEMA_VERSION}")
            self._conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            self._conn.execute("INSERT OR IGNORE INTO meta VALUES ('revision', '0')")
            self._conn.execute("INSERT OR IGNORE INTO meta VALUES ('created', ?)", (repr(time.time()),))

    # -- writing -------------------------------------------------------------------------------------
    def _bump(self) -> None:
        """Inside a write transaction: readers poll `revision` (did anything change?) and `updated_at`."""
        self._conn.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key='revision'")
        self._conn.execute("INSERT OR REPLACE INTO meta VALUES ('updated_at', ?)", (repr(time.time()),))

    def _write(self, sql: str, rows: Iterable[tuple]) -> None:
        with self._conn:  # one transaction: rows + revision bump are seen together or not at all
            self._conn.executemany(sql, rows)
            self._bump()

    def log_scalars(self, iteration: int, scalars: Mapping[str, Any]) -> None:
        _check_iteration(iteration)
        now = time.time()
        values = {str(k): _as_float(str(k), v) for k, v in scalars.items()}
        rows = [(iteration, k, v, now) for k, v in values.items()]
        self._write(
            "INSERT INTO scalars VALUES (?, ?, ?, ?) ON CONFLICT (iteration, key) "
            "DO UPDATE SET value=excluded.value, wall_time=excluded.wall_time",
            rows,
        )
        for exporter in self.exporters:
            try:
                exporter.log_scalars(iteration, values)
            except Exception as e:  # an exporter (network, disk) must never stop training
                name = getattr(exporter, "name", type(exporter).__name__)
                self.exporter_failures[name] = self.exporter_failures.get(name, 0) + 1
                log.warning("metrics exporter %s failed at iteration %d: %s", name, iteration, e)

    def log_tasks(self, iteration: int, tasks: Sequence[TaskRecord]) -> None:
        _check_iteration(iteration)
        rows = []
        for t in tasks:
            if t.iteration != iteration:
                raise ValueError(f"task {t.task_id!r} has iteration {t.iteration}, logged under {iteration}")
            rows.append((
                t.task_id, t.iteration, t.question, t.pseudo_label, _num(t.p_hat), _num(t.proposer_reward),
                json.dumps(t.reward_components), json.dumps(t.agreement), int(t.n_samples),
                _num(t.mean_tool_calls), int(bool(t.accepted)), t.reject_reason,
            ))
        self._write("INSERT OR REPLACE INTO tasks VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)

    def log_trajectories(self, iteration: int, trajs: Sequence[TrajectoryRecord]) -> None:
        _check_iteration(iteration)
        rows = []
        for t in trajs:
            if t.iteration != iteration:
                raise ValueError(f"trajectory {t.traj_id!r} has iteration {t.iteration}, logged under {iteration}")
            rows.append((
                t.traj_id, t.task_id, t.iteration, t.role, t.text, _num(t.reward),
                None if t.correct is None else int(bool(t.correct)), int(t.n_tool_calls),
                json.dumps(list(t.sandbox_statuses)), t.finish_reason, t.answer,
            ))
        self._write("INSERT OR REPLACE INTO trajectories VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)

    def truncate_after(self, iteration: int) -> dict[str, int]:
        """Resume from a checkpoint at `iteration`: forget everything logged for later iterations; returns how
        many rows each table lost."""
        _check_iteration(iteration)
        dropped = {}
        with self._conn:
            for table in ("scalars", "tasks", "trajectories"):
                dropped[table] = self._conn.execute(f"DELETE FROM {table} WHERE iteration > ?", (iteration,)).rowcount
            self._bump()
        return dropped

    # -- reading (the writer's own view) -------------------------------------------------------------
    def last_iteration(self) -> int | None:
        row = self._conn.execute(
            "SELECT MAX(m) FROM (SELECT MAX(iteration) AS m FROM scalars UNION ALL "
            "SELECT MAX(iteration) FROM tasks UNION ALL SELECT MAX(iteration) FROM trajectories)"
        ).fetchone()
        return None if row[0] is None else int(row[0])

    def scalars_at(self, iteration: int) -> dict[str, float | None]:
        rows = self._conn.execute("SELECT key, value FROM scalars WHERE iteration = ? ORDER BY key", (iteration,))
        return {key: value for key, value in rows}

    def close(self) -> None:
        for exporter in self.exporters:
            try:
                exporter.close()
            except Exception as e:
                log.warning("metrics exporter %s failed to close: %s", getattr(exporter, "name", exporter), e)
        self.exporters = []
        if self._conn is not None:
            self._conn.close()
            self._conn = None  # type: ignore[assignment]

    def __enter__(self) -> "MetricsStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _num(value: float | None) -> float | None:
    return None if value is None else float(value)
