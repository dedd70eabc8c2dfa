"""The task pool: tasks the verifier accepted, with their pseudo-labels, that the executor trains on.

Append-only JSONL (one fsync'd line per task) so a killed run keeps every accepted task; deduplicated by a
normalised form of the question, so a proposer repeating itself does not flood the pool; `truncate_after`
drops tasks of iterations a resumed run will redo, so nothing is duplicated across a resume.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


def question_key(question: str) -> str:
    norm = re.sub(r"\s+", " ", question.strip().lower())
    return hashlib.sha1(norm.encode()).hexdigest()[:16]


@dataclass
class PoolTask:
    task_id: str
    question: str
    pseudo_label: str
    p_hat: float
    iteration: int
    meta: dict[str, Any] = field(default_factory=dict)


class TaskPool:
    def __init__(self, path: str | os.PathLike, capacity: int = 10000):
        self.path = Path(path)
        self.capacity = capacity
        self.tasks: list[PoolTask] = []
        self._keys: set[str] = set()
        self.corrupt_lines = 0
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    self._remember(PoolTask(**json.loads(line)))
                except (json.JSONDecodeError, TypeError):
                    self.corrupt_lines += 1  # a line cut by a kill: the task is re-proposed later

    def _remember(self, task: PoolTask) -> bool:
        key = question_key(task.question)
        if key in self._keys:
            return False
        self._keys.add(key)
        self.tasks.append(task)
        if len(self.tasks) > self.capacity:  # oldest out; the file keeps history
            old = self.tasks.pop(0)
            self._keys.discard(question_key(old.question))
        return True

    def __len__(self) -> int:
        return len(self.tasks)

    def __contains__(self, question: str) -> bool:
        return question_key(question) in self._keys

    def add(self, tasks: list[PoolTask]) -> list[PoolTask]:
        """Add new tasks; returns the ones actually added (duplicates skipped)."""
        added = [t for t in tasks if self._remember(t)]
        if added:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                for t in added:
                    f.write(json.dumps(asdict(t)) + "\n")
                f.flush()
                os.fsync(f.fileno())
        return added

    def sample(self, n: int, rng: random.Random, newest_first: bool = False) -> list[PoolTask]:
        if not self.tasks:
            return []
        if newest_first:
            return list(reversed(self.tasks[-n:]))
        return rng.sample(self.tasks, min(n, len(self.tasks)))

    def truncate_after(self, iteration: int) -> int:
        """Forget tasks admitted after `iteration` (they will be re-proposed); returns how many were dropped."""
        if not self.path.exists():
            return 0
        history = []
        for line in self.path.read_text().splitlines():
            try:
                history.append(PoolTask(**json.loads(line)))
            except (json.JSONDecodeError, TypeError):
                continue
        kept = [t for t in history if t.iteration <= iteration]
        dropped = len(history) - len(kept)
        if dropped or self.corrupt_lines:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(asdict(t)) + "\n" for t in kept))
            os.replace(tmp, self.path)
            self.tasks, self._keys, self.corrupt_lines = [], set(), 0
            for t in kept:
                self._remember(t)
        return dropped
