"""Calls of one worker are isolated from each other, and a hostile call never fails the innocent call after it
(issue #10's red-team findings, each followed by an innocent call that must succeed). One worker, so every
call below runs on the same template as the one before it."""
from __future__ import annotations

import os
import secrets
import sys
import time

import pytest

from sandbox import ExecStatus, Limits, SandboxPool
from sandbox.linux import children_of

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox needs Linux")

LIMITS = Limits(timeout_s=20.0, cpu_time_s=20.0, memory_mb=1024, max_processes=32)
INNOCENT = "import numpy, sympy; print(int(numpy.int64(6)) * sympy.Integer(7))"


@pytest.fixture(scope="module")
def pool():
    with SandboxPool(LIMITS, workers=1, hang_grace_s=4.0) as p:
        yield p


def _innocent_ok(pool: SandboxPool) -> None:
    r = pool.run(INNOCENT)
    assert (r.status, r.stdout) == (ExecStatus.OK, "42\n"), r.stderr[-1000:]


def _needs_namespaces(pool: SandboxPool) -> None:
    if not pool.report.mechanisms["namespaces"].active:
        pytest.skip("per-call namespaces are not available on this host")


# ---------------------------------------------------------------------------------------------------------
# nothing of call N is reachable from call N+1
# ---------------------------------------------------------------------------------------------------------
SHM = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
key = 0x5EED
{body}
"""
SHM_WRITE = SHM.format(body="""
sid = libc.shmget(key, 1 << 20, 0o1600)  # IPC_CREAT | 0600
addr = libc.shmat(sid, None, 0)
ctypes.memmove(addr, b"left-behind", 11)
print(sid >= 0, open('/proc/self/ns/ipc').name and os.readlink('/proc/self/ns/ipc'))
""")
SHM_READ = SHM.format(body="""
sid = libc.shmget(key, 0, 0)
print(sid, ctypes.get_errno(), os.readlink('/proc/self/ns/ipc'))
""")


def test_each_call_gets_its_own_ipc_namespace(pool):
    _needs_namespaces(pool)
    first = pool.run(SHM_WRITE)
    assert first.status is ExecStatus.OK and first.stdout.startswith("True "), first.stderr
    second = pool.run(SHM_READ)
    sid, err, ns = second.stdout.split()
    assert (sid, int(err)) == ("-1", 2), second.stdout  # ENOENT: the segment died with the first call
    # Namespace numbers are compared only between namespaces alive at the same time: the kernel frees a dead
    # one asynchronously and reuses its number (at load 10 two consecutive calls showed the same number).
    # The template lives throughout: each call's namespace must differ from the template's, which every call
    # would share if it re-entered it (the red-team finding).
    template = next(iter(pool.template_pids().values()))
    try:
        template_ns = os.readlink(f"/proc/{template}/ns/ipc")  # the template is not dumpable: root only
    except PermissionError:
        template_ns = None
    for call_ns in (first.stdout.split()[1], ns):
        assert call_ns.startswith("ipc:[") and call_ns != template_ns, (call_ns, template_ns)
    _innocent_ok(pool)


# Looks for each secret of the previous call in this process's frames and in all of its readable memory. A
# secret is only ever named in halves here, so it is found contiguous only where the previous call left it.
SCAN = """
import os, sys
PAIRS = {pairs!r}
found = set()

def look(name, a, b, data):
    i = data.find(a)
    while i >= 0:
        if data[i + len(a):i + len(a) + len(b)] == b:
            found.add(name)
            return
        i = data.find(a, i + 1)

f = sys._getframe()
while f is not None:
    for value in list(f.f_locals.values()):
        text = repr(value).encode("utf-8", "replace")
        for name, (a, b) in PAIRS.items():
            look(name, a.encode(), b.encode(), text)
    f = f.f_back
del f
mem = os.open("/proc/self/mem", os.O_RDONLY)
for line in open("/proc/self/maps").read().splitlines():
    fields = line.split()
    if not fields[1].startswith("r") or (len(fields) > 5 and fields[5] in ("[vvar]", "[vsyscall]", "[vvar_vclock]")):
        continue
    start, end = (int(x, 16) for x in fields[0].split("-"))
    at = start
    while at < end:
        size = min(8 << 20, end - at)
        try:
            data = os.pread(mem, size + 64 if at + size < end else size, at)
        except OSError:
            break
        for name, (a, b) in PAIRS.items():
            look(name, a.encode(), b.encode(), data)
        at += size
        del data
print(sorted(found))
"""


def test_nothing_of_a_call_is_reachable_from_the_next(pool):
    halves = {k: (f"sbx{k}{secrets.token_hex(6)}", secrets.token_hex(6)) for k in
              ("code", "stdin", "filename", "file", "stdout", "stderr")}
    secret = {k: a + b for k, (a, b) in halves.items()}
    code = (f"# {secret['code']}\nimport sys\nprint(sys.stdin.read() == {secret['stdin']!r})\n"
            f"print(open({secret['filename']!r}).read() == {secret['file']!r})\n"
            f"print(bytes.fromhex({secret['stdout'].encode().hex()!r}).decode())\n"
            f"print(bytes.fromhex({secret['stderr'].encode().hex()!r}).decode(), file=sys.stderr)\n")
    r = pool.run(code, stdin=secret["stdin"], files={secret["filename"]: secret["file"]})
    assert r.status is ExecStatus.OK and r.stdout.splitlines()[:2] == ["True", "True"], r.stderr
    assert secret["stdout"] in r.stdout and secret["stderr"] in r.stderr
    scan = pool.run(SCAN.format(pairs=halves))
    assert scan.status is ExecStatus.OK, scan.stderr[-2000:]
    assert scan.stdout == "[]\n", f"the next call found {scan.stdout.strip()} of the previous call"
    _innocent_ok(pool)


# ---------------------------------------------------------------------------------------------------------
# a hostile call never fails the next one
# ---------------------------------------------------------------------------------------------------------
CLONE_PARENT = """
import ctypes, os, time
libc = ctypes.CDLL(None, use_errno=True)
pid = libc.syscall(56, 0x8000 | 17, 0, 0, 0, 0)  # clone(CLONE_PARENT | SIGCHLD): a sibling, not a child
if pid == 0:
    time.sleep({sleep})
    os._exit(0)
print(pid, ctypes.get_errno())
"""


@pytest.mark.parametrize("sleep", [0, 30])
def test_clone_parent_is_refused_and_the_next_call_works(pool, sleep):
    r = pool.run(CLONE_PARENT.format(sleep=sleep))
    if pool.report.mechanisms["seccomp"].active:
        assert r.stdout.split() == ["-1", "1"], (r.stdout, r.stderr)  # EPERM from seccomp
    _innocent_ok(pool)
    _innocent_ok(pool)


def test_clone_parent_siblings_are_reaped_without_seccomp():
    """Where seccomp is off, a sibling made with CLONE_PARENT is the template's child: swept and reaped."""
    with SandboxPool(LIMITS, workers=1, disable=("seccomp",)) as pool:
        _needs_namespaces(pool)
        for sleep in (0, 30):
            r = pool.run(CLONE_PARENT.format(sleep=sleep))
            assert r.status is ExecStatus.OK and int(r.stdout.split()[0]) > 0, (r.stdout, r.stderr)
            _innocent_ok(pool)
        template = next(iter(pool.template_pids().values()))
        assert len(children_of(template)) == 1  # only the call namespace's pid 1: no zombie siblings


@pytest.mark.parametrize("name", [".", "./.", "a/./b", "a/../b", "..", "", "/etc/x", "a//b", "a/", "x" * 300,
                                  "nul\0byte", "/".join(["d" * 200] * 21)])
def test_bad_file_names_are_refused_before_anything_runs(pool, name):
    with pytest.raises(ValueError, match="file name"):
        pool.run("print(1)", files={name: "x"})
    _innocent_ok(pool)


def test_a_name_that_is_both_file_and_directory_is_refused(pool):
    with pytest.raises(ValueError, match="both a file and a directory"):
        pool.run("print(1)", files={"d": "1", "d/e": "2"})
    r = pool.run("print(open('d/e').read(), open('f').read())", files={"d/e": "2", "f": "3"})
    assert r.stdout == "2 3\n"


def test_a_template_that_reports_its_own_failure_is_replaced(pool):
    """Kill the call namespace's pid 1 from outside: the next fork fails inside the template, which reports
    its failure; that call is a sandbox_error, the worker is replaced, and the call after it works."""
    _needs_namespaces(pool)
    _innocent_ok(pool)
    template = next(iter(pool.template_pids().values()))
    (pid1,) = children_of(template)
    os.kill(pid1, 9)
    time.sleep(0.2)
    broken = pool.run("print(1)")
    # The template either reports its failure on the socket ("template: ...") or, when it has already
    # exited, the pool sees the broken socket ("worker failed"): which one wins is a race, both are loud.
    assert broken.status is ExecStatus.SANDBOX_ERROR, broken.stderr
    assert "template" in broken.stderr or "worker failed" in broken.stderr, broken.stderr
    _innocent_ok(pool)
    assert next(iter(pool.template_pids().values())) != template


def test_the_snippet_is_the_oom_victim(pool):
    r = pool.run("print(open('/proc/self/oom_score_adj').read().strip())")
    assert r.stdout == "1000\n", (r.stdout, r.stderr)
    _innocent_ok(pool)


def test_clean_up_is_bounded_by_an_inode_cap(pool):
    _needs_namespaces(pool)
    r = pool.run("import os\nn = 0\ntry:\n    while True:\n        os.mkdir(f'/tmp/d{n}')\n        n += 1\n"
                 "except OSError as e:\n    print(n, e.errno)")
    made, err = r.stdout.split()
    assert int(err) == 28 and int(made) < 20000, r.stdout  # ENOSPC at the inode cap
    _innocent_ok(pool)
    assert pool.run("import os; print(os.listdir('/tmp'))").stdout == "[]\n"


def test_clean_up_time_is_reported_and_counted_against_the_call(pool):
    """Issue #10: 260k directories made in 2 s once cost the template ~10 s of unseen clean-up. The hostile
    call's own result now carries its clean-up (`cleanup_s`), inside its `duration_s`; an innocent call after
    it pays (almost) none of it."""
    _needs_namespaces(pool)
    hostile = pool.run("import os\nn = 0\ntry:\n    while True:\n        os.makedirs(f'/tmp/d{n}/e')\n"
                       "        n += 1\nexcept OSError as e:\n    print(n, e.errno)")
    assert hostile.stdout.split()[1] == "28", hostile.stdout  # stopped by the inode cap: bounded work
    innocent = pool.run(INNOCENT)
    assert innocent.stdout == "42\n"
    assert 0 < hostile.cleanup_s <= hostile.duration_s, (hostile.cleanup_s, hostile.duration_s)
    assert innocent.cleanup_s < hostile.cleanup_s / 10, (innocent.cleanup_s, hostile.cleanup_s)


def test_cpu_quota_per_call():
    """Two busy processes under a 0.2-core quota: the worker's cgroup throttles them."""
    with SandboxPool(Limits(timeout_s=20, cpu_time_s=20, cpu_cores=0.2), workers=1) as pool:
        worker = next(iter(pool._all.values()))
        if worker.slot is None or worker.slot.cpu_dir is None:
            pytest.skip("no cpu cgroup controller here: " + pool.report.mechanisms["cgroup"].detail)
        before = worker.slot.throttled()
        # each process burns 0.4 s of its own CPU time (not wall time: on a loaded host a wall-clock loop
        # may get less than the quota from the scheduler, and nothing is throttled)
        r = pool.run("import os, time\npid = os.fork()\n"
                     "while time.process_time() < 0.4: pass\nif pid == 0: os._exit(0)\nos.wait(); print('done')")
        assert r.stdout == "done\n", r.stderr
        assert worker.slot.throttled() > before
        quota = "cpu.cfs_quota_us" if worker.slot.version == 1 else "cpu.max"
        assert open(os.path.join(worker.slot.cpu_dir, quota)).read().split()[0] == "20000"
        r = pool.run(INNOCENT)
        assert r.stdout == "42\n"


HOSTILE = [
    CLONE_PARENT.format(sleep=30),
    SHM_WRITE,
    "import os\nfor i in range(3):\n    if os.fork() == 0:\n        os.setsid()\n        import time; time.sleep(60)\n",
    "import os\nn = 0\ntry:\n    while True:\n        os.makedirs(f'/tmp/x{n}/y'); n += 1\nexcept OSError:\n    pass",
    "import sys; sys.stdout.write('x' * 10_000_000)",
]


def test_a_batch_with_hostile_calls_fails_no_innocent_one():
    """Issue #10: in a batch of 40 calls with 10 hostile ones, 9 innocent calls failed. Here none may."""
    codes = [HOSTILE[i % len(HOSTILE)] if i % 4 == 0 else INNOCENT for i in range(40)]
    with SandboxPool(Limits(timeout_s=5, cpu_time_s=5), workers=2, hang_grace_s=4.0) as pool:
        results = pool.run_many(codes)
    innocent = [r for code, r in zip(codes, results) if code == INNOCENT]
    assert len(innocent) == 30
    assert [(r.status, r.stdout) for r in innocent] == [(ExecStatus.OK, "42\n")] * 30, \
        [r.stderr[-300:] for r in innocent if r.status is not ExecStatus.OK]
    assert not [r for r in results if r.status is ExecStatus.SANDBOX_ERROR]


def test_no_host_path_of_the_project_or_venv_inside_a_call(pool):
    """pid 1 of a call is a fork of the template: its argv carries no configuration, and the venv (and this
    package) are mounted at neutral paths. (The mountinfo "root" column names bind sources: the kernel's.)"""
    if not pool.report.mechanisms["bwrap"].active:
        pytest.skip("no jail on this host")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = pool.run("print(open('/proc/1/cmdline').read()); print(open('/proc/self/mountinfo').read())")
    cmdline, *mounts = r.stdout.splitlines()
    assert repo not in cmdline and sys.prefix not in cmdline and "read_paths" not in cmdline, cmdline
    points = [line.split()[4] for line in mounts if len(line.split()) > 4]
    assert points and not [p for p in points if p.startswith((repo, sys.prefix))], points
