"""Metrics store (SQLite, upserts, resume) and its exporters (console, TensorBoard, wandb, mlflow)."""
from __future__ import annotations

import io
import math
import random
import sqlite3
import struct
import sys
import time
from pathlib import Path

import pytest

from selfplay.config import MetricsConfig, RunConfig
from selfplay.dashboard.demo import synthetic_iteration
from selfplay.telemetry.exporters import ConsoleExporter, TensorBoardExporter, make_exporters, mlflow_key, summary_line
from selfplay.telemetry.metrics import MetricsStore, TaskRecord, TrajectoryRecord, connect_readonly


def _log(store: MetricsStore, it: int, seed: int) -> tuple[dict, list, list]:
    scalars, tasks, trajs = synthetic_iteration(it, RunConfig(), random.Random(seed))
    store.log_tasks(it, tasks)
    store.log_trajectories(it, trajs)
    store.log_scalars(it, scalars)
    return scalars, tasks, trajs


def _dump(path: Path) -> dict[str, list]:
    conn = sqlite3.connect(path)
    out = {t: sorted(conn.execute(f"SELECT * FROM {t}").fetchall(), key=repr) for t in ("tasks", "trajectories")}
    out["scalars"] = sorted(conn.execute("SELECT iteration, key, value FROM scalars").fetchall(), key=repr)
    conn.close()
    return out


def test_scalars_upsert_per_iteration_and_key(tmp_path: Path) -> None:
    with MetricsStore(tmp_path / "m.sqlite") as store:
        assert store.last_iteration() is None
        store.log_scalars(0, {"a": 1.0, "b": 2})
        store.log_scalars(0, {"a": 5.0})  # re-log: replaces, never duplicates
        store.log_scalars(3, {"a": True})
        assert store.scalars_at(0) == {"a": 5.0, "b": 2.0}
        assert store.scalars_at(3) == {"a": 1.0}
        assert store.last_iteration() == 3
    rows = sqlite3.connect(tmp_path / "m.sqlite").execute("SELECT COUNT(*) FROM scalars").fetchone()[0]
    assert rows == 3


def test_resume_truncates_and_relogs_to_the_same_store_as_an_uninterrupted_run(tmp_path: Path) -> None:
    with MetricsStore(tmp_path / "straight.sqlite") as store:
        for it in range(6):
            _log(store, it, seed=it)
    with MetricsStore(tmp_path / "resumed.sqlite") as store:
        for it in range(6):
            _log(store, it, seed=100 + it)  # iterations 4-5 logged with other values, then "crash"
    late_rows = {t: _dump(tmp_path / "resumed.sqlite")[t] for t in ("scalars", "tasks", "trajectories")}
    with MetricsStore(tmp_path / "resumed.sqlite") as store:  # resume from the checkpoint of iteration 3
        dropped = store.truncate_after(3)
        assert store.last_iteration() == 3
        for it in range(4, 6):
            _log(store, it, seed=it)
    straight, resumed = _dump(tmp_path / "straight.sqlite"), _dump(tmp_path / "resumed.sqlite")
    for table in ("scalars", "tasks", "trajectories"):
        late = lambda rows: [r for r in rows if (r[0] if table == "scalars" else r[2 if table == "trajectories" else 1]) >= 4]  # noqa: E731
        assert late(resumed[table]) == late(straight[table]), table
        assert len(resumed[table]) == len(straight[table]), table
        assert dropped[table] == len(late(late_rows[table])) > 0, table  # the resume event reports these


def test_tasks_and_trajectories_round_trip_and_upsert_by_id(tmp_path: Path) -> None:
    task = TaskRecord("t1", 2, "What is 2+2?", "4", 0.7, 0.6, {"uncertainty": 0.6, "format_ok": True},
                      {"4": 7, "5": 3}, 10, 1.5, True, None)
    traj = TrajectoryRecord("r1", "t1", 2, "executor", "```python\nprint(2+2)\n```\n```output\n4\n```", 1.0, True, 1,
                            ["ok"], "stop", "4")
    with MetricsStore(tmp_path / "m.sqlite") as store:
        store.log_tasks(2, [task])
        store.log_trajectories(2, [traj])
        task.accepted, task.reject_reason, traj.correct = False, "too easy", None
        store.log_tasks(2, [task])
        store.log_trajectories(2, [traj])
    conn = connect_readonly(tmp_path / "m.sqlite")
    rows = conn.execute("SELECT * FROM tasks").fetchall()
    assert len(rows) == 1 and rows[0]["accepted"] == 0 and rows[0]["reject_reason"] == "too easy"
    assert rows[0]["agreement"] == '{"4": 7, "5": 3}'
    t = conn.execute("SELECT * FROM trajectories").fetchone()
    assert t["correct"] is None and t["text"] == traj.text and t["sandbox_statuses"] == '["ok"]'


def test_bad_input_gets_a_clear_error(tmp_path: Path) -> None:
    with MetricsStore(tmp_path / "m.sqlite") as store:
        with pytest.raises(TypeError, match="'executor/accuracy'"):
            store.log_scalars(0, {"executor/accuracy": "high"})
        with pytest.raises(ValueError, match="non-negative int"):
            store.log_scalars(-1, {"a": 1.0})
        with pytest.raises(ValueError, match="iteration 1, logged under 2"):
            store.log_tasks(2, [TaskRecord("t", 1, "q")])
        store.log_scalars(1, {"learner/executor/loss": float("nan"), "x": float("inf")})
        assert store.scalars_at(1) == {"learner/executor/loss": None, "x": math.inf}


def test_reader_sees_a_live_writer_and_cannot_write(tmp_path: Path) -> None:
    path = tmp_path / "m.sqlite"
    store = MetricsStore(path)
    store.log_scalars(0, {"a": 1.0})
    reader = connect_readonly(path)
    revision = lambda: int(reader.execute("SELECT value FROM meta WHERE key='revision'").fetchone()[0])  # noqa: E731
    before = revision()
    store.log_scalars(1, {"a": 2.0})  # written while the reader is open
    assert revision() == before + 1
    assert reader.execute("SELECT COUNT(*) FROM scalars").fetchone()[0] == 2
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        reader.execute("DELETE FROM scalars")
    ro = MetricsStore(path, readonly=True)
    assert ro.last_iteration() == 1
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        ro.log_scalars(2, {"a": 3.0})
    ro.close()
    reader.close()
    store.close()


def test_failing_exporter_is_counted_and_does_not_stop_logging(tmp_path: Path) -> None:
    class DiskFull:
        name = "diskfull"

        def log_scalars(self, iteration, scalars):
            raise OSError("No space left on device")

        def close(self):
            pass

    out = io.StringIO()
    from rich.console import Console

    console = ConsoleExporter(Console(file=out, width=200))
    with MetricsStore(tmp_path / "m.sqlite", exporters=[DiskFull(), console]) as store:
        store.log_scalars(0, {"tasks/proposed": 8, "tasks/accepted": 5})
        store.log_scalars(1, {"tasks/proposed": 8, "tasks/accepted": 6})
        assert store.exporter_failures == {"diskfull": 2}
        assert store.scalars_at(1) == {"tasks/accepted": 6.0, "tasks/proposed": 8.0}
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and "accepted 6/8 (75%)" in lines[1]


def test_console_summary_line_reports_what_was_logged_and_skips_what_was_not() -> None:
    line = summary_line(12, {"tasks/accepted_rate": 0.625, "pool/size": 143, "executor/accuracy": 0.61,
                             "eval/gsm8k/pass@1": 0.4321, "faults/actor_restarts": 0})
    assert line.startswith("it   12") and "accepted 62%" in line and "pool 143" in line
    assert "exec acc 0.61" in line and "gsm8k pass@1 0.432" in line
    assert "restarts" not in line and "tok/s" not in line
    assert "3 scalars" in summary_line(0, {"a": 1, "b": 2, "c": float("nan")})
    assert "labels" not in line
    # intervals and pseudo-label accuracy when logged
    line = summary_line(3, {"eval/gen/pass@1": 0.1, "eval/gen/pass@1_ci95_lo": 0.07, "eval/gen/pass@1_ci95_hi": 0.15,
                            "verifier/label_accuracy": 0.25, "verifier/probes": 4})
    assert "gen pass@1 0.100 [0.070, 0.150]" in line and "labels 25% of 4 probes" in line


def _tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_events_read_back_and_resume_purges_later_steps(tmp_path: Path) -> None:
    tb = TensorBoardExporter(tmp_path / "tb")
    for it in range(5):
        tb.log_scalars(it, {"executor/accuracy": it / 10, "eval/gsm8k/pass@1": 0.5})
    tb.close()
    tb = TensorBoardExporter(tmp_path / "tb", resume_from=2)  # crashed after 4, resumed from checkpoint 2
    for it in (3, 4):
        tb.log_scalars(it, {"executor/accuracy": 1 + it / 10, "eval/gsm8k/pass@1": 0.5})
    tb.close()
    got = _tensorboard_scalars(tmp_path / "tb")
    acc = got["executor/accuracy"]
    assert [s for s, _ in acc] == [0, 1, 2, 3, 4]
    assert [round(v, 5) for _, v in acc] == [0.0, 0.1, 0.2, 1.3, 1.4]
    assert len(got["eval/gsm8k/pass@1"]) == 5


def test_make_exporters_names_unknown_and_missing_backends(tmp_path: Path, monkeypatch) -> None:
    cfg = MetricsConfig(exporters=["console", "tensorboard", "console"])
    exporters = make_exporters(cfg, tmp_path)
    assert [e.name for e in exporters] == ["console", "tensorboard"]
    for e in exporters:
        e.close()
    assert (tmp_path / "tensorboard").is_dir()
    cfg.exporters = ["wandb"]
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(ImportError, match=r"selfplay\[exporters\]"):
        make_exporters(cfg, tmp_path)
    bad = MetricsConfig.model_construct(exporters=["neptune"])
    with pytest.raises(ValueError, match="neptune"):
        make_exporters(bad, tmp_path)


def _wandb_history(run_file: Path) -> list[dict[str, str]]:
    """History rows from a `.wandb` file: a LevelDB-style log of protobuf `Record`s in 32 KiB blocks."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, buf, rows = run_file.read_bytes(), 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7 or data[pos + 6] == 0:  # block trailer or zero padding
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + n], pos + 7 + n
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): i.value_json for i in record.history.item})
    return rows


@pytest.mark.slow
def test_wandb_offline_run_holds_the_scalars_by_iteration(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("wandb", reason="wandb not installed (pip install 'selfplay[exporters]')")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = MetricsConfig(exporters=["wandb"])
    (exporter,) = make_exporters(cfg, tmp_path, run_config={"seed": 3})
    for it in range(3):
        exporter.log_scalars(it, {"executor/accuracy": it / 4, "eval/gsm8k/pass@1": 0.25})
    exporter.close()
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    for _ in range(300):  # wandb-core writes the file asynchronously after finish(); wait for it, not a time
        rows = _wandb_history(run_file)
        if len(rows) >= 3:
            break
        time.sleep(0.1)
    assert [(r["iteration"], float(r["executor/accuracy"])) for r in rows] == [("0", 0.0), ("1", 0.25), ("2", 0.5)]
    assert (tmp_path / "wandb_run_id").read_text().strip() in run_file.name


@pytest.mark.slow
def test_mlflow_sqlite_store_in_run_dir_and_resume_reuses_the_run(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("mlflow", reason="mlflow not installed (pip install 'selfplay[exporters]')")
    pytest.importorskip("sqlalchemy", reason="mlflow's SQLite tracking store needs sqlalchemy (full mlflow)")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = MetricsConfig(exporters=["mlflow"])
    (first,) = make_exporters(cfg, tmp_path, run_config={"learner": {"lr": 1e-5}})
    first.log_scalars(0, {"eval/gsm8k/pass@1": 0.3, "executor/accuracy": 0.5})
    first.close()
    (second,) = make_exporters(cfg, tmp_path)  # a resumed run appends to the same MLflow run
    second.log_scalars(1, {"eval/gsm8k/pass@1": 0.4})
    assert second.run_id == first.run_id
    history = second.client.get_metric_history(first.run_id, mlflow_key("eval/gsm8k/pass@1"))
    assert sorted((m.step, m.value) for m in history) == [(0, 0.3), (1, 0.4)]
    assert second.client.get_run(first.run_id).data.params["learner.lr"] == "1e-05"
    second.close()
    assert (tmp_path / "mlflow.db").is_file()
