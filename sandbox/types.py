"""Typed seams of the sandbox: what a call may use (`Limits`), what it returns (`ExecResult`, `ExecStatus`),
and what isolation the host gave us (`IsolationReport`).

`Limits` field names match `selfplay.config.SandboxConfig` one to one, so a caller can write
`Limits(**cfg.sandbox.limit_values())`; this package never imports selfplay.
"""
from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field

# Ordered from weakest to strongest; `min_isolation` names one of these.
ISOLATION_LEVELS = ("rlimits", "namespaces", "full")


class IsolationError(RuntimeError):
    """The host cannot give the isolation the caller required (`min_isolation`); says what is missing."""


class SandboxClosedError(RuntimeError):
    """A call on a pool after `close()`."""


@dataclass(frozen=True)
class Limits:
    """Per-call resource limits. Defaults are Agent0's (firejail: nproc 32, fsize 2m, AS 1096m; 10 s)."""

    timeout_s: float = 10.0  # wall clock; the whole process tree is killed when it passes
    cpu_time_s: float = 10.0  # RLIMIT_CPU of the snippet (SIGXCPU, then SIGKILL one second later)
    memory_mb: int = 1096  # RLIMIT_AS of each process; also the per-call memory cgroup budget and scratch size
    max_processes: int = 32  # RLIMIT_NPROC (per call where a user namespace exists); pids cgroup
    max_open_files: int = 64  # RLIMIT_NOFILE
    max_file_size_mb: float = 2.0  # RLIMIT_FSIZE
    max_output_bytes: int = 64 * 1024  # per stream; past it the call is killed and flagged `truncated`
    # CPU quota of a call, all its processes together (cgroup cpu.max / cfs_quota; without a cpu controller
    # only RLIMIT_CPU bounds each process). 1: a call never takes more than one core.
    cpu_cores: float = 1.0
    # Imported once in the warm template, so `import numpy, sympy` in a snippet costs nothing.
    # Applies when a pool starts; a per-call `limits=` cannot change it.
    preimport: tuple[str, ...] = ("math", "numpy", "sympy", "fractions", "itertools")

    def __post_init__(self) -> None:
        if isinstance(self.preimport, str) or not isinstance(self.preimport, Iterable):
            raise TypeError(f"Limits.preimport must be a list of module names, got {self.preimport!r}")
        object.__setattr__(self, "preimport", tuple(str(m) for m in self.preimport))
        for name in ("timeout_s", "cpu_time_s", "memory_mb", "max_processes", "max_open_files",
                     "max_file_size_mb", "max_output_bytes", "cpu_cores"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"Limits.{name} must be a positive number, got {value!r}")
        if self.memory_mb < 64:
            raise ValueError(f"Limits.memory_mb must be >= 64 (Python itself needs that), got {self.memory_mb}")
        if self.max_open_files < 8:
            raise ValueError(f"Limits.max_open_files must be >= 8, got {self.max_open_files}")
        if self.max_output_bytes < 256:
            raise ValueError(f"Limits.max_output_bytes must be >= 256, got {self.max_output_bytes}")

    def to_wire(self) -> dict:
        return {k: getattr(self, k) for k in ("timeout_s", "cpu_time_s", "memory_mb", "max_processes",
                                              "max_open_files", "max_file_size_mb", "max_output_bytes")}


class ExecStatus(str, enum.Enum):
    """How a call ended. The value strings are what metrics and the dashboard record."""

    OK = "ok"  # exited 0
    ERROR = "error"  # exited non-zero (uncaught exception, sys.exit(n), os._exit(n))
    TIMEOUT = "timeout"  # wall-clock or CPU-time limit; the process tree was killed
    MEMORY_LIMIT = "memory_limit"  # MemoryError at the address-space limit, or the memory cgroup's OOM killer
    OUTPUT_LIMIT = "output_limit"  # stdout or stderr passed max_output_bytes; killed, output truncated
    KILLED = "killed"  # ended by a signal it did not get from our limits (segfault, abort, kill of itself)
    SANDBOX_ERROR = "sandbox_error"  # our fault: the worker crashed, hung or could not isolate the call


@dataclass(frozen=True)
class ExecResult:
    stdout: str
    stderr: str
    exit_code: int | None  # -N when ended by signal N; None when the sandbox ended it (timeout, limits, errors)
    status: ExecStatus
    duration_s: float  # from dispatch to a worker until the result came back (clean-up included)
    truncated: bool = False  # stdout or stderr was cut at max_output_bytes
    # Time the worker spent after the code ended emptying what the call left (its /tmp and /dev/shm) before
    # it replied: part of duration_s, so a call that litters pays for its own clean-up, and bounded by the
    # scratch tmpfs's inode cap (sandbox.jail.monitor.SCRATCH_INODES). 0.0 when the worker never replied.
    cleanup_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status is ExecStatus.OK


@dataclass(frozen=True)
class Mechanism:
    active: bool
    detail: str  # what exactly is in force, or why not


@dataclass(frozen=True)
class IsolationReport:
    """What a pool's workers actually run with; `python -m sandbox doctor` prints it."""

    level: str  # one of ISOLATION_LEVELS
    mechanisms: dict[str, Mechanism] = field(default_factory=dict)
    preimported: tuple[str, ...] = ()
    preimport_failed: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        on = [n for n, m in self.mechanisms.items() if m.active]
        off = [n for n, m in self.mechanisms.items() if not m.active]
        return f"isolation={self.level} active=[{', '.join(on)}] inactive=[{', '.join(off)}]"


def level_rank(level: str) -> int:
    if level not in ISOLATION_LEVELS:
        raise ValueError(f"isolation level must be one of {ISOLATION_LEVELS}, got {level!r}")
    return ISOLATION_LEVELS.index(level)
