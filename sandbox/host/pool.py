"""`SandboxPool`: N warm workers shared by any number of threads, coroutines and `run_many` batches.

The pool owns the host-side decisions: which launch mode works here (bwrap jail, else plain), the cgroup
tree, the isolation report and the `min_isolation` check (it raises `IsolationError` rather than run
below it; it never runs code unsandboxed). Workers that die or hang are replaced in the background by one
long-lived spawner thread while the other workers keep serving.
"""
from __future__ import annotations

import asyncio
import atexit
import functools
import logging
import os
import queue
import shutil
import tempfile
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields, replace

from sandbox.host.cgroups import CgroupTree, owner_dead
from sandbox.host.launch import LaunchSpec, python_paths, reachable_by_others
from sandbox.types import (
    ExecResult,
    ExecStatus,
    IsolationError,
    IsolationReport,
    Limits,
    Mechanism,
    SandboxClosedError,
    level_rank,
)
from sandbox.host.worker import Worker, WorkerStartError

log = logging.getLogger("sandbox")
DISABLE_ENV = "SELFPLAY_SANDBOX_DISABLE"  # comma-separated mechanisms to switch off, e.g. "bwrap,seccomp"
MECHANISMS = ("rlimits", "scrubbed_env", "bwrap", "namespaces", "seccomp", "landlock", "cgroup", "dedicated_uid")
RESPAWN_ATTEMPTS = 3


def default_workers() -> int:
    """One per usable core (at least 2, at most 32: each template holds numpy+sympy, ~70 MB)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 2
    return min(32, max(2, cores))


FileContent = str | bytes


MAX_NAME_PART_BYTES = 255  # NAME_MAX
MAX_NAME_BYTES = 4095  # PATH_MAX less the scratch dir's own


def check_file_name(name: object) -> str:
    """A `files=` key must be a plain relative path: no absolute path, no '.', '..' or empty parts (so also no
    trailing '/'), no NUL, parts of at most 255 bytes. Raises ValueError naming the key, before anything runs."""
    bad = None
    if not isinstance(name, str) or not name:
        bad = "must be a non-empty str"
    elif "\0" in name:
        bad = "contains NUL"
    elif name.startswith("/"):
        bad = "is absolute"
    else:
        try:
            raw = name.encode()
        except UnicodeEncodeError:
            raw = None
            bad = "is not valid UTF-8"
        if raw is not None:
            parts = name.split("/")
            if any(p in ("", ".", "..") for p in parts):
                bad = "has an empty, '.' or '..' part"
            elif any(len(p.encode()) > MAX_NAME_PART_BYTES for p in parts) or len(raw) > MAX_NAME_BYTES:
                bad = f"is too long (parts <= {MAX_NAME_PART_BYTES} bytes, whole <= {MAX_NAME_BYTES})"
    if bad:
        shown = repr(name) if len(repr(name)) < 80 else repr(name)[:77] + "..."
        raise ValueError(f"file name {shown} {bad}: files= keys are plain relative paths inside the scratch dir")
    return name


def encode_call(code: str, stdin: FileContent | None, files: Mapping[str, FileContent] | None,
                limits: Limits) -> tuple[dict, list[bytes]]:
    """Validate a call's inputs (clear errors for bad ones) and turn them into a wire frame. Everything a call
    brings (code, stdin, file names and contents) travels as blobs, none in the JSON header: the template
    reads the blobs into a buffer it unmaps after the call, so nothing of it stays in the template's memory."""
    if not isinstance(code, str):
        raise TypeError(f"code must be a str, got {type(code).__name__}")
    if stdin is not None and not isinstance(stdin, (str, bytes)):
        raise TypeError(f"stdin must be str, bytes or None, got {type(stdin).__name__}")
    names, blobs = [], []
    for name, content in (files or {}).items():
        check_file_name(name)
        if not isinstance(content, (str, bytes)):
            raise TypeError(f"files[{name!r}] must be str or bytes, got {type(content).__name__}")
        names.append(name)
        blobs.append(content.encode() if isinstance(content, str) else content)
    dirs = {"/".join(n.split("/")[:i]) for n in names for i in range(1, n.count("/") + 1)}
    if clash := sorted(dirs & set(names)):
        raise ValueError(f"file name {clash[0]!r} is both a file and a directory of another files= key")
    stdin_bytes = stdin.encode() if isinstance(stdin, str) else (stdin or b"")
    header = {"type": "run", "limits": limits.to_wire(), "stdin": stdin is not None, "files": len(names)}
    return header, [code.encode("utf-8", "surrogatepass"), stdin_bytes, "\0".join(names).encode(), *blobs]


class SandboxPool:
    """Run untrusted Python snippets, each in a fresh isolated process forked from a warm template."""

    def __init__(self, limits: Limits | None = None, workers: int | None = None, min_isolation: str = "rlimits",
                 *, disable: Sequence[str] = (), hang_grace_s: float = 10.0, start_timeout_s: float = 180.0):
        level_rank(min_isolation)
        self.limits = limits or Limits()
        self.workers = workers or default_workers()
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        env_disable = [d.strip() for d in os.environ.get(DISABLE_ENV, "").split(",") if d.strip()]
        self.disable = tuple(dict.fromkeys([*disable, *env_disable]))
        unknown = set(self.disable) - set(MECHANISMS)
        if unknown:
            raise ValueError(f"unknown mechanisms to disable: {sorted(unknown)}; known: {MECHANISMS}")
        self.hang_grace_s, self.start_timeout_s = hang_grace_s, start_timeout_s
        self.min_isolation = min_isolation
        self._pid = os.getpid()
        self._closed = False
        self._lock = threading.Lock()
        self._idle: queue.Queue[Worker] = queue.Queue()
        self._all: dict[int, Worker] = {}
        self._failed_slots: set[int] = set()
        self._spawner = ThreadPoolExecutor(1, thread_name_prefix="sandbox-spawner")
        self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="sandbox-call")
        # Private, root-owned 0711 dir: stage mount points and (fallback mode only) per-slot scratch dirs.
        # Named after our pid, so a later pool can remove it if this process dies without close().
        for name in os.listdir(tempfile.gettempdir()):
            if owner_dead(name):
                shutil.rmtree(os.path.join(tempfile.gettempdir(), name), ignore_errors=True)
        self.workdir = tempfile.mkdtemp(prefix=f"selfplay-sandbox-{self._pid}-")
        os.chmod(self.workdir, 0o711)
        self.scratch_root = os.path.join(self.workdir, "scratch")
        os.mkdir(self.scratch_root, 0o711)
        self._cgroups, cgroup_reason = (None, "disabled by request") if "cgroup" in self.disable \
            else CgroupTree.create()
        try:
            self.report = self._start(cgroup_reason)
        except BaseException:
            self.close()
            raise
        if level_rank(self.report.level) < level_rank(min_isolation):
            self.close()
            missing = [f"  {n}: {m.detail}" for n, m in self.report.mechanisms.items() if not m.active]
            raise IsolationError(f"sandbox isolation here is {self.report.level!r}, below min_isolation="
                                 f"{min_isolation!r}. Inactive mechanisms:\n" + "\n".join(missing)
                                 + "\nRun `python -m sandbox doctor` for details.")
        log.info("sandbox pool ready: %d workers, %s", self.workers, self.report.summary())
        for name, mech in self.report.mechanisms.items():
            if not mech.active:
                log.warning("sandbox mechanism %s inactive: %s", name, mech.detail)

    @classmethod
    def from_config(cls, section, **kwargs) -> SandboxPool:
        """From `selfplay.config.SandboxConfig` (or anything with the same attribute names), without this
        package importing selfplay: Limits fields, plus `workers` and `min_isolation`."""
        limits = Limits(**{f.name: getattr(section, f.name) for f in fields(Limits) if hasattr(section, f.name)})
        return cls(limits, workers=getattr(section, "workers", None),
                   min_isolation=getattr(section, "min_isolation", "rlimits"), **kwargs)

    # -- start-up --------------------------------------------------------------------------------------
    def _new_worker(self, index: int, spec: LaunchSpec) -> Worker:
        slot = self._cgroups.slot(index) if self._cgroups is not None else None
        scratch = None
        if not spec.jail:  # in the jail, scratch is the jail's own tmpfs /tmp, never the host disk
            scratch = os.path.join(self.scratch_root, f"slot-{index}")
            os.makedirs(scratch, mode=0o700, exist_ok=True)
            if spec.uid is not None:
                os.chown(scratch, spec.uid, spec.gid)
        worker = Worker(index, spec, slot, scratch, self.hang_grace_s)
        self._spawner.submit(worker.popen).result()
        return worker

    def _start_all(self, spec: LaunchSpec) -> list[Worker]:
        started = [self._new_worker(i, spec) for i in range(self.workers)]
        errors = []
        for w in started:  # hellos arrive in parallel; the imports overlap
            try:
                w.await_hello(self.start_timeout_s)
            except WorkerStartError as e:
                errors.append(str(e))
        if errors:
            for w in started:
                self._discard(w)
            raise WorkerStartError(errors[0])
        return started

    def _start(self, cgroup_reason: str) -> IsolationReport:
        spec = LaunchSpec.for_host(self.limits.preimport, self.disable, workdir=self.workdir,
                                   scratch_mb=self.limits.memory_mb)
        spec.prepare()
        jail_reason = "disabled by request" if "bwrap" in self.disable else "no bwrap binary found"
        if spec.jail:
            try:
                workers = self._start_all(spec)
            except WorkerStartError as e:
                jail_reason = f"bwrap failed to start here: {e}"
                log.warning("sandbox: %s; falling back to a plain template process", jail_reason)
                spec = replace(spec, jail=False)
                workers = self._start_all(spec)
        else:
            workers = self._start_all(spec)
        self._spec = spec
        for w in workers:
            self._all[w.index] = w
            self._idle.put(w)
        return self._make_report(workers[0].hello, spec, jail_reason, cgroup_reason)

    def _make_report(self, hello: dict, spec: LaunchSpec, jail_reason: str, cgroup_reason: str) -> IsolationReport:
        lim = self.limits
        mech = {
            "rlimits": Mechanism(True, f"per call: AS {lim.memory_mb} MB, CPU {lim.cpu_time_s:g} s, NPROC "
                                       f"{lim.max_processes}, NOFILE {lim.max_open_files}, FSIZE "
                                       f"{lim.max_file_size_mb:g} MB, no core dumps; wall clock "
                                       f"{lim.timeout_s:g} s kills the whole tree"),
            "scrubbed_env": Mechanism(True, f"{len(spec.env)} fixed variables, nothing inherited"),
            "bwrap": Mechanism(spec.jail, f"{spec.bwrap}: tmpfs root with read-only system and Python dirs "
                                          "only; no home, repository or /etc secrets; own pid/net/ipc/uts "
                                          "namespaces" if spec.jail else jail_reason),
        }
        for name in ("namespaces", "seccomp", "landlock"):
            active, detail = hello["mechanisms"].get(name, [False, "not reported"])
            mech[name] = Mechanism(bool(active), str(detail))
        mech["cgroup"] = Mechanism(self._cgroups is not None,
                                   self._cgroups.detail if self._cgroups is not None else cgroup_reason)
        uid = hello.get("uid")
        if spec.uid is not None:
            detail = f"template and snippets run as uid {uid}"
            if not spec.jail and not all(reachable_by_others(p) for p in python_paths()):
                detail += (" (the Python install is not reachable by that uid outside the jail: snippets can "
                           "import only what `preimport` loaded)")
            mech["dedicated_uid"] = Mechanism(uid == spec.uid, detail)
        else:
            mech["dedicated_uid"] = Mechanism(False, f"not root, so snippets keep our uid {os.getuid()}")
        if mech["bwrap"].active and mech["namespaces"].active:
            level = "full" if mech["seccomp"].active else "namespaces"
        else:
            level = "rlimits"
        return IsolationReport(level, mech, tuple(hello.get("preimported", ())),
                               dict(hello.get("preimport_failed", {})))

    # -- worker bookkeeping ------------------------------------------------------------------------------
    def _discard(self, worker: Worker) -> None:
        worker.kill()
        if worker.slot is not None:
            worker.slot.remove()

    def _respawn(self, index: int) -> None:
        for attempt in range(RESPAWN_ATTEMPTS):
            if self._closed:
                return
            worker = None
            try:
                worker = self._new_worker(index, self._spec)
                worker.await_hello(self.start_timeout_s)
            except (WorkerStartError, OSError, RuntimeError) as e:  # RuntimeError: closed mid-restart
                if worker is not None:
                    self._discard(worker)
                if self._closed:
                    return
                log.error("sandbox: could not restart worker %d (attempt %d): %s", index, attempt + 1, e)
                continue
            with self._lock:
                if self._closed:
                    self._discard(worker)
                    return
                self._all[index] = worker
            self._idle.put(worker)
            return
        self._failed_slots.add(index)

    def _release(self, worker: Worker) -> None:
        if not worker.dead and not self._closed:
            self._idle.put(worker)
            return
        if worker.slot is not None:
            worker.kill()
            worker.slot.remove()
        if not self._closed:
            threading.Thread(target=self._respawn, args=(worker.index,), daemon=True,
                             name="sandbox-respawn").start()

    def _acquire(self) -> Worker | None:
        while True:
            if self._closed:
                raise SandboxClosedError("this SandboxPool is closed")
            if len(self._failed_slots) >= self.workers:
                return None
            try:
                return self._idle.get(timeout=0.25)
            except queue.Empty:
                continue

    # -- public API ----------------------------------------------------------------------------------------
    @property
    def isolation(self) -> str:
        return self.report.level

    def run(self, code: str, *, timeout_s: float | None = None, stdin: FileContent | None = None,
            files: Mapping[str, FileContent] | None = None, limits: Limits | None = None) -> ExecResult:
        """Run one snippet; blocks until a worker is free and the snippet has finished."""
        if os.getpid() != self._pid:
            raise RuntimeError("SandboxPool used in a forked child; create one pool per process")
        lim = limits or self.limits
        if timeout_s is not None:
            lim = replace(lim, timeout_s=timeout_s)
        header, blobs = encode_call(code, stdin, files, lim)
        worker = self._acquire()
        if worker is None:
            return ExecResult("", "[sandbox] no worker could be started; see the log", None,
                              ExecStatus.SANDBOX_ERROR, 0.0)
        try:
            return worker.call(header, blobs, lim)
        finally:
            self._release(worker)

    def run_many(self, codes: Sequence[str], *, timeout_s: float | None = None, stdin: FileContent | None = None,
                 files: Mapping[str, FileContent] | None = None, limits: Limits | None = None) -> list[ExecResult]:
        """Run a batch concurrently (up to `workers` at once); results in the order of `codes`."""
        if isinstance(codes, str):
            raise TypeError("run_many takes a sequence of code strings, not one string")
        call = functools.partial(self.run, timeout_s=timeout_s, stdin=stdin, files=files, limits=limits)
        if self._closed:
            raise SandboxClosedError("this SandboxPool is closed")
        return list(self._executor.map(call, list(codes)))

    async def arun(self, code: str, **kwargs) -> ExecResult:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(self.run, code, **kwargs))

    async def arun_many(self, codes: Sequence[str], **kwargs) -> list[ExecResult]:
        return list(await asyncio.gather(*(self.arun(c, **kwargs) for c in codes)))

    def worker_processes(self) -> dict[int, list[int]]:
        """index -> host pids of that worker's process tree (tests, diagnostics)."""
        with self._lock:
            return {i: w.process_tree() for i, w in self._all.items() if not w.dead}

    def template_pids(self) -> dict[int, int]:
        """index -> host pid of that worker's template process."""
        with self._lock:
            workers = [w for w in self._all.values() if not w.dead]
        return {w.index: pid for w in workers if (pid := w.template_pid()) is not None}

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            workers = list(self._all.values())
        self._executor.shutdown(wait=False, cancel_futures=True)
        for w in workers:
            w.close()
            if w.slot is not None:
                w.slot.remove()
        self._spawner.shutdown(wait=True)
        if self._cgroups is not None:
            self._cgroups.remove()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> SandboxPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            if not self._closed and os.getpid() == self._pid:
                self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


# -- the process-wide default pool behind sandbox.run / run_many / arun / arun_many ---------------------------
_default: SandboxPool | None = None
_default_lock = threading.Lock()


def default_pool() -> SandboxPool:
    """The lazily created pool of this process (default limits, workers from the machine); a forked child
    gets its own."""
    global _default
    with _default_lock:
        if _default is None or _default._closed or _default._pid != os.getpid():
            _default = SandboxPool()
            atexit.register(_default.close)
        return _default


def run(code: str, **kwargs) -> ExecResult:
    return default_pool().run(code, **kwargs)


def run_many(codes: Sequence[str], **kwargs) -> list[ExecResult]:
    return default_pool().run_many(codes, **kwargs)


async def arun(code: str, **kwargs) -> ExecResult:
    return await default_pool().arun(code, **kwargs)


async def arun_many(codes: Sequence[str], **kwargs) -> list[ExecResult]:
    return await default_pool().arun_many(codes, **kwargs)
