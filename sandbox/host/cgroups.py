"""One memory+pids cgroup per worker slot, where the host lets us make one.

rlimits bound each process, but only a cgroup bounds the *sum*: without one, a snippet forking 30 children
of 400 MB each takes 12 GB (sandbox.md measured host free memory falling 2.7 GB in 3 s). A worker runs one
call at a time, so a slot's limit is the template's own usage plus one call's `memory_mb`.

cgroup v1 (separate memory and pids hierarchies, writable as root) and v2 (a delegated subtree whose
subtree_control we may enable) are both handled; slots live under our own cgroup so the caller's limits
still apply above them. The slot also tells us, after a call, whether the OOM killer fired in it.
"""
from __future__ import annotations

import os
import re
import secrets
import time
from dataclasses import dataclass


def _own_paths() -> dict[str, str]:
    """controller ('memory', 'pids', '' for v2) -> our cgroup path, from /proc/self/cgroup."""
    out: dict[str, str] = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for c in controllers.split(",") if controllers else [""]:
                out[c] = path
    return out


def _mounts() -> dict[str, str]:
    """controller ('memory', 'pids', '' for v2) -> the dir where our own cgroup of it is, from mountinfo."""
    own = _own_paths()
    out: dict[str, str] = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, rfields = left.split(), right.split()
            if len(fields) < 5 or len(rfields) < 3 or rfields[0] not in ("cgroup", "cgroup2"):
                continue
            root, point = fields[3], fields[4]
            keys = [""] if rfields[0] == "cgroup2" else [c for c in ("memory", "pids", "cpu")
                                                          if c in rfields[2].split(",")]
            for key in keys:
                path = own.get(key)
                if path is None or key in out:
                    continue
                rel = os.path.relpath(path, root) if path.startswith(root) else path.lstrip("/")
                out[key] = os.path.normpath(os.path.join(point, "" if rel == "." else rel))
    return out


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


CPU_PERIOD_US = 100_000  # the kernel's default CFS period


@dataclass
class Slot:
    version: int
    memory_dir: str
    pids_dir: str  # the same dir on v2
    cpu_dir: str | None = None  # None: no cpu controller here (rlimits bound each process's CPU time)

    @property
    def dirs(self) -> list[str]:
        return list(dict.fromkeys(d for d in (self.memory_dir, self.pids_dir, self.cpu_dir) if d))

    @property
    def procs_files(self) -> list[str]:
        return [os.path.join(d, "cgroup.procs") for d in self.dirs]

    def set_cpu(self, cores: float) -> None:
        """A CPU quota of `cores` for everything in the slot (one call at a time, the template is idle)."""
        if self.cpu_dir is None:
            return
        quota = max(1000, int(cores * CPU_PERIOD_US))
        if self.version == 1:
            _write(os.path.join(self.cpu_dir, "cpu.cfs_period_us"), str(CPU_PERIOD_US))
            _write(os.path.join(self.cpu_dir, "cpu.cfs_quota_us"), str(quota))
        else:
            _write(os.path.join(self.cpu_dir, "cpu.max"), f"{quota} {CPU_PERIOD_US}")

    def throttled(self) -> int:
        """How many CFS periods the slot was throttled in (0 without a cpu controller)."""
        if self.cpu_dir is None:
            return 0
        for line in _read(os.path.join(self.cpu_dir, "cpu.stat")).splitlines():
            key, _, value = line.partition(" ")
            if key == "nr_throttled":
                return int(value)
        return 0

    def set_limits(self, memory_bytes: int, pids: int) -> None:
        if self.version == 1:
            limit = os.path.join(self.memory_dir, "memory.limit_in_bytes")
            memsw = os.path.join(self.memory_dir, "memory.memsw.limit_in_bytes")
            has_memsw = os.path.exists(memsw)  # memory+swap: no swapping around the limit
            try:
                _write(limit, str(memory_bytes))
            except OSError:  # raising the limit: memsw (which must stay >= it) goes first
                if not has_memsw:
                    raise
                _write(memsw, str(memory_bytes))
                _write(limit, str(memory_bytes))
            if has_memsw:
                _write(memsw, str(memory_bytes))
            _write(os.path.join(self.pids_dir, "pids.max"), str(pids))
        else:
            _write(os.path.join(self.memory_dir, "memory.max"), str(memory_bytes))
            swap = os.path.join(self.memory_dir, "memory.swap.max")
            if os.path.exists(swap):
                _write(swap, "0")
            _write(os.path.join(self.pids_dir, "pids.max"), str(pids))

    def memory_usage(self) -> int:
        name = "memory.usage_in_bytes" if self.version == 1 else "memory.current"
        return int(_read(os.path.join(self.memory_dir, name)))

    def oom_kills(self) -> int:
        name = "memory.oom_control" if self.version == 1 else "memory.events"
        try:
            for line in _read(os.path.join(self.memory_dir, name)).splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except OSError:
            pass
        return 0

    def kill_all(self) -> None:
        """SIGKILL whatever is still in the slot (a dead worker's leftovers)."""
        if self.version == 2 and os.path.exists(os.path.join(self.memory_dir, "cgroup.kill")):
            _write(os.path.join(self.memory_dir, "cgroup.kill"), "1")
            return
        for _ in range(100):
            pids = [int(p) for f in self.procs_files for p in _read(f).split()]
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass
            time.sleep(0.01)

    def remove(self) -> None:
        for d in self.dirs:
            for _ in range(50):  # a killed process leaves the cgroup a moment after it is reaped
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.02)


STALE = re.compile(r"^selfplay-sandbox-(\d+)-")


def owner_dead(name: str) -> bool:
    """For `selfplay-sandbox-<pid>-...` names: whether the pool process that made it is gone."""
    m = STALE.match(name)
    if not m:
        return False
    try:
        os.kill(int(m.group(1)), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    return False


def _remove_stale(base: str) -> None:
    """Trees left by pools whose process was killed (no close() ran). Only empty cgroups can go."""
    for name in os.listdir(base) if os.path.isdir(base) else []:
        if owner_dead(name):
            _remove_tree(os.path.join(base, name))


def _remove_tree(tree: str) -> None:
    """rmdir a cgroup and its child cgroups; only empty ones can go (a busy one stays, silently)."""
    for sub in os.listdir(tree) if os.path.isdir(tree) else []:
        if os.path.isdir(os.path.join(tree, sub)):
            try:
                os.rmdir(os.path.join(tree, sub))
            except OSError:
                pass
    try:
        os.rmdir(tree)
    except OSError:
        pass


class CgroupTree:
    """Our private subtree (one dir per hierarchy), holding one Slot per worker."""

    def __init__(self, version: int, memory_base: str, pids_base: str, cpu_base: str | None = None):
        self.version, self.memory_base, self.pids_base, self.cpu_base = version, memory_base, pids_base, cpu_base
        what = "memory+pids+cpu" if cpu_base else "memory+pids (no cpu controller: no CPU quota, rlimits only)"
        self.detail = f"cgroup v{version} {what} per worker under {memory_base}"

    @classmethod
    def create(cls) -> tuple[CgroupTree | None, str]:
        """The tree, or None and the reason no cgroup can be made here."""
        name = f"selfplay-sandbox-{os.getpid()}-{secrets.token_hex(3)}"
        reasons = []
        try:
            where = _mounts()
        except OSError as e:
            return None, f"cannot read /proc/self/cgroup or mountinfo: {e}"
        for base in where.values():
            _remove_stale(base)
        if "memory" in where and "pids" in where:
            mem, pids = os.path.join(where["memory"], name), os.path.join(where["pids"], name)
            try:
                os.mkdir(mem)
                try:
                    os.mkdir(pids)
                except OSError:
                    os.rmdir(mem)
                    raise
                cpu = None
                if "cpu" in where:
                    try:
                        os.mkdir(os.path.join(where["cpu"], name))
                        cpu = os.path.join(where["cpu"], name)
                    except OSError:
                        pass
                return cls(1, mem, pids, cpu), ""
            except OSError as e:
                reasons.append(f"v1: cannot create {mem}: {e.strerror}")
        else:
            reasons.append("v1: no memory+pids hierarchies mounted")
        if "" in where:
            base = where[""]
            try:
                available = _read(os.path.join(base, "cgroup.controllers")).split()
                if not {"memory", "pids"} <= set(available):
                    raise OSError(0, f"controllers delegated here: {' '.join(available) or 'none'}")
                want = "+memory +pids" + (" +cpu" if "cpu" in available else "")
                if not set(want.replace("+", "").split()) <= set(
                        _read(os.path.join(base, "cgroup.subtree_control")).split()):
                    # EBUSY when our cgroup holds processes (the no-internal-process rule)
                    _write(os.path.join(base, "cgroup.subtree_control"), want)
                tree = os.path.join(base, name)
                os.mkdir(tree)
                try:
                    _write(os.path.join(tree, "cgroup.subtree_control"), want)
                except OSError:
                    os.rmdir(tree)
                    raise
                return cls(2, tree, tree, tree if "cpu" in want else None), ""
            except OSError as e:
                reasons.append(f"v2: {e.strerror or e}")
        else:
            reasons.append("v2: not mounted")
        return None, "; ".join(reasons)

    def slot(self, index: int) -> Slot:
        name = f"slot-{index}-{secrets.token_hex(2)}"
        mem, pids = os.path.join(self.memory_base, name), os.path.join(self.pids_base, name)
        cpu = os.path.join(self.cpu_base, name) if self.cpu_base else None
        for d in dict.fromkeys(d for d in (mem, pids, cpu) if d):
            os.mkdir(d)
        return Slot(self.version, mem, pids, cpu)

    def remove(self) -> None:
        for d in dict.fromkeys(d for d in (self.memory_base, self.pids_base, self.cpu_base) if d):
            _remove_tree(d)
