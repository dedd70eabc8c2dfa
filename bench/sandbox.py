"""Sandbox throughput and latency against the naive baseline, measured in the same run.

Baseline: a fresh `python3 -I -c` subprocess per call that applies the same rlimits before running the code
(what a tool runtime without a warm template does). Both sides run the same snippets; the table reports
calls/s (serial and concurrent), p50/p99 latency, the sandbox/baseline ratios, and CPU per call summed
over every process involved (baseline: its reaped children; sandbox: the workers' process trees moved
into a cgroup v1 cpuacct group when we may make one), which shared or busy machines do not distort.

    .venv/bin/python bench/sandbox.py                # defaults: 200 trivial calls, 60 numpy+sympy calls
    .venv/bin/python bench/sandbox.py --calls 100 --heavy-calls 30 --workers 4
    .venv/bin/python bench/sandbox.py --repeats 5    # + a mean and 95% interval (t over repeats) per metric

With `--repeats R` the whole measurement (sandbox, then baseline, both snippets) runs R times in one pool;
each repeat gives one p50 per side and one ratio, and the summary reports their mean with a 95% Student-t
interval over the R repeats (repeats are the independent unit; calls within one repeat are not).
"""
from __future__ import annotations

import argparse
import functools
import os
import resource
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sandbox import Limits, SandboxPool  # noqa: E402
from sandbox.host.pool import default_workers  # noqa: E402

SNIPPETS = {
    "trivial": "print(sum(range(1000)))",
    "numpy+sympy": "import numpy, sympy\nprint(int(numpy.arange(10).sum()), sympy.factorint(360))",
}

# The baseline applies the sandbox's rlimits in the fresh interpreter, then runs the snippet.
NAIVE_PRELUDE = """import resource as _r
_mb = 1024 * 1024
for _k, _v in ((_r.RLIMIT_AS, {mem} * _mb), (_r.RLIMIT_CPU, {cpu}), (_r.RLIMIT_NPROC, {nproc}),
               (_r.RLIMIT_NOFILE, {nofile}), (_r.RLIMIT_FSIZE, int({fsize} * _mb)), (_r.RLIMIT_CORE, 0)):
    _r.setrlimit(_k, (_v, _v))
exec(compile({code!r}, "<snippet>", "exec"))
"""


def naive_call(code: str, limits: Limits) -> tuple[float, str]:
    wrapped = NAIVE_PRELUDE.format(mem=limits.memory_mb, cpu=int(limits.cpu_time_s), nproc=limits.max_processes,
                                   nofile=limits.max_open_files, fsize=limits.max_file_size_mb, code=code)
    env = {"PATH": "/usr/bin:/bin", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "LANG": "C.UTF-8"}
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-I", "-c", wrapped], capture_output=True, text=True, env=env,
                         timeout=limits.timeout_s + 60)
    took = time.perf_counter() - t
    if out.returncode != 0:
        raise RuntimeError(f"baseline call failed: {out.stderr[-500:]}")
    return took, out.stdout


def sandbox_call(pool: SandboxPool, code: str) -> tuple[float, str]:
    t = time.perf_counter()
    r = pool.run(code)
    took = time.perf_counter() - t
    if not r.ok:
        raise RuntimeError(f"sandbox call failed: {r.status} {r.stderr[-500:]}")
    return took, r.stdout


class CpuMeter:
    """CPU seconds used by a set of process trees: a cpuacct cgroup (v1, root) they are moved into."""

    def __init__(self, pids: list[int]):
        self.dir = f"/sys/fs/cgroup/cpuacct/sandbox-bench-{os.getpid()}"
        try:
            os.makedirs(self.dir, exist_ok=True)
            for pid in pids:
                with open(f"{self.dir}/cgroup.procs", "w") as f:
                    f.write(str(pid))
        except OSError:
            self.dir = None

    def seconds(self) -> float | None:
        if self.dir is None:
            return None
        with open(f"{self.dir}/cpuacct.usage") as f:
            return int(f.read()) / 1e9

    def close(self) -> None:
        if self.dir is None:
            return
        with open(f"{self.dir}/cgroup.procs") as f:
            pids = f.read().split()
        for pid in pids:  # back to the parent group, so the directory can go
            try:
                with open("/sys/fs/cgroup/cpuacct/cgroup.procs", "w") as f:
                    f.write(pid)
            except OSError:
                pass
        try:
            os.rmdir(self.dir)
        except OSError:
            pass


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1f}"


def measure(call, n: int, concurrency: int, cpu=None) -> dict:
    """Serial: n calls in a row (latency percentiles, calls/s). Concurrent: n calls from `concurrency` threads."""
    call()  # warm-up (page cache, first fork)
    lat = []
    cpu0 = cpu() if cpu else None
    t = time.perf_counter()
    for _ in range(n):
        lat.append(call()[0])
    serial_s = time.perf_counter() - t
    cpu_ms = 1000 * (cpu() - cpu0) / n if cpu and cpu0 is not None else None
    with ThreadPoolExecutor(concurrency) as ex:
        t = time.perf_counter()
        list(ex.map(lambda _: call(), range(n)))
        concurrent_s = time.perf_counter() - t
    lat.sort()
    return {"p50_ms": 1000 * statistics.median(lat), "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))],
            "serial_cps": n / serial_s, "concurrent_cps": n / concurrent_s, "cpu_ms": cpu_ms}


# two-sided 95% Student-t critical values by degrees of freedom (any statistics table; df > 30: normal)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
        20: 2.086, 25: 2.060, 30: 2.042}


def t_interval(values: list[float]) -> tuple[float, float, float]:
    """(mean, low, high): the 95% Student-t interval of the mean of independent repeats."""
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return mean, float("nan"), float("nan")
    df = n - 1
    t = T975.get(df) or (T975[max(k for k in T975 if k <= df)] if df <= 30 else 1.960)
    half = t * statistics.stdev(values) / n ** 0.5
    return mean, mean - half, mean + half


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=200, help="calls per measurement, trivial snippet")
    ap.add_argument("--heavy-calls", type=int, default=60, help="calls per measurement, numpy+sympy snippet")
    ap.add_argument("--workers", type=int, default=None, help="sandbox workers (default: from the machine)")
    ap.add_argument("--repeats", type=int, default=1, help="run the whole measurement this many times")
    args = ap.parse_args()
    limits = Limits(timeout_s=30, cpu_time_s=30)
    workers = args.workers or default_workers()
    load = os.getloadavg()[0]
    with SandboxPool(limits, workers=workers) as pool:
        print(f"# sandbox bench: {os.cpu_count()} cores, load {load:.1f}, {workers} workers, "
              f"isolation={pool.isolation}")
        print(f"# {pool.report.summary()}\n")
        meter = CpuMeter([pid for tree in pool.worker_processes().values() for pid in tree])
        sandbox_cpu = (lambda: meter.seconds() + self_cpu()) if meter.seconds() is not None else None
        repeats = []
        try:
            for _ in range(max(1, args.repeats)):
                rows = []
                for name, code in SNIPPETS.items():
                    n = args.calls if name == "trivial" else args.heavy_calls
                    sb = measure(functools.partial(sandbox_call, pool, code), n, workers, sandbox_cpu)
                    nv = measure(functools.partial(naive_call, code, limits), n, workers,
                                 lambda: children_cpu() + self_cpu())
                    rows.append((name, sb, nv))
                repeats.append(rows)
                if args.repeats > 1:
                    print("# repeat", len(repeats), " ".join(f"{nm}: {s['p50_ms']:.1f} vs {b['p50_ms']:.1f} ms"
                                                             for nm, s, b in rows), flush=True)
        finally:
            meter.close()
    rows = repeats[-1]
    print("| snippet | runtime | p50 ms | p99 ms | serial calls/s | concurrent calls/s | CPU ms/call |")
    print("|---|---|---|---|---|---|---|")
    for name, sb, nv in rows:
        for label, m in (("sandbox", sb), ("fresh python3 -c", nv)):
            print(f"| {name} | {label} | {m['p50_ms']:.1f} | {m['p99_ms']:.1f} | {m['serial_cps']:.1f} | "
                  f"{m['concurrent_cps']:.1f} | {fmt(m['cpu_ms'])} |")
        cpu_ratio = f"{nv['cpu_ms'] / sb['cpu_ms']:.1f}x less" if sb["cpu_ms"] and nv["cpu_ms"] else "n/a"
        print(f"| {name} | **ratio** | {nv['p50_ms'] / sb['p50_ms']:.1f}x faster | "
              f"{nv['p99_ms'] / sb['p99_ms']:.1f}x faster | {sb['serial_cps'] / nv['serial_cps']:.1f}x | "
              f"{sb['concurrent_cps'] / nv['concurrent_cps']:.1f}x | {cpu_ratio} |")
    if len(repeats) > 1:
        print(f"\n{len(repeats)} repeats: mean [95% t interval] over repeats\n")
        print("| snippet | sandbox p50 ms | fresh subprocess p50 ms | p50 ratio | serial calls/s ratio | "
              "concurrent calls/s ratio |")
        print("|---|---|---|---|---|---|")
        for i, (name, _, _) in enumerate(rows):
            per = [r[i] for r in repeats]
            cols = [[s["p50_ms"] for _, s, _ in per], [b["p50_ms"] for _, _, b in per],
                    [b["p50_ms"] / s["p50_ms"] for _, s, b in per],
                    [s["serial_cps"] / b["serial_cps"] for _, s, b in per],
                    [s["concurrent_cps"] / b["concurrent_cps"] for _, s, b in per]]
            cells = ["{:.1f} [{:.1f}, {:.1f}]".format(*t_interval(c)) for c in cols]
            print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"\n# load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
