"""Replay buffer: trajectories waiting for (or kept after) a learner step, persisted so a crash loses nothing.

On disk the buffer is an append-only log of small Parquet files in one directory, each written to a hidden
temporary name, fsynced and renamed into place (an atomic publish: a killed writer leaves either a whole file
or none). `NNNNNNNNNNNN.add.parquet` holds new trajectories, `.mark.parquet` state events (consumed, evicted,
dropped, truncate), `.snapshot.parquet` the whole live state written by compaction. Loading replays the newest
snapshot and every later file in sequence order, so consumption state survives restarts too. See
docs/replay.md for the design and its limits.
"""
from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from selfplay.config import ReplayConfig
from selfplay.types import Trajectory

_FILE = re.compile(r"^(\d{12})\.(add|mark|snapshot)\.parquet$")
_TRAJ_TYPES: dict[str, pa.DataType] = {
    "role": pa.string(), "task_id": pa.string(), "group_id": pa.string(), "text": pa.string(),
    "traj_id": pa.string(), "prompt_ids": pa.list_(pa.int32()), "completion_ids": pa.list_(pa.int32()),
    "loss_mask": pa.list_(pa.int8()), "behaviour_logprobs": pa.list_(pa.float64()), "reward": pa.float64(),
    "advantage": pa.float64(), "policy_version": pa.int64(), "p_hat": pa.float64(), "created_at": pa.float64(),
}  # any other Trajectory field (meta, fields added later) is stored as a JSON string
_FIELDS = [f.name for f in dataclasses.fields(Trajectory)]
_TRAJ_SCHEMA = pa.schema([(n, _TRAJ_TYPES.get(n, pa.string())) for n in _FIELDS])
_SNAPSHOT_SCHEMA = _TRAJ_SCHEMA.append(pa.field("consumed_at", pa.int64()))
_MARK_SCHEMA = pa.schema([("op", pa.string()), ("traj_id", pa.string()), ("version", pa.int64()),
                          ("role", pa.string()), ("value", pa.float64())])  # value: an "advantage" event's
_COUNTERS = ("added", "duplicates", "consumed", "evicted_consumed", "evicted_unconsumed", "dropped_stale",
             "truncated", "replayed")


@dataclass
class Batch:
    """Whole groups for one learner step. `weights[i]` < 1 down-weights a stale sample (policy_loss weights);
    `replayed[i]` marks a self-imitation replay, whose stored advantage must be used as is (its group is not
    in the batch, so advantages cannot be recomputed for it)."""

    trajectories: list[Trajectory] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    replayed: list[bool] = field(default_factory=list)
    dropped_stale: int = 0  # trajectories dropped as too stale while building this batch

    @property
    def ids(self) -> list[str]:
        return [t.traj_id for t in self.trajectories]

    def __len__(self) -> int:
        return len(self.trajectories)


@dataclass
class _Entry:
    traj: Trajectory
    seq: int  # arrival order (FIFO and eviction order)
    consumed_at: int | None = None  # policy version after the step that trained on it
    replays: int = 0


def _to_row(t: Trajectory) -> dict[str, Any]:
    return {n: (getattr(t, n) if n in _TRAJ_TYPES else json.dumps(getattr(t, n), default=str)) for n in _FIELDS}


def _from_row(row: dict[str, Any]) -> Trajectory:
    kw = {n: (row[n] if n in _TRAJ_TYPES else json.loads(row[n])) for n in _FIELDS if n in row}
    return Trajectory(**kw)


class ReplayBuffer:
    """Persistent, bounded, group-aware replay buffer. One process owns a directory (an flock enforces it)."""

    def __init__(self, path: str | os.PathLike, cfg: ReplayConfig | None = None) -> None:
        self.cfg = cfg or ReplayConfig()
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.path / ".lock", "a+")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise RuntimeError(f"replay directory {self.path} is in use by another ReplayBuffer (lock held on "
                               f"{self.path / '.lock'})") from None
        self._entries: dict[str, _Entry] = {}
        self._groups: dict[tuple[str, str], list[str]] = {}
        self.counters = dict.fromkeys(_COUNTERS, 0)
        self._seq = 0
        self._since_snapshot = 0
        self._load()
        self._enforce_capacity()

    # ------------------------------------------------------------------------------------------ public API
    def add(self, trajs: list[Trajectory]) -> int:
        """Append trajectories (whole groups); ids already present are skipped. Returns how many were new."""
        new, seen = [], set()
        for t in trajs:
            if not isinstance(t, Trajectory):
                raise TypeError(f"ReplayBuffer.add takes Trajectory objects, got {type(t).__name__}")
            if t.traj_id in self._entries or t.traj_id in seen:
                self.counters["duplicates"] += 1
                continue
            seen.add(t.traj_id)
            new.append(t)
        if new:
            seq = self._write("add", pa.Table.from_pylist([_to_row(t) for t in new], schema=_TRAJ_SCHEMA))
            for t in new:
                self._insert(t, seq)
            self.counters["added"] += len(new)
            self._enforce_capacity()
            self._maybe_compact()
        return len(new)

    def sample(self, role: str, max_groups: int, current_version: int) -> Batch:
        """Up to `max_groups` complete groups of `role`: unconsumed ones oldest first (FIFO), plus a
        `self_imitation_share` of replayed high-advantage trajectories when configured."""
        if max_groups < 1:
            raise ValueError(f"max_groups must be >= 1, got {max_groups}")
        cfg, batch = self.cfg, Batch()
        n_sil = round(cfg.self_imitation_share * max_groups)
        sil = self._self_imitation_groups(role, n_sil) if n_sil else []
        n_fresh, dropped = max_groups - len(sil), []
        for key, ids in self._ready_groups(role):
            if n_fresh == 0:
                break
            staleness = max(0, current_version - min(self._entries[i].traj.policy_version for i in ids))
            over = staleness - cfg.max_staleness
            weight = 1.0 if over <= 0 else (0.0 if cfg.stale_mode == "drop" else cfg.stale_decay ** over)
            if weight == 0.0:
                dropped.extend(ids)
                continue
            for i in ids:
                batch.trajectories.append(self._entries[i].traj)
                batch.weights.append(weight)
                batch.replayed.append(False)
            n_fresh -= 1
        for ids in sil:
            for i in ids:
                self._entries[i].replays += 1
                batch.trajectories.append(self._entries[i].traj)
                batch.weights.append(1.0)
                batch.replayed.append(True)
            self.counters["replayed"] += len(ids)
        if dropped:
            self._apply_and_log([("dropped", i, None, None, None) for i in dropped])
            batch.dropped_stale = len(dropped)
        return batch

    def mark_consumed(self, ids: list[str], version: int) -> int:
        """Record that a learner step trained on `ids`, producing policy `version`. Unknown (already evicted) or
        already-consumed ids are ignored. Returns how many were newly marked."""
        todo = [i for i in dict.fromkeys(ids) if i in self._entries and self._entries[i].consumed_at is None]
        if todo:
            self._apply_and_log([("consumed", i, int(version), None, None) for i in todo])
        return len(todo)

    def set_advantages(self, advantages: dict[str, float]) -> int:
        """Record the advantages a learner step used (traj_id -> value), durably. Self-imitation picks its
        replays by them; unknown (evicted) ids are ignored. Returns how many were stored."""
        events = [("advantage", i, None, None, float(a)) for i, a in advantages.items() if i in self._entries]
        self._apply_and_log(events)
        return len(events)

    def truncate_after(self, version: int, role: str | None = None) -> dict[str, int]:
        """Roll back to a checkpoint of policy `version`: drop trajectories generated by later policies and
        forget consumption by later steps (those steps were lost), so a resume neither trains on samples
        from a discarded policy nor skips samples whose update was lost."""
        mine = [e for e in self._entries.values() if role is None or e.traj.role == role]
        dropped = sum(e.traj.policy_version > version for e in mine)
        unconsumed = sum(e.traj.policy_version <= version and e.consumed_at is not None and e.consumed_at > version
                         for e in mine)
        self._apply_and_log([("truncate", "", int(version), role, None)])
        return {"dropped": dropped, "unconsumed": unconsumed}

    def drop_where(self, predicate) -> int:
        """Remove every trajectory for which `predicate(traj)` holds (durably); returns how many. The driver
        uses it on resume to forget what an uncommitted iteration wrote (`meta["iteration"]`)."""
        ids = [i for i, e in self._entries.items() if predicate(e.traj)]
        self._apply_and_log([("dropped", i, None, None, None) for i in ids])
        return len(ids)

    def trajectories(self, role: str | None = None) -> list[Trajectory]:
        """Everything held, oldest first (inspection, tests, export)."""
        return [e.traj for e in self._entries.values() if role is None or e.traj.role == role]

    def compact(self) -> None:
        """Write the live state as one snapshot file and delete the files it replaces (crash-safe: files
        older than the newest snapshot are ignored and removed on load)."""
        rows = [dict(_to_row(e.traj), consumed_at=e.consumed_at) for e in self._entries.values()]
        table = pa.Table.from_pylist(rows, schema=_SNAPSHOT_SCHEMA)
        table = table.replace_schema_metadata({"counters": json.dumps(self.counters)})
        seq = self._write("snapshot", table)
        self._since_snapshot = 0
        for f in self._log_files():
            if f[0] < seq:
                f[2].unlink(missing_ok=True)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, traj_id: str) -> bool:
        return traj_id in self._entries

    def is_consumed(self, traj_id: str) -> bool:
        return self._entries[traj_id].consumed_at is not None

    def consumed_at(self, traj_id: str) -> int | None:
        """The policy version the step that trained on it produced (None: not trained yet); that step started
        from `consumed_at - 1`, so the sample was `consumed_at - 1 - policy_version` versions old."""
        return self._entries[traj_id].consumed_at

    def stats(self) -> dict[str, Any]:
        by_role: dict[str, dict[str, int]] = {}
        for e in self._entries.values():
            r = by_role.setdefault(e.traj.role, {"trajectories": 0, "consumed": 0, "ready_groups": 0})
            r["trajectories"] += 1
            r["consumed"] += e.consumed_at is not None
        for role, r in by_role.items():
            r["ready_groups"] = sum(1 for _ in self._ready_groups(role))
        versions = [e.traj.policy_version for e in self._entries.values()]
        return {"size": len(self._entries), "capacity": self.cfg.capacity, "roles": by_role,
                "min_version": min(versions, default=None), "max_version": max(versions, default=None),
                "files": len(self._log_files()), **self.counters}

    def close(self) -> None:
        if not self._lock.closed:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()

    def __enter__(self) -> "ReplayBuffer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------- internals
    def _insert(self, t: Trajectory, seq: int, consumed_at: int | None = None) -> None:
        self._entries[t.traj_id] = _Entry(t, seq, consumed_at)
        self._groups.setdefault((t.role, t.group_id), []).append(t.traj_id)

    def _remove(self, traj_id: str) -> _Entry:
        e = self._entries.pop(traj_id)
        key = (e.traj.role, e.traj.group_id)
        members = self._groups[key]
        members.remove(traj_id)
        if not members:
            del self._groups[key]
        return e

    def _ready_groups(self, role: str):
        """Unconsumed complete groups of `role`, oldest first. Complete = as many members as the producer's
        meta["group_size"] says (when given); a group with any consumed member is no longer fresh."""
        cands = []
        for (r, _), ids in self._groups.items():
            if r != role or any(self._entries[i].consumed_at is not None for i in ids):
                continue
            size = self._entries[ids[0]].traj.meta.get("group_size")
            if size is not None and len(ids) < int(size):
                continue
            cands.append((min(self._entries[i].seq for i in ids), ids))
        cands.sort(key=lambda c: c[0])
        for _, ids in cands:
            yield (role, self._entries[ids[0]].traj.group_id), list(ids)

    def _self_imitation_groups(self, role: str, n: int) -> list[list[str]]:
        """SPEAR-style self-imitation: consumed trajectories with advantage >= the threshold, by group; the
        least replayed first, then the highest advantage, then the newest."""
        out = []
        for (r, _), ids in self._groups.items():
            if r != role:
                continue
            good = [i for i in ids if self._entries[i].consumed_at is not None
                    and self._entries[i].traj.advantage >= self.cfg.self_imitation_min_advantage]
            if good:
                es = [self._entries[i] for i in good]
                out.append((min(e.replays for e in es), -max(e.traj.advantage for e in es),
                            -max(e.seq for e in es), good))
        out.sort(key=lambda c: c[:3])
        return [c[3] for c in out[:n]]

    def _enforce_capacity(self) -> None:
        """Evict whole groups while over capacity: consumed groups oldest first, then unconsumed oldest."""
        excess = len(self._entries) - self.cfg.capacity
        if excess <= 0:
            return
        order = sorted(self._groups.values(), key=lambda ids: (
            not any(self._entries[i].consumed_at is not None for i in ids), min(self._entries[i].seq for i in ids)))
        events = []
        for ids in order:
            if excess <= 0:
                break
            events += [("evicted", i, None, None, None) for i in ids]
            excess -= len(ids)
        self._apply_and_log(events)

    def _apply(self, op: str, traj_id: str, version: int | None, role: str | None, value: float | None) -> None:
        e = self._entries.get(traj_id)
        if op == "advantage" and e is not None:
            e.traj = dataclasses.replace(e.traj, advantage=value)
        elif op == "consumed" and e is not None and e.consumed_at is None:
            e.consumed_at = version
            self.counters["consumed"] += 1
        elif op in ("evicted", "dropped") and e is not None:
            self._remove(traj_id)
            name = "dropped_stale" if op == "dropped" else (
                "evicted_consumed" if e.consumed_at is not None else "evicted_unconsumed")
            self.counters[name] += 1
        elif op == "truncate":
            for tid, e in list(self._entries.items()):
                if role is not None and e.traj.role != role:
                    continue
                if e.traj.policy_version > version:
                    self._remove(tid)
                    self.counters["truncated"] += 1
                elif e.consumed_at is not None and e.consumed_at > version:
                    # the advantage the lost step stored goes too (before it, the sample had none; self-imitation
                    # ranks replays by it)
                    e.consumed_at = None
                    e.traj = dataclasses.replace(e.traj, advantage=0.0)
                    self.counters["consumed"] -= 1

    def _apply_and_log(self, events: list[tuple[str, str, int | None, str | None, float | None]]) -> None:
        if not events:
            return
        cols = list(zip(*events))
        table = pa.table({n: list(c) for n, c in zip(_MARK_SCHEMA.names, cols)}, schema=_MARK_SCHEMA)
        self._write("mark", table)
        for ev in events:
            self._apply(*ev)
        self._maybe_compact()

    def _write(self, kind: str, table: pa.Table) -> int:
        seq = self._seq
        final = self.path / f"{seq:012d}.{kind}.parquet"
        tmp = self.path / f".{final.name}.tmp"
        with open(tmp, "wb") as fh:
            pq.write_table(table, fh, compression="zstd")
            if self.cfg.fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, final)
        if self.cfg.fsync:
            dir_fd = os.open(self.path, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        self._seq = seq + 1
        self._since_snapshot += 1
        return seq

    def _maybe_compact(self) -> None:
        if self._since_snapshot >= self.cfg.compact_every:
            self.compact()

    def _log_files(self) -> list[tuple[int, str, Path]]:
        found = []
        for p in self.path.iterdir():
            m = _FILE.match(p.name)
            if m:
                found.append((int(m.group(1)), m.group(2), p))
        return sorted(found)

    def _load(self) -> None:
        for p in self.path.glob(".*.tmp"):  # a write that never got published: not part of the log
            p.unlink(missing_ok=True)
        files = self._log_files()
        snaps = [f for f in files if f[1] == "snapshot"]
        start = snaps[-1][0] if snaps else -1
        for seq, kind, p in files:
            if seq < start:  # superseded by the snapshot (an interrupted compaction left it behind)
                p.unlink(missing_ok=True)
                continue
            try:
                table = pq.read_table(p)
            except Exception as e:  # noqa: BLE001 - any unreadable file is reported the same way
                raise RuntimeError(f"replay log file {p} is unreadable ({e}); move it away to load the rest") from e
            if kind == "snapshot":
                meta = table.schema.metadata or {}
                self.counters.update(json.loads(meta.get(b"counters", b"{}")))
                for row in table.to_pylist():
                    consumed_at = row.pop("consumed_at")
                    self._insert(_from_row(row), seq, consumed_at)
            elif kind == "add":
                for row in table.to_pylist():
                    if row["traj_id"] in self._entries:
                        self.counters["duplicates"] += 1
                    else:
                        self._insert(_from_row(row), seq)
                        self.counters["added"] += 1
            else:
                for row in table.to_pylist():
                    self._apply(row["op"], row["traj_id"], row["version"], row["role"], row.get("value"))
            self._seq = seq + 1
        self._since_snapshot = sum(1 for f in files if f[0] > start)
