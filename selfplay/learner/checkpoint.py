"""Atomic checkpoint directories, a `latest` pointer, and RNG state capture.

A crash mid-write must never leave a directory that looks complete: every checkpoint (and every exported
adapter) is written into a temporary sibling and renamed into place, and the `latest` pointer file is
replaced (os.replace) only after the rename. Readers follow `latest`, so they see the old checkpoint or the
new one, never half of one.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

LATEST = "latest"
STEP_DIR = re.compile(r"^step-(\d+)$")


@contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary directory next to `target`; on success it becomes `target`.

    An existing `target` is replaced (moved aside, then deleted after the new one is in place). On an
    exception the temporary directory is removed and `target` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}-{tmp.name[-8:]}"
            os.rename(target, old)
        os.rename(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_latest(root: str | os.PathLike, name: str) -> None:
    """Point `root/latest` at checkpoint `name` (a file holding the name; replaced atomically)."""
    root = Path(root)
    fd, tmp = tempfile.mkstemp(prefix=".latest.", dir=root)
    with os.fdopen(fd, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / LATEST)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory: `path` itself if it holds `state.json`, else the one `path/latest` names."""
    path = Path(path)
    if (path / "state.json").exists():
        return path
    pointer = path / LATEST
    if not pointer.exists():
        raise FileNotFoundError(f"no checkpoint at {path}: neither {path}/state.json nor {pointer} exists")
    target = path / pointer.read_text().strip()
    if not (target / "state.json").exists():
        raise FileNotFoundError(f"{pointer} names {target.name}, which has no state.json")
    return target


def prune_checkpoints(root: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the newest `keep` step-* directories (never the one `latest` names); return removed."""
    root = Path(root)
    pointer = root / LATEST
    current = pointer.read_text().strip() if pointer.exists() else None
    steps = sorted(
        (int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))
    )
    removed = []
    for _, p in steps[: max(0, len(steps) - keep)]:
        if p.name != current:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch (CPU and every CUDA device) RNG states, safe for torch.load(weights_only=True)."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(words), gauss],
        "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, words, gauss = state["python"]
    random.setstate((version, tuple(words), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
