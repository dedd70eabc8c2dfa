"""Read-only SQL over one run's metrics store, shaped for the dashboard's charts and tables.

Pure functions of a connection, so they are tested on a store written by `MetricsStore` and reused by
anything else that reads a run (notebooks). Every number leaving here is JSON-safe (NaN/inf -> None).
"""
from __future__ import annotations

import json
import math
import sqlite3
from typing import Any

SORTS = {  # whitelisted ORDER BY clauses, chosen by name from the query string
    "newest": "iteration DESC, task_id",
    "oldest": "iteration ASC, task_id",
    "p_hat": "p_hat IS NULL, p_hat DESC, iteration DESC",
    "p_hat_asc": "p_hat IS NULL, p_hat ASC, iteration DESC",
    "reward": "proposer_reward IS NULL, proposer_reward DESC, iteration DESC",
}


def finite(value: Any) -> float | None:
    return None if value is None or not math.isfinite(value) else value


def version(conn: sqlite3.Connection) -> dict[str, Any]:
    """What changed since the last poll; index lookups only, as every open page asks every two seconds."""
    meta = dict(conn.execute("SELECT key, value FROM meta WHERE key IN ('revision', 'updated_at')").fetchall())
    last = conn.execute(
        "SELECT MAX(m) FROM (SELECT MAX(iteration) AS m FROM scalars UNION ALL SELECT MAX(iteration) FROM tasks)"
    ).fetchone()[0]
    if "updated_at" in meta:
        updated = float(meta["updated_at"])
    else:  # a store from before meta.updated_at existed: one scan of the scalars
        updated = conn.execute("SELECT MAX(wall_time) FROM scalars").fetchone()[0]
    return {"revision": int(meta.get("revision", 0)), "last_iteration": last, "updated_at": updated}


def scalars(conn: sqlite3.Connection, prefix: str = "") -> dict[str, dict[str, list]]:
    """{key: {"x": iterations, "y": values}} for every key (starting with `prefix`), x ascending."""
    out: dict[str, dict[str, list]] = {}
    rows = conn.execute(
        "SELECT key, iteration, value FROM scalars WHERE substr(key, 1, ?) = ? ORDER BY key, iteration",
        (len(prefix), prefix),
    )
    for key, iteration, value in rows:
        series = out.setdefault(key, {"x": [], "y": []})
        series["x"].append(iteration)
        series["y"].append(finite(value))
    return out


def common_k(conn: sqlite3.Connection) -> int | None:
    """The most common number of executor samples among scored tasks (unparseable proposals have none)."""
    row = conn.execute("SELECT n_samples FROM tasks WHERE n_samples > 0 GROUP BY n_samples "
                       "ORDER BY COUNT(*) DESC LIMIT 1").fetchone()
    return row[0] if row and row[0] else None


def difficulty(conn: sqlite3.Connection, band_low: float, band_high: float, bins: int | None = None,
               k: int | None = None) -> dict:
    """p_hat of proposed tasks per iteration, binned for a heatmap, plus where each iteration sits vs the band.

    Bins are centred on i/bins (i = 0..bins) and bins defaults to the run's k (`executor.samples_per_task`,
    else the tasks' most common sample count), so each possible p_hat = j/k value gets its own row: with
    fewer or more bins than k, rows fall between the values p_hat can take.
    """
    bins = bins or min(50, max(1, k or common_k(conn) or 10))
    cells = [
        {"iteration": it, "bin": b, "count": n, "accepted": acc}
        for it, b, n, acc in conn.execute(
            "SELECT iteration, CAST(ROUND(MIN(MAX(p_hat, 0), 1) * ?) AS INTEGER) AS b, COUNT(*), SUM(accepted) "
            "FROM tasks WHERE p_hat IS NOT NULL GROUP BY iteration, b ORDER BY iteration, b",
            (bins,),
        )
    ]
    per_iteration = [
        {"iteration": it, "tasks": n, "scored": scored, "mean_p_hat": finite(mean), "below": below or 0,
         "inside": inside or 0, "above": above or 0, "unscored": n - scored, "accepted": acc or 0}
        for it, n, scored, mean, below, inside, above, acc in conn.execute(
            "SELECT iteration, COUNT(*), COUNT(p_hat), AVG(p_hat), SUM(p_hat < ?), SUM(p_hat >= ? AND p_hat <= ?), "
            "SUM(p_hat > ?), SUM(accepted) FROM tasks GROUP BY iteration ORDER BY iteration",
            (band_low, band_low, band_high, band_high),
        )
    ]
    return {"bins": bins, "band": [band_low, band_high], "cells": cells, "per_iteration": per_iteration}


def iterations(conn: sqlite3.Connection) -> list[int]:
    return [row[0] for row in conn.execute("SELECT DISTINCT iteration FROM tasks ORDER BY iteration DESC")]


def _like(text: str) -> str:
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def _task_row(row: sqlite3.Row) -> dict[str, Any]:
    agreement = json.loads(row["agreement"])
    return {
        "task_id": row["task_id"], "iteration": row["iteration"], "question": row["question"],
        "pseudo_label": row["pseudo_label"], "p_hat": finite(row["p_hat"]),
        "proposer_reward": finite(row["proposer_reward"]), "reward_components": json.loads(row["reward_components"]),
        "agreement": agreement, "majority_count": max(agreement.values(), default=0), "n_samples": row["n_samples"],
        "mean_tool_calls": finite(row["mean_tool_calls"]), "accepted": bool(row["accepted"]),
        "reject_reason": row["reject_reason"],
    }


def tasks(
    conn: sqlite3.Connection, iteration: int | None = None, status: str = "all", q: str = "",
    sort: str = "newest", limit: int = 50, offset: int = 0,
) -> dict[str, Any]:
    """One page of tasks matching the filters, with the total for paging and each task's trajectory count."""
    where, args = [], []
    if iteration is not None:
        where.append("iteration = ?")
        args.append(iteration)
    if status in ("accepted", "rejected"):
        where.append("accepted = ?")
        args.append(1 if status == "accepted" else 0)
    if q:
        where.append("(question LIKE ? ESCAPE '\\' OR task_id LIKE ? ESCAPE '\\' OR pseudo_label LIKE ? ESCAPE '\\')")
        args += [_like(q)] * 3
    clause = f"WHERE {' AND '.join(where)}" if where else ""
    total = conn.execute(f"SELECT COUNT(*) FROM tasks {clause}", args).fetchone()[0]
    rows = conn.execute(
        f"SELECT *, (SELECT COUNT(*) FROM trajectories tr WHERE tr.task_id = tasks.task_id) AS n_trajectories "
        f"FROM tasks {clause} ORDER BY {SORTS[sort]} LIMIT ? OFFSET ?",
        [*args, limit, offset],
    ).fetchall()
    return {"total": total, "offset": offset, "limit": limit,
            "rows": [{**_task_row(r), "n_trajectories": r["n_trajectories"]} for r in rows]}


def task_detail(conn: sqlite3.Connection, task_id: str) -> dict[str, Any] | None:
    row = conn.execute("SELECT * FROM tasks WHERE task_id = ?", (task_id,)).fetchone()
    if row is None:
        return None
    trajectories = [
        {"traj_id": t["traj_id"], "iteration": t["iteration"], "role": t["role"], "text": t["text"], "reward": finite(t["reward"]),
         "correct": None if t["correct"] is None else bool(t["correct"]), "n_tool_calls": t["n_tool_calls"],
         "sandbox_statuses": json.loads(t["sandbox_statuses"]), "finish_reason": t["finish_reason"],
         "answer": t["answer"]}
        for t in conn.execute(
            "SELECT * FROM trajectories WHERE task_id = ? ORDER BY iteration, role, traj_id", (task_id,))
    ]
    return {**_task_row(row), "trajectories": trajectories}
