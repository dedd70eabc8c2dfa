"""Atomic checkpoint directories, a `latest` pointer, RNG state capture, and a `Learner`'s checkpoint.

A crash mid-write must never leave a directory that looks complete: every checkpoint (and every exported
adapter) is written into a temporary sibling and renamed into place, and the `latest` pointer file is
replaced (os.replace) only after the rename. Readers follow `latest`, so they see the old checkpoint or the
new one, never half of one.
"""
from __future__ import annotations

import json
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


def prune_checkpoints(root: str | os.PathLike, keep: int, protect: tuple[str | None, ...] = ()) -> list[Path]:
    """Delete all but the newest `keep` step-* directories (never the one `latest` names, nor those named in
    `protect`); return removed."""
    root = Path(root)
    pointer = root / LATEST
    current = pointer.read_text().strip() if pointer.exists() else None
    steps = sorted(
        (int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))
    )
    removed = []
    for _, p in steps[: max(0, len(steps) - keep)]:
        if p.name != current and p.name not in protect:
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


# ---------------------------------------------------------------------------- a learner's checkpoint
def save_learner(learner: Any, root: str | os.PathLike) -> Path:
    """A `Learner`'s whole state: write `root/step-XXXXXXXX/` atomically, then point `root/latest` at it;
    prune old ones."""
    root = Path(root)
    name = f"step-{learner.step:08d}"
    fsdp = learner.fsdp
    full = fsdp.full_state() if fsdp is not None else None  # fsdp2: every rank gathers, rank 0 writes
    optim = {k: {"optimizer": fsdp.full_optimizer_state(o) if fsdp is not None else o.state_dict(),
                 "scheduler": s.state_dict()} for k, (o, s) in learner._optim.items()}
    if fsdp is not None and learner.dist.rank != 0:
        return root / name
    with atomic_dir(root / name) as tmp:
        if learner.lora:
            for role in learner.roles:
                learner.model.save_pretrained(str(tmp / "adapters"), selected_adapters=[role], state_dict=full)
        elif full is not None:
            from selfplay.learner.fsdp import save_full

            save_full(full, tmp / "model.safetensors")
        else:
            from safetensors.torch import save_model

            save_model(learner.model, str(tmp / "model.safetensors"))
        torch.save(optim, tmp / "optimizer.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        state = {"step": learner.step, "policy_version": learner.policy_version, "roles": list(learner.roles),
                 "seed": learner.seed, "finetune": learner.cfg.finetune, "sharded": fsdp is not None,
                 "model": learner.model_cfg.model_dump(mode="json"), "learner": learner.cfg.model_dump(mode="json")}
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
    pointer = root / LATEST
    previous = pointer.read_text().strip() if pointer.exists() else None
    write_latest(root, name)
    # the previous checkpoint survives this save: the run's last commit names it until the driver commits
    # this one (a kill or a dead rank in between rolls back to it), whatever `keep_checkpoints` says
    prune_checkpoints(root, learner.cfg.keep_checkpoints, protect=(previous,))
    return root / name

def load_learner(learner: Any, path: str | os.PathLike) -> Path:
    """Into a `Learner`: restore weights, optimizers, schedulers, RNG states, step and versions from a checkpoint (or root)."""
    ck = resolve_checkpoint(path)
    state = json.loads((ck / "state.json").read_text())
    if state["finetune"] != learner.cfg.finetune or list(state["roles"]) != list(learner.roles):
        raise ValueError(f"checkpoint {ck} is finetune={state['finetune']} roles={state['roles']}; this learner "
                         f"is finetune={learner.cfg.finetune} roles={list(learner.roles)}")
    if bool(state.get("sharded")) != (learner.fsdp is not None):  # the optimizer files differ (FQN keys)
        raise ValueError(f"checkpoint {ck} was written by {'fsdp2' if state.get('sharded') else 'unsharded'} "
                         f"ranks; load it with the same learner.strategy")
    if learner.fsdp is not None:
        from selfplay.learner.fsdp import load_weights

        load_weights(learner, ck)
    elif learner.lora:
        from peft import set_peft_model_state_dict
        from peft.utils import load_peft_weights

        for role in learner.roles:
            weights = load_peft_weights(str(ck / "adapters" / role), device=str(learner.device))
            res = set_peft_model_state_dict(learner.model, weights, adapter_name=role)
            if res.unexpected_keys:
                raise ValueError(f"{ck}: adapter {role} has keys this model lacks: {res.unexpected_keys[:3]}")
    else:
        from safetensors.torch import load_model

        load_model(learner.model, str(ck / "model.safetensors"), device=str(learner.device))
    optim = torch.load(ck / "optimizer.pt", map_location=learner.device, weights_only=True)
    for k, (o, s) in learner._optim.items():
        if learner.fsdp is not None:
            learner.fsdp.load_full_optimizer_state(o, optim[k]["optimizer"])
        else:
            o.load_state_dict(optim[k]["optimizer"])
        s.load_state_dict(optim[k]["scheduler"])
    set_rng_state(torch.load(ck / "rng.pt", map_location="cpu", weights_only=True))
    learner.step = int(state["step"])
    learner.policy_version = {r: int(v) for r, v in state["policy_version"].items()}
    return ck
